"""GPU only: the Transformer Engine layer spec builds, is the one chosen by ``auto``, and trains.

Skipped on machines without CUDA and Transformer Engine (the CPU CI); on a GPU machine:
``.venv/bin/python -m pytest -m gpu tests/gpu``.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None,
        reason="needs CUDA and Transformer Engine",
    ),
]


def _train(impl: str) -> list[float]:
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.specs import use_transformer_engine
    from copd_megatron.trainer import run_smoke

    cfg = config_from_dict({"schedule": {"mode": "smoke", "train_steps": 30}, "model": {"transformer_impl": impl},
                            "precision": {"params_dtype": "bf16"}, "run_dir": "/tmp/copd_gpu_smoke",
                            "optimizer": {"lr": 3e-3}, "rollout": {"prompts_per_step": 16},
                            "parallel": {"micro_batch_size": 4}})  # fmt: skip
    assert use_transformer_engine(cfg.model)
    layout = validate(cfg, torch.distributed.get_world_size())
    init_model_parallel(layout)
    set_seed(cfg.seed)
    return run_smoke(cfg, layout)


def test_transformer_engine_spec_trains(tmp_path):
    from copd_megatron.testing import run_distributed

    losses = run_distributed(_train, 1, args=("auto",), timeout=600)[0]
    assert losses[-1] < losses[0] - 1.0
