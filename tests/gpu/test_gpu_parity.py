"""GPU: one train step at TP=1 against the CPU fp32 reference, and the CoPD tiny config end to end.

The reference runs in a child process with CUDA hidden (``CUDA_VISIBLE_DEVICES=""``), i.e. through the
CPU compatibility layer, from the same saved weights and batch. Stated tolerances:

* GPU fp32 vs CPU fp32: loss and gradient norm within 1e-4 relative, logits within 1e-3 absolute
  (different kernels and reduction orders; TF32 is off for fp32 matmuls by default);
* GPU bf16 vs CPU fp32: loss within 2e-2 relative, gradient norm within 5e-2 relative, logits within
  0.1 absolute, and the logit change made by the step in the same direction (cosine > 0.9).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from copd_megatron.testing import run_distributed
from tests.gpu.conftest import NEEDS_CUDA

pytestmark = [pytest.mark.gpu, NEEDS_CUDA]
ROOT = Path(__file__).resolve().parents[2]
VOCAB = 512


def _cfg(params_dtype: str):
    from copd_megatron.config import config_from_dict

    return config_from_dict({"schedule": {"mode": "smoke"}, "model": {"vocab_size": VOCAB, "num_layers": 2},
                             "precision": {"params_dtype": params_dtype}, "parallel": {"use_distributed_optimizer": False},
                             "optimizer": {"lr": 1e-3, "clip_grad": 1.0, "weight_decay": 0.0}})  # fmt: skip


def _step(root: str, params_dtype: str, save: bool) -> dict:
    """Build (or load) the tiny model, logits on fixed tokens, one train step, logits again."""
    from copd_megatron.checkpoint.dist_ckpt import load_model, save_model
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.data.batch import MicroBatch
    from copd_megatron.distributed.device import runtime_device
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import wrap_and_optimize
    from copd_megatron.model.provider import make_provider
    from copd_megatron.training.step import train_step

    cfg = _cfg(params_dtype)
    init_model_parallel(resolve_layout(cfg.parallel, cfg.model, 1))
    set_seed(11)
    provider = make_provider(cfg.model, cfg.parallel, cfg.precision)
    chunks = provider.build_chunks(provider_groups())
    if save:
        save_model(chunks, f"{root}/base", cfg.model, params_dtype)
    else:
        load_model(chunks, f"{root}/base")
    branch = wrap_and_optimize(chunks, provider.tcfg, cfg.parallel, cfg.precision, cfg.optimizer, 1,
                               provider_groups(), provider)  # fmt: skip
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, VOCAB, (8, 65), generator=g)
    mbs = [MicroBatch.from_tokens(t).to(runtime_device()) for t in tokens.split(4)]

    def logits():
        with torch.no_grad():
            branch.chunks[0].eval()
            out = provider.forward(branch.chunks[0], mbs[0]).float().cpu()
            branch.chunks[0].train()
        return out

    before = logits()
    res = train_step(branch, mbs)
    return {"loss": res.loss, "grad_norm": res.grad_norm, "before": before, "after": logits()}


def provider_groups():
    from copd_megatron.distributed.groups import shared_groups

    return shared_groups()


def test_train_step_matches_the_cpu_fp32_reference(tmp_path, record) -> None:
    cpu = run_distributed(_step, 1, args=(str(tmp_path), "fp32", True), env={"CUDA_VISIBLE_DEVICES": ""},
                          timeout=300)[0]  # fmt: skip
    gpu32 = run_distributed(_step, 1, args=(str(tmp_path), "fp32", False), timeout=300)[0]
    gpu16 = run_distributed(_step, 1, args=(str(tmp_path), "bf16", False), timeout=300)[0]
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)  # noqa: E731
    for name, run in (("fp32", gpu32), ("bf16", gpu16)):
        record("parity", f"loss rel. diff, GPU {name} vs CPU fp32", rel(run["loss"], cpu["loss"]))
        record("parity", f"grad-norm rel. diff, GPU {name} vs CPU fp32", rel(run["grad_norm"], cpu["grad_norm"]))
        record("parity", f"max |logit diff|, GPU {name} vs CPU fp32", float((run["before"] - cpu["before"]).abs().max()))
    delta_cpu, delta_16 = (cpu["after"] - cpu["before"]).flatten(), (gpu16["after"] - gpu16["before"]).flatten()
    cos = float(torch.nn.functional.cosine_similarity(delta_cpu, delta_16, dim=0))
    record("parity", "cosine of the step's logit change, GPU bf16 vs CPU fp32", cos)
    assert rel(gpu32["loss"], cpu["loss"]) < 1e-4 and rel(gpu32["grad_norm"], cpu["grad_norm"]) < 1e-4
    assert float((gpu32["before"] - cpu["before"]).abs().max()) < 1e-3
    assert rel(gpu16["loss"], cpu["loss"]) < 2e-2 and rel(gpu16["grad_norm"], cpu["grad_norm"]) < 5e-2
    assert float((gpu16["before"] - cpu["before"]).abs().max()) < 0.1 and cos > 0.9


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("base")
    cmd = [sys.executable, "tools/make_base.py", "--out", str(out), "--families", "count", "sort", "--difficulty", "4",
           "--steps", "60", "--eval-prompts", "8", "--model", "model.num_layers=2", "model.hidden_size=64",
           "model.ffn_hidden_size=176"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


def _copd_with_phase_memory(cfg) -> dict:
    """The recipe with each phase's peak GPU memory measured (the phase functions wrapped)."""
    import copd_megatron.copd.step as step

    peaks: dict[str, float] = {}

    def wrap(name, fn):
        def run(*a, **k):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
            return out

        return run

    for name in ("generate_phase", "score_phase", "update_phase", "sync_phase"):
        setattr(step, name, wrap(name.removesuffix("_phase"), getattr(step, name)))
    from tests.distributed.conftest import run_recipe_here

    t0 = time.perf_counter()
    table = run_recipe_here(cfg)
    return {"table": table, "peaks": peaks, "seconds": time.perf_counter() - t0}


def test_copd_tiny_config_end_to_end(tiny_base, tmp_path, record) -> None:
    from tests.distributed.conftest import metrics, tiny_config

    cfg = tiny_config(tiny_base, tmp_path / "run", "precision.params_dtype=bf16")
    res = run_distributed(_copd_with_phase_memory, 1, args=(cfg,), timeout=400)[0]
    rows = metrics(tmp_path / "run")
    assert len(rows) == cfg.schedule.cycles * (cfg.schedule.s_rl + cfg.schedule.s_opd)
    losses = [v for r in rows for k, v in r.items() if k.endswith("/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    table = json.loads((tmp_path / "run" / "eval.json").read_text())["table"]
    assert {"base", "count", "sort", "merged"} <= set(table)
    record("copd", "wall time of the run (build, 2 steps, evaluations, merge)", res["seconds"], "s")
    record("copd", "time per step (mean)", sum(r["time/step"] for r in rows) / len(rows), "s")
    for phase, mib in res["peaks"].items():
        record("memory", f"CoPD tiny: {phase} phase", mib, "MiB", "torch.cuda.max_memory_allocated")
