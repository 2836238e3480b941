"""The Qwen-VL vision tower as a Megatron-Core ``TransformerBlock`` (tensor parallel; it lives on
the first pipeline stage and is not pipelined itself).

Per forward, for the packed patches of all images and videos of a micro-batch::

    x   = patch_embed(pixels)                 Conv3d with kernel = stride = (Tp, P, P), i.e. a Linear
    x  += interp(pos_table)                   Qwen3-VL only: bilinear resampling to each grid
    x   = permute(x, windows)                 Qwen2.5-VL only, in units of m² patches
    for layer l:  x = l(x)                    pre-norm attention + MLP, biases everywhere;
                                              attention within a frame (or a window), 2-D RoPE
    tokens   = merger(x)                      norm → view m² patches as one row → fc1 → GELU → fc2
    deep_j   = deepstack_merger_j(x after layer deepstack_layers[j])      Qwen3-VL only
    tokens   = unpermute(tokens)              Qwen2.5-VL only

Attention segments: with the local layer spec (CPU) each layer gets a block-diagonal bool mask
``[1, 1, N, N]``; with Transformer Engine the patches are one THD packed sequence
(``PackedSeqParams`` with the segment boundaries). The 2-D rotary is applied by
:class:`VisionSelfAttention` to q and k in fp32 (as transformers does), before Megatron's
attention sees them, so its own per-sequence RoPE path (which would restart positions in
every THD segment) is never used.

Numerical choices that follow transformers, not Megatron-Bridge: the mergers use the exact
(erf) GELU while the ViT MLP uses GELU(tanh) (Qwen3-VL) or SiLU-gated (Qwen2.5-VL); the
position table is interpolated with fp32 weights; ViT and merger norms use eps 1e-6.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.nn.functional as F

from copd_megatron.config.schema import ModelConfig
from copd_megatron.model.qwen_vl import grid
from copd_megatron.model.qwen_vl.rope import rotate, vision_rotary_angles

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_layer import TransformerLayer

NORM_EPS = 1e-6  # transformers hard-codes it for the ViT and merger norms (not the config's rms_norm_eps)


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class VisionSelfAttention(SelfAttention):
    """Megatron ``SelfAttention`` that rotates q and k by per-patch 2-D angles in fp32.

    The angles arrive as ``rotary_pos_emb`` ``[N, 1, 1, head_dim]``; they are kept for the
    duration of this call only (so activation recomputation, which calls forward again, sees
    them too) and Megatron's own rotary path receives None."""

    _angles: torch.Tensor | None = None

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        self._angles = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self._angles = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False, split_qkv=True):
        query, key, value = super().get_query_key_value_tensors(hidden_states, key_value_states, output_gate, split_qkv)
        if self._angles is not None:  # q, k: [N, 1, heads/tp, head_dim]
            query, key = rotate(query, self._angles), rotate(key, self._angles)
        return query, key, value


class VisionTransformerLayer(TransformerLayer):
    """A ViT layer that picks its attention segments: ``attention_mask`` / ``packed_seq_params``
    hold [windows, frames] (Qwen2.5-VL) or [frames]; full-attention layers take frames."""

    def __init__(self, *args, full_attention_layers: tuple[int, ...] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        windowed = full_attention_layers is not None
        self.segment_choice = 1 if windowed and (self.layer_number - 1) in full_attention_layers else 0

    def forward(self, *args, **kwargs):
        i = self.segment_choice
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"][i : i + 1]
        if isinstance(kwargs.get("packed_seq_params"), tuple):
            kwargs["packed_seq_params"] = kwargs["packed_seq_params"][i]
        return super().forward(*args, **kwargs)


class PatchEmbed(torch.nn.Module):
    """Conv3d weights ``[hidden, C, Tp, P, P]`` (HF's layout) applied as one Linear over each row."""

    def __init__(self, v, dtype: torch.dtype, bias: bool) -> None:
        super().__init__()
        kernel = (v.temporal_patch_size, v.patch_size, v.patch_size)
        self.proj = torch.nn.Conv3d(v.in_channels, v.hidden_size, kernel, stride=kernel, bias=bias, dtype=dtype,
                                    device=_device())  # fmt: skip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixels.to(w.dtype).reshape(len(pixels), -1), w.reshape(len(w), -1), self.proj.bias)


class RMSNorm(torch.nn.Module):
    """transformers' Qwen2 RMSNorm: normalise in fp32, round to the input dtype, then scale."""

    def __init__(self, size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(size, dtype=dtype, device=_device()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + NORM_EPS)).to(x.dtype)


class PatchMerger(MegatronModule):
    """m² patches → one language-model token: norm, view ``[n/m², m²·h]``, fc1, GELU (erf), fc2.
    Qwen3-VL's DeepStack mergers normalise after the view (``postshuffle``)."""

    def __init__(self, config, hidden: int, merge: int, out: int, rms: bool, postshuffle: bool, tp_group) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        super().__init__(config=config)
        self.width, self.postshuffle = hidden * merge * merge, postshuffle
        size = self.width if postshuffle else hidden
        dtype = config.params_dtype
        self.norm = RMSNorm(size, dtype) if rms else torch.nn.LayerNorm(size, NORM_EPS, dtype=dtype, device=_device())
        self.linear_fc1 = ColumnParallelLinear(self.width, self.width, config=config, init_method=config.init_method,
                                               bias=True, gather_output=False, tp_group=tp_group)  # fmt: skip
        self.linear_fc2 = RowParallelLinear(self.width, out, config=config, init_method=config.output_layer_init_method,
                                            bias=True, input_is_parallel=True, skip_bias_add=False, tp_group=tp_group)  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.reshape(-1, self.width)) if self.postshuffle else self.norm(x).reshape(-1, self.width)
        h, _ = self.linear_fc1(x[:, None])  # Megatron linears take [s, b, h]
        out, _ = self.linear_fc2(F.gelu(h))
        return out[:, 0]


class MergerList(torch.nn.ModuleList):
    """DeepStack mergers; a ``sharded_state_dict`` that keeps each merger's TP sharding (a plain
    ModuleList would be saved as replicated tensors)."""

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        out: dict = {}
        for i, merger in enumerate(self):
            out.update(merger.sharded_state_dict(f"{prefix}{i}.", sharded_offsets, metadata))
        return out


def vision_transformer_config(model: ModelConfig, lm_config):
    """The ViT's Megatron ``TransformerConfig``: same TP and dtype as the language model, never
    pipelined, sequence-parallel or context-parallel; biases everywhere; norms with eps 1e-6."""
    from megatron.core.transformer import TransformerConfig

    v = model.vision
    qwen3 = model.arch == "qwen3_vl"
    return TransformerConfig(
        num_layers=v.num_layers, hidden_size=v.hidden_size, ffn_hidden_size=v.ffn_hidden_size,
        num_attention_heads=v.num_attention_heads, num_query_groups=v.num_attention_heads,
        kv_channels=v.hidden_size // v.num_attention_heads,
        normalization="LayerNorm" if qwen3 else "RMSNorm", layernorm_epsilon=NORM_EPS,
        gated_linear_unit=not qwen3, activation_func=partial(F.gelu, approximate="tanh") if qwen3 else F.silu,
        add_bias_linear=True, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=lm_config.init_method_std,
        tensor_model_parallel_size=lm_config.tensor_model_parallel_size, pipeline_model_parallel_size=1,
        sequence_parallel=False, context_parallel_size=1,
        params_dtype=lm_config.params_dtype, bf16=lm_config.bf16, fp16=lm_config.fp16,
        bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=lm_config.gradient_accumulation_fusion, use_cpu_initialization=False,
    )  # fmt: skip


def vision_layer_spec(model: ModelConfig):
    """(spec, uses_te): the ViT layer spec with our layer and attention classes, no causal mask."""
    from megatron.core.transformer.enums import AttnMaskType

    from copd_megatron.model.specs import vision_layer_spec as base_spec

    spec, te = base_spec(model)
    v = model.vision
    attention = dataclasses.replace(
        spec.submodules.self_attention, module=VisionSelfAttention,
        # TE: THD packing turns no_mask into per-segment padding masks; local: an explicit bool mask.
        params={"attn_mask_type": AttnMaskType.no_mask if te else AttnMaskType.arbitrary},
    )  # fmt: skip
    windows = tuple(v.full_attention_layers) if model.arch == "qwen2_5_vl" else None
    submodules = dataclasses.replace(spec.submodules, self_attention=attention)
    return dataclasses.replace(spec, module=VisionTransformerLayer, submodules=submodules,
                               params={"full_attention_layers": windows}), te  # fmt: skip


class VisionTower(MegatronModule):
    """Patch embedding, (Qwen3-VL) position table, ViT ``TransformerBlock``, patch merger(s)."""

    def __init__(self, model: ModelConfig, config, pg_collection) -> None:
        from megatron.core.transformer.transformer_block import TransformerBlock

        super().__init__(config=config)
        v = self.vision = model.vision
        self.qwen3 = model.arch == "qwen3_vl"
        spec, self.packed = vision_layer_spec(model)
        self.patch_embed = PatchEmbed(v, config.params_dtype, bias=self.qwen3)
        if self.qwen3:
            self.pos_embed = torch.nn.Embedding(v.num_position_embeddings, v.hidden_size, dtype=config.params_dtype,
                                                device=_device())  # fmt: skip
            self.side = int(round(v.num_position_embeddings**0.5))
        self.decoder = TransformerBlock(config, spec, post_layer_norm=False, pre_process=True, post_process=False,
                                        pg_collection=pg_collection)  # fmt: skip
        merger = partial(PatchMerger, config, v.hidden_size, v.spatial_merge_size, model.hidden_size, not self.qwen3,
                         tp_group=pg_collection.tp)  # fmt: skip
        self.merger = merger(postshuffle=False)
        self.taps = list(v.deepstack_layers or [])  # Qwen2.5-VL: none
        self.deepstack_mergers = MergerList([merger(postshuffle=True) for _ in self.taps])

    def forward(self, pixels: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Packed patch rows ``[N, C·Tp·P·P]`` → language-model tokens ``[N/m², h_lm]`` and the
        DeepStack features (a list of the same shape; empty for Qwen2.5-VL)."""
        v, unit = self.vision, self.vision.spatial_merge_size**2
        grid_thw = grid_thw.cpu()
        x = self.patch_embed(pixels)
        dev = x.device
        if self.qwen3:
            idx, w = grid.position_table_taps(grid_thw, self.side, v.spatial_merge_size)
            pos = (self.pos_embed(idx.to(dev)) * w.to(dev)[:, :, None]).sum(1)
            x = x + pos.to(x.dtype)
        coords = grid.patch_coords(grid_thw, v.spatial_merge_size).to(dev)
        angles = vision_rotary_angles(coords, v.hidden_size // v.num_attention_heads, v.rotary_base)
        segments = [grid.frame_segments(grid_thw)]
        if not self.qwen3:
            order, windows = grid.window_partition(grid_thw, v.spatial_merge_size, v.window_size, v.patch_size)
            order = order.to(dev)
            x = x.view(-1, unit, x.shape[-1])[order].reshape(x.shape)
            angles = angles.view(-1, unit, angles.shape[-1])[order].reshape(angles.shape)
            segments = [windows, segments[0]]  # frames stay contiguous in window order
        mask, packed = self._attention_inputs(segments, dev)
        out = self.decoder(hidden_states=x[:, None], attention_mask=mask, rotary_pos_emb=angles[:, None, None],
                           packed_seq_params=packed, extract_layer_indices=set(self.taps))  # fmt: skip
        hidden, taps = out if self.taps else (out, [])
        tokens = self.merger(hidden[:, 0])
        deep = [m(t[:, 0]) for m, t in zip(self.deepstack_mergers, taps, strict=True)]
        if not self.qwen3:
            tokens = tokens[torch.argsort(order)]
        return tokens, deep

    def _attention_inputs(self, segments: list[torch.Tensor], dev: torch.device):
        """Block-diagonal masks (local spec) or THD packed-sequence boundaries (TE), one per segmentation."""
        if not self.packed:
            return torch.cat([grid.segment_mask(lengths) for lengths in segments]).to(dev), None
        from megatron.core.packed_seq_params import PackedSeqParams

        params = []
        for lengths in segments:
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(device=dev, dtype=torch.int32)
            longest = int(lengths.max())
            params.append(PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                          max_seqlen_q=longest, max_seqlen_kv=longest))  # fmt: skip
        return None, tuple(params)
