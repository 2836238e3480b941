"""Start-up rendezvous: a rank whose peers never come says what it waited for and gives up.

The CLI case is the one users hit: ``WORLD_SIZE=2 RANK=0`` left exported in a shell, no
launcher. It used to block silently; now it is one line (address, port, world size, likely
cause) and exit code 2 after ``parallel.rendezvous_timeout_s``. The other failures (a worker
that cannot reach the master, an unresolvable master, a taken port, a rank that arrives alone
under Slurm) are checked in-process against the real ``TCPStore`` and sockets.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from copd_megatron.distributed.init import DistEnv
from copd_megatron.distributed.rendezvous import RendezvousError, rendezvous

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_exported_world_size_without_launcher_fails_in_one_line_after_the_timeout(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "LOCAL_"))}
    env.update(WORLD_SIZE="2", RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "copd_megatron.cli", "configs/smoke_cpu.yaml", f"run_dir={tmp_path / 'run'}",
           "parallel.rendezvous_timeout_s=4"]  # fmt: skip
    t0 = time.monotonic()
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - t0
    errors = [line for line in out.stderr.splitlines() if line.startswith("copd-train:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert len(errors) == 1, out.stderr
    (line,) = errors
    for part in (f"127.0.0.1:{port}", "world size 2", "waited 4s", "1 rank(s) joined",
                 "RANK=0 and WORLD_SIZE=2 are set in the environment but no launcher started the other ranks"):  # fmt: skip
        assert part in line, line
    # Before giving up, rank 0 said what it was waiting for.
    assert f"listening at 127.0.0.1:{port}" in out.stdout and "for world size 2" in out.stdout, out.stdout
    assert elapsed < 4 + 60, f"gave up after {elapsed:.0f}s (timeout 4s + start-up)"
    assert not (tmp_path / "run" / "checkpoints").exists()


def _env(rank: int, world: int, port: int, launcher: str = "torchrun", addr: str = "127.0.0.1") -> DistEnv:
    return DistEnv(rank=rank, world_size=world, local_rank=rank, master_addr=addr, master_port=port, launcher=launcher)


def _raises_within(fn, timeout: float, slack: float = 15.0) -> str:
    t0 = time.monotonic()
    with pytest.raises(RendezvousError) as info:
        fn()
    elapsed = time.monotonic() - t0
    assert elapsed < timeout + slack, f"took {elapsed:.1f}s for a {timeout}s timeout"
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_worker_that_cannot_reach_the_master_names_it_and_gives_up():
    port = _free_port()  # nobody listens there
    msg = _raises_within(lambda: rendezvous(_env(1, 4, port, "slurm"), 2.0, environ={}), 2.0)
    assert f"rank 1 of world size 4 could not reach the master 127.0.0.1:{port} within 2s" in msg
    assert "rank 0 did not start or failed before listening" in msg and "MASTER_ADDR" in msg


def test_unresolvable_master_and_taken_port_are_named():
    msg = _raises_within(lambda: rendezvous(_env(1, 2, 29400, "slurm", addr="no-such-host.invalid"), 5.0,
                                            environ={}), 5.0)  # fmt: skip
    assert "cannot resolve the master address 'no-such-host.invalid'" in msg
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        msg = _raises_within(lambda: rendezvous(_env(0, 2, port, "slurm"), 5.0, environ={}), 5.0)
    assert f"cannot listen on port {port}: it is already in use" in msg and "MASTER_PORT" in msg


def test_master_alone_under_slurm_blames_the_other_nodes():
    port = _free_port()
    msg = _raises_within(lambda: rendezvous(_env(0, 16, port, "slurm"), 2.0, environ={}), 2.0)
    assert f"rank 0 waited 2s at 127.0.0.1:{port} for world size 16 and 1 rank(s) joined" in msg
    assert "the other ranks did not start, or cannot reach" in msg
