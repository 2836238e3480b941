"""The runtime: disjoint placement equals colocated, memory offload changes nothing, the trainer's
merge equals ``copd-merge``, and a run killed in Phase II resumes exactly in both placements.

Worlds (gloo, CPU): colocated = every rank holds both branches; disjoint = each branch on its own
data-parallel slice. The same per-request seeds make the rollouts identical whatever the layout,
so the runs must agree step by step (losses, rewards, OPD signals) and in their final weights.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from copd_megatron.testing import run_distributed
from tests.distributed.conftest import ROOT, TINY, base_overrides, launch_cli, metrics, run_recipe_here, tiny_config

TORCHRUN = str(Path(sys.executable).parent / "torchrun")
COMPARED = ("/loss", "/native/reward", "/grad_norm", "/opd_logratio", "/teacher_version", "/cross/count/reward",
            "/cross/sort/reward", "/overlap", "/entropy")  # fmt: skip


def _runs(base: str, root: str, variants: list[tuple[str, list[str]]]) -> None:
    """Several recipes one after another in this world (start-up costs seconds on 2 cores)."""
    for name, overrides in variants:
        run_recipe_here(tiny_config(Path(base), Path(root) / name, *overrides))


def _final_weights(run_dir: Path) -> dict:
    """Every branch's model tensors of the run's last checkpoint (plain tensors, any layout)."""
    return run_distributed(_load_final, 1, args=(str(run_dir),), timeout=120)[0]


def _load_final(run_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    ckpts = Path(run_dir) / "checkpoints"
    it = ckpts / (ckpts / "latest").read_text().strip()
    out = {}
    for branch in ("count", "sort"):
        tensors = dist_checkpointing.load_plain_tensors(str(it / branch))
        out[branch] = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")}
    return out


def _assert_same_runs(a: Path, b: Path, exact_weights: bool = True) -> None:
    ra, rb = metrics(a), metrics(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        keys = [k for k in x if k.endswith(COMPARED)]
        assert keys and set(keys) <= set(y), f"{b}: missing {sorted(set(keys) - set(y))}"
        for k in keys:
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), f"step {x['step']} {k}: {x[k]} vs {y[k]}"
    wa, wb = _final_weights(a), _final_weights(b)
    for branch in wa:
        for k, t in wa[branch].items():
            tol = dict(rtol=0, atol=0) if exact_weights else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(wb[branch][k], t, **tol, msg=lambda m, k=k: f"{branch} {k}: {m}")


TWO_STEPS = ["schedule.s_rl=1", "schedule.s_opd=1", "checkpoint.save_interval=0"]


def test_disjoint_placement_equals_colocated_at_tp1(base, tmp_path):
    """2 branches × 1 rank each (world 2) vs both on one rank; sampled-token and top-k OPD; and
    colocated with weights and optimizer state offloaded between phases."""
    variants = [("sampled", TWO_STEPS), ("topk", [*TWO_STEPS, "opd.loss=topk_kl", "opd.topk=8"])]
    run_distributed(_runs, 1, args=(str(base), str(tmp_path / "colo"), variants + [
        ("offload", [*TWO_STEPS, "memory.offload_weights=true", "memory.offload_optimizer=true"])]), timeout=600)
    disjoint = [(n, [*o, "parallel.placement=disjoint"]) for n, o in variants]
    run_distributed(_runs, 2, args=(str(base), str(tmp_path / "dis"), disjoint), timeout=600)
    for name, _ in variants:
        _assert_same_runs(tmp_path / "colo" / name, tmp_path / "dis" / name)
    _assert_same_runs(tmp_path / "colo" / "sampled", tmp_path / "colo" / "offload")


@pytest.mark.slow  # 75 s; the TP=1 test covers placement in `make test`, this adds TP=2 groups per branch
def test_disjoint_placement_equals_colocated_at_tp2(base, tmp_path):
    """2 branches × TP=2 (world 4) vs both branches on the same 2 TP ranks."""
    variants = [("sampled", [*TWO_STEPS, "parallel.tp=2"])]
    run_distributed(_runs, 2, args=(str(base), str(tmp_path / "colo"), variants), timeout=600)
    disjoint = [(n, [*o, "parallel.placement=disjoint"]) for n, o in variants]
    run_distributed(_runs, 4, args=(str(base), str(tmp_path / "dis"), disjoint), timeout=900)
    _assert_same_runs(tmp_path / "colo" / "sampled", tmp_path / "dis" / "sampled")


# ---- the trainer's merge is copd-merge ---------------------------------------------------------
def _merge_in_trainer(base: str, run_dir: str, tp: int) -> None:
    """A run that merges with TIES; then the trainer's merge function again with DARE settings."""
    import torch.distributed as dist

    from copd_megatron.config import validate
    from copd_megatron.copd.runtime import merge_final
    from copd_megatron.distributed.init import init_model_parallel

    cfg = tiny_config(Path(base), Path(run_dir), *TWO_STEPS, f"parallel.tp={tp}", "merge.method=ties",
                      "merge.density=0.3", "merge.lam=0.9", "optimizer.lr=1e-2")  # fmt: skip
    run_recipe_here(cfg)
    init_model_parallel(validate(cfg, dist.get_world_size()))
    cfg.merge.method, cfg.merge.drop_p, cfg.merge.seed = "dare", 0.5, 7
    final = Path(run_dir) / "checkpoints" / "iter_0000002"
    merge_final(cfg, [str(final / "count"), str(final / "sort")], str(Path(run_dir) / "merged_dare"))


def _load_plain(path: str) -> dict:
    from megatron.core import dist_checkpointing

    return {k: v for k, v in dist_checkpointing.load_plain_tensors(path).items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])  # TP=2: 70 s, `make test-all`
def test_merge_inside_the_trainer_equals_copd_merge(base, tmp_path, tp):
    """TIES (density, λ) and DARE (drop rate, seed) from the config give the very tensors the CLI
    gives on the same final checkpoints, at TP=1 and TP=2."""
    run = tmp_path / "run"
    run_distributed(_merge_in_trainer, tp, args=(str(base), str(run), tp), timeout=600)
    final = run / "checkpoints" / "iter_0000002"
    launcher = [sys.executable, "-m"] if tp == 1 else [TORCHRUN, "--standalone", f"--nproc-per-node={tp}", "-m"]
    for method, extra, ours in (("ties", ["--density", "0.3", "--lam", "0.9"], "merged"),
                                ("dare", ["--drop-p", "0.5", "--seed", "7", "--lam", "0.9"], "merged_dare")):  # fmt: skip
        out = tmp_path / f"cli_{method}"
        cmd = [*launcher, "copd_megatron.checkpoint.merge_cli", "--tp", str(tp), "--inputs", str(final / "count"),
               str(final / "sort"), "--base", str(base / "checkpoint"), "--method", method, *extra, "--out", str(out)]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        a, b = run_distributed(_load_two_plain, 1, args=(str(run / ours), str(out)), timeout=120)[0]
        assert set(a) == set(b) and a
        for k in a:
            assert torch.equal(a[k], b[k]), f"{method} tp={tp}: {k} differs between the trainer and copd-merge"


def _load_two_plain(a: str, b: str):
    return _load_plain(a), _load_plain(b)


# ---- exact resume after SIGKILL in Phase II, both placements --------------------------------------
RESUME = ["schedule.s_rl=1", "schedule.s_opd=3", "checkpoint.save_interval=2", "model.hidden_dropout=0.1",
          "model.attention_dropout=0.1"]  # fmt: skip


def _cli(base: Path, run_dir: Path, nproc: int, *extra: str, fault: str | None = None) -> int:
    args = [str(TINY), *base_overrides(base), f"run_dir={run_dir}", *RESUME, *extra]
    return launch_cli(args, run_dir, nproc, fault=fault, timeout=600)


def _load_final_with_optimizer(run_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    ckpts = Path(run_dir) / "checkpoints"
    it = ckpts / (ckpts / "latest").read_text().strip()
    return {b: {k: v for k, v in dist_checkpointing.load_plain_tensors(str(it / b)).items() if isinstance(v, torch.Tensor)}
            for b in ("count", "sort")}  # fmt: skip


# Colocated resume after SIGKILL is also covered by test_resume.py in `make test`.
@pytest.mark.parametrize("placement,nproc", [pytest.param("colocated", 1, marks=pytest.mark.slow), ("disjoint", 2)])
def test_resume_after_sigkill_in_phase_two_is_exact(base, tmp_path, placement, nproc):
    """Checkpoint after step 2 (one Phase II step done: cross streams have moved), SIGKILL inside
    step 3, resume: steps 3-4 and the final weights and Adam moments equal the uninterrupted run's,
    with dropout on (the RNG streams come back too)."""
    extra = [f"parallel.placement={placement}"]
    assert _cli(base, tmp_path / "full", nproc, *extra) == 0
    assert _cli(base, tmp_path / "killed", nproc, *extra, fault="train@3") != 0
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    assert _cli(base, tmp_path / "resumed", nproc, *extra, f"checkpoint.load_dir={ckpts}") == 0
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in (k for k in a if k.endswith(COMPARED)):
            assert a[key] == b[key], f"step {a['step']} {key}"
    wa, wb = run_distributed(_load_two_final, 1, args=(str(tmp_path / "full"), str(tmp_path / "resumed")), timeout=120)[0]
    assert any(k.startswith("optimizer.") for k in wa["count"]), "Adam moments must be compared too"
    for branch in wa:
        for k in wa[branch]:
            assert torch.equal(wa[branch][k], wb[branch][k]), f"{branch} {k}"


def _load_two_final(a: str, b: str):
    return _load_final_with_optimizer(a), _load_final_with_optimizer(b)
