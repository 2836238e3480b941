"""checkpoint.load_dir resolution: ``auto`` finds the run's newest complete checkpoint or starts fresh."""

from __future__ import annotations

import logging
from pathlib import Path

from copd_megatron.checkpoint.resume import latest_complete, resolve_load_dir
from copd_megatron.config import load_config


def _iter(root: Path, n: int, complete: bool) -> Path:
    d = root / f"iter_{n:07d}"
    (d / "main").mkdir(parents=True)
    if complete:
        (d / "COMPLETE").write_text("ok\n")
    return d


def test_auto_is_the_default():
    assert load_config("configs/smoke_cpu.yaml").checkpoint.load_dir == "auto"


def test_newest_complete_iteration_wins_over_incomplete_and_over_latest(tmp_path):
    assert latest_complete(tmp_path / "missing") is None
    _iter(tmp_path, 2, True)
    four = _iter(tmp_path, 4, True)
    _iter(tmp_path, 6, False)  # killed mid-save
    (tmp_path / "latest").write_text("iter_0000002\n")  # killed between COMPLETE and the rename of latest
    (tmp_path / "iter_9").mkdir()  # not an iteration directory
    assert latest_complete(tmp_path) == four


def test_resolve_logs_first_start_and_resume(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    caplog.set_level(logging.INFO, logger="copd_megatron.checkpoint.resume")
    assert resolve_load_dir("auto", tmp_path / "ckpt") is None
    assert "first start: no complete checkpoint in" in caplog.text
    _iter(tmp_path / "ckpt", 3, False)
    caplog.clear()
    assert resolve_load_dir("auto", tmp_path / "ckpt") is None
    assert "ignoring 1 incomplete checkpoint dir(s)" in caplog.text
    done = _iter(tmp_path / "ckpt", 1, True)
    caplog.clear()
    assert resolve_load_dir("auto", tmp_path / "ckpt") == done
    assert "resuming from iter_0000001" in caplog.text and "Slurm job 77, restart 2" in caplog.text
    assert resolve_load_dir(None, tmp_path / "ckpt") is None  # null: always fresh, even with checkpoints
    assert resolve_load_dir("/elsewhere", tmp_path / "ckpt") == "/elsewhere"  # explicit paths pass through
