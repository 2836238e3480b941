"""GPU tier fixtures: skip reasons, and the records the GPU check's report is built from.

Every test here is marked ``gpu`` (``make test`` deselects them) and skips with a stated reason where
its hardware or library is missing. With ``COPD_GPU_REPORT=<file>`` (``tools/gpu_check.sh`` sets it)
the machine, every test's outcome and every figure a test measures are appended to that file as JSON
lines; ``tools/gpu_report.py`` turns them into ``report.md``.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TE = HAS_CUDA and importlib.util.find_spec("transformer_engine") is not None
NEEDS_CUDA = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (run on a GPU machine: make gpu-check)")
NEEDS_TE = pytest.mark.skipif(not HAS_TE, reason="needs Transformer Engine on a CUDA machine "
                              f"({os.environ.get('COPD_TE_STATUS', 'not importable here')})")  # fmt: skip


def _append(record: dict) -> None:
    path = os.environ.get("COPD_GPU_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


@pytest.fixture(scope="session", autouse=True)
def _machine_record() -> None:
    """The machine, once per session (a conftest below the root cannot use pytest_sessionstart)."""
    if not os.environ.get("COPD_GPU_REPORT") or not HAS_CUDA:
        return
    try:
        import megatron.core as mc

        mcore = getattr(mc, "__version__", "?")
    except ImportError as e:
        mcore = f"not importable ({e})"
    p = torch.cuda.get_device_properties(0)
    _append({"kind": "env", "device": f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}",
             "torch": torch.__version__, "cuda": torch.version.cuda, "megatron_core": mcore,
             "te": os.environ.get("COPD_TE_STATUS", "present" if HAS_TE else "absent")})  # fmt: skip


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        reason = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            reason = report.longrepr[2].removeprefix("Skipped: ")
        elif report.failed:
            reason = str(report.longrepr).strip().splitlines()[-1][:200]
        _append({"kind": "outcome", "test": report.nodeid.split("::", 1)[-1], "outcome": report.outcome,
                 "reason": reason})  # fmt: skip


@pytest.fixture
def record():
    """``record(section, name, value, unit="", note="")``: one figure for the GPU check's report."""

    def add(section: str, name: str, value, unit: str = "", note: str = "") -> None:
        _append({"kind": "figure", "section": section, "name": name, "value": value, "unit": unit, "note": note})

    return add
