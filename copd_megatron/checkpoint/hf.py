"""Hugging Face ⇄ Megatron-Core name and layout mapping for dense Llama-3, Qwen2/2.5, Qwen3.

Pure tensor functions on *full* (TP=1, PP=1) state dicts of Megatron's local layer spec; the
sharding to any TP/PP layout is dist_checkpointing's job (``checkpoint/convert.py``).

    HF                                          Megatron (local spec)
    model.embed_tokens.weight [V, h]            embedding.word_embeddings.weight [V_pad, h]
    layers.i.input_layernorm.weight             decoder.layers.i.input_layernorm.weight
    layers.i.self_attn.{q,k,v}_proj.{weight,bias}  decoder.layers.i.self_attention.linear_qkv.{weight,bias}
    layers.i.self_attn.{q,k}_norm.weight (Qwen3)   decoder.layers.i.self_attention.{q,k}_layernorm.weight
    layers.i.self_attn.o_proj.weight            decoder.layers.i.self_attention.linear_proj.weight
    layers.i.post_attention_layernorm.weight    decoder.layers.i.pre_mlp_layernorm.weight
    layers.i.mlp.{gate,up}_proj.weight          decoder.layers.i.mlp.linear_fc1.weight  = [gate; up]
    layers.i.mlp.down_proj.weight               decoder.layers.i.mlp.linear_fc2.weight
    model.norm.weight                           decoder.final_layernorm.weight
    lm_head.weight (absent when tied)           output_layer.weight (absent when tied)

Fused QKV, grouped by KV head (GQA): with G query groups, H/G query heads per group and head
dim d, ``linear_qkv`` rows are, for g = 0..G−1:  [q heads g·H/G … (g+1)·H/G − 1 | k_g | v_g],
each block d rows. TP splits these rows by whole groups, which is why TP must divide G.
The vocabulary is padded with zero rows on import and the padding is trimmed on export.
"""

from __future__ import annotations

import torch

from copd_megatron.config.layout import padded_vocab_size
from copd_megatron.config.schema import ConfigError, ModelConfig

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def model_config_from_hf(hf: dict, source: str = "config.json") -> dict:
    """ModelConfig fields from an HF ``config.json`` (one-line errors for what we cannot map)."""
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{source}: architectures[0]={arch!r} is not supported; expected one of {ARCHITECTURES}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act={hf['hidden_act']!r}; only 'silu' (SwiGLU) is supported")
    rope = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope and rope_type not in ("llama3", "default"):
        raise ConfigError(f"{source}: rope_scaling type {rope_type!r} is not supported; expected 'llama3' or none")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    fields = dict(
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads", heads),
        kv_channels=head_dim if head_dim * heads != hf["hidden_size"] or arch == "Qwen3ForCausalLM" else None,
        vocab_size=hf["vocab_size"], seq_length=hf.get("max_position_embeddings", 4096),
        rotary_base=float(hf.get("rope_theta", 10000.0)), norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), add_qkv_bias=arch == "Qwen2ForCausalLM",
        qk_layernorm=arch == "Qwen3ForCausalLM", normalization="RMSNorm", activation="swiglu",
        rope_scaling=rope_type == "llama3", rope_scaling_factor=float(rope.get("factor", 8.0)),
    )  # fmt: skip
    return fields


def hf_config_from_model(m: ModelConfig, arch: str) -> dict:
    if arch not in ARCHITECTURES:
        raise ConfigError(f"--arch: {arch!r} is not supported; expected one of {ARCHITECTURES}")
    head_dim = m.kv_channels or m.hidden_size // m.num_attention_heads
    cfg = {
        "architectures": [arch], "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                                                "Qwen3ForCausalLM": "qwen3"}[arch],
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_hidden_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.num_query_groups or m.num_attention_heads,
        "head_dim": head_dim, "vocab_size": m.vocab_size, "max_position_embeddings": m.seq_length,
        "rope_theta": m.rotary_base, "rms_norm_eps": m.norm_epsilon, "tie_word_embeddings": m.tie_embeddings,
        "hidden_act": "silu", "torch_dtype": "float32",
    }  # fmt: skip
    if m.rope_scaling:
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": m.rope_scaling_factor, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    return cfg


def _dims(m: ModelConfig) -> tuple[int, int, int]:
    groups = m.num_query_groups or m.num_attention_heads
    return m.num_attention_heads, groups, m.kv_channels or m.hidden_size // m.num_attention_heads


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    """[q; k; v] (HF, head-major) → Megatron's per-group [q_g…, k_g, v_g] rows (weights or biases)."""
    heads, groups, d = _dims(m)
    rest = q.shape[1:]
    q = q.reshape(groups, heads // groups * d, *rest)
    k, v = k.reshape(groups, d, *rest), v.reshape(groups, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    heads, groups, d = _dims(m)
    rest = qkv.shape[1:]
    per = qkv.reshape(groups, (heads // groups + 2) * d, *rest)
    q, k, v = torch.split(per, [heads // groups * d, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def _pad_vocab(t: torch.Tensor, m: ModelConfig) -> torch.Tensor:
    rows = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by) - t.shape[0]
    return torch.cat([t, t.new_zeros(rows, t.shape[1])]) if rows > 0 else t


def hf_to_mcore(hf: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Full Megatron state dict (local spec, TP=1/PP=1) from an HF state dict."""
    out = {"embedding.word_embeddings.weight": _pad_vocab(hf["model.embed_tokens.weight"], m),
           "decoder.final_layernorm.weight": hf["model.norm.weight"]}  # fmt: skip
    if not m.tie_embeddings:
        out["output_layer.weight"] = _pad_vocab(hf["lm_head.weight"], m)
    for i in range(m.num_layers):
        h, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn = h + "self_attn."
        out[mc + "input_layernorm.weight"] = hf[h + "input_layernorm.weight"]
        out[mc + "pre_mlp_layernorm.weight"] = hf[h + "post_attention_layernorm.weight"]
        out[mc + "self_attention.linear_qkv.weight"] = fuse_qkv(*(hf[f"{attn}{p}_proj.weight"] for p in "qkv"), m)
        if m.add_qkv_bias:
            out[mc + "self_attention.linear_qkv.bias"] = fuse_qkv(*(hf[f"{attn}{p}_proj.bias"] for p in "qkv"), m)
        if m.qk_layernorm:
            out[mc + "self_attention.q_layernorm.weight"] = hf[attn + "q_norm.weight"]
            out[mc + "self_attention.k_layernorm.weight"] = hf[attn + "k_norm.weight"]
        out[mc + "self_attention.linear_proj.weight"] = hf[attn + "o_proj.weight"]
        out[mc + "mlp.linear_fc1.weight"] = torch.cat([hf[h + "mlp.gate_proj.weight"], hf[h + "mlp.up_proj.weight"]])
        out[mc + "mlp.linear_fc2.weight"] = hf[h + "mlp.down_proj.weight"]
    return out


def mcore_to_hf(mc: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict from a full Megatron state dict; vocabulary padding trimmed."""
    v = m.vocab_size
    out = {"model.embed_tokens.weight": mc["embedding.word_embeddings.weight"][:v],
           "model.norm.weight": mc["decoder.final_layernorm.weight"]}  # fmt: skip
    if not m.tie_embeddings:
        out["lm_head.weight"] = mc["output_layer.weight"][:v]
    for i in range(m.num_layers):
        h, p = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[h + "input_layernorm.weight"] = mc[p + "input_layernorm.weight"]
        out[h + "post_attention_layernorm.weight"] = mc[p + "pre_mlp_layernorm.weight"]
        for name, t in zip("qkv", split_qkv(mc[p + "self_attention.linear_qkv.weight"], m)):
            out[f"{h}self_attn.{name}_proj.weight"] = t
        if m.add_qkv_bias:
            for name, t in zip("qkv", split_qkv(mc[p + "self_attention.linear_qkv.bias"], m)):
                out[f"{h}self_attn.{name}_proj.bias"] = t
        if m.qk_layernorm:
            out[h + "self_attn.q_norm.weight"] = mc[p + "self_attention.q_layernorm.weight"]
            out[h + "self_attn.k_norm.weight"] = mc[p + "self_attention.k_layernorm.weight"]
        out[h + "self_attn.o_proj.weight"] = mc[p + "self_attention.linear_proj.weight"]
        gate, up = mc[p + "mlp.linear_fc1.weight"].chunk(2)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = mc[p + "mlp.linear_fc2.weight"]
    return {k: t.contiguous() for k, t in out.items()}
