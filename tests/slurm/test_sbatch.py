"""examples/slurm/train.sbatch against a real (throwaway, single-node) Slurm.

1. The example script as a user submits it (2 tasks, TP=2, CPU overrides on the sbatch
   command line) runs the smoke recipe to COMPLETED.
2. The same run, submitted with the command ``copd-sbatch`` prints, is preempted the way a
   time limit does it: ``scancel --batch --signal=USR1`` (what ``--signal=B:USR1@300`` sends
   300 s before the limit) reaches the batch shell while the ranks are at step 3 (held there by
   ``COPD_FAULT=train@3:pause`` so the moment is reproducible). The shell forwards the signal,
   the ranks save step 3 and exit, the job requeues itself, Slurm starts it again, and
   ``checkpoint.load_dir: auto`` resumes it from step 3 without any edit. Its losses and final
   weights and Adam moments are bitwise those of run 1, which was never interrupted.

The cluster's CPUs come from ``nproc`` (2 on CI). The tier runs three allocations of two Python
ranks each and one requeue (Slurm holds a requeued job for ``cred_expire``, 10 s here); most
of its time is the ranks' start-up. Every wait has a timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from copd_megatron.testing import reap, run_distributed

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
RUN = ["configs/smoke_cpu.yaml", "parallel.tp=2", "schedule.train_steps=6", "checkpoint.save_interval=2",
       "logging.log_interval=1"]  # fmt: skip
CPU = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]
JOB_TIMEOUT = 300


def _env(token: str, **extra: str) -> dict[str, str]:
    """What the job inherits (sbatch exports the submitting environment)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COPD_FAULT", "COPD_PYTHON", "COPD_ENV_FILE")}
    env.update(OMP_NUM_THREADS="1", COPD_TEST_SESSION=token, **extra)
    if not (ROOT / ".venv" / "bin" / "python").exists():  # a checkout without its own venv (CI has one)
        env["COPD_PYTHON"] = sys.executable
    return env


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _why(slurm, job: int, log: Path) -> str:
    return f"\n--- job log {log} ---\n{_text(log)[-4000:]}\n{slurm.logs('slurmctld', 15)}\n{slurm.logs('slurmd', 15)}"


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"steps logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def uninterrupted(slurm, tmp_path_factory) -> Path:
    """Run 1: the example script exactly as a user submits it; also the reference of run 2."""
    tmp = tmp_path_factory.mktemp("sbatch")
    run, log = tmp / "run", tmp / "job.out"
    token = uuid.uuid4().hex
    args = [*CPU, f"--output={log}", "examples/slurm/train.sbatch", *RUN, f"run_dir={run}"]
    job = slurm.sbatch(args, env=_env(token), cwd=ROOT)
    try:
        info = slurm.wait(job, {"COMPLETED"}, JOB_TIMEOUT)
    except AssertionError as e:
        raise AssertionError(f"{e}{_why(slurm, job, log)}") from None
    finally:
        reap(token)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", info
    return run


def test_example_sbatch_runs_tp2_to_completion(uninterrupted):
    log = _text(uninterrupted.parent / "job.out")
    assert "first start: no complete checkpoint" in log and "step 6/6" in log
    assert "world=2 tp=2" in log and "all 2 ranks joined" in log  # rendezvous over the SLURM_* variables
    assert sorted(_losses(uninterrupted)) == [1, 2, 3, 4, 5, 6]
    assert (uninterrupted / "checkpoints" / "latest").read_text().strip() == "iter_0000006"


def test_preempted_job_saves_requeues_resumes_and_matches_uninterrupted(slurm, uninterrupted, tmp_path):
    run = tmp_path / "run"
    helper = [sys.executable, "-m", "copd_megatron.sbatch_cli", *RUN, f"run_dir={run}", "--gpus-per-node", "0",
              "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "00:30:00"]  # fmt: skip
    out = subprocess.run(helper, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith(f"mkdir -p {run}/slurm && sbatch ") and "--signal=B:USR1@300" in line, line
    log = run / "slurm" / "smoke_cpu-{}.out"

    token = uuid.uuid4().hex
    env = _env(token, COPD_FAULT="train@3:pause", SLURM_CONF=slurm.env["SLURM_CONF"])
    try:
        sub = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert sub.returncode == 0, sub.stderr
        job = int(sub.stdout.split()[-1])  # "Submitted batch job N"
        log = Path(str(log).format(job))
        deadline = time.monotonic() + JOB_TIMEOUT
        while _text(log).count("paused at train@3") < 2:  # both ranks are inside step 3
            assert time.monotonic() < deadline, f"the ranks never reached step 3{_why(slurm, job, log)}"
            assert slurm.job(job)["JobState"] in ("PENDING", "RUNNING"), _why(slurm, job, log)
            time.sleep(0.5)
        # What --signal=B:USR1@300 does 300 s before the time limit: USR1 to the batch shell only.
        slurm.run(["scancel", "--batch", "--signal=USR1", str(job)])
        try:
            info = slurm.wait(job, {"COMPLETED"}, 2 * JOB_TIMEOUT)
        except AssertionError as e:
            raise AssertionError(f"{e}{_why(slurm, job, log)}") from None
    finally:
        reap(token)

    text = _text(log)
    assert info["Restarts"] == "1" and info["ExitCode"] == "0:0", f"{info}{_why(slurm, job, log)}"
    first, _, second = text.partition(f"job {job} restart 1 ")
    assert second, f"the job never ran a second time{_why(slurm, job, log)}"
    assert "SIGUSR1 received" in first and "signal received: saved step 3, exiting cleanly" in first
    assert f"requeueing job {job}" in first and "step 4/6" not in first
    assert "resuming from iter_0000003" in second and "step 4/6" in second and "step 6/6" in second
    assert "step 3/6" not in second  # nothing replayed

    ref = _losses(uninterrupted)
    assert _losses(run) == ref  # steps 1-3 from the first allocation, 4-6 from the second: bitwise
    _assert_same_state(uninterrupted / "checkpoints" / "iter_0000006" / "main", run / "checkpoints" / "iter_0000006" / "main")


def _load(a: str, b: str):
    from megatron.core import dist_checkpointing

    return [(dist_checkpointing.load_plain_tensors(p), dist_checkpointing.load_common_state_dict(p)) for p in (a, b)]


def _assert_same_state(a: Path, b: Path) -> None:
    """Weights, Adam moments and scheduler step identical to the bit."""
    (ta, ca), (tb, cb) = run_distributed(_load, 1, args=(str(a), str(b)), timeout=120)[0]
    assert set(ta) == set(tb) and any("exp_avg" in k for k in ta)
    for k, v in ta.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, tb[k]), k
    assert ca["scheduler"]["num_steps"] == cb["scheduler"]["num_steps"]


def test_missing_python_is_one_line_in_the_job_log(slurm, tmp_path):
    """No activated environment is relied on: a wrong COPD_PYTHON fails at once, saying what to set."""
    log = tmp_path / "job.out"
    env = {**_env(uuid.uuid4().hex), "COPD_PYTHON": str(tmp_path / "no-venv" / "python")}
    job = slurm.sbatch([*CPU, f"--output={log}", "examples/slurm/train.sbatch", *RUN], env=env, cwd=ROOT)
    info = slurm.wait(job, {"FAILED"}, 120)
    assert info["ExitCode"] == "2:0" and info["Restarts"] == "0", info
    errors = [line for line in _text(log).splitlines() if "error" in line]
    assert errors == [f"train.sbatch: error: {tmp_path}/no-venv/python is not an executable Python; submit from the "
                      "repository root (where 'make' created .venv) or set COPD_PYTHON=/path/to/venv/bin/python"], errors
