"""Supervised fine-tuning micro-batches whose rows may carry images and video frames.

Rows are ``prompt (placeholders expanded) + target + eos`` with the loss on target + eos, as in
``training/sft.py``; each row's media (``data.media.prompt_inputs``: ``{"pixels": [n, 3, H, W]}``,
or ``{}`` for a text row) is the batch's ragged ``media`` field, so ``Batch.micro_batches`` keeps
every image with its row and the model provider finds it there. Used to make a vision-language
base (``tools/make_base.py --vision``).
"""

from __future__ import annotations

from typing import Sequence

import torch

from copd_megatron.data.batch import RAGGED, TARGET, Batch, MicroBatch
from copd_megatron.data.media import prompt_inputs
from copd_megatron.data.prompts import PromptSample


def sft_media_microbatches(tokenizer, samples: Sequence[PromptSample], targets: Sequence[str], micro_batch_size: int,
                           pad_id: int) -> list[MicroBatch]:  # fmt: skip
    """Right-padded micro-batches of a fixed length (pipeline stages need equal shapes)."""
    rows, masks, media = [], [], []
    for s, target in zip(samples, targets, strict=True):
        ids, m = prompt_inputs(tokenizer, s)
        t = tokenizer.encode(target) + [tokenizer.eos_id]
        rows.append(ids + t)
        masks.append([0] * len(ids) + [1] * len(t))
        media.append(m)
    length = max(len(r) for r in rows)
    tokens = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length)
    for i, (r, m) in enumerate(zip(rows, masks)):
        tokens[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    batch = Batch(tokens).set("loss_mask", mask[:, 1:].contiguous(), TARGET).set("media", media, RAGGED)
    return batch.micro_batches(micro_batch_size, trim=False)
