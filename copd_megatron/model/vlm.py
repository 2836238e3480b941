"""A vision-language branch: Megatron-Core's ``LLaVAModel`` (CLIP ViT + projector + GPTModel).

Every image, and every sampled frame of a video, goes through the ViT; its patch vectors (the
class token dropped) go through the projector to the language model's width:

    pixels [N, 3, H, W] ─ViT→ [N, 1 + T, h_v] ─drop cls→ [N, T, h_v] ─projector→ [N, T, h]

with ``T = (H / patch) · (W / patch)``. The prompt carries ``T`` placeholder ids per image (the
data path expands them), and the ``N · T`` projected vectors *replace* the embeddings of the
placeholders, row by row, left to right. So the model's sequence is the token stream itself:
labels, loss masks, positions (plain 1-D RoPE, one position per token), log-probs and the KV
cache index tokens exactly as for a text model, and every loss over vocab-parallel logits
``[b, s, V/tp]`` works unchanged. A row without images is a text prompt.

Why not ``LLaVAModel.forward``: it expands *one* placeholder per image inside the model, so
its output is longer than its input, and with pipeline parallelism it pads every sequence to
``language_max_sequence_length``; our runtime splits, scores and decodes token streams whose
length the data path knows. We keep LLaVAModel itself (construction, ``freeze``, pipeline
``set_input_tensor``, ``sharded_state_dict``: checkpoints carry Megatron-LM's LLaVA keys
``language_model.* / vision_model.* / vision_projection.*``) and replace only the embedding step.

Pipeline parallelism: the ViT and the projector live with the embedding on the first stage;
later stages receive hidden states ``[s, b, h]``. Tensor parallelism shards the ViT's heads and
MLP and the projector's MLP like the language model's (the outputs are all-reduced, so every
TP rank holds the same image vectors).

The provider (``model.arch: llava``) reads the batch's ragged ``media`` field: one dict per row,
``{"pixels": [n, 3, H, W]}`` (its images and video frames in placeholder order, from
``data/media.py``) or ``{}`` for a text row. KV-cached decoding feeds windows of positions
``offset..offset+s``; the provider keeps, in the inference context, the image vectors (encoded
once per sequence batch, at ``offset`` 0) and how many placeholders of each row earlier windows
consumed (``VisionInputs.skip``), so a window that reaches into a longer prompt after the prefill
still gets the right vectors. Placeholder ids are never sampled (``never_sample``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from copd_megatron.config.layout import padded_vocab_size
from copd_megatron.config.schema import ModelConfig, ParallelConfig, PrecisionConfig, VisionConfig
from copd_megatron.data.batch import MicroBatch
from copd_megatron.model.provider import positions, register_provider, stage_flags, unwrap
from copd_megatron.model.specs import gpt_layer_spec, projector_spec, use_transformer_engine, vision_norm, vit_layer_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class VisionInputs:
    """The images and video frames of a micro-batch, in the order their placeholders appear.

    ``pixels`` holds every row's images back to back (row 0's first); ``counts[r]`` is how many
    belong to row ``r``. A row's placeholders take the vectors of its images in order."""

    pixels: torch.Tensor  # [N, 3, H, W] float, normalised (see data/media.py)
    counts: torch.Tensor  # [b] int64: images (frames) of each row; sum = N
    skip: Optional[torch.Tensor] = None  # [b] int64: placeholders of each row before this window (None: whole rows)
    embeddings: Optional[torch.Tensor] = None  # [N·T, h] projected vectors computed earlier (then pixels are unused)

    @staticmethod
    def from_rows(rows: Sequence[Optional[torch.Tensor]], image_shape: tuple[int, int, int]) -> "VisionInputs":
        """Pack per-row ``[n_r, 3, H, W]`` tensors (None or n_r = 0: no images in that row)."""
        counts = torch.tensor([0 if r is None else int(r.shape[0]) for r in rows], dtype=torch.long)
        present = [r for r in rows if r is not None and r.shape[0] > 0]
        pixels = torch.cat(present) if present else torch.zeros(0, *image_shape)
        return VisionInputs(pixels, counts)

    def window(self, skip: torch.Tensor) -> "VisionInputs":
        """The same images for a decoding window after ``skip[r]`` placeholders of each row."""
        return VisionInputs(self.pixels, self.counts, skip, self.embeddings)


def _base_config(precision: PrecisionConfig, parallel: ParallelConfig, te: bool, **shape):
    from megatron.core.transformer import TransformerConfig

    dtype = DTYPES[precision.params_dtype]
    return TransformerConfig(
        tensor_model_parallel_size=parallel.tp,
        # The vision side lives on the first pipeline stage in full: it is not pipelined itself.
        pipeline_model_parallel_size=1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=True,
        gated_linear_unit=False,
        calculate_per_token_loss=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=te,
        masked_softmax_fusion=te,
        persist_layer_norm=False,  # WrappedTorchNorm refuses it; TE does not need it
        gradient_accumulation_fusion=te,
        **shape,
    )


def vision_transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig):
    """Megatron ``TransformerConfig`` of the CLIP ViT (LayerNorm, biases, GELU, non-causal)."""
    from megatron.core.activations import quick_gelu

    v = model.vision
    cfg = _base_config(
        precision, parallel, use_transformer_engine(model),
        num_layers=v.num_layers, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.num_attention_heads, kv_channels=v.kv_channels, normalization="LayerNorm",
        layernorm_epsilon=v.norm_epsilon, add_qkv_bias=True, init_method_std=model.init_method_std,
        activation_func=quick_gelu if v.activation == "quick_gelu" else F.gelu,
    )  # fmt: skip
    cfg.vision_model_type = "clip"  # read by LLaVAModel (Megatron-LM sets it the same way)
    return cfg


def projection_config(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig):
    """``TransformerConfig`` of the projector MLP: vision width → ffn → language width."""
    v = model.vision
    return _base_config(
        precision, parallel, use_transformer_engine(model),
        num_layers=1, hidden_size=model.hidden_size, ffn_hidden_size=v.projector_ffn_hidden_size or model.hidden_size,
        # Unused by an MLP, but TransformerConfig checks that TP divides the heads.
        num_attention_heads=model.num_attention_heads, activation_func=F.gelu, init_method_std=model.init_method_std,
    )  # fmt: skip


def _llava_class():
    from megatron.core.models.multimodal.llava_model import LLaVAModel

    class VisionLanguageModel(LLaVAModel):
        """LLaVAModel whose embedding step replaces expanded placeholder tokens (module docstring)."""

        def __init__(self, *, vision: VisionConfig, vision_config, vision_spec, norm_impl, projection_config_,
                     projection_spec, **kwargs) -> None:  # fmt: skip
            # LLaVAModel would build CLIPViTModel with its default LayerNorm, which without TE is
            # torch.nn.LayerNorm and rejects `config=`; build the encoder here with `norm_impl`.
            super().__init__(vision_transformer_config=vision_config, vision_transformer_layer_spec=vision_spec,
                             drop_vision_class_token=True, vision_projection_config=projection_config_,
                             vision_projection_layer_spec=projection_spec, vision_projection_type=vision.projector,
                             add_encoder=False, add_decoder=True, img_h=vision.image_height,
                             img_w=vision.image_width, patch_dim=vision.patch_size,
                             image_token_index=vision.image_token_id, **kwargs)  # fmt: skip
            from megatron.core.transformer.enums import ModelType

            self.model_type = ModelType.encoder_or_decoder  # what Megatron's schedules ask every chunk
            self.placeholder_ids = sorted({vision.image_token_id, vision.video_id})
            self.tokens_per_image = vision.tokens_per_image
            if self.pre_process:
                self._build_encoder(vision, vision_config, vision_spec, norm_impl, projection_config_, projection_spec)

        def _build_encoder(self, vision, vision_config, vision_spec, norm_impl, proj_config, proj_spec) -> None:
            from megatron.core.models.vision.clip_vit_model import CLIPViTModel
            from megatron.core.models.vision.multimodal_projector import MultimodalProjector

            self.add_encoder = True
            self._drop_vision_class_token = True
            self.vision_model = CLIPViTModel(
                vision_config, vision_spec, ln_pre_impl=norm_impl, ln_post_impl=norm_impl,
                add_class_token=vision.class_token, class_token_len=1, patch_dim=vision.patch_size,
                img_h=vision.image_height, img_w=vision.image_width, model_subtype="clip",
                pg_collection=self.pg_collection, vp_stage=self.vp_stage,
            )  # fmt: skip
            self.vision_projection = MultimodalProjector(
                proj_config, proj_spec, vision.projector, vision_config.hidden_size, tp_group=self.pg_collection.tp
            )
            # CLIPViTModel draws its class token and position embeddings from N(0, 1), which drowns a
            # freshly initialised patch embedding (std ~0.1): every image then encodes alike and a model
            # trained from scratch cannot see. OpenAI CLIP initialises both with std width^-0.5. Replicated
            # on every TP rank (same seed), replaced by a checkpoint's values when one is loaded.
            with torch.no_grad():
                scale = vision_config.hidden_size**-0.5
                self.vision_model.position_embeddings.weight.normal_(0.0, scale)
                if self.vision_model.add_class_token:
                    self.vision_model.class_token.normal_(0.0, scale)

        def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
            """Projected patch vectors ``[N · T, h]`` of ``pixels [N, 3, H, W]`` (first stage only)."""
            weight = self.vision_model.conv1.weight
            x = self.vision_model(pixels.to(device=weight.device, dtype=weight.dtype))  # [N, cls + T, h_v]
            if self.vision_model.add_class_token:
                x = x[:, self.vision_model.class_token_len :, :]
            x = self.vision_projection(x.permute(1, 0, 2).contiguous())  # [T, N, h]
            return x.permute(1, 0, 2).reshape(-1, x.shape[-1])

        def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor, vision: Optional[VisionInputs]):
            """Token embeddings ``[s, b, h]`` with placeholders replaced by image vectors."""
            emb = self.language_model.embedding(input_ids=input_ids, position_ids=position_ids)
            is_ph = torch.isin(input_ids, torch.tensor(self.placeholder_ids, device=input_ids.device))
            if vision is None:
                if bool(is_ph.any()):
                    raise ValueError("the batch has image placeholder tokens but no images")
                return emb
            vecs = vision.embeddings if vision.embeddings is not None else self._encode(vision.pixels, emb)
            index = placeholder_index(is_ph, vision.counts * self.tokens_per_image, vision.skip)
            b, s = input_ids.shape
            flat = emb.transpose(0, 1).reshape(b * s, -1)
            where = is_ph.reshape(-1).nonzero().squeeze(-1)
            flat = flat.index_put((where,), vecs[index].to(flat.dtype))  # out of place: gradients reach both
            return flat.reshape(b, s, -1).transpose(0, 1).contiguous()

        def _encode(self, pixels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
            if pixels.shape[0] == 0:  # a text-only micro-batch
                return like.new_zeros(0, like.shape[-1])
            return self.encode_images(pixels)

        def forward(self, input_ids, position_ids, attention_mask=None, labels=None, inference_context=None, *,
                    vision: Optional[VisionInputs] = None, runtime_gather_output=None, **_unused):  # fmt: skip
            """Vocab-parallel logits ``[b, s, V/tp]`` (per-token loss with ``labels``) on the last
            stage, hidden states ``[s, b, h]`` elsewhere; ``vision`` is read on the first stage."""
            decoder_input = self.embed(input_ids, position_ids, vision) if self.pre_process else None
            return self.language_model(
                input_ids=None, position_ids=None, attention_mask=attention_mask, decoder_input=decoder_input,
                labels=labels, inference_context=inference_context, runtime_gather_output=runtime_gather_output,
            )  # fmt: skip

    return VisionLanguageModel


def placeholder_index(is_ph: torch.Tensor, per_row: torch.Tensor, skip: Optional[torch.Tensor]) -> torch.Tensor:
    """For every placeholder of ``is_ph [b, s]`` (row-major), its row in the packed vectors.

    Row ``r`` owns vectors ``start_r .. start_r + per_row[r]`` (``start`` = exclusive cumsum);
    its k-th placeholder in this window takes ``start_r + skip_r + k``. Whole rows (``skip``
    None) must have exactly ``per_row[r]`` placeholders; a window may have fewer."""
    per_row = per_row.to(is_ph.device)
    have = is_ph.sum(dim=1)
    exact = skip is None
    skip = torch.zeros_like(have) if skip is None else skip.to(is_ph.device)
    bad = (have + skip > per_row) | ((have != per_row) if exact else torch.zeros_like(have, dtype=torch.bool))
    if bool(bad.any()):
        r = int(bad.nonzero()[0, 0])
        raise ValueError(f"row {r}: {int(have[r])} image placeholder tokens (after {int(skip[r])}) but its images "
                         f"give {int(per_row[r])} vectors; expand each image to its tokens_per_image placeholders")  # fmt: skip
    start = torch.cumsum(per_row, 0) - per_row
    rank = torch.cumsum(is_ph.long(), dim=1) - 1
    return (start[:, None] + skip[:, None] + rank)[is_ph]


@register_provider("llava")
class LLaVAProvider:
    """Megatron-Core ``LLaVAModel`` (CLIP ViT + projector + GPTModel) as a model provider."""

    fields: tuple[str, ...] = ("media",)

    def __init__(self, model_cfg: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, tcfg=None) -> None:
        from copd_megatron.model.build import transformer_config

        if model_cfg.vision is None:
            raise ValueError("the llava provider needs model.vision")
        self.model_cfg, self.parallel, self.precision = model_cfg, parallel, precision
        self.tcfg = tcfg or transformer_config(model_cfg, parallel, precision)
        v = model_cfg.vision
        self.never_sample = tuple(sorted({v.image_token_id, v.video_id}))  # placeholder ids
        self.image_shape = (3, v.image_height, v.image_width)

    def build_chunks(self, groups) -> list:
        """This rank's chunk (one: virtual pipeline stages are refused with model.vision)."""
        m, p, prec = self.model_cfg, self.parallel, self.precision
        pre, post = stage_flags(groups, None, None)
        chunk = _llava_class()(
            vision=m.vision,
            vision_config=vision_transformer_config(m, p, prec),
            vision_spec=vit_layer_spec(m),
            norm_impl=vision_norm(m),
            projection_config_=projection_config(m, p, prec),
            projection_spec=projector_spec(m),
            language_transformer_config=self.tcfg,
            language_transformer_layer_spec=gpt_layer_spec(m, fp8=prec.fp8),
            language_vocab_size=padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, p.tp),
            language_max_sequence_length=m.seq_length,
            parallel_output=True,
            share_embeddings_and_output_weights=m.tie_embeddings,
            language_position_embedding_type="rope",
            language_rotary_percent=m.rotary_percent,
            language_rotary_base=int(m.rotary_base),
            language_rope_scaling=m.rope_scaling,
            language_rope_scaling_factor=m.rope_scaling_factor,
            pre_process=pre,
            post_process=post,
            pg_collection=groups.pg_collection,
        )
        chunk.freeze(freeze_language_model=False, freeze_vision_model=m.vision.freeze_vision,
                     freeze_vision_projection=m.vision.freeze_projector)  # fmt: skip
        return [chunk]

    def forward(self, chunk, mb: MicroBatch, *, inference_context=None, with_labels: bool = False):
        labels = mb.labels if with_labels else None
        vision = self.vision_inputs(chunk, mb, inference_context)
        return chunk(mb.tokens, positions(mb), None, labels=labels, inference_context=inference_context, vision=vision)

    def vision_inputs(self, chunk, mb: MicroBatch, ctx) -> Optional[VisionInputs]:
        """The micro-batch's images for the first stage (None elsewhere, or without images)."""
        model = unwrap(chunk)
        media = mb.fields.get("media")
        if not model.pre_process or not media or not any(m and m.get("pixels") is not None for m in media):
            return None
        rows = [m.get("pixels") if m else None for m in media]
        vi = VisionInputs.from_rows(rows, self.image_shape)
        is_ph = torch.isin(mb.tokens, torch.tensor(self.never_sample, device=mb.tokens.device))
        if ctx is None:  # whole rows, or (no KV cache) a prefix of them
            return vi.window(torch.zeros_like(vi.counts))
        state = getattr(ctx, "copd_vision", None)
        if mb.offset == 0 or state is None:  # a new batch of sequences: encode its images once
            state = {"embeddings": model.encode_images(vi.pixels) if vi.pixels.shape[0] else None,
                     "seen": torch.zeros_like(vi.counts)}  # fmt: skip
            ctx.copd_vision = state
        out = VisionInputs(vi.pixels, vi.counts, state["seen"].clone(), state["embeddings"])
        state["seen"] = state["seen"] + is_ph.sum(dim=1).cpu()
        return out


def build_vlm_chunks(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, config=None,
                     groups=None) -> list:  # fmt: skip
    """This rank's vision-language model chunk, unwrapped (``LLaVAProvider.build_chunks``)."""
    from copd_megatron.distributed.groups import shared_groups

    return LLaVAProvider(model, parallel, precision, config).build_chunks(groups or shared_groups())


def media_field(rows: Sequence[Optional[torch.Tensor]]) -> list[dict]:
    """The ragged ``media`` field of a batch from per-row pixels (None: a text row)."""
    return [{} if r is None else {"pixels": r} for r in rows]
