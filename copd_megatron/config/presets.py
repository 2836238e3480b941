"""Model shape presets: the published shapes of dense Llama-3 / Qwen2.5 / Qwen3 models, of the
Qwen3-VL / Qwen2.5-VL vision-language models (``arch`` and a ``vision`` sub-section included), and
of vision towers for ``model.vision.preset``.

A preset fills every ``model.*`` field (``VISION_PRESETS``: every ``model.vision.*`` field); keys
written next to ``preset`` in a config override it.
Shapes come from the models' public ``config.json`` files (hidden size, layers, heads, KV
heads, head dim, FFN size, vocabulary, RoPE theta, tied embeddings, QKV bias, QK-norm).
"""

from __future__ import annotations

from copd_megatron.config.vision import CLIP_MEAN, CLIP_STD

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


# Qwen3-VL (config.json of Qwen/Qwen3-VL-{2B,4B,8B}-Instruct): language model θ = 5,000,000,
# mrope_section [24, 20, 20] (interleaved), max_position_embeddings 262144, rms_norm_eps 1e-6,
# head_dim 128, vocabulary 151936; ViT patch 16, temporal patch 2, merge 2, a 48×48 = 2304-row
# position table, GELU(tanh). 2B/4B: ViT depth 24, width 1024, MLP 4096, 16 heads, DeepStack
# taps after ViT layers 5, 11, 17. 8B: depth 27, width 1152, MLP 4304, 16 heads, taps 8, 16, 24.
_QWEN3_VL = dict(
    arch="qwen3_vl", normalization="RMSNorm", activation="swiglu", norm_epsilon=1e-6, rotary_base=5000000.0,
    vocab_size=151936, add_qkv_bias=False, qk_layernorm=True, kv_channels=128, seq_length=262144,
)  # fmt: skip
# Token ids of Qwen's tokenizer: <|image_pad|>, <|video_pad|>, <|vision_start|>, <|vision_end|>.
_QWEN_VL_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
                    vision_end_token_id=151653)  # fmt: skip
# Processor settings (preprocessor_config.json): Qwen3-VL normalises with 0.5 / 0.5 and bounds an
# image at 65,536..16,777,216 pixels; Qwen2.5-VL with CLIP's mean / std at 3,136..12,845,056.
_QWEN3_VL_TOWER = dict(patch_size=16, temporal_patch_size=2, spatial_merge_size=2, num_position_embeddings=2304,
                       mrope_section=[24, 20, 20], image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                       min_pixels=65536, max_pixels=16777216, **_QWEN_VL_IDS)  # fmt: skip
_QWEN3_VL_SMALL_VIT = dict(**_QWEN3_VL_TOWER, num_layers=24, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
                           deepstack_layers=[5, 11, 17])  # fmt: skip
_QWEN3_VL_LARGE_VIT = dict(**_QWEN3_VL_TOWER, num_layers=27, hidden_size=1152, ffn_hidden_size=4304, num_attention_heads=16,
                           deepstack_layers=[8, 16, 24])  # fmt: skip
# Qwen2.5-VL (config.json of Qwen/Qwen2.5-VL-{3B,7B}-Instruct): language model θ = 1,000,000,
# mrope_section [16, 24, 24] (chunked), QKV bias, max_position_embeddings 128000, rms_norm_eps
# 1e-6; ViT depth 32, width 1280, MLP 3420 (SwiGLU), 16 heads, patch 14, window 112 pixels,
# full attention in ViT layers 7, 15, 23, 31, tokens_per_second 2. 3B: 36 layers × 2048, MLP
# 11008, 16/2 heads, tied, vocabulary 151936. 7B: 28 layers × 3584, MLP 18944, 28/4 heads,
# untied, vocabulary 152064.
_QWEN25_VL = dict(
    arch="qwen2_5_vl", normalization="RMSNorm", activation="swiglu", norm_epsilon=1e-6, rotary_base=1000000.0,
    vocab_size=151936, add_qkv_bias=True, qk_layernorm=False, seq_length=128000,
)  # fmt: skip
_QWEN25_VL_VIT = dict(num_layers=32, hidden_size=1280, ffn_hidden_size=3420, num_attention_heads=16, patch_size=14,
                      temporal_patch_size=2, spatial_merge_size=2, window_size=112, full_attention_layers=[7, 15, 23, 31],
                      tokens_per_second=2.0, mrope_section=[16, 24, 24], image_mean=CLIP_MEAN, image_std=CLIP_STD,
                      min_pixels=3136, max_pixels=12845056, **_QWEN_VL_IDS)  # fmt: skip


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
    "qwen3-vl-2b": {**_QWEN3_VL, **_shape(28, 2048, 6144, 16, 8, True, vision=_QWEN3_VL_SMALL_VIT)},
    "qwen3-vl-4b": {**_QWEN3_VL, **_shape(36, 2560, 9728, 32, 8, True, vision=_QWEN3_VL_SMALL_VIT)},
    "qwen3-vl-8b": {**_QWEN3_VL, **_shape(36, 4096, 12288, 32, 8, False, vision=_QWEN3_VL_LARGE_VIT)},
    "qwen2.5-vl-3b": {**_QWEN25_VL, **_shape(36, 2048, 11008, 16, 2, True, vision=_QWEN25_VL_VIT)},
    "qwen2.5-vl-7b": {**_QWEN25_VL, **_shape(28, 3584, 18944, 28, 4, False, vocab_size=152064, vision=_QWEN25_VL_VIT)},
}


VISION_PRESETS: dict[str, dict] = {
    # llava: a CPU-sized CLIP ViT: 32x32 images in 8x8 patches, 16 tokens per image.
    "tiny": dict(
        num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, image_height=32, image_width=32,
        patch_size=8, activation="gelu", image_mean=CLIP_MEAN, image_std=CLIP_STD,
    ),  # fmt: skip
    # llava: OpenAI CLIP ViT-L/14 at 336 px (LLaVA-1.5's tower): 576 tokens per image.
    "clip-vit-l-14-336": dict(
        num_layers=24, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16, image_height=336,
        image_width=336, patch_size=14, activation="quick_gelu", norm_epsilon=1e-5, image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ),  # fmt: skip
    # qwen3_vl: a CPU-sized tower: 4-pixel patches merged 2x2, so a 32x32 image is 8x8 patches and 16
    # tokens (one per 8x8 cell); 2-layer ViT with one DeepStack tap. Token ids are the tokenizer's.
    "qwen3-vl-tiny": dict(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, patch_size=4, temporal_patch_size=2,
        spatial_merge_size=2, num_position_embeddings=64, deepstack_layers=[0], image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5], min_pixels=64, max_pixels=1024,
    ),  # fmt: skip
    # qwen2_5_vl: the same size with windows of 2x2 merged tokens and full attention in layer 1.
    "qwen2.5-vl-tiny": dict(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=2, patch_size=4, temporal_patch_size=2,
        spatial_merge_size=2, window_size=16, full_attention_layers=[1], tokens_per_second=2.0, image_mean=CLIP_MEAN,
        image_std=CLIP_STD, min_pixels=64, max_pixels=1024,
    ),  # fmt: skip
}
