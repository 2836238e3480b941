"""Megatron-native rollouts of a vision-language model: prefill with image vectors, then KV cache.

The text engine (``megatron_engine``) prefills a batch up to its shortest prompt and then
advances one position per step, feeding prompt tokens to rows whose prompt is longer. Here
each prompt also carries its images (and video frames) as ``[n, 3, H, W]`` pixels, and its
token ids carry ``tokens_per_image`` placeholders per image. The images are encoded once per
``generate`` call on the first pipeline stage (ViT + projector); every forward then receives,
for each row, how many of its placeholders precede the window (``skip``), so the vectors land
at the right positions whether a placeholder is reached in the prefill or in a later step.
Once written, image positions live in the KV cache like any other token. Placeholder ids are
never sampled (−inf logits), so responses never ask for an image that does not exist.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from copd_megatron.config.schema import VisionConfig
from copd_megatron.data.media import encode_multimodal_prompt, load_media
from copd_megatron.data.prompts import PromptSample
from copd_megatron.model.vlm import VisionInputs
from copd_megatron.rollout.engine import register_engine
from copd_megatron.rollout.megatron_engine import MegatronEngine, _unwrap
from copd_megatron.rollout.types import RolloutBatch, SamplingParams


class VLMEngine(MegatronEngine):
    """Generate with a single-chunk vision-language model (``model/vlm.py``) on this rank."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, vision: VisionConfig, pad_id: int = 0,
                 decode: Callable[[list[int]], str] | None = None, use_kv_cache: bool = True) -> None:  # fmt: skip
        super().__init__(model, vocab_size, pad_id, decode, use_kv_cache)
        self.vision = vision
        self.placeholders = sorted({vision.image_token_id, vision.video_id})
        if pad_id in self.placeholders:
            raise ValueError(f"pad id {pad_id} is an image placeholder id; the tokenizer's pad must differ")
        self.banned_ids = tuple(self.placeholders)
        self._prompts: list[list[int]] = []
        self._inputs: Optional[VisionInputs] = None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams,
                 media: Optional[Sequence[Optional[torch.Tensor]]] = None) -> RolloutBatch:  # fmt: skip
        """``media[i]``: prompt ``i``'s images / frames ``[n_i, 3, H, W]`` in placeholder order
        (None: a text prompt). Placeholder counts must match, or a ValueError names the prompt."""
        media = list(media) if media is not None else [None] * len(prompts)
        if len(media) != len(prompts):
            raise ValueError(f"generate: {len(media)} media entries for {len(prompts)} prompts")
        per_image = self.vision.tokens_per_image
        for i, (p, m) in enumerate(zip(prompts, media)):
            have, want = sum(t in self.placeholders for t in p), (0 if m is None else int(m.shape[0])) * per_image
            if have != want:
                raise ValueError(f"prompt {i}: {have} image placeholder tokens, its {want // per_image} images "
                                 f"need {want} ({per_image} per image)")  # fmt: skip
        shape = (3, self.vision.image_height, self.vision.image_width)
        self._prompts, self._inputs = prompts, VisionInputs.from_rows(media, shape)
        try:
            return super().generate(prompts, params)
        finally:
            self._prompts, self._inputs = [], None

    def prepare(self, tokenizer, samples: Sequence[PromptSample]) -> tuple[list[list[int]], list]:
        """Prompt ids (placeholders expanded) and pixels of ``samples`` whose media are resolved
        (``data.media.resolve_row_media``; rows without media are text prompts)."""
        ids = [encode_multimodal_prompt(tokenizer, s, self.vision) for s in samples]
        media = [load_media(s, self.vision) for s in samples]
        return ids, [None if m is None else m.pixels for m in media]

    def _step_inputs(self, offset: int, length: int) -> dict:
        vi = self._inputs
        if vi is None or int(vi.counts.sum()) == 0:
            return {}
        model = _unwrap(self.model)
        if not model.pre_process:
            return {}  # later pipeline stages receive hidden states, not tokens
        if vi.embeddings is None:  # encode every image once per generate call (model is in eval mode)
            vi.embeddings = model.encode_images(vi.pixels)
        ids = set(self.placeholders)
        skip = torch.tensor([sum(t in ids for t in p[:offset]) for p in self._prompts], dtype=torch.long)
        return {"vision": vi.window(skip)}


@register_engine("megatron_vlm")
def make_vlm_engine(model, vocab_size: int, vision: VisionConfig, pad_id: int = 0, decode=None,
                    use_kv_cache: bool = True) -> VLMEngine:  # fmt: skip
    return VLMEngine(model, vocab_size, vision, pad_id, decode, use_kv_cache)
