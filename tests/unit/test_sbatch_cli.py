"""copd-sbatch: the printed command for a valid layout, one-line refusals (exit 2) otherwise.

The command it prints is submitted to a real Slurm in tests/slurm/test_sbatch.py.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from copd_megatron.config import ConfigError
from copd_megatron.sbatch_cli import main, slurm_time_seconds

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the default --script is relative to the repository root


def test_prints_a_checked_command_for_a_real_size(capsys):
    assert main(["configs/smoke_cpu.yaml", "model.preset=llama3-8b", "parallel.tp=8", "--nodes", "2",
                 "--time", "04:00:00", "--partition", "gpu", "run_dir=runs/x y"]) == 0  # fmt: skip
    out, err = capsys.readouterr()
    mkdir, _, sbatch = out.strip().partition(" && ")
    assert shlex.split(mkdir) == ["mkdir", "-p", "runs/x y/slurm"]
    argv = shlex.split(sbatch)
    assert argv == ["sbatch", "--job-name=smoke_cpu", "--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8",
                    "--time=04:00:00", "--signal=B:USR1@300", "--output=runs/x y/slurm/%x-%j.out", "--partition=gpu",
                    "examples/slurm/train.sbatch", "configs/smoke_cpu.yaml", "model.preset=llama3-8b", "parallel.tp=8",
                    "run_dir=runs/x y"]  # fmt: skip
    assert "world size 16 = tp 8 x pp 1 x cp 1 x dp 2" in err
    assert "checkpoint.save_interval is 0" in err  # smoke_cpu.yaml saves only at the end


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["parallel.tp=3", "model.preset=llama3-8b"], "parallel.tp: 3 does not divide model.num_attention_heads=32"),
        (["parallel.tp=2", "parallel.pp=2", "--nodes", "3", "--gpus-per-node", "2"],
         "world size 6 is not divisible by tp*pp*cp = 4 (tp=2, pp=2, cp=1); launch a multiple of 4 ranks or change "
         "the sizes (for --nodes 3 x 2 tasks = world size 6)"),
        (["parallel.dp=4", "--nodes", "2"], "parallel.dp: 4 does not match world size 16"),
        (["parallel.backend=nccl", "--gpus-per-node", "0", "--tasks-per-node", "2"], "parallel.backend: 'nccl' needs CUDA"),
        (["--gpus-per-node", "0"], "--tasks-per-node: required (>= 1) when --gpus-per-node is 0"),
        (["--tasks-per-node", "4"], "--tasks-per-node: 4 != --gpus-per-node 8; copd-train runs one rank per GPU"),
        (["--nodes", "0"], "--nodes: must be >= 1, got 0"),
        (["--time", "1:2:3:4"], "--time: '1:2:3:4' is not a Slurm time"),
        (["--time", "5"], "--signal-lead: 300s must be > 0 and shorter than --time 5 (300s)"),
        (["--script", "nope.sbatch"], "--script: nope.sbatch not found"),
        (["optimizer.lrr=1"], "optimizer.lrr: unknown key (did you mean 'lr'?)"),
    ],
)  # fmt: skip
def test_impossible_requests_are_refused_before_submission(capsys, argv, expected):
    assert main(["configs/smoke_cpu.yaml", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("copd-sbatch: error: ") and expected in err, err


def test_notes_when_a_requeued_job_would_not_resume_its_own_checkpoints(capsys):
    assert main(["configs/smoke_cpu.yaml", "checkpoint.load_dir=null", "checkpoint.save_interval=100"]) == 0
    err = capsys.readouterr().err
    assert "checkpoint.load_dir is null, not 'auto'" in err and "save_interval" not in err


def test_slurm_time_formats():
    assert slurm_time_seconds("90") == 90 * 60
    assert slurm_time_seconds("10:30") == 10 * 60 + 30
    assert slurm_time_seconds("04:00:00") == 4 * 3600
    assert slurm_time_seconds("2-12") == 60 * 3600
    assert slurm_time_seconds("1-00:30") == 24 * 3600 + 30 * 60
    assert slurm_time_seconds("1-02:03:04") == 26 * 3600 + 3 * 60 + 4
    with pytest.raises(ConfigError):
        slurm_time_seconds("soon")


def test_cli_refusal_is_one_line_without_traceback():
    """As a stranger runs it: the module entry point, a bad layout, exit 2, one stderr line."""
    cmd = [sys.executable, "-m", "copd_megatron.sbatch_cli", "configs/smoke_cpu.yaml", "parallel.tp=3"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "copd-sbatch: error: parallel.tp: 3 does not divide model.num_attention_heads=4; allowed tp values: "
        "[1, 2, 4] (for --nodes 1 x 8 tasks = world size 8)"
    ]
