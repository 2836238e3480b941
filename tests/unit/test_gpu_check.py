"""The GPU check's machinery on a machine without a GPU: tools/gpu_check.sh refuses an unready machine
or wheel folder with one line and exit 2 (and plans the run on a ready folder), the report is built
from the GPU tests' records, and the wheel fetcher names exactly the pinned set."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CORE = ["megatron_core-0.19.2-cp312-cp312-manylinux_2_28_x86_64.whl", "math_verify-0.9.0-py3-none-any.whl",
        "latex2sympy2_extended-1.11.0-py3-none-any.whl", "antlr4_python3_runtime-4.13.2-py3-none-any.whl"]  # fmt: skip


def _check(*args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python}
    return subprocess.run(["bash", "tools/gpu_check.sh", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)  # fmt: skip


def _one_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("gpu_check: error: "), done.stderr
    return done.stderr


def test_missing_wheels_are_one_line_naming_the_file_and_the_fetch_command(tmp_path: Path) -> None:
    err = _one_line(_check("--dry-run", "--wheels", str(tmp_path / "absent")))
    assert "does not exist" in err and "python3 tools/fetch_gpu_wheels.py --out" in err
    for missing in range(len(CORE)):
        folder = tmp_path / f"partial{missing}"
        folder.mkdir()
        for i, name in enumerate(CORE):
            if i != missing:
                (folder / name).write_bytes(b"")
        err = _one_line(_check("--dry-run", "--wheels", str(folder)))
        assert CORE[missing].split("-")[0] in err and f"fetch_gpu_wheels.py --out {folder}" in err


def test_ready_folder_plans_the_run_and_a_machine_without_cuda_is_refused(tmp_path: Path) -> None:
    for name in CORE:
        (tmp_path / name).write_bytes(b"")
    done = _check("--dry-run", "--wheels", str(tmp_path))
    assert done.returncode == 0 and "Transformer Engine wheels: no" in done.stdout and "pytest -m gpu" in done.stdout
    if not torch.cuda.is_available():  # the real run stops before installing anything
        report = tmp_path / "report"
        err = _one_line(_check("--wheels", str(tmp_path), "--report-dir", str(report)))
        assert "sees no CUDA device" in err and not report.exists()


def test_wrong_python_and_unknown_arguments_are_refused(tmp_path: Path) -> None:
    fake = tmp_path / "python3.11"
    fake.write_text("#!/bin/sh\necho 3.11\n")
    fake.chmod(0o755)
    assert "Python 3.11; megatron-core 0.19.2 ships cp312 wheels only" in _one_line(_check("--dry-run", python=str(fake)))
    assert "unknown argument '--fast'" in _one_line(_check("--fast"))


def test_report_has_machine_outcomes_figures_and_names_what_was_not_measured(tmp_path: Path) -> None:
    records = [
        {"kind": "env", "device": "NVIDIA H100 80GB HBM3, 79 GiB, sm_90", "torch": "2.11.0+cu130", "cuda": "13.0",
         "megatron_core": "0.19.2", "te": "absent: no Transformer Engine wheels"},
        {"kind": "outcome", "test": "test_train_step_matches_the_cpu_fp32_reference", "outcome": "passed", "reason": ""},
        {"kind": "outcome", "test": "test_fp8_training_tracks_bf16", "outcome": "skipped",
         "reason": "needs Transformer Engine on a CUDA machine"},
        {"kind": "figure", "section": "throughput", "name": "local spec: tokens/s", "value": 51234, "unit": "tokens/s",
         "note": "1.10B params"},
        {"kind": "figure", "section": "parity", "name": "loss rel. diff", "value": 0.00123456, "unit": "", "note": ""},
    ]  # fmt: skip
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    done = subprocess.run([sys.executable, "tools/gpu_report.py", str(tmp_path), "--command", "make gpu-check"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "report.md").read_text()
    assert "- device: NVIDIA H100 80GB HBM3, 79 GiB, sm_90" in text and "`make gpu-check`" in text
    assert "| test_fp8_training_tracks_bf16 | skipped | needs Transformer Engine on a CUDA machine |" in text
    assert "| local spec: tokens/s | 51234 | tokens/s | 1.10B params |" in text and "| loss rel. diff | 0.001235 |" in text
    assert "## Not measured" in text and "- FP8 train step vs bf16 (Transformer Engine)" in text
    empty = tmp_path / "empty"
    empty.mkdir()
    done = subprocess.run([sys.executable, "tools/gpu_report.py", str(empty)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 1 and "has no records" in done.stderr


def test_wheel_fetcher_names_the_pinned_set_for_cpython_312() -> None:
    done = subprocess.run([sys.executable, "tools/fetch_gpu_wheels.py", "--with-te", "--print", "--out", "W"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    core, te, src = done.stdout.strip().splitlines()
    assert "megatron-core==0.19.2" in core and "--python-version 3.12" in core and "--only-binary=:all:" in core
    assert "transformer-engine-cu13==2.20.2" in te and "pydantic-core==2.50.5" in te
    assert "--no-binary=:all:" in src and src.endswith("transformer-engine-torch==2.20.2")
