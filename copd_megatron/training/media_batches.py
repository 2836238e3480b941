"""Micro-batches whose rows carry images and video frames (a ragged per-row field).

Token fields are right-padded to one length (pipeline stages need equal shapes); the pixels of
each row stay whole and travel with their row: a micro-batch of rows ``i..j`` gets exactly
those rows' images, packed by ``VisionInputs.from_rows`` (``model/vlm.py``) in row order, so
splitting a batch into micro-batches, or over data-parallel ranks, never separates an image
from its placeholders. Used for supervised fine-tuning of a vision-language base
(``tools/make_base.py``): loss on the target tokens only, as in ``training/sft.py``.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from copd_megatron.config.schema import VisionConfig
from copd_megatron.data.media import encode_multimodal_prompt, load_media
from copd_megatron.data.prompts import PromptSample
from copd_megatron.model.vlm import VisionInputs
from copd_megatron.training.step import MicroBatch


def media_microbatches(tokens: torch.Tensor, loss_mask: torch.Tensor, pixels: Sequence[Optional[torch.Tensor]],
                       vision: VisionConfig, micro_batch_size: int) -> list[MicroBatch]:  # fmt: skip
    """Split ``[n, L+1]`` token rows (with their per-row ``pixels``) into language-model
    micro-batches of ``micro_batch_size`` rows, each with its rows' images."""
    shape = (3, vision.image_height, vision.image_width)
    out = []
    for i in range(0, tokens.shape[0], micro_batch_size):
        mb = MicroBatch.from_tokens(tokens[i : i + micro_batch_size], loss_mask[i : i + micro_batch_size])
        mb.inputs["vision"] = VisionInputs.from_rows(list(pixels[i : i + micro_batch_size]), shape)
        out.append(mb)
    return out


def sft_media_microbatches(tokenizer, samples: Sequence[PromptSample], targets: Sequence[str], vision: VisionConfig,
                           micro_batch_size: int, pad_id: int) -> list[MicroBatch]:  # fmt: skip
    """``prompt (placeholders expanded) + target + eos`` rows, loss on target + eos; samples'
    media must be resolved (``data.media``). Rows without media are text rows."""
    rows, masks, pixels = [], [], []
    for s, target in zip(samples, targets, strict=True):
        p = encode_multimodal_prompt(tokenizer, s, vision)
        t = tokenizer.encode(target) + [tokenizer.eos_id]
        rows.append(p + t)
        masks.append([0] * len(p) + [1] * len(t))
        media = load_media(s, vision)
        pixels.append(None if media is None else media.pixels)
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    return media_microbatches(tokens, mask, pixels, vision, micro_batch_size)
