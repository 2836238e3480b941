"""Model building: config options map onto the Megatron modules they should create."""

from __future__ import annotations

import torch.distributed as dist

from copd_megatron.testing import run_distributed


def _param_shapes(overrides: list[str]) -> dict:
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": {"preset": "tiny"}}, overrides)
    init_model_parallel(validate(cfg, dist.get_world_size()))
    set_seed(0)
    (chunk,) = build_model_chunks(cfg.model, cfg.parallel, cfg.precision)
    return {n: tuple(p.shape) for n, p in chunk.named_parameters()}


def test_llama_and_qwen_options_at_tp2():
    llama, qwen = run_distributed(_worker, 2, timeout=120)[0]
    # Llama: untied output layer, no biases, no QK-norm; vocab 512 padded to a multiple of 128*tp.
    assert llama["output_layer.weight"] == (256, 64)  # V/tp rows on each TP rank
    assert llama["embedding.word_embeddings.weight"] == (256, 64)
    # GQA: 4 query heads + 2 KV groups x (K, V), head dim 16 -> (4 + 2*2) * 16 = 128 fused rows, / tp.
    assert llama["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 16 // 2, 64)
    # SwiGLU: fused gate and up projections, each ffn/tp rows.
    assert llama["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * 176 // 2, 64)
    assert not any("bias" in n or "q_layernorm" in n for n in llama)
    # Qwen3/Qwen2 options: tied embeddings (no output layer), QK-norm, QKV bias, explicit head dim.
    assert "output_layer.weight" not in qwen
    assert qwen["decoder.layers.0.self_attention.q_layernorm.weight"] == (32,)
    assert qwen["decoder.layers.0.self_attention.linear_qkv.bias"] == ((4 + 2 * 2) * 32 // 2,)


def _worker():
    llama = _param_shapes(["parallel.tp=2"])
    qwen = _param_shapes(["parallel.tp=2", "model.tie_embeddings=true", "model.qk_layernorm=true",
                          "model.add_qkv_bias=true", "model.kv_channels=32"])  # fmt: skip
    return llama, qwen


def _built_counts(variants: list[list[str]]) -> list[tuple[int, int]]:
    from megatron.core import parallel_state as ps

    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.config.summary import count_parameters
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks

    out = []
    for overrides in variants:
        cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": {"preset": "tiny"}}, overrides)
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        init_model_parallel(validate(cfg, dist.get_world_size()))
        set_seed(0)
        (chunk,) = build_model_chunks(cfg.model, cfg.parallel, cfg.precision)
        out.append((count_parameters(cfg.model), sum(p.numel() for p in chunk.parameters())))
    return out


def test_closed_form_parameter_count_equals_the_built_model():
    """The count `copd-train --check` prints, against Megatron's modules for every option."""
    variants = [[], ["model.tie_embeddings=true", "model.qk_layernorm=true", "model.add_qkv_bias=true",
                     "model.kv_channels=32", "model.num_query_groups=1"],
                ["model.normalization=LayerNorm", "model.activation=gelu", "model.add_bias_linear=true",
                 "model.vocab_size=300"]]  # fmt: skip
    for closed_form, built in run_distributed(_built_counts, 1, args=(variants,), timeout=120)[0]:
        assert closed_form == built
