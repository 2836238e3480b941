"""``checkpoint.load_dir: auto`` through the CLI: the same command line starts a run, then
continues it; a different experiment in the same run_dir is refused instead of mixed in.
(The requeue case under a real Slurm is tests/slurm/test_sbatch.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from copd_megatron.testing import reap

ROOT = Path(__file__).resolve().parents[2]


def _train(run: Path, *overrides: str) -> subprocess.CompletedProcess:
    token = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COPD_TEST_SESSION": token}
    env.pop("COPD_FAULT", None)
    cmd = [sys.executable, "-m", "copd_megatron.cli", "configs/smoke_cpu.yaml", f"run_dir={run}",
           "logging.log_interval=1", "checkpoint.save_interval=2", *overrides]  # fmt: skip
    try:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    finally:
        reap(token)


def test_same_command_starts_then_continues_and_a_different_experiment_is_refused(tmp_path):
    run = tmp_path / "run"
    first = _train(run, "schedule.train_steps=3")
    assert first.returncode == 0, first.stderr
    assert "first start: no complete checkpoint" in first.stdout and "step 3/3" in first.stdout
    # The job is "requeued" with a longer budget (schedule.train_steps may change on resume).
    second = _train(run, "schedule.train_steps=5")
    assert second.returncode == 0, second.stderr
    assert "resuming from iter_0000003" in second.stdout and "step 4/5" in second.stdout
    assert "step 1/5" not in second.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    other = _train(run, "schedule.train_steps=5", "optimizer.lr=0.1")
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and "Traceback" not in other.stderr
    assert "was written by a different experiment config" in lines[-1] and "use a new run_dir" in lines[-1]
    assert (run / "checkpoints" / "latest").read_text().strip() == "iter_0000005"  # untouched
