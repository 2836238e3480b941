"""Model shape presets: the published shapes of dense Llama-3 / Qwen2.5 / Qwen3 models, and of
vision towers for ``model.vision``.

A preset fills every ``model.*`` field (``VISION_PRESETS``: every ``model.vision.*`` field); keys
written next to ``preset`` in a config override it.
Shapes come from the models' public ``config.json`` files (hidden size, layers, heads, KV
heads, head dim, FFN size, vocabulary, RoPE theta, tied embeddings, QKV bias, QK-norm).
"""

from __future__ import annotations

_LLAMA3 = dict(
    normalization="RMSNorm", activation="swiglu", norm_epsilon=1e-5, rotary_base=500000.0,
    vocab_size=128256, add_qkv_bias=False, qk_layernorm=False, seq_length=8192,
)  # fmt: skip
_QWEN2 = dict(
    normalization="RMSNorm", activation="swiglu", norm_epsilon=1e-6, rotary_base=1000000.0,
    vocab_size=151936, add_qkv_bias=True, qk_layernorm=False, seq_length=32768,
)  # fmt: skip
_QWEN3 = dict(
    normalization="RMSNorm", activation="swiglu", norm_epsilon=1e-6, rotary_base=1000000.0,
    vocab_size=151936, add_qkv_bias=False, qk_layernorm=True, kv_channels=128, seq_length=40960,
)  # fmt: skip


def _shape(layers: int, hidden: int, ffn: int, heads: int, groups: int, tie: bool, **extra) -> dict:
    return dict(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=ffn, num_attention_heads=heads,
        num_query_groups=groups, tie_embeddings=tie, **extra,
    )  # fmt: skip


PRESETS: dict[str, dict] = {
    # A CPU-sized model for tests and the demo (≈0.2M parameters with a 512-token vocabulary).
    "tiny": dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4, num_query_groups=2,
        vocab_size=512, seq_length=256, normalization="RMSNorm", activation="swiglu", tie_embeddings=False,
    ),  # fmt: skip
    "llama3.2-1b": {**_LLAMA3, **_shape(16, 2048, 8192, 32, 8, True, rope_scaling=True, rope_scaling_factor=32.0)},
    "llama3.2-3b": {**_LLAMA3, **_shape(28, 3072, 8192, 24, 8, True, rope_scaling=True, rope_scaling_factor=32.0)},
    "llama3-8b": {**_LLAMA3, **_shape(32, 4096, 14336, 32, 8, False)},
    "llama3.1-8b": {**_LLAMA3, **_shape(32, 4096, 14336, 32, 8, False, rope_scaling=True)},
    "llama3-70b": {**_LLAMA3, **_shape(80, 8192, 28672, 64, 8, False)},
    "llama3.1-70b": {**_LLAMA3, **_shape(80, 8192, 28672, 64, 8, False, rope_scaling=True)},
    "qwen2.5-0.5b": {**_QWEN2, **_shape(24, 896, 4864, 14, 2, True)},
    "qwen2.5-1.5b": {**_QWEN2, **_shape(28, 1536, 8960, 12, 2, True)},
    "qwen2.5-3b": {**_QWEN2, **_shape(36, 2048, 11008, 16, 2, True)},
    "qwen2.5-7b": {**_QWEN2, **_shape(28, 3584, 18944, 28, 4, False, vocab_size=152064)},
    "qwen2.5-14b": {**_QWEN2, **_shape(48, 5120, 13824, 40, 8, False, vocab_size=152064)},
    "qwen2.5-32b": {**_QWEN2, **_shape(64, 5120, 27648, 40, 8, False, vocab_size=152064)},
    "qwen2.5-72b": {**_QWEN2, **_shape(80, 8192, 29568, 64, 8, False, vocab_size=152064)},
    "qwen3-0.6b": {**_QWEN3, **_shape(28, 1024, 3072, 16, 8, True)},
    "qwen3-1.7b": {**_QWEN3, **_shape(28, 2048, 6144, 16, 8, True)},
    "qwen3-4b": {**_QWEN3, **_shape(36, 2560, 9728, 32, 8, True)},
    "qwen3-8b": {**_QWEN3, **_shape(36, 4096, 12288, 32, 8, False)},
    "qwen3-14b": {**_QWEN3, **_shape(40, 5120, 17408, 40, 8, False)},
    "qwen3-32b": {**_QWEN3, **_shape(64, 5120, 25600, 64, 8, False)},
}


VISION_PRESETS: dict[str, dict] = {
    # A CPU-sized ViT: 32x32 images in 8x8 patches, 16 tokens per image.
    "tiny": dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, image_height=32, image_width=32,
        patch_size=8, activation="gelu",
    ),  # fmt: skip
    # OpenAI CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower): 576 tokens per image.
    "clip-vit-l-14-336": dict(
        num_layers=24, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16, image_height=336,
        image_width=336, patch_size=14, activation="quick_gelu", norm_epsilon=1e-5,
    ),  # fmt: skip
}
