"""The per-GPU memory estimate of ``copd-train --check`` (``config/memory.py``) against a built branch.

A tiny Qwen3-VL branch (ViT with a DeepStack tap + mRoPE language model) is built at TP=1 with DDP
and Megatron's distributed optimizer, in fp32 and in bf16, and one optimizer step allocates Adam's
state. The bytes its weights, gradient buffers and optimizer state really hold equal the estimate's
weights, gradients and optimizer columns (to the buffers' alignment padding)."""

from __future__ import annotations

import pytest
import torch

from copd_megatron.testing import run_distributed

TINY_QWEN = {"preset": "tiny", "arch": "qwen3_vl", "vocab_size": 320, "vision": {
    "preset": "qwen3-vl-tiny", "image_token_id": 4, "video_token_id": 5, "vision_start_token_id": 6,
    "vision_end_token_id": 7, "mrope_section": [4, 2, 2]}}  # fmt: skip


def _measure(dtype: str) -> tuple[dict, dict]:
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.config.memory import estimate_memory
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_branch

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": TINY_QWEN, "precision": {"params_dtype": dtype}})
    layout = validate(cfg, 1)
    init_model_parallel(layout)
    set_seed(0)
    branch = build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, 1)
    branch.optimizer.step()  # Adam's moments (and fp32 master shards for bf16) exist after the first step

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    weights = nbytes(p for c in branch.chunks for p in c.module.parameters())
    grads = nbytes(b.grad_data for c in branch.chunks for b in c.buffers)
    opt = 0
    for inner in getattr(branch.optimizer, "chained_optimizers", [branch.optimizer]):
        opt += nbytes(t for st in inner.optimizer.state.values() for t in st.values()
                      if isinstance(t, torch.Tensor) and t.dim() > 0)  # Adam's moments (not the step counters)
        opt += nbytes(t for group in getattr(inner, "shard_fp32_from_float16_groups", []) for t in group)
    (gen, *_) = estimate_memory(cfg, layout)
    return {"weights": weights, "gradients": grads, "optimizer": opt}, {
        "weights": gen.weights, "gradients": gen.gradients, "optimizer": gen.optimizer}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_memory_estimate_equals_a_built_branch(dtype):
    real, est = run_distributed(_measure, 1, args=(dtype,), timeout=300)[0]
    for kind in ("weights", "gradients", "optimizer"):
        assert real[kind] > 0
        assert abs(est[kind] - real[kind]) <= 0.02 * real[kind], (kind, real, est)
