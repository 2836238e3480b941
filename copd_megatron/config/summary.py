"""What a config describes, in one line: the model's shape and its parameter count.

``copd-train --check`` prints it, so a check of a large layout says which model it checked
(a preset whose shape keys were overridden by the file is visible at once). The count is
closed-form over the fields of :class:`ModelConfig`, for the padded vocabulary the model
builds (``config/layout.py``); ``tests/distributed/test_model_build.py`` compares it with the
parameters of built models and with published sizes.

Per decoder layer, with ``h`` hidden, ``d`` head dim, ``a`` heads, ``g`` KV groups, ``f`` FFN:
attention ``h·d·(a + 2g)`` (QKV) + ``a·d·h`` (output), MLP ``h·f·(2 if SwiGLU else 1) + f·h``,
two norms of ``h`` (LayerNorm adds biases), QK-norm ``2d``, QKV bias ``d·(a + 2g)``; plus
the embedding ``V·h``, the output layer ``V·h`` unless tied, and the final norm.
"""

from __future__ import annotations

from copd_megatron.config.layout import padded_vocab_size
from copd_megatron.config.schema import ModelConfig


def count_parameters(m: ModelConfig) -> int:
    """Parameters of one branch (all TP/PP shards together)."""
    h, a = m.hidden_size, m.num_attention_heads
    d = m.kv_channels or h // a
    g = m.num_query_groups or a
    norm = h * (2 if m.normalization == "LayerNorm" else 1)
    qkv_out = d * (a + 2 * g)
    attn = h * qkv_out + a * d * h
    if m.add_qkv_bias or m.add_bias_linear:
        attn += qkv_out
    if m.add_bias_linear:
        attn += h
    if m.qk_layernorm:
        attn += 2 * d * (2 if m.normalization == "LayerNorm" else 1)
    fc1_out = m.ffn_hidden_size * (2 if m.activation == "swiglu" else 1)
    mlp = h * fc1_out + m.ffn_hidden_size * h + ((fc1_out + h) if m.add_bias_linear else 0)
    if m.num_moe_experts:
        mlp = mlp * m.num_moe_experts + h * m.num_moe_experts  # experts + router
    vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by)
    embeddings = vocab * h * (1 if m.tie_embeddings else 2)
    return m.num_layers * (attn + mlp + 2 * norm) + norm + embeddings


def describe_model(m: ModelConfig) -> str:
    """``36 layers, hidden 4096, 32 heads (8 KV groups, head dim 128), FFN 12288, vocab 151936: 8.19B parameters``."""
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    preset = f"preset {m.preset}, " if m.preset else ""
    return (f"{preset}{m.num_layers} layers, hidden {m.hidden_size}, {m.num_attention_heads} heads ({groups} KV groups, "
            f"head dim {d}), FFN {m.ffn_hidden_size}, vocab {m.vocab_size}: {human_count(count_parameters(m))} "
            "parameters")  # fmt: skip


def human_count(n: int) -> str:
    """``8190735360`` → ``8.19B``; ``823552`` → ``823.55K``."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale or unit == "K":
            return f"{n / scale:.2f}{unit}"
    return str(n)
