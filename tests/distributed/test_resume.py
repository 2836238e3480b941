"""Checkpoints never lose work: kill a run mid-step or mid-save, resume, get the same numbers.

Each scenario runs the real CLI under torchrun (2 CPU ranks, TP=2) on the smoke recipe, whose
data are a function of the step, and compares with one uninterrupted run of the same seed:
the continued losses are identical, and so are the final weights, Adam moments and LR
scheduler step. A resume at another layout (TP=1, and TP=1×PP=2) reshards model and optimizer
state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from copd_megatron.testing import reap

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
BASE = ["configs/smoke_cpu.yaml", "schedule.train_steps=6", "checkpoint.save_interval=2", "logging.log_interval=1"]


def _train(run_dir: Path, *overrides: str, nproc: int = 2, tp: int = 2, fault: str | None = None) -> int:
    token = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COPD_TEST_SESSION": token}
    env.pop("COPD_FAULT", None)
    if fault:
        env["COPD_FAULT"] = fault
    cmd = [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", "copd_megatron.cli", *BASE,
           f"parallel.tp={tp}", f"run_dir={run_dir}", *overrides]  # fmt: skip
    # Output to a file, and every process of the run reaped by its environment token:
    # Megatron's checkpoint writer starts helpers that outlive a SIGKILLed rank (and would
    # hold a pipe open forever).
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait(timeout=240)
        finally:
            reap(token)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def _final_state(ckpt_dir: Path) -> tuple[dict, dict]:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_plain_tensors(str(ckpt_dir)), dist_checkpointing.load_common_state_dict(str(ckpt_dir))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ref")
    assert _train(run) == 0
    return run


def _assert_same_final_state(a: Path, b: Path, exact: bool = True) -> None:
    from copd_megatron.testing import run_distributed

    (ta, ca), (tb, cb) = run_distributed(_load_two, 1, args=(str(a), str(b)), timeout=120)[0]
    assert set(ta) == set(tb)
    moments = [k for k in ta if "exp_avg" in k]
    assert moments, "Adam moments must be in the checkpoint"
    for k in ta:
        if isinstance(ta[k], torch.Tensor):
            tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(ta[k], tb[k], **tol, msg=k)
    assert ca["scheduler"]["num_steps"] == cb["scheduler"]["num_steps"] == 6


def _load_two(a: str, b: str):
    return _final_state(Path(a)), _final_state(Path(b))


def test_sigkill_mid_step_then_resume_is_exact(reference, tmp_path):
    killed = tmp_path / "killed"
    assert _train(killed, fault="train@5") != 0  # dies between backward and optimizer step 5
    ckpts = killed / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000004"
    resumed = tmp_path / "resumed"
    assert _train(resumed, f"checkpoint.load_dir={ckpts}", f"checkpoint.save_dir={resumed / 'checkpoints'}") == 0
    ref = _losses(reference)
    assert _losses(resumed) == {5: ref[5], 6: ref[6]}  # bit-identical continuation
    _assert_same_final_state(reference / "checkpoints" / "iter_0000006" / "main", resumed / "checkpoints" / "iter_0000006" / "main")


def test_sigkill_during_async_save_resumes_from_previous(reference, tmp_path):
    killed = tmp_path / "killed"
    assert _train(killed, "checkpoint.async_save=true", fault="save_started@4") != 0
    ckpts = killed / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    assert not (ckpts / "iter_0000004" / "COMPLETE").exists()  # the half-written one is never used
    resumed = tmp_path / "resumed"
    assert _train(resumed, f"checkpoint.load_dir={ckpts}", f"checkpoint.save_dir={resumed / 'checkpoints'}",
                  "checkpoint.async_save=true") == 0  # fmt: skip
    ref = _losses(reference)
    assert _losses(resumed) == {s: ref[s] for s in (3, 4, 5, 6)}


LAYOUTS = {
    "tp1": (1, []),
    "tp1pp2": (2, ["parallel.pp=2"]),
    # DP=2: Megatron's fully parallel loader (each DP rank reads part of the replicated shards,
    # then they are exchanged) and fully parallel async save (the step-6 checkpoint compared
    # below was written half by each DP rank).
    "dp2": (2, ["checkpoint.fully_parallel_load=true", "checkpoint.fully_parallel_save=true", "checkpoint.async_save=true"]),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_at_another_layout_reshards_weights_and_optimizer(reference, tmp_path, layout):
    """The TP=2 run's step-4 checkpoint continues at TP=1 (one rank), at TP=1×PP=2 (two
    pipeline stages) and at DP=2: same losses and, at step 6, the same weights and Adam moments
    (to fp32 reduction-order noise: the layouts sum in different orders)."""
    resumed = tmp_path / layout
    src = reference / "checkpoints" / "iter_0000004"
    nproc, extra = LAYOUTS[layout]
    assert _train(resumed, f"checkpoint.load_dir={src}", *extra, nproc=nproc, tp=1) == 0
    ref = _losses(reference)
    got = _losses(resumed)
    assert sorted(got) == [5, 6]
    for s in (5, 6):
        assert got[s] == pytest.approx(ref[s], rel=1e-5)
    _assert_same_final_state(reference / "checkpoints" / "iter_0000006" / "main",
                             resumed / "checkpoints" / "iter_0000006" / "main", exact=False)  # fmt: skip
    if layout == "dp2":  # each DP rank wrote about half (without the wrapper: rank 0 ~all of it)
        sizes = [f.stat().st_size for f in sorted((resumed / "checkpoints" / "iter_0000006" / "main").glob("__*.distcp"))]
        assert len(sizes) == 2 and min(sizes) > 0.3 * sum(sizes), sizes


def test_incomplete_or_foreign_checkpoints_are_refused(reference, tmp_path):
    bad = tmp_path / "incomplete"
    (bad / "iter_0000002").mkdir(parents=True)
    env = {**os.environ}
    cmd = [sys.executable, "-m", "copd_megatron.cli", *BASE, f"run_dir={tmp_path / 'x'}",
           f"checkpoint.load_dir={bad / 'iter_0000002'}"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "incomplete (no COMPLETE marker)" in out.stderr.strip().splitlines()[-1]
    cmd[-1] = f"checkpoint.load_dir={reference / 'checkpoints'}"
    out = subprocess.run(cmd + ["optimizer.lr=0.1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "different experiment config" in out.stderr.strip().splitlines()[-1]


def test_damaged_shard_files_are_refused_before_loading(reference, tmp_path):
    """A checkpoint marked COMPLETE whose shard files were later deleted or cut short (a partial
    copy between clusters): one line naming the file, before anything is loaded."""
    import shutil

    from copd_megatron.checkpoint.dist_ckpt import verify_files
    from copd_megatron.config.schema import ConfigError

    src = reference / "checkpoints" / "iter_0000004"
    verify_files(src / "main")  # intact
    damaged = tmp_path / "copy" / "iter_0000004"
    shutil.copytree(src, damaged)
    shard = sorted((damaged / "main").glob("__*.distcp"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(100)
    with pytest.raises(ConfigError, match=rf"shard file {shard.name} is truncated \(100 bytes"):
        verify_files(damaged / "main")
    shard.unlink()
    cmd = [sys.executable, "-m", "copd_megatron.cli", *BASE, f"run_dir={tmp_path / 'x'}", f"checkpoint.load_dir={damaged}"]
    out = subprocess.run(cmd, cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=120)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and f"shard file {shard.name} is missing" in last and "Traceback" not in out.stderr
    (damaged / "main" / ".metadata").unlink()
    with pytest.raises(ConfigError, match=r"\.metadata is missing"):
        verify_files(damaged / "main")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    """What Slurm sends before a time limit: the run saves the step it reached and exits 0."""
    import signal
    import time

    run = tmp_path / "term"
    token = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COPD_TEST_SESSION": token}
    cmd = [sys.executable, "-m", "copd_megatron.cli", "configs/smoke_cpu.yaml", "schedule.train_steps=100000",
           "checkpoint.save_interval=0", f"run_dir={run}", "logging.log_interval=1"]  # fmt: skip
    with open(tmp_path / "term.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not ((run / "metrics.jsonl").exists() and len(_losses(run)) >= 3):
                time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=120) == 0
        finally:
            reap(token)
    last = max(_losses(run))
    assert (run / "checkpoints" / "latest").read_text().strip() == f"iter_{last:07d}"
    assert (run / "checkpoints" / f"iter_{last:07d}" / "COMPLETE").exists()
