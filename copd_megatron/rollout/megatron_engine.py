"""Megatron-native rollouts: batched sampling with the training model itself and a KV cache.

Prompts of different lengths. On text GPT models with RoPE and Megatron's own (local) attention
(the CPU path), the batch is left-padded to its longest prompt and prefilled in one forward: the
padding keys are masked out of every query (Megatron's masked softmax gives them probability 0)
and each row gets its own rotary angles (position ``j - pad``), so every real token sees exactly
the positions and context it has alone. Elsewhere (TE attention, which drops the mask once
decoding starts; sequence parallelism; vision-language models, whose providers place their own
positions and media) it is done the way Megatron-LM's static generation does it: the whole batch
is prefilled up to the shortest prompt, then advanced one position per step for everyone, a
sequence whose prompt is not exhausted yet being fed its next prompt token instead of a sample.
Either way, after the prefill every step is a single-token forward against Megatron's
``StaticInferenceContext`` KV cache (``sequence_len_offset`` advances by the tokens consumed). The
model runs through its provider (``provider.forward(chunk, micro_batch, inference_context=...)``),
so vision-language models prefill with their media.

Decoding is bound by per-layer work outside the matmuls on CPU, so for the duration of a
``generate`` the engine also: stores keys in the cache already rotated (Megatron rotates the whole
cached prefix again at every step), computes RoPE's cosines and sines once per step for all layers,
runs TP=1 linear layers as the plain matmul they are, reads the cache once per KV head in
grouped-query attention, runs each decode step of a plain local-spec layer at TP=1 as one function
over the layer's weights (as vLLM writes its models; Megatron's module calls and checks cost more
than the layer's matmuls at one token per step), and applies the output layer to the last position
only. Each is the same arithmetic as Megatron's path, in the same order (see the functions below;
the tests compare them bit for bit); the benchmark is ``tools/bench_rollout.py``.

Sampling is per request: a request's k-th response token is drawn by inverse-CDF sampling with
the uniform ``counter_uniforms(seed, k)``, so its completion depends on its own seed and tokens
only — not on the batch it was put in, the data-parallel rank, or a resume.

Parallelism (on the branch's own groups). TP: each rank gets vocab-parallel logits ``[n, V/tp]``
of the last position; they are all-gathered (only ``n × V`` numbers per step) and every TP rank
samples the same tokens, then TP rank 0's choice is broadcast so ranks can never diverge. PP:
hidden states ``[s, n, h]`` go stage to stage with point-to-point send/recv; the last stage
samples and broadcasts the new tokens to the whole pipeline group. DP: each data-parallel rank
generates for its own requests. Padded vocabulary ids are never sampled.

The engine shares the trainer's module: ``update_weights`` records the version only and
``sleep``/``wake`` release nothing.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from copd_megatron.data.batch import MicroBatch
from copd_megatron.distributed.device import runtime_device
from copd_megatron.model.precision import precision_pass
from copd_megatron.model.provider import forward_of, unwrap
from copd_megatron.rollout.engine import EngineContext, register_engine
from copd_megatron.rollout.types import GenerationRequest, RolloutBatch, SamplingParams, as_requests
from copd_megatron.utils.seeds import counter_uniforms


def _filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) masking; masked entries become -inf."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token).
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from ``[n, V]`` full-vocabulary logits with one U[0,1) per row (inverse CDF; greedy
    decoding takes the argmax and needs no uniforms). Returns
    ids ``[n]`` and their log-probs under the distribution sampled from (after temperature/top-k/top-p)."""
    logits = logits.float()
    if params.greedy:
        ids = logits.argmax(-1)
        return ids, torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)
    logp = torch.log_softmax(_filter_logits(logits, params), dim=-1)
    cdf = logp.exp().double().cumsum(-1)
    # The first id whose CDF exceeds u·total has positive probability, and u < 1 keeps it in range.
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


Overrides = list[tuple[torch.nn.Module, str]]  # (module, attribute) set for one ``generate``


def _override(module: torch.nn.Module, name: str, value, overrides: Overrides) -> None:
    """Shadow ``module.<name>`` (a method) with ``value`` on this instance; ``generate`` deletes every
    recorded attribute at its end, which brings back the class's own."""
    setattr(module, name, value)
    overrides.append((module, name))


def _rotate_half_rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Megatron's unfused, non-interleaved RoPE (``_apply_rotary_pos_emb_bshd``) with its cosines and
    sines given: ``t * cos + rotate_half(t) * sin`` on the first ``cos.shape[-1]`` channels, the same
    operations in the same order."""
    rot = cos.shape[-1]
    x = t[..., :rot] if rot < t.shape[-1] else t
    x1, x2 = torch.chunk(x, 2, dim=-1)
    y = x * cos + torch.cat((-x2, x1), dim=-1) * sin
    return y if rot == t.shape[-1] else torch.cat((y, t[..., rot:]), dim=-1)


class _RopeTables:
    """RoPE's cosines and sines of one step, computed once and shared by every layer (keyed by the
    angles' tensor: all layers of a step get the same one from the model's rotary module)."""

    def __init__(self) -> None:
        self.tables: dict = {}

    def __call__(self, freqs: torch.Tensor, mscale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        key = (freqs.data_ptr(), tuple(freqs.shape), freqs.stride(), freqs._version, mscale, dtype)
        if key not in self.tables:
            self.tables.clear()  # one step at a time; holding ``freqs`` keeps its memory from being reused
            self.tables[key] = (freqs, (torch.cos(freqs) * mscale).to(dtype), (torch.sin(freqs) * mscale).to(dtype))
        return self.tables[key][1:]


def _rotate_cached_keys_once(model: torch.nn.Module, overrides: Overrides, cos_sin: _RopeTables) -> None:
    """Store keys in the KV cache already rotated, so each step applies RoPE to its new positions only.

    Megatron's static-batching cache stores keys *before* RoPE and rotates the whole cached prefix
    again at every step, in every layer (the new key is appended, then ``apply_rotary_pos_emb`` runs
    on ``key[:end]``): per step O(length) work, and the largest non-matmul cost of decoding on CPU.
    RoPE acts on each position independently, so rotating positions ``start:end`` once, as they are
    written, and handing attention ``k_pos_emb=None`` (Megatron then skips the key rotation) gives
    the same keys. With Megatron's unfused, non-interleaved RoPE (the CPU path) the queries are
    rotated here too, with cosines and sines computed once per step for all layers instead of twice
    per layer (same formula, see ``_rotate_half_rope``); otherwise (TE's fused RoPE, interleaved,
    MLA) the new keys are rotated by Megatron's own ``apply_rotary_pos_emb`` with the arguments its
    attention passes, and the queries by the attention itself. Installed per attention module for the
    duration of one ``generate``."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.transformer.attention import Attention

    modules = [m for m in unwrap(model).modules() if isinstance(m, Attention) and not m.config.flash_decode]

    for attn in modules:
        cfg = attn.config
        own = not (cfg.apply_rope_fusion or cfg.rotary_interleaved or cfg.multi_latent_attention)

        def adjusted(ctx, query, key, value, rotary_pos_emb, *args, _attn=attn, _own=own,
                     _original=attn._adjust_key_value_for_inference, **kwargs):  # fmt: skip
            out = _original(ctx, query, key, value, rotary_pos_emb, *args, **kwargs)
            q, k, v, rope, mask_type, block_table = out
            if ctx is None or not ctx.is_static_batching() or rope is None or rope[1] is None:
                return out
            start = ctx.sequence_len_offset
            end = start + key.size(0)  # ``k`` is the cache's [:end] view: rotate the new rows in place
            # Self-attention: the queries' angles are the new keys' (one table, sliced the same way).
            same = rope[0] is not None and rope[0].data_ptr() == rope[1][start:end].data_ptr() and q.dtype == k.dtype
            if _own and same and rope[0].shape == rope[1][start:end].shape:
                cos, sin = cos_sin(rope[1], _attn._yarn_concentration_factor, k.dtype)
                cos, sin = cos[start:end], sin[start:end]
                k[start:end] = _rotate_half_rope(k[start:end], cos, sin)
                return _rotate_half_rope(q, cos, sin), k, v, (None, None), mask_type, block_table
            k[start:end] = apply_rotary_pos_emb(k[start:end], rope[1][start:end], config=_attn.config,
                                                mscale=_attn._yarn_concentration_factor, cp_group=_attn.pg_collection.cp)  # fmt: skip
            return q, k, v, (rope[0], None), mask_type, block_table

        _override(attn, "_adjust_key_value_for_inference", adjusted, overrides)


def _is_plain_linear(m: torch.nn.Module) -> bool:
    """A local ``ColumnParallelLinear`` / ``RowParallelLinear`` of a one-rank TP group without
    sequence parallelism, CPU offloading or deferred weight gradients: one matmul (+ bias)."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return (type(m) in (ColumnParallelLinear, RowParallelLinear) and m.tp_group.size() == 1 and not m.sequence_parallel
            and m.config._cpu_offloading_context is None and not m.config.defer_embedding_wgrad_compute)  # fmt: skip


def _linear(m: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor | None = None):
    """What a plain linear layer's forward returns: ``(x @ W^T [+ bias], bias if it is returned for
    a fused bias-add else None)``, the same operations in the same order."""
    output = torch.matmul(x, (m.weight if weight is None else weight).t())
    if m.bias is not None and not m.skip_bias_add:
        return output + m.bias, None
    return output, m.bias if m.skip_bias_add else None


def _direct_linears(model: torch.nn.Module, overrides: Overrides) -> None:
    """Run Megatron's own (local) linear layers of a tensor-parallel group of one rank as the one
    matmul they are, without the autograd-function and communication wrappers around it.

    Decoding on CPU is bound by per-layer Python work once the KV cache makes each step one token:
    with TP=1 ``ColumnParallelLinear`` / ``RowParallelLinear`` go through an identity copy to the TP
    region, an autograd function, an identity reduction and several process-group queries per call.
    Their arithmetic is ``torch.matmul(x, weight.t())`` then ``+ bias`` (unless the bias is returned
    for a fused bias-add), which is what this runs: the same operations, in the same order. Layers
    with TP > 1, sequence parallelism, CPU offloading or deferred weight-gradient buffers, and
    Transformer Engine's layers, keep their own forward."""
    for m in unwrap(model).modules():
        if _is_plain_linear(m):

            def forward(input_, weight=None, runtime_gather_output=None, _m=m):
                return _linear(_m, input_, weight)

            _override(m, "forward", forward, overrides)


def _grouped_attention(m, rep: int, query, key, value, attention_mask) -> torch.Tensor:
    """Megatron's local ``DotProductAttention`` ``m`` in eval mode with ``rep`` query heads per KV
    group, without expanding the keys and values (see ``_grouped_query_attention``) and without the
    RNG-tracker fork around the attention dropout (the identity in eval mode). With ``rep == 1``
    (multi-head attention) the operands are laid out as Megatron's own and the result is its result
    bit for bit (tested through ``_decode_layer``)."""
    sq, b, heads, hn = query.shape
    sk, groups = key.shape[0], key.shape[2]
    # [sq, b, groups*rep, hn] -> [b*groups, rep*sq, hn]: head h = g*rep + r, as repeat_interleave
    q = query.reshape(sq, b, groups, rep, hn).permute(1, 2, 3, 0, 4).reshape(b * groups, rep * sq, hn)
    k = key.reshape(sk, b * groups, hn).transpose(0, 1)  # [b*groups, sk, hn], a view of the cache
    scores = torch.baddbmm(torch.empty(b * groups, rep * sq, sk, dtype=q.dtype, device=q.device),
                           q, k.transpose(1, 2), beta=0.0, alpha=m.softmax_scale)  # fmt: skip
    probs = m.scale_mask_softmax(scores.view(b, heads, sq, sk), attention_mask, None)
    v = value.reshape(sk, b * groups, hn).transpose(0, 1)
    context = torch.bmm(probs.reshape(b * groups, rep * sq, sk), v)  # [b*groups, rep*sq, hn]
    context = context.view(b, groups, rep, sq, hn).permute(3, 0, 1, 2, 4)
    return context.reshape(sq, b, m.hidden_size_per_partition)


def _grouped_query_attention(model: torch.nn.Module, overrides: Overrides) -> None:
    """Grouped-query attention without copying the cache: Megatron's local ``DotProductAttention``
    expands the keys and values to one copy per query head (``repeat_interleave`` over the whole
    ``[:end]`` cache, in every layer, at every step). Here the queries of a KV group are stacked
    instead, ``[b*groups, heads_per_group*sq, hn]``, and multiplied against the group's keys and
    values once: the same scaled scores, the same masked softmax module (the attention's own
    ``scale_mask_softmax``), the same probability-weighted values, in the same head order. The
    attention dropout is left out: it is the identity while decoding (eval mode). Installed (per
    module, for one ``generate``) on local attention with more than one query head per group and
    no softmax offset."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    for m in unwrap(model).modules():
        if type(m) is not DotProductAttention or m.softmax_offset is not None:
            continue
        rep = m.num_attention_heads_per_partition // m.num_query_groups_per_partition
        if rep == 1:
            continue

        def forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None, _m=m, _rep=rep):  # fmt: skip
            return _grouped_attention(_m, _rep, query, key, value, attention_mask)

        _override(m, "forward", forward, overrides)


def _norm(m: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``m(x)``; torch's own RMSNorm / LayerNorm (what Megatron's local spec builds without Apex)
    as the functional call their forward makes, without the module call around it."""
    if not (m._forward_hooks or m._forward_pre_hooks):
        if type(m) is torch.nn.RMSNorm:
            return torch.nn.functional.rms_norm(x, m.normalized_shape, m.weight, m.eps)
        if type(m) is torch.nn.LayerNorm:
            return torch.nn.functional.layer_norm(x, m.normalized_shape, m.weight, m.bias, m.eps)
    return m(x)


def _decodes_in_one_function(layer: torch.nn.Module) -> bool:
    """Whether ``_decode_layer`` computes this layer's decode step exactly as Megatron does: a plain
    ``TransformerLayer`` (self-attention with Megatron's local core attention and a dense MLP, no
    cross-attention) whose linear layers are plain one-rank matmuls (``_is_plain_linear``), with
    unfused non-interleaved RoPE, no output gate, no fp32 residual, no fused bias-dropout-add or
    bias-activation, no recomputation, offloading or softmax offset."""
    from megatron.core.transformer.attention import SelfAttention
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.transformer_layer import TransformerLayer

    if type(layer) is not TransformerLayer:
        return False
    attn, mlp, cfg = layer.self_attention, layer.mlp, layer.config
    if type(attn) is not SelfAttention or type(attn.core_attention) is not DotProductAttention or type(mlp) is not MLP:
        return False
    if not (isinstance(layer.pre_cross_attn_layernorm, IdentityOp) and isinstance(layer.cross_attention, IdentityOp)):
        return False
    if attn.core_attention.softmax_offset is not None:
        return False
    if not all(_is_plain_linear(m) for m in (attn.linear_qkv, attn.linear_proj, mlp.linear_fc1, mlp.linear_fc2)):
        return False
    # Anything unknown to this version counts as set: the layer then keeps Megatron's own forward.
    flags = [getattr(cfg, name, True) for name in (
        "attention_output_gate", "fp32_residual_connection", "no_rope_freq", "flash_decode", "apply_rope_fusion",
        "rotary_interleaved", "multi_latent_attention", "bias_activation_fusion", "use_te_activation_func",
        "inference_fuse_tp_communication", "bias_dropout_fusion", "test_mode")]  # fmt: skip
    flags += [getattr(layer, name, True) for name in (
        "recompute_input_layernorm", "recompute_pre_mlp_layernorm", "recompute_mlp", "offload_attn_norm",
        "offload_mlp_norm")]  # fmt: skip
    flags += [getattr(attn, name, True) for name in ("offload_qkv_linear", "offload_core_attention")]
    return not any(flags)


def _decode_layer(layer, hidden_states, attention_mask, rotary_pos_emb, ctx, cos_sin: _RopeTables) -> torch.Tensor:
    """One decode step of a Megatron ``TransformerLayer`` (eval mode, static KV cache at
    ``ctx.sequence_len_offset > 0``) as one function over the layer's own modules and weights:
    the operations of ``TransformerLayer.forward`` -> ``SelfAttention.forward`` ->
    ``DotProductAttention.forward`` and ``MLP.forward`` in the same order, with keys cached
    already rotated (as ``_rotate_cached_keys_once`` does) and the dropouts left out (the identity
    in eval mode). See ``_decodes_in_one_function`` for the layers it is used on."""
    attn, mlp, cfg = layer.self_attention, layer.mlp, layer.config
    # Self-attention block: input norm, QKV projection split per KV group, RoPE, cache, attention.
    residual = hidden_states
    qkv, _ = _linear(attn.linear_qkv, _norm(layer.input_layernorm, hidden_states))
    groups, hn = attn.num_query_groups_per_partition, attn.hidden_size_per_attention_head
    rep = attn.num_attention_heads_per_partition // groups
    qkv = qkv.view(*qkv.shape[:-1], groups, (rep + 2) * hn)
    query, key, value = torch.split(qkv, [rep * hn, hn, hn], dim=3)
    query = query.reshape(query.size(0), query.size(1), -1, hn)
    if attn.q_layernorm is not None:
        query = attn.q_layernorm(query)
    if attn.k_layernorm is not None:
        key = attn.k_layernorm(key)
    keys, values = ctx.key_value_memory_dict[attn.layer_number]
    start, b0 = ctx.sequence_len_offset, ctx.batch_size_offset
    end, b1 = start + key.size(0), b0 + key.size(1)
    if rotary_pos_emb is not None:
        cos, sin = cos_sin(rotary_pos_emb[start:end], attn._yarn_concentration_factor, key.dtype)
        query, key = _rotate_half_rope(query, cos, sin), _rotate_half_rope(key, cos, sin)
    keys[start:end, b0:b1] = key
    values[start:end, b0:b1] = value
    key, value = keys[:end, b0:b1], values[:end, b0:b1]
    context = _grouped_attention(attn.core_attention, rep, query, key, value, attention_mask)
    out, bias = _linear(attn.linear_proj, context)
    # Megatron's bias-dropout-add in eval mode, in place: (out + bias) + residual.
    if bias is not None:
        out.add_(bias)
    hidden_states = out.add_(residual)
    # MLP block: pre-MLP norm, fc1, (gated) activation, fc2, residual.
    residual = hidden_states
    inter, bias = _linear(mlp.linear_fc1, _norm(layer.pre_mlp_layernorm, hidden_states))
    if bias is not None:
        inter = inter + bias
    if cfg.gated_linear_unit:
        x_glu, x_linear = torch.chunk(inter, 2, dim=-1)
        if (val := cfg.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        inter = cfg.activation_func(x_glu) * (x_linear + cfg.glu_linear_offset)
    else:
        inter = mlp.activation_func(inter)
    out, bias = _linear(mlp.linear_fc2, inter)
    if bias is not None:
        out.add_(bias)
    return out.add_(residual)


# Layer inputs the one-function decode step does not take: a call with any of them set runs
# Megatron's own layer forward.
_NOT_DECODED_HERE = ("context", "context_mask", "rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin",
                     "attention_bias", "packed_seq_params")  # fmt: skip


def _decode_layers(model: torch.nn.Module, overrides: Overrides, cos_sin: _RopeTables) -> None:
    """Run each decode step of every qualifying layer (``_decodes_in_one_function``) as one function,
    ``_decode_layer``, as vLLM writes its models: at one token per step on CPU, a Megatron layer
    spends more time in the Python of its module calls, config checks and context managers than in
    its matmuls. The prefill (``sequence_len_offset == 0``) and any call the function does not cover
    run Megatron's own forward. Installed per layer for the duration of one ``generate``."""
    for layer in unwrap(model).modules():
        if not _decodes_in_one_function(layer):
            continue

        def forward(*args, _layer=layer, _original=layer.forward, **kwargs):
            ctx, hidden_states = kwargs.get("inference_context"), kwargs.get("hidden_states")
            emb = kwargs.get("rotary_pos_emb")
            if (args or ctx is None or hidden_states is None or _layer.training or not ctx.is_static_batching()
                    or ctx.sequence_len_offset == 0 or hidden_states.size(0) != 1 or isinstance(emb, tuple)
                    or any(kwargs.get(name) is not None for name in _NOT_DECODED_HERE)):  # fmt: skip
                return _original(*args, **kwargs)
            return _decode_layer(_layer, hidden_states, kwargs.get("attention_mask"), emb, ctx, cos_sin), None

        _override(layer, "forward", forward, overrides)


class _LeftPadding:
    """A batch whose row ``i`` starts with ``left[i]`` padding positions: positions, attention masks
    and per-row rotary angles for it. While installed, the model's rotary module returns, for every
    buffer position ``j`` and row ``i``, the angles of position ``j - left[i]`` (Megatron's own table,
    gathered per row), so each real token is rotated exactly as in training; the mask hides the padding
    keys from every query (Megatron's masked softmax sets them to -10000 before the softmax, so they
    get probability exactly 0 in fp32)."""

    def __init__(self, model: torch.nn.Module, left: list[int], total: int, device, overrides: Overrides) -> None:
        self.left = torch.tensor(left, device=device)
        rope = unwrap(model).rotary_pos_emb
        table = rope(total)[:, 0, 0, :]  # [total, d]: Megatron's angles of positions 0..total-1
        where = (torch.arange(total, device=device)[:, None] - self.left[None, :]).clamp(min=0)
        rows = table[where.to(table.device)].unsqueeze(2)  # [total, n, 1, d]: broadcasts over heads

        def forward(max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None) -> torch.Tensor:
            return rows[offset : offset + max_seq_len]

        _override(rope, "forward", forward, overrides)

    def positions(self, offset: int, s: int) -> torch.Tensor:
        pos = torch.arange(offset, offset + s, device=self.left.device)
        return (pos[None, :] - self.left[:, None]).clamp(min=0)

    def mask(self, offset: int, s: int) -> torch.Tensor:
        """``[n, 1, s, offset+s]``, True = masked: later positions (causal) and padding keys."""
        q = torch.arange(offset, offset + s, device=self.left.device)
        k = torch.arange(offset + s, device=self.left.device)
        return ((k[None, :] > q[:, None])[None] | (k[None, None, :] < self.left[:, None, None])).unsqueeze(1)


class MegatronEngine:
    """Generate with a (DDP-wrapped or bare) single-chunk Megatron model on this rank."""

    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int,
        pad_id: int = 0,
        decode: Callable[[list[int]], str] | None = None,
        use_kv_cache: bool = True,
        *,
        provider=None,
        groups=None,
    ) -> None:
        from copd_megatron.distributed.groups import shared_groups

        self.model = model
        self.vocab_size = vocab_size  # true vocabulary: ids >= this are padding, never sampled
        self.pad_id = pad_id
        self.decode = decode  # needed for stop strings
        self.use_kv_cache = use_kv_cache
        self.forward = forward_of(provider)
        self._provider = provider
        self.never_sample = list(getattr(provider, "never_sample", ()))  # e.g. image placeholder ids
        self.groups = groups if groups is not None else (shared_groups() if dist.is_initialized() else None)
        self.weight_version = 0
        self.device = runtime_device()  # token buffers, KV cache and sampling live here
        self.precision = getattr(provider, "precision", None)  # precision.generate (model/precision.py)

    # -- protocol -----------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """The engine runs the trainer's own module: nothing to load (the iterator is never read)."""
        self.weight_version = int(version)

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest] | Sequence[list[int]], params: SamplingParams) -> RolloutBatch:
        from megatron.core.inference.contexts import StaticInferenceContext

        requests = as_requests(requests, params)
        if not requests or any(len(r.prompt_ids) == 0 for r in requests):
            raise ValueError("generate needs a non-empty list of non-empty prompts")
        if params.stop_strings and self.decode is None:
            raise ValueError("stop strings need a decode function (pass the tokenizer's decode)")
        t0 = time.perf_counter()
        n, dev = len(requests), self.device
        host_lens = [len(r.prompt_ids) for r in requests]
        longest = max(host_lens)
        total = longest + params.max_new_tokens
        media = [r.media for r in requests]
        # Sequence parallelism splits every input over the TP ranks, and TE's linear layers fix the
        # flag when they are built: decoding keeps SP on, recomputes the prefix (no KV cache) and pads
        # it to a multiple of TP. Without SP: prefill once, then one token per step against the cache.
        sp = bool(getattr(unwrap(self.model).config, "sequence_parallel", False))
        pad = self.groups.tp_size if sp and self.groups is not None else 1
        # Prompts of different lengths: left-aligned to the longest one and prefilled together, with
        # the padding masked out of attention and per-row rotary positions (see ``_LeftPadding``), on
        # the models where that is exact; otherwise the batch prefills the shortest prompt's length
        # and feeds the rest of the longer prompts one position per step.
        left = [longest - length for length in host_lens] if longest != min(host_lens) and self._can_left_pad(media, sp) else None
        tokens = torch.full((n, total), self.pad_id, dtype=torch.long)
        for i, r in enumerate(requests):
            at = 0 if left is None else left[i]
            tokens[i, at : at + len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        # Every per-step tensor lives on the device; the only per-step sync is the "all done?" test.
        tokens = tokens.to(dev)
        # Where each row's response begins in ``tokens`` (left-padded: after the longest prompt).
        host_first = host_lens if left is None else [longest] * n
        first = torch.tensor(host_first, device=dev)
        seeds = torch.tensor([int(r.seed) for r in requests], dtype=torch.int64, device=dev)
        logprobs = torch.zeros(n, total, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        finished = torch.zeros(n, dtype=torch.bool, device=dev)
        resp_lens = torch.zeros(n, dtype=torch.long, device=dev)
        ctx = StaticInferenceContext(n, total) if self.use_kv_cache and not sp else None
        was_training = self.model.training
        self.model.eval()
        prev, steps = 0, 0
        hook = self._output_on_last_position() if ctx is not None else None
        overrides: Overrides = []  # this generate's decoding paths (see the functions above)
        try:
            cos_sin = _RopeTables()
            if ctx is not None:
                _rotate_cached_keys_once(self.model, overrides, cos_sin)
                _decode_layers(self.model, overrides, cos_sin)
            _direct_linears(self.model, overrides)
            _grouped_query_attention(self.model, overrides)
            padded = _LeftPadding(self.model, left, total, dev, overrides) if left is not None else None
            with precision_pass([self.model], self.precision, "generate"):
                for cur in range(min(host_first), total):
                    start = prev if ctx is not None else 0
                    last_logits = self._forward_last(tokens[:, start:cur], start, ctx, media, pad, padded)
                    prev, steps = cur, steps + 1
                    # The k-th response token's draw (greedy decoding draws nothing).
                    u = None if params.greedy else counter_uniforms(seeds, (cur - first).clamp(min=0))
                    ids, lps = self._sample_and_share(last_logits, params, u, n)
                    generating = (first <= cur) & ~done  # position `cur` is a response position
                    tokens[:, cur] = torch.where(generating, ids, torch.where(first <= cur, self.pad_id, tokens[:, cur]))
                    logprobs[:, cur] = torch.where(generating, lps, 0.0)
                    resp_lens += generating.long()
                    stopped = generating & self._stopped(tokens, first, cur, params)
                    finished |= stopped
                    done |= stopped | (generating & (cur + 1 - first >= params.max_new_tokens))
                    if bool(done.all()):
                        break
        finally:
            if hook is not None:
                hook.remove()
            for module, name in overrides:
                delattr(module, name)  # back to the class's own
            self.model.train(was_training)
        # The rollout goes to the host once: decoding, verifiers and batch bookkeeping run there.
        tokens, logprobs, resp_lens, finished = tokens.cpu(), logprobs.cpu(), resp_lens.cpu(), finished.cpu()
        lens = torch.tensor(host_lens)
        length = int((lens + resp_lens).max())
        pos = torch.arange(length)[None, :]
        mask = ((pos >= lens[:, None]) & (pos < (lens + resp_lens)[:, None])).float()
        if left is not None:  # back to the batch layout: every prompt at position 0
            at = (pos + torch.tensor(left)[:, None]).clamp(max=total - 1)
            keep = pos < (lens + resp_lens)[:, None]
            tokens = torch.where(keep, tokens.gather(1, at), self.pad_id)
            logprobs = torch.where(keep, logprobs.gather(1, at), 0.0)
        seconds = time.perf_counter() - t0
        meta = {"decode_steps": steps, "seconds": seconds, "tokens_per_s": float(resp_lens.sum()) / max(seconds, 1e-9)}
        return RolloutBatch(tokens[:, :length], lens, resp_lens, logprobs[:, :length], mask, finished, meta,
                            self.weight_version, media)  # fmt: skip

    def _can_left_pad(self, media: list, sp: bool) -> bool:
        """Left-padding is exact where padding can be masked and positions set per row: text-only
        requests, a plain GPT model with RoPE, and Megatron's own (local) core attention, whose
        softmax applies the attention mask at every step. TE's attention drops the mask once decoding
        starts, sequence parallelism pads the sequence itself, and the vision-language providers place
        their own positions."""
        from megatron.core.models.gpt import GPTModel
        from megatron.core.transformer.dot_product_attention import DotProductAttention

        from copd_megatron.model.provider import GPTProvider

        model = unwrap(self.model)
        if sp or any(media) or not (self._provider is None or type(self._provider) is GPTProvider):
            return False
        if type(model) is not GPTModel or model.position_embedding_type != "rope" or model.config.flash_decode:
            return False
        cores = [m.core_attention for m in model.modules() if hasattr(m, "core_attention")]
        return bool(cores) and all(type(c) is DotProductAttention for c in cores)

    def _stopped(self, tokens, first, cur, params) -> torch.Tensor:
        stop = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        if params.stop_token_ids:
            stop |= torch.isin(tokens[:, cur], torch.tensor(params.stop_token_ids, device=tokens.device))
        if params.stop_strings:  # decoding text needs the host: one copy of the rows per step
            rows, starts = tokens[:, : cur + 1].cpu(), first.cpu().tolist()
            hit = [cur >= starts[i] and any(s in self.decode(rows[i, starts[i] :].tolist())
                                           for s in params.stop_strings) for i in range(len(starts))]  # fmt: skip
            stop |= torch.tensor(hit, dtype=torch.bool, device=tokens.device)
        return stop

    def _output_on_last_position(self):
        """Make the output layer see only the final position (a forward pre-hook; returns its handle,
        or None on stages without one). Only the last position's logits are ever sampled from, so
        the prefill then costs [n, V] logits instead of [n, s, V]: for a 32k vocabulary the output
        layer was the largest matmul of the prefill. (Megatron's own inference mode does the same
        slice, but needs ``runtime_gather_output``, which model providers do not pass.)"""
        layers = [m for name, m in unwrap(self.model).named_modules() if name.rsplit(".", 1)[-1] == "output_layer"]
        if len(layers) != 1:
            return None
        # Megatron's layout is [s, n, h]: keep the last position, as a length-1 sequence.
        return layers[0].register_forward_pre_hook(lambda module, args: (args[0][-1:], *args[1:]))

    def _forward_last(self, tokens: torch.Tensor, offset: int, ctx, media: list, pad: int = 1,
                      padded: _LeftPadding | None = None) -> torch.Tensor | None:  # fmt: skip
        """Run positions ``offset..offset+s`` through this rank's stage; on the last stage
        return the full-vocabulary logits of the final position ``[n, V]`` (else None). ``pad``:
        right-pad the input to a multiple of it (sequence parallelism; causal attention keeps the
        real positions' outputs exact). ``padded``: the batch is left-padded (positions and mask)."""
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        g = self.groups
        n, real = tokens.shape
        if real % pad:
            tokens = torch.nn.functional.pad(tokens, (0, pad - real % pad), value=self.pad_id)
        s = tokens.shape[1]
        model = unwrap(self.model)
        first = g is None or g.is_first_stage
        last = g is None or g.is_last_stage
        if not first:
            h = model.config.hidden_size
            recv = torch.empty(s, n, h, dtype=model.config.pipeline_dtype, device=tokens.device)
            # Hidden states of the previous stage for these positions ([s, n, h], Megatron's layout).
            dist.recv(recv, src=g.pp_global(g.pp_rank - 1), group=g.pp)
            model.set_input_tensor(recv)
        if padded is not None:
            out = self.model(tokens, padded.positions(offset, s), padded.mask(offset, s), inference_context=ctx)
        else:
            mb = MicroBatch(tokens, tokens, torch.zeros(n, s, device=tokens.device), rows=n, offset=offset)
            if any(media):
                mb.fields["media"] = media
            out = self.forward(self.model, mb, inference_context=ctx)
        if ctx is not None:
            ctx.sequence_len_offset += s
        if not last:
            dist.send(out.contiguous(), dst=g.pp_global(g.pp_rank + 1), group=g.pp)
            return None
        # [n, V/tp] vocab-parallel logits of the final real position, counted from the end: the output
        # holds every position, or only the last one when the KV-cache path's hook slices it (no padding).
        logits = out[:, real - 1 - s, :].float()
        if g is not None and g.tp_size > 1:
            logits = gather_from_tensor_model_parallel_region(logits, g.tp)  # [n, V]: one position only
        if logits.shape[-1] > self.vocab_size:
            logits[:, self.vocab_size :] = float("-inf")  # padded vocabulary entries
        if self.never_sample:
            logits[:, self.never_sample] = float("-inf")  # ids the model reserves (image placeholders)
        return logits

    def _sample_and_share(self, logits, params, uniforms, n) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.groups
        if g is None or (g.tp_size == 1 and g.pp_size == 1):  # this rank sampled and needs nobody's tokens
            return sample_tokens(logits, params, uniforms)
        packed = torch.zeros(2, n, device=self.device)
        if logits is not None:
            ids, lps = sample_tokens(logits, params, uniforms)
            packed = torch.stack([ids.float(), lps])
        if g is not None:
            # TP rank 0's sample wins (every TP rank drew the same, this makes it certain).
            if g.tp_size > 1:
                dist.broadcast(packed, src=g.tp_global(0), group=g.tp)
            # The last pipeline stage sampled; every stage needs the tokens for the next step.
            if g.pp_size > 1:
                dist.broadcast(packed, src=g.pp_global(g.pp_size - 1), group=g.pp)
        return packed[0].long(), packed[1]


@register_engine("megatron")
def make_megatron_engine(ctx: EngineContext) -> MegatronEngine:
    """The ``megatron`` engine of one branch: its own first model chunk, provider and groups."""
    return MegatronEngine(ctx.chunks[0], ctx.model_cfg.vocab_size, ctx.tokenizer.pad_id, ctx.tokenizer.decode,
                          provider=ctx.provider, groups=ctx.groups)  # fmt: skip
