"""Outputs never destroy work; one run per run_dir; metrics after a resume; progress lines;
helpers die with their parent. No process group, no model: the rules themselves."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from copd_megatron.config.schema import ConfigError
from copd_megatron.utils.logging import truncate_metrics
from copd_megatron.utils.outputs import check_output, staged_dir, staging_path, write_text_atomic
from copd_megatron.utils.progress import Progress, format_seconds
from copd_megatron.utils.rundir import check_run_dir, remove_outputs


def test_check_output_refuses_overlap_with_inputs_even_with_force(tmp_path):
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "x").write_text("1")
    for out, word in ((src, "is"), (src / "sub", "is inside"), (tmp_path, "contains")):
        with pytest.raises(ConfigError, match=f"--out: .* {word} the input"):
            check_output(out, [src], force=True)
    full = tmp_path / "full"
    full.mkdir()
    (full / "y").write_text("2")
    with pytest.raises(ConfigError, match="is not empty; pass --force"):
        check_output(full, [src], force=False)
    check_output(full, [src], force=True)
    check_output(tmp_path / "new", [src], force=False)
    (tmp_path / "empty").mkdir()
    check_output(tmp_path / "empty", [src], force=False)  # an empty directory holds nothing to lose
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        check_output(src / "x", [], force=True)
    with pytest.raises(ConfigError, match="already exists"):
        check_output(src / "x", [], force=False, kind="file")
    with pytest.raises(ConfigError, match="is a directory"):
        check_output(full, [], force=True, kind="file")


def test_staged_dir_replaces_only_when_complete(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(final) as stage:
            (stage / "half").write_text("half")
            raise RuntimeError("killed halfway")
    assert sorted(p.name for p in final.iterdir()) == ["old"] and not staging_path(final).exists()
    with staged_dir(final) as stage:
        (stage / "new").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left aside


def test_a_sigkilled_writer_leaves_the_old_output_and_the_next_run_cleans_up(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    code = textwrap.dedent(f"""
        import os, signal
        from copd_megatron.utils.outputs import staged_dir
        with staged_dir({str(final)!r}) as stage:
            (stage / "half").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.returncode == -signal.SIGKILL
    assert (final / "old").read_text() == "old" and staging_path(final).exists()
    with staged_dir(final) as stage:
        (stage / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["new"] and not staging_path(final).exists()


def test_write_text_atomic(tmp_path):
    p = tmp_path / "r.json"
    write_text_atomic(p, "a")
    write_text_atomic(p, "b")
    assert p.read_text() == "b" and sorted(x.name for x in tmp_path.iterdir()) == ["r.json"]


def test_run_dir_rules(tmp_path):
    run = tmp_path / "run"
    assert check_run_dir(run, resuming=False, force=False) == []  # new
    run.mkdir()
    assert check_run_dir(run, resuming=False, force=False) == []  # empty
    for name in ("metrics.jsonl", "config.yaml", "notes.txt"):
        (run / name).write_text("x")
    (run / "checkpoints" / "iter_0000002").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"run_dir: .* is not empty .*resume it with checkpoint.load_dir=.*--force"):
        check_run_dir(run, resuming=False, force=False)
    assert check_run_dir(run, resuming=True, force=False) == []  # a resume continues the run
    removals = check_run_dir(run, resuming=False, force=True)
    assert sorted(p.name for p in removals) == ["checkpoints", "config.yaml", "metrics.jsonl"]  # never the user's notes
    with pytest.raises(ConfigError, match=r"--force: would remove .*checkpoints, which holds checkpoint.base="):
        check_run_dir(run, resuming=False, force=True, inputs=[("checkpoint.base", run / "checkpoints" / "iter_0000002")])
    remove_outputs(removals)
    assert [p.name for p in run.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="run_dir: .* is a file"):
        check_run_dir(tmp_path / "file", resuming=True, force=True)
    # A save_dir outside run_dir that holds another run's checkpoints counts as occupied too.
    save = tmp_path / "save"
    (save / "iter_0000004").mkdir(parents=True)
    (save / "latest").write_text("iter_0000004\n")
    with pytest.raises(ConfigError, match="holds checkpoints of another run"):
        check_run_dir(tmp_path / "other", resuming=False, force=False, save_dir=save)
    assert sorted(p.name for p in check_run_dir(tmp_path / "other", resuming=False, force=True, save_dir=save)) == [
        "iter_0000004", "latest"]  # fmt: skip
    # ... and so does one inside run_dir under another name: --force clears its iterations too.
    inner = tmp_path / "other" / "ckpt"
    (inner / "iter_0000002").mkdir(parents=True)
    assert sorted(p.name for p in check_run_dir(tmp_path / "other", resuming=False, force=True, save_dir=inner)) == [
        "iter_0000002"]  # fmt: skip


def test_truncate_metrics_keeps_steps_up_to_the_resumed_one(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps({"step": s, "loss": s / 10}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    assert truncate_metrics(p, 2) == 3  # steps 3, 4 and the half-written line of a killed run
    assert [json.loads(line)["step"] for line in p.read_text().splitlines()] == [1, 2]
    assert truncate_metrics(p, 2) == 0 and truncate_metrics(tmp_path / "none.jsonl", 1) == 0


def test_progress_lines_have_an_eta(monkeypatch, caplog):
    clock = iter([0.0, 10.0, 20.0, 100.0])
    monkeypatch.setattr("copd_megatron.utils.progress.time.perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO)
    p = Progress("evaluation", 4, logging.getLogger("t"), unit="models", every_s=30.0)
    p.update(note="base")  # t=10: first update, logged
    p.update()  # t=20: within 30 s of the last line, silent
    p.update(2)  # t=100: the last one, logged
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["evaluation: 1/4 models (25%) | 10s elapsed | ETA 30s | base",
                     "evaluation: 4/4 models (100%) | 1m40s elapsed | ETA 0s"]  # fmt: skip
    assert format_seconds(3700) == "1h01m"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_helper_dies_with_its_parent():
    """A forked child that called die_with_parent exits when its parent is SIGKILLed."""
    code = textwrap.dedent("""
        import os, sys, time
        from copd_megatron.utils.procs import helpers_die_with_this_process
        helpers_die_with_this_process()
        pid = os.fork()
        if pid == 0:
            time.sleep(600)
            os._exit(0)
        print(pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        os.kill(child, 0)  # alive while the parent lives
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _alive(child):
            time.sleep(0.05)
        assert not _alive(child), "the forked helper outlived its SIGKILLed parent"
    finally:
        parent.kill()
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
