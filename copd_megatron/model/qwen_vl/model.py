"""Qwen3-VL / Qwen2.5-VL for Megatron-Core: one pipeline chunk = (vision tower on the first stage)
+ a slice of the language model.

One forward takes a micro-batch of token ids ``[b, s]`` plus the ragged vision inputs of its
samples, packed: ``pixel_values [Σ t·h·w, C·Tp·P·P]`` with ``image_grid_thw [n_images, 3]``
(and the same for videos), exactly what the Hugging Face processor produces. It returns
vocab-parallel logits ``[b, s, V/tp]`` on the last pipeline stage and hidden states
``[s, b, h]`` on the others (Megatron's convention), so the pipeline schedules, the losses and
the rollout engine treat it like a ``GPTModel``:

1. positions: mRoPE ids ``[3, b, s]`` from the token ids and grids (every stage computes
   them; they are cheap and every stage needs rotary angles), or the caller's ``position_ids``
   (``[b, s]`` text positions are broadcast to the three axes, which is ordinary RoPE);
2. first stage: the tower encodes all images and videos at once; its tokens replace the
   embeddings of the placeholder tokens in (batch, sequence) order, images first, as
   transformers' ``masked_scatter`` does; Qwen3-VL's DeepStack features ride along;
3. the language model (``language.py``).

KV-cached decoding (Megatron's ``StaticInferenceContext``): attention keeps un-rotated keys
and rotates all of them at every step with the angles of positions ``[0, end)``, so the model
keeps the mRoPE ids of the whole sequence on the context (``copd_mrope``) and extends them
by n + delta per generated token (``rope.decode_position_ids``), or by the ids the caller gives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.transformer.module import MegatronModule

from copd_megatron.config.schema import ModelConfig
from copd_megatron.model.qwen_vl.language import build_language_model
from copd_megatron.model.qwen_vl.rope import decode_position_ids, mrope_position_ids
from copd_megatron.model.qwen_vl.vision import VisionTower, vision_transformer_config


@dataclass
class RowVision:
    """The images and videos of a micro-batch as the model provider passes them: the patch rows
    of each distinct media entry once (rows of one prompt's group share them), and per row where
    its vision tokens start in the encoded output, how many it has and how many placeholders
    earlier windows of a KV-cached decode consumed (``skip``)."""

    patches: torch.Tensor  # [N, C·Tp·P·P] patch rows of the distinct media, in order
    grid_thw: torch.Tensor  # [n, 3] their grids, in the same order
    start: torch.Tensor  # [b] index of each row's first vision token in the encoded tokens
    count: torch.Tensor  # [b] vision tokens of each row (0: a text row)
    skip: torch.Tensor  # [b] placeholders of each row before this window
    encoded: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # (tokens, DeepStack features) computed earlier


@dataclass
class _MRopeCache:
    """mRoPE ids of every cached position of a static inference context, and each row's delta."""

    ids: torch.Tensor  # [3, max_batch, max_sequence]
    deltas: torch.Tensor  # [max_batch]


class QwenVLModel(MegatronModule):
    """One pipeline chunk of a Qwen-VL model (see the module docstring)."""

    def __init__(self, model: ModelConfig, config, *, vocab: int, fp8: str | None, pre_process: bool,
                 post_process: bool, vp_stage: int | None, pg_collection) -> None:  # fmt: skip
        from megatron.core.enums import ModelType

        super().__init__(config=config)
        assert model.vision is not None
        self.vision, self.arch = model.vision, model.arch
        self.model_type = ModelType.encoder_or_decoder  # what Megatron's schedules ask of a chunk
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.pg_collection = pg_collection
        self.share_embeddings_and_output_weights = model.tie_embeddings
        self.language_model = build_language_model(model, config, vocab, fp8, pre_process=pre_process,
                                                   post_process=post_process, vp_stage=vp_stage,
                                                   pg_collection=pg_collection)  # fmt: skip
        if pre_process:
            self.vision_model = VisionTower(model, vision_transformer_config(model, config), pg_collection)

    # -- what pipeline schedules, DDP and finalize_model_grads ask of a model chunk
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None, *, pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None, second_per_grid_ts: torch.Tensor | None = None,
        inference_context=None, labels: torch.Tensor | None = None, vision: RowVision | None = None,
        runtime_gather_output=None,
    ) -> torch.Tensor:  # fmt: skip
        """Logits ``[b, s, V/tp]`` (last stage) or hidden states ``[s, b, h]`` for ``input_ids [b, s]``;
        with ``labels`` the last stage returns ``GPTModel``'s per-token cross-entropy ``[b, s]``.
        Vision inputs come either as transformers' keyword arguments or (the model provider's
        path) as ``vision``, with ``position_ids [3, b, s]`` computed by the provider."""
        positions = self.positions(input_ids, position_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                   inference_context)  # fmt: skip
        decoder_input, deepstack = None, None
        if self.pre_process and vision is not None:
            decoder_input, deepstack = self.embed_rows(input_ids, vision)
        elif self.pre_process:
            decoder_input, deepstack = self.embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos,
                                                  video_grid_thw)  # fmt: skip
        return self.language_model(
            input_ids, positions, attention_mask, decoder_input=decoder_input, inference_context=inference_context,
            labels=labels, extra_block_kwargs={"context": deepstack} if deepstack is not None else None,
        )  # fmt: skip

    def positions(self, input_ids, position_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                  inference_context) -> torch.Tensor:  # fmt: skip
        """mRoPE ids ``[3, b, s]`` of this call's tokens, or of the whole cached prefix when decoding."""
        v = self.vision
        b, s = input_ids.shape
        start = inference_context.sequence_len_offset if inference_context is not None else 0
        deltas = None
        if position_ids is not None:
            ids = position_ids if position_ids.dim() == 3 else position_ids.unsqueeze(0).expand(3, -1, -1)
        elif start == 0:
            ids, deltas = mrope_position_ids(
                input_ids.cpu(), image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                image_token_id=v.image_token_id, video_token_id=v.video_token_id,
                spatial_merge_size=v.spatial_merge_size, family=self.arch, tokens_per_second=v.tokens_per_second,
                second_per_grid_ts=second_per_grid_ts.cpu() if second_per_grid_ts is not None else None,
            )  # fmt: skip
        else:
            cache = getattr(inference_context, "copd_mrope", None)
            if cache is None:
                raise ValueError("decoding without position_ids needs the prefill to run through this model first")
            row = inference_context.batch_size_offset
            ids = decode_position_ids(start, s, cache.deltas[row : row + b])
        ids = ids.to(input_ids.device)
        if inference_context is None:
            return ids
        return self._cache_positions(inference_context, ids, deltas, start, b, s)

    @staticmethod
    def _cache_positions(ctx, ids: torch.Tensor, deltas, start: int, b: int, s: int) -> torch.Tensor:
        cache = getattr(ctx, "copd_mrope", None)
        if cache is None or start == 0 and ctx.batch_size_offset == 0:
            shape = (3, ctx.max_batch_size, ctx.max_sequence_length)
            cache = ctx.copd_mrope = _MRopeCache(ids.new_zeros(shape), ids.new_zeros(ctx.max_batch_size))
        row = ctx.batch_size_offset
        cache.ids[:, row : row + b, start : start + s] = ids
        if deltas is None:  # caller-given ids: later tokens continue after the largest (as get_rope_index's delta)
            deltas = ids.amax(dim=(0, 2)) + 1 - (start + s)
        cache.deltas[row : row + b] = deltas.to(cache.deltas.device)
        return cache.ids[:, row : row + b, : start + s]

    def embed(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        """Decoder input ``[s, b, h]`` with vision tokens in place, and the DeepStack carrier
        ``[s, b, k, h]`` (None without vision inputs or DeepStack)."""
        from megatron.core import tensor_parallel

        v = self.vision
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        inputs = [self._check_placeholders(input_ids, kind, px, g)
                  for kind, px, g in (("image", pixel_values, image_grid_thw),
                                      ("video", pixel_values_videos, video_grid_thw))]  # fmt: skip
        inputs = [x for x in inputs if x is not None]
        deepstack = None
        if inputs:
            pixels = torch.cat([px for _, px, _ in inputs])
            grids = torch.cat([g for _, _, g in inputs])
            tokens, deep = self.vision_model(pixels, grids)
            x = emb.transpose(0, 1)  # [b, s, h]: placeholders are filled in (batch, sequence) order
            carrier = x.new_zeros(*x.shape[:2], len(deep), x.shape[-1]) if deep else None
            offset = 0
            for mask, _, g in inputs:
                n = int((g.prod(-1) // v.spatial_merge_size**2).sum())
                x = x.masked_scatter(mask[..., None], tokens[offset : offset + n].to(x.dtype))
                if carrier is not None:
                    feats = torch.stack([d[offset : offset + n] for d in deep], dim=1).to(x.dtype)
                    carrier = carrier.masked_scatter(mask[..., None, None], feats)
                offset += n
            emb = x.transpose(0, 1).contiguous()
            deepstack = carrier.transpose(0, 1).contiguous() if carrier is not None else None
        if self.config.sequence_parallel:  # the embedding itself does not scatter (see language.py)
            emb = tensor_parallel.scatter_to_sequence_parallel_region(emb)
            if deepstack is not None:
                deepstack = tensor_parallel.scatter_to_sequence_parallel_region(deepstack)
        return emb, deepstack

    def encode(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Language-model tokens ``[Σ t·h·w/m², h]`` and DeepStack features of packed patch rows."""
        if patches.shape[0] == 0:
            return patches.new_zeros(0, self.config.hidden_size), []
        weight = self.vision_model.patch_embed.proj.weight
        return self.vision_model(patches.to(device=weight.device, dtype=weight.dtype), grid_thw)

    def embed_rows(self, input_ids: torch.Tensor, vision: RowVision) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``embed`` for the provider path: placeholder k of row r (after ``skip[r]``) takes encoded
        token ``start[r] + skip[r] + k``, so a window may hold part of an image."""
        from copd_megatron.model.vlm import placeholder_index

        v = self.vision
        emb = self.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        is_ph = torch.isin(input_ids, torch.tensor([v.image_token_id, v.video_token_id], device=input_ids.device))
        if not bool(is_ph.any()):
            return emb, None
        tokens, deep = vision.encoded if vision.encoded is not None else self.encode(vision.patches, vision.grid_thw)
        index = placeholder_index(is_ph, vision.count, vision.skip, start=vision.start).to(tokens.device)
        b, s = input_ids.shape
        flat = emb.transpose(0, 1).reshape(b * s, -1)
        where = is_ph.reshape(-1).nonzero().squeeze(-1).to(flat.device)
        flat = flat.index_put((where,), tokens[index].to(flat.dtype))  # out of place: gradients reach both
        carrier = None
        if deep:
            feats = torch.stack(deep, dim=1)[index].to(flat.dtype)  # [n_placeholders, k, h]
            carrier = flat.new_zeros(b * s, len(deep), flat.shape[-1]).index_put((where,), feats)
            carrier = carrier.reshape(b, s, len(deep), -1).transpose(0, 1).contiguous()
        return flat.reshape(b, s, -1).transpose(0, 1).contiguous(), carrier

    def _check_placeholders(self, input_ids, kind: str, pixels, grid_thw):
        """(placeholder mask, pixels, grid) of one modality, or None; mismatches are errors."""
        v = self.vision
        mask = input_ids == (v.image_token_id if kind == "image" else v.video_token_id)
        found = int(mask.sum())
        if pixels is None:
            if found:
                raise ValueError(f"{found} {kind} placeholder tokens but no pixel values for them")
            return None
        if grid_thw is None:
            raise ValueError(f"{kind} pixel values need {kind}_grid_thw")
        grid_thw = grid_thw.to(torch.long)
        rows, tokens = int(grid_thw.prod(-1).sum()), int((grid_thw.prod(-1) // v.spatial_merge_size**2).sum())
        if pixels.shape[0] != rows:
            raise ValueError(f"{kind}_grid_thw describes {rows} patches but pixel values have {pixels.shape[0]} rows")
        if found != tokens:
            raise ValueError(f"{kind}_grid_thw describes {tokens} tokens but input_ids hold {found} placeholders")
        return mask, pixels, grid_thw
