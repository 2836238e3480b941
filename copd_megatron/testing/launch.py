"""Run a function on N spawned processes joined in one process group (gloo on CPU, NCCL on
GPU), with a hard timeout.

Every multi-process test goes through :func:`run_distributed`, so a deadlock (a collective
that one rank never reaches) fails the test after ``timeout`` seconds instead of freezing CI.

    def _worker(scale):                       # module-level: spawned children import it
        t = torch.ones(1) * (dist.get_rank() + 1) * scale
        dist.all_reduce(t)
        return t.item()

    assert run_distributed(_worker, world_size=2, args=(1.0,)) == [3.0, 3.0]

Children are started with the ``spawn`` method (fresh interpreters, no inherited locks),
run with one intra-op thread each (the CI machine has 2 cores), activate the CPU
compatibility layer when CUDA is absent, and send back their return value pickled by value.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import signal
import socket
import time
import traceback
import uuid
from datetime import timedelta
from typing import Any, Callable, Sequence


class DistributedTestError(RuntimeError):
    """A rank raised, or the world did not finish before the timeout."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn, rank, world_size, port, args, kwargs, extra_env, result_q, pg_timeout_s):
    # A process group of its own, so the parent can take down helpers this rank starts
    # (dist_checkpointing's writer processes outlive a killed parent otherwise).
    os.setsid()
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            **extra_env,
        }
    )
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        if not torch.cuda.is_available():
            from copd_megatron.distributed import cpu_compat

            cpu_compat.activate()
        backend = "gloo"
        if torch.cuda.is_available():  # the GPU path: one device per rank, NCCL collectives
            torch.cuda.set_device(rank % torch.cuda.device_count())
            backend = "nccl"
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=pg_timeout_s)
        )
        out = fn(*args, **kwargs)
        result_q.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # noqa: BLE001 - report everything, the parent decides
        result_q.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    *,
    timeout: float = 180.0,
    env: dict[str, str] | None = None,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results.

    ``fn`` must be importable by module path (a module-level function). Raises
    :class:`DistributedTestError` with the failing rank's traceback if any rank raises, and
    kills the whole world if it has not finished after ``timeout`` seconds.
    """
    ctx = mp.get_context("spawn")
    result_q = ctx.Queue()
    token = uuid.uuid4().hex
    env = {**(env or {}), "COPD_TEST_SESSION": token}
    port = _free_port()
    # A collective left hanging by a dead peer must also time out inside the children.
    pg_timeout_s = max(30, int(timeout))
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, r, world_size, port, tuple(args), kwargs or {}, env, result_q, pg_timeout_s),
            daemon=False,  # dist_checkpointing starts child processes of its own
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise DistributedTestError(
                    f"{fn.__name__}: ranks {missing} of {world_size} did not finish within {timeout:.0f}s"
                )
            try:
                rank, status, payload = result_q.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise DistributedTestError(
                        f"{fn.__name__}: rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a result"
                    )
                continue
            if status == "error":
                raise DistributedTestError(f"{fn.__name__} failed on rank {rank}:\n{payload}")
            results[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5)
        for p in procs:
            _kill_group(p.pid)
            p.join(timeout=5)
        reap(token)
    return [results[r] for r in range(world_size)]


def _kill_group(pid: int | None) -> None:
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def reap(token: str) -> int:
    """SIGKILL every process whose environment carries ``COPD_TEST_SESSION=token``.

    dist_checkpointing's writer starts a multiprocessing manager that survives a rank killed
    with SIGKILL (Slurm reaps such processes with the job's cgroup; a test must do it itself).
    Returns the number of processes killed. Linux only (reads /proc).
    """
    needle = f"COPD_TEST_SESSION={token}".encode()
    killed = 0
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(int(entry), signal.SIGKILL)
                    killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed
