"""GPU only: the vision-language model with Transformer Engine layers (ViT, projector, language
model) is what ``auto`` picks and fits a fixed batch of images, videos and text rows.

Skipped on machines without CUDA and Transformer Engine (the CPU CI); on a GPU machine:
``.venv/bin/python -m pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
        reason="needs CUDA and Transformer Engine",
    ),
]


def _fit() -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "distributed"))
    from test_vlm import _global_batch, _micro_batch

    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.groups import shared_groups
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import wrap_and_optimize
    from copd_megatron.model.provider import make_provider
    from copd_megatron.training.step import train_step

    cfg = config_from_dict({
        "schedule": {"mode": "smoke"}, "precision": {"params_dtype": "bf16"}, "optimizer": {"lr": 3e-3},
        "model": {"preset": "tiny", "arch": "llava", "vocab_size": 500, "seq_length": 64,
                  "vision": {"preset": "tiny", "image_token_id": 7, "video_token_id": 8}},
    })  # fmt: skip
    init_model_parallel(validate(cfg, 1))
    set_seed(cfg.seed)
    provider, groups = make_provider(cfg.model, cfg.parallel, cfg.precision), shared_groups()
    chunks = provider.build_chunks(groups)
    kinds = {type(m).__name__ for m in chunks[0].vision_model.modules()}
    branch = wrap_and_optimize(chunks, provider.tcfg, cfg.parallel, cfg.precision, cfg.optimizer, 30, groups, provider)
    tokens, mask, pixels = _global_batch()
    mbs = [_micro_batch(tokens[i : i + 2].cuda(), mask[i : i + 2].cuda(), [p if p is None else p.cuda() for p in
                                                                        pixels[i : i + 2]]) for i in range(0, 8, 2)]  # fmt: skip
    return {"losses": [train_step(branch, mbs).loss for _ in range(30)], "kinds": kinds}


def test_vlm_with_transformer_engine_trains():
    from copd_megatron.testing import run_distributed

    r = run_distributed(_fit, 1, timeout=600)[0]
    assert any(k.startswith("TE") for k in r["kinds"]), r["kinds"]  # the ViT is built from TE layers
    assert r["losses"][-1] < r["losses"][0] - 1.0
