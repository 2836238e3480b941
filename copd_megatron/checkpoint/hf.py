"""Hugging Face ⇄ Megatron-Core mapping for dense Llama-3, Qwen2/2.5 and Qwen3: pure functions.
(Qwen3-VL / Qwen2.5-VL: ``checkpoint/hf_vl.py``, reached through the same functions when the
model config has a ``vision`` section.)

Nothing here touches a process group or a file. The functions translate *full* tensors, i.e.
a Megatron state dict at TP=1/PP=1, to and from HF tensors; sharding to any TP/PP layout is
``dist_checkpointing``'s job (see ``checkpoint/convert.py``). They take a *getter* (name →
tensor) and yield ``(name, tensor)`` one at a time, so a caller can stream: read one HF tensor
from a memory-mapped safetensors file, write one Megatron parameter, and so on.

Names (``i`` = layer; Megatron names are the local layer spec's, TE names are accepted too)::

    HF                                             Megatron
    model.embed_tokens.weight         [V, h]       embedding.word_embeddings.weight   [V_pad, h]
    model.layers.i.input_layernorm.weight          decoder.layers.i.input_layernorm.weight
                                                     (TE: ...self_attention.linear_qkv.layer_norm_weight)
    model.layers.i.self_attn.{q,k,v}_proj.weight   decoder.layers.i.self_attention.linear_qkv.weight
    model.layers.i.self_attn.{q,k,v}_proj.bias     decoder.layers.i.self_attention.linear_qkv.bias (Qwen2)
    model.layers.i.self_attn.{q,k}_norm.weight     decoder.layers.i.self_attention.{q,k}_layernorm.weight (Qwen3)
    model.layers.i.self_attn.o_proj.weight         decoder.layers.i.self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight decoder.layers.i.pre_mlp_layernorm.weight
                                                     (TE: ...mlp.linear_fc1.layer_norm_weight)
    model.layers.i.mlp.{gate,up}_proj.weight       decoder.layers.i.mlp.linear_fc1.weight = [gate; up]
    model.layers.i.mlp.down_proj.weight            decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                              decoder.final_layernorm.weight
    lm_head.weight (absent when tied)              output_layer.weight (absent when tied)

Fused QKV. Megatron splits ``linear_qkv``'s output per query group (``SelfAttention.
get_query_key_value_tensors``: view as [ng, (np/ng + 2)·hn], split [np/ng·hn, hn, hn]), so its
rows are grouped by KV head. With H = 4 query heads, G = 2 KV groups, head dim d::

    HF q_proj [H·d, h]:  q0 q1 q2 q3        Megatron linear_qkv [(H + 2G)·d, h]:
    HF k_proj [G·d, h]:  k0 k1                q0 q1 k0 v0 | q2 q3 k1 v1
    HF v_proj [G·d, h]:  v0 v1                └─ group 0 ─┘ └─ group 1 ─┘   (every block d rows)

TP splits these rows by whole groups, which is why TP must divide G. The Qwen2 bias is laid
out the same way. Fused MLP: Megatron's SwiGLU takes ``torch.chunk(x, 2, dim=-1)`` and applies
SiLU to the first half, so ``linear_fc1 = [gate; up]`` (gate rows first).

Vocabulary. Megatron pads the embedding and output layer to ``padded_vocab_size`` (a multiple
of ``make_vocab_size_divisible_by``). Import appends zero rows (their logits are 0; our losses
and sampler mask padded ids); export trims to ``vocab_size``, so padding never leaks into HF.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

from copd_megatron.config.layout import padded_vocab_size
from copd_megatron.config.schema import ConfigError, ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
"""Supported HF architectures and their ``model_type``."""

# Megatron's Llama-3 RoPE scaling hard-codes these (rotary_pos_embedding._apply_scaling): a
# checkpoint with other values would silently run with the wrong frequencies, so we refuse it.
LLAMA3_ROPE_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# The TE layer spec fuses the pre-attention / pre-MLP RMSNorm into the next linear layer.
TE_TO_LOCAL = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",  # LayerNorm ViT (Qwen3-VL)
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}

# Per-layer tensors that map one to one: (HF suffix, Megatron suffix).
_DIRECT = (
    ("input_layernorm.weight", "input_layernorm.weight"),
    ("self_attn.o_proj.weight", "self_attention.linear_proj.weight"),
    ("post_attention_layernorm.weight", "pre_mlp_layernorm.weight"),
    ("mlp.down_proj.weight", "mlp.linear_fc2.weight"),
)
_QK_NORM = (("self_attn.q_norm.weight", "self_attention.q_layernorm.weight"),
            ("self_attn.k_norm.weight", "self_attention.k_layernorm.weight"))  # fmt: skip

Getter = Callable[[str], torch.Tensor]


# ----------------------------------------------------------------------------- config mapping


def _rope(hf: dict) -> tuple[float, dict]:
    """(rope_theta, scaling dict) from either config.json style: transformers 4.x writes
    ``rope_theta`` + ``rope_scaling``, 5.x writes one ``rope_parameters`` dict."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    return float(theta), params


def _check_supported(hf: dict, src: str) -> None:
    """Refuse features our Megatron model cannot express, naming the config field."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{src}: hidden_act={hf['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if hf.get(key):
            raise ConfigError(f"{src}: {key}=true is not supported by the built-in converter (try --backend bridge)")
    if hf.get("quantization_config"):
        raise ConfigError(f"{src}: quantization_config is set; convert an unquantized checkpoint")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{src}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported")
    theta, rope = _rope(hf)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise ConfigError(f"{src}: rope_scaling rope_type={kind!r} is not supported; expected 'llama3' or none")
    for key, want in LLAMA3_ROPE_FIXED.items() if kind == "llama3" else ():
        if float(rope.get(key, want)) != want:
            raise ConfigError(f"{src}: rope_scaling.{key}={rope[key]} is not supported; Megatron fixes it to {want}")
    if not theta.is_integer():
        raise ConfigError(f"{src}: rope_theta={theta} must be an integer (Megatron's rotary_base is an int)")


def all_architectures() -> dict[str, str]:
    from copd_megatron.checkpoint.hf_vl import ARCHITECTURES as VL

    return {**ARCHITECTURES, **VL}


def architecture_of(hf: dict, src: str = "config.json") -> str:
    """The HF architecture name of a config.json, refused unless it is one of ours."""
    known = all_architectures()
    arch = (hf.get("architectures") or [None])[0]
    if arch is None:  # some configs only carry model_type
        arch = {v: k for k, v in known.items()}.get(hf.get("model_type"), hf.get("model_type"))
    if arch not in known:
        raise ConfigError(f"{src}: architectures[0]={arch!r} is not supported; expected one of {list(known)}")
    return arch


def model_fields_from_hf(hf: dict, src: str = "config.json", make_vocab_size_divisible_by: int = 128) -> dict:
    """``ModelConfig`` fields (the ``model:`` section) from an HF config.json dict."""
    arch = architecture_of(hf, src)
    if arch not in ARCHITECTURES:
        from copd_megatron.checkpoint import hf_vl

        return hf_vl.model_fields({**hf, "architectures": [arch]}, src, make_vocab_size_divisible_by)
    _check_supported(hf, src)
    theta, rope = _rope(hf)
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim") or hidden // heads
    return dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
        # Only when it differs from hidden/heads (Qwen3-8B: 128 = 4096/32 needs none).
        kv_channels=head_dim if head_dim * heads != hidden else None,
        vocab_size=hf["vocab_size"], make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        seq_length=hf.get("max_position_embeddings", 4096), rotary_base=theta,
        rope_scaling=rope.get("rope_type", rope.get("type")) == "llama3",
        rope_scaling_factor=float(rope.get("factor", 8.0)), normalization="RMSNorm",
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), activation="swiglu",
        add_qkv_bias=arch == "Qwen2ForCausalLM", add_bias_linear=False, qk_layernorm=arch == "Qwen3ForCausalLM",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )  # fmt: skip


def _vl(m: ModelConfig) -> bool:
    """A Qwen-VL model (mapped by ``hf_vl``); a LLaVA model has no HF mapping here (one-line refusal)."""
    if m.arch == "llava":
        raise ConfigError("model.arch 'llava' has no Hugging Face conversion here; copd-convert handles gpt, "
                          "qwen3_vl and qwen2_5_vl models")  # fmt: skip
    return m.vision is not None


def infer_architecture(m: ModelConfig) -> str:
    """The HF family a ModelConfig corresponds to: its vision family, else QK-norm → Qwen3,
    QKV bias → Qwen2, else Llama."""
    if _vl(m):
        from copd_megatron.checkpoint.hf_vl import FAMILY_ARCH

        return FAMILY_ARCH[m.arch]
    return "Qwen3ForCausalLM" if m.qk_layernorm else "Qwen2ForCausalLM" if m.add_qkv_bias else "LlamaForCausalLM"


def _check_exportable(m: ModelConfig, arch: str) -> None:
    bad = [(m.normalization != "RMSNorm", "normalization", m.normalization), (m.activation != "swiglu", "activation",
           m.activation), (m.add_bias_linear, "add_bias_linear", True), (m.num_moe_experts, "num_moe_experts",
           m.num_moe_experts), (m.rotary_percent != 1.0, "rotary_percent", m.rotary_percent)]  # fmt: skip
    for is_bad, field, value in bad:
        if is_bad:
            raise ConfigError(f"model.{field}={value!r} has no {arch} equivalent")
    if m.qk_layernorm != (arch == "Qwen3ForCausalLM"):
        raise ConfigError(f"model.qk_layernorm={m.qk_layernorm} does not match --arch {arch} (only Qwen3 has QK-norm)")
    if m.add_qkv_bias != (arch == "Qwen2ForCausalLM"):
        raise ConfigError(f"model.add_qkv_bias={m.add_qkv_bias} does not match --arch {arch} (only Qwen2 has it)")


_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "vocab_size", "tie_embeddings", "add_qkv_bias", "qk_layernorm")  # fmt: skip


def hf_config_from_model(m: ModelConfig, arch: str | None = None, template: dict | None = None) -> dict:
    """An HF config.json dict for ``m``. ``template`` (e.g. the base model's config.json) keeps
    the fields we do not model (token ids, dtype, chat settings) and its rope key style; its
    shape must match ``m`` (a mismatch means the wrong template, so it is an error)."""
    if _vl(m):
        from copd_megatron.checkpoint import hf_vl

        return hf_vl.hf_config(m, arch, template)
    arch = arch or infer_architecture(m)
    if arch not in ARCHITECTURES:
        raise ConfigError(f"--arch: {arch!r} is not supported; expected one of {list(ARCHITECTURES)}")
    _check_exportable(m, arch)
    cfg = dict(template or {})
    head_dim = dims(m).head_dim
    if template:
        theirs = model_fields_from_hf(template, "template config.json")
        theirs["head_dim"] = theirs["kv_channels"] or theirs["hidden_size"] // theirs["num_attention_heads"]
        ours = {**{k: getattr(m, k) for k in _SHAPE_FIELDS}, "num_query_groups": dims(m).groups, "head_dim": head_dim}
        for key, value in ours.items():
            if theirs[key] != value:
                raise ConfigError(f"template config.json: {key} is {theirs[key]} but the checkpoint has {value}")
    cfg.update(architectures=[arch], model_type=ARCHITECTURES[arch], hidden_size=m.hidden_size,
               intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
               num_attention_heads=m.num_attention_heads, num_key_value_heads=dims(m).groups, head_dim=head_dim,
               vocab_size=m.vocab_size, max_position_embeddings=m.seq_length,
               rms_norm_eps=m.norm_epsilon, tie_word_embeddings=m.tie_embeddings, hidden_act="silu")  # fmt: skip
    if arch != "Qwen2ForCausalLM":
        cfg["attention_bias"] = False
    rope = {"rope_type": "llama3", "factor": m.rope_scaling_factor, **LLAMA3_ROPE_FIXED} if m.rope_scaling else None
    if "rope_parameters" in cfg:  # transformers >= 5 style
        cfg["rope_parameters"] = {"rope_theta": m.rotary_base, **(rope or {"rope_type": "default"})}
    else:  # 4.x style, which 5.x reads too
        cfg.update(rope_theta=m.rotary_base, rope_scaling=rope)
    return cfg


# ----------------------------------------------------------------------------- tensor layout


@dataclass(frozen=True)
class Dims:
    """Attention and vocabulary sizes a ModelConfig implies."""

    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int


def dims(m: ModelConfig) -> Dims:
    heads = m.num_attention_heads
    return Dims(heads, m.num_query_groups or heads, m.kv_channels or m.hidden_size // heads, m.vocab_size,
                padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by))  # fmt: skip


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, d: Dims) -> torch.Tensor:
    """HF q [H·d, …], k/v [G·d, …] → Megatron rows [q_g…, k_g, v_g] per group g (weights or biases)."""
    rest = q.shape[1:]
    q = q.reshape(d.groups, d.heads // d.groups * d.head_dim, *rest)
    k, v = k.reshape(d.groups, d.head_dim, *rest), v.reshape(d.groups, d.head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, d: Dims) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`fuse_qkv`: Megatron's grouped rows → contiguous HF q, k, v."""
    rest = qkv.shape[1:]
    per_group = qkv.reshape(d.groups, (d.heads // d.groups + 2) * d.head_dim, *rest)
    q, k, v = torch.split(per_group, [d.heads // d.groups * d.head_dim, d.head_dim, d.head_dim], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))  # type: ignore[return-value]


def pad_vocab(t: torch.Tensor, d: Dims) -> torch.Tensor:
    """Append zero rows up to the padded vocabulary."""
    extra = d.padded_vocab - t.shape[0]
    return torch.cat([t, t.new_zeros(extra, *t.shape[1:])]) if extra > 0 else t


def hf_shapes(m: ModelConfig, hf_names: set[str] | None = None) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a model with config ``m`` has, with its shape (in file order).
    ``hf_names``: a checkpoint's tensor names, to pick the naming a Qwen-VL file uses."""
    if _vl(m):
        from copd_megatron.checkpoint import hf_vl

        return hf_vl.hf_shapes(m, hf_vl.naming_of(m, hf_names))
    d, h, f = dims(m), m.hidden_size, m.ffn_hidden_size
    q, kv = d.heads * d.head_dim, d.groups * d.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (d.vocab, h)}
    for i in range(m.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                    p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h)})  # fmt: skip
        if m.add_qkv_bias:
            out.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                        p + "self_attn.v_proj.bias": (kv,)})  # fmt: skip
        if m.qk_layernorm:
            out.update({p + "self_attn.q_norm.weight": (d.head_dim,), p + "self_attn.k_norm.weight": (d.head_dim,)})
        out.update({p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f)})  # fmt: skip
    out["model.norm.weight"] = (h,)
    if not m.tie_embeddings:
        out["lm_head.weight"] = (d.vocab, h)
    return out


def _checked(get: Getter, shapes: Mapping[str, tuple[int, ...]], what: str) -> Getter:
    """Wrap a getter so a tensor of the wrong shape is a one-line error naming it."""

    def checked(name: str) -> torch.Tensor:
        t = get(name)
        if name in shapes and tuple(t.shape) != shapes[name]:
            raise ConfigError(f"{what}: {name} has shape {tuple(t.shape)} but the config implies {shapes[name]}")
        return t

    return checked


def hf_to_mcore_iter(get: Getter, m: ModelConfig, hf_names: set[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield full Megatron (local-spec) tensors, one at a time, reading HF tensors via ``get``."""
    if _vl(m):
        from copd_megatron.checkpoint import hf_vl

        yield from hf_vl.hf_to_mcore_iter(get, m, hf_vl.naming_of(m, hf_names))
        return
    d, get = dims(m), _checked(get, hf_shapes(m), "HF checkpoint")
    yield "embedding.word_embeddings.weight", pad_vocab(get("model.embed_tokens.weight"), d)
    for i in range(m.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_name, mc_name in _DIRECT + (_QK_NORM if m.qk_layernorm else ()):
            yield mc + mc_name, get(hf + hf_name)
        for kind in ("weight", "bias") if m.add_qkv_bias else ("weight",):
            qkv = (get(f"{hf}self_attn.{p}_proj.{kind}") for p in "qkv")
            yield f"{mc}self_attention.linear_qkv.{kind}", fuse_qkv(*qkv, d)
        gate_up = [get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")]
        yield mc + "mlp.linear_fc1.weight", torch.cat(gate_up)
    yield "decoder.final_layernorm.weight", get("model.norm.weight")
    if not m.tie_embeddings:
        yield "output_layer.weight", pad_vocab(get("lm_head.weight"), d)


def _trim_vocab(t: torch.Tensor, d: Dims, name: str) -> torch.Tensor:
    if t.shape[0] < d.vocab:
        raise ConfigError(f"Megatron checkpoint: {name} has {t.shape[0]} rows, fewer than vocab_size={d.vocab}")
    return t[: d.vocab]


def mcore_to_hf_iter(get: Getter, m: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield HF tensors, one at a time, reading full Megatron tensors (local or TE names) via ``get``."""
    if _vl(m):
        from copd_megatron.checkpoint import hf_vl

        yield from hf_vl.mcore_to_hf_iter(get, m)
        return
    d = dims(m)
    emb = "embedding.word_embeddings.weight"
    yield "model.embed_tokens.weight", _trim_vocab(get(emb), d, emb)
    for i in range(m.num_layers):
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_name, mc_name in _DIRECT + (_QK_NORM if m.qk_layernorm else ()):
            yield hf + hf_name, get(mc + mc_name)
        for kind in ("weight", "bias") if m.add_qkv_bias else ("weight",):
            q, k, v = split_qkv(get(f"{mc}self_attention.linear_qkv.{kind}"), d)
            yield from ((f"{hf}self_attn.{p}_proj.{kind}", t) for p, t in zip("qkv", (q, k, v), strict=True))
        gate, up = get(mc + "mlp.linear_fc1.weight").chunk(2)
        yield hf + "mlp.gate_proj.weight", gate.contiguous()
        yield hf + "mlp.up_proj.weight", up.contiguous()
    yield "model.norm.weight", get("decoder.final_layernorm.weight")
    if not m.tie_embeddings:
        yield "lm_head.weight", _trim_vocab(get("output_layer.weight"), d, "output_layer.weight")


def local_name(name: str) -> str:
    """A Megatron parameter name in the local spec's naming (TE's fused-norm names mapped)."""
    for te, local in TE_TO_LOCAL.items():
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def checkpoint_names(name: str) -> tuple[str, ...]:
    """The torch_dist keys a local-spec parameter may be stored under, preferred first.

    Megatron saves the local spec's norms under TE's fused names (the local layer spec's
    ``sharded_state_dict_keys_map``), so a checkpoint reads the same from either spec; the
    plain local name is accepted too, for specs without that map."""
    for te, local in TE_TO_LOCAL.items():
        if name.endswith(local):
            return name[: -len(local)] + te, name
    return (name,)


def mcore_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every full (TP=1/PP=1) Megatron parameter of ``m``, local-spec names, with its shape."""
    if _vl(m):
        from copd_megatron.checkpoint import hf_vl

        return hf_vl.mcore_shapes(m)
    d, h, f = dims(m), m.hidden_size, m.ffn_hidden_size
    qkv, q = (d.heads + 2 * d.groups) * d.head_dim, d.heads * d.head_dim
    out: dict[str, tuple[int, ...]] = {"embedding.word_embeddings.weight": (d.padded_vocab, h)}
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        out.update({p + "input_layernorm.weight": (h,), p + "self_attention.linear_qkv.weight": (qkv, h)})
        if m.add_qkv_bias:
            out[p + "self_attention.linear_qkv.bias"] = (qkv,)
        if m.qk_layernorm:
            out.update({p + "self_attention.q_layernorm.weight": (d.head_dim,),
                        p + "self_attention.k_layernorm.weight": (d.head_dim,)})  # fmt: skip
        out.update({p + "self_attention.linear_proj.weight": (h, q), p + "pre_mlp_layernorm.weight": (h,),
                    p + "mlp.linear_fc1.weight": (2 * f, h), p + "mlp.linear_fc2.weight": (h, f)})  # fmt: skip
    out["decoder.final_layernorm.weight"] = (h,)
    if not m.tie_embeddings:
        out["output_layer.weight"] = (d.padded_vocab, h)
    return out


def hf_embedding_name(m: ModelConfig, hf_names: set[str] | None = None) -> str:
    """The HF name of the input embedding (its dtype is the checkpoint's; tied models share it)."""
    if _vl(m):
        from copd_megatron.checkpoint import hf_vl

        return hf_vl.hf_embedding_name(m, hf_vl.naming_of(m, hf_names))
    return "model.embed_tokens.weight"


def mcore_embedding_name(m: ModelConfig) -> str:
    return "language_model.embedding.word_embeddings.weight" if _vl(m) else "embedding.word_embeddings.weight"


def _dict_getter(state: Mapping[str, torch.Tensor], what: str) -> Getter:
    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise ConfigError(f"{what}: tensor {name} is missing")
        return state[name]

    return get


def hf_to_mcore(hf: Mapping[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Full Megatron state dict (local spec, TP=1/PP=1) from a whole HF state dict."""
    return dict(hf_to_mcore_iter(_dict_getter(hf, "HF checkpoint"), m, set(hf)))


def mcore_to_hf(mc: Mapping[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict from a full Megatron state dict in either naming scheme; padding trimmed."""
    local = {local_name(k): v for k, v in mc.items() if isinstance(v, torch.Tensor)}
    return dict(mcore_to_hf_iter(_dict_getter(local, "Megatron checkpoint"), m))
