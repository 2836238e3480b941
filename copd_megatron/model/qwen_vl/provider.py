"""Qwen3-VL / Qwen2.5-VL as model providers (``model.arch: qwen3_vl`` / ``qwen2_5_vl``).

The provider turns a micro-batch of token ids plus the ragged ``media`` field (one dict per
row from ``data/qwen_media.py``, ``{}`` for a text row) into the model's inputs:

* **positions**: one :class:`~copd_megatron.model.qwen_vl.rope.PositionStream` per row walks
  its tokens and the merged grids of its images / videos in prompt order and gives mRoPE ids
  ``[3, b, s]`` (equal to transformers' ``get_rope_index`` on whole rows). Every pipeline stage
  computes them: each needs the rotary angles, and they cost a few list operations per row.
* **vision tokens** (first stage): the distinct media entries of the micro-batch are encoded
  once (the G rollouts of a prompt share one dict, so their images go through the ViT once) and
  placeholder k of row r takes token ``start[r] + skip[r] + k`` of the encoded output, DeepStack
  features alike. A row cut short inside its prompt (``Batch.micro_batches`` trims after the
  last response token of the micro-batch) simply uses the first placeholders.
* **KV-cached decoding** (the Megatron rollout engine): a window at ``offset`` 0 starts a new
  batch of sequences, whose images are encoded once and whose position streams and consumed
  placeholder counts are kept in the inference context (``copd_qwen``); later windows, prompt
  tokens of longer prompts or sampled tokens alike, continue them. So the engine's prefill to
  the shortest prompt, followed by per-step prompt tokens, places every image token right.

Placeholder ids are never sampled (``never_sample``). ``model.vision.freeze_vision`` keeps the
ViT fixed, ``freeze_projector`` the patch mergers (DeepStack mergers included).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from copd_megatron.config.layout import padded_vocab_size
from copd_megatron.config.schema import ModelConfig, ParallelConfig, PrecisionConfig
from copd_megatron.data.batch import MicroBatch
from copd_megatron.model.provider import register_provider, stage_flags, unwrap
from copd_megatron.model.qwen_vl.language import configure_language
from copd_megatron.model.qwen_vl.model import QwenVLModel, RowVision
from copd_megatron.model.qwen_vl.rope import PositionStream, row_blocks


@dataclass
class _DecodeState:
    """What a KV-cached decode keeps between windows (on the inference context)."""

    streams: list[PositionStream]
    vision: RowVision | None  # skip = placeholders consumed by earlier windows


@register_provider("qwen3_vl")
@register_provider("qwen2_5_vl")
class QwenVLProvider:
    """Qwen3-VL / Qwen2.5-VL (``QwenVLModel``: Qwen ViT + GPTModel with mRoPE) as a model provider."""

    fields: tuple[str, ...] = ("media",)

    def __init__(self, model_cfg: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, tcfg=None) -> None:
        from copd_megatron.model.build import transformer_config

        if model_cfg.vision is None:
            raise ValueError(f"model.arch {model_cfg.arch!r} needs model.vision")
        self.model_cfg, self.parallel, self.precision = model_cfg, parallel, precision
        self.tcfg = tcfg or transformer_config(model_cfg, parallel, precision)
        configure_language(self.tcfg, model_cfg)
        v = model_cfg.vision
        self.never_sample = (v.image_token_id, v.video_token_id)

    def build_chunks(self, groups) -> list:
        """This rank's chunks (one per virtual pipeline stage); the tower lives with the embedding."""
        m, p = self.model_cfg, self.parallel
        vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, p.tp)
        chunks = []
        for vp_stage in range(p.vpp or 1):
            vp = vp_stage if p.vpp else None
            pre, post = stage_flags(groups, vp, p.vpp)
            chunk = QwenVLModel(m, self.tcfg, vocab=vocab, fp8=self.precision.fp8, pre_process=pre, post_process=post,
                                vp_stage=vp, pg_collection=groups.pg_collection)  # fmt: skip
            _freeze(chunk, m.vision.freeze_vision, m.vision.freeze_projector)
            chunks.append(chunk)
        return chunks

    def forward(self, chunk, mb: MicroBatch, *, inference_context=None, with_labels: bool = False):
        model = unwrap(chunk)
        ctx = inference_context
        state = getattr(ctx, "copd_qwen", None) if ctx is not None else None
        if state is None or mb.offset == 0:
            state = _DecodeState(self._streams(mb), self._vision(model, mb, encode=ctx is not None))
            if ctx is not None:
                ctx.copd_qwen = state
        is_ph = torch.isin(mb.tokens, torch.tensor(self.never_sample, device=mb.tokens.device))
        if mb.position_ids is not None and mb.position_ids.dim() == 3:  # caller-given mRoPE ids
            ids = mb.position_ids
        else:
            flags = is_ph.cpu()
            ids = torch.stack([s.advance(flags[r]) for r, s in enumerate(state.streams)], dim=1)
        vision = state.vision
        if vision is not None and ctx is not None:  # this window's view; the next one starts after it
            state.vision = RowVision(vision.patches, vision.grid_thw, vision.start, vision.count,
                                     vision.skip + is_ph.sum(dim=1).cpu(), vision.encoded)  # fmt: skip
        labels = mb.labels if with_labels else None
        return chunk(mb.tokens, ids.to(mb.tokens.device), None, labels=labels, inference_context=ctx, vision=vision)

    def _rows(self, mb: MicroBatch) -> list[dict]:
        media = mb.fields.get("media") or [None] * mb.tokens.shape[0]
        return [m if m and m.get("patches") is not None else {} for m in media]

    def _streams(self, mb: MicroBatch) -> list[PositionStream]:
        v = self.model_cfg.vision
        out = []
        for m in self._rows(mb):
            blocks = row_blocks(m["grid_thw"], m["video"], m["seconds"], v.spatial_merge_size, self.model_cfg.arch,
                                v.tokens_per_second) if m else []  # fmt: skip
            out.append(PositionStream(blocks))
        return out

    def _vision(self, model: QwenVLModel, mb: MicroBatch, *, encode: bool) -> RowVision | None:
        """The micro-batch's distinct media packed for the first stage (None elsewhere or without media);
        ``encode``: run the tower now (a decode encodes once for all its windows)."""
        rows = self._rows(mb)
        if not model.pre_process or not any(rows):
            return None
        merge = self.model_cfg.vision.spatial_merge_size**2
        unique: dict[int, int] = {}  # id(patches) -> index of its first vision token
        patches, grids, start, count, total = [], [], [], [], 0
        for m in rows:
            if not m:
                start.append(0)
                count.append(0)
                continue
            key = id(m["patches"])
            n = int((m["grid_thw"].prod(-1) // merge).sum())
            if key not in unique:
                unique[key] = total
                patches.append(m["patches"])
                grids.append(m["grid_thw"])
                total += n
            start.append(unique[key])
            count.append(n)
        vision = RowVision(torch.cat(patches), torch.cat(grids), torch.tensor(start), torch.tensor(count),
                           torch.zeros(len(rows), dtype=torch.long))  # fmt: skip
        if encode:
            vision.encoded = model.encode(vision.patches, vision.grid_thw)
        return vision


def _freeze(chunk: QwenVLModel, vision: bool, mergers: bool) -> None:
    """No gradients (hence no optimizer state) for the ViT body and/or its patch mergers."""
    tower = getattr(chunk, "vision_model", None)
    if tower is None:
        return
    for name, param in tower.named_parameters():
        is_merger = name.startswith(("merger.", "deepstack_mergers."))
        if (mergers if is_merger else vision):
            param.requires_grad_(False)
