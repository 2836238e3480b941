"""Start-up rendezvous that says what it waits for and gives up with one line.

``torch.distributed``'s own TCP rendezvous waits silently (a rank whose peers never come
blocks until the collective timeout, then prints a C++ stack), so an exported
``WORLD_SIZE=2 RANK=0`` without a launcher, a node that cannot reach the master, or a crashed
rank 0 all look like a hang. Here:

1. rank 0 opens the key-value store (``torch.distributed.TCPStore``) on the master port (under
   torchrun the agent already serves it there); the other ranks probe ``MASTER_ADDR:MASTER_PORT``
   with plain sockets (quiet, unlike the store's own retries) until it answers, then connect;
2. every rank adds itself to a counter in the store and waits until it reaches the world size;
3. the store is handed to ``init_process_group``.

Rank 0 logs where it listens and for how many ranks, and every wait logs progress every 30 s.
Past ``timeout_s`` a :class:`RendezvousError` carries one line: the address, port, world size,
how many ranks arrived, and the likely cause for this launcher.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta
from typing import Mapping

logger = logging.getLogger(__name__)

_JOINED = "copd/rendezvous/joined"
_PROGRESS_EVERY_S = 30.0
_SOURCE = {"torchrun": "RANK/WORLD_SIZE/MASTER_* from the environment", "slurm": "SLURM_* variables"}


class RendezvousError(RuntimeError):
    """The ranks did not all meet in time; the message is one line naming the likely cause."""


def _likely_cause(dist_env, environ: Mapping[str, str], waiting_side: str) -> str:
    where = f"{dist_env.master_addr}:{dist_env.master_port}"
    if dist_env.launcher == "torchrun" and "TORCHELASTIC_RUN_ID" not in environ:
        return (f"RANK={dist_env.rank} and WORLD_SIZE={dist_env.world_size} are set in the environment but no "
                "launcher started the other ranks (unset them to run one process, or start every rank with "
                "torchrun or srun)")  # fmt: skip
    if waiting_side == "master":
        return (f"the other ranks did not start, or cannot reach {where} from their nodes (firewall, or "
                f"{dist_env.master_addr} resolves to an interface they cannot reach: set MASTER_ADDR)")  # fmt: skip
    return (f"rank 0 did not start or failed before listening, or {where} is not reachable from "
            f"{socket.gethostname()} (firewall, wrong interface: set MASTER_ADDR)")  # fmt: skip


def _probe_master(dist_env, deadline: float, timeout_s: float, environ: Mapping[str, str]) -> None:
    """Wait until something listens on the master port (non-master ranks)."""
    addr, port = dist_env.master_addr, dist_env.master_port
    try:
        socket.getaddrinfo(addr, port)
    except socket.gaierror as e:
        raise RendezvousError(
            f"rendezvous: rank {dist_env.rank} cannot resolve the master address {addr!r} ({e.strerror}); "
            "set MASTER_ADDR to a host name or IP address every node can resolve"
        ) from None
    next_note = time.monotonic() + _PROGRESS_EVERY_S
    while True:
        try:
            with socket.create_connection((addr, port), timeout=min(5.0, max(deadline - time.monotonic(), 0.1))):
                return
        except OSError:
            pass
        now = time.monotonic()
        if now >= deadline:
            raise RendezvousError(
                f"rendezvous: rank {dist_env.rank} of world size {dist_env.world_size} could not reach the master "
                f"{addr}:{port} within {timeout_s:g}s; likely cause: {_likely_cause(dist_env, environ, 'worker')}"
            )
        if now >= next_note:
            logger.warning("rendezvous: rank %d still cannot reach the master %s:%d (%.0fs left)",
                           dist_env.rank, addr, port, deadline - now)  # fmt: skip
            next_note = now + _PROGRESS_EVERY_S
        time.sleep(0.5)


def _open_store(dist_env, deadline: float, timeout_s: float, environ: Mapping[str, str]):
    import torch.distributed as dist

    # Under torchrun the agent already serves the store on the master port: every rank is a client.
    master = dist_env.rank == 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    if not master:
        _probe_master(dist_env, deadline, timeout_s, environ)
    try:
        return dist.TCPStore(dist_env.master_addr, dist_env.master_port, dist_env.world_size, is_master=master,
                             timeout=timedelta(seconds=max(deadline - time.monotonic(), 1.0)),
                             wait_for_workers=False)  # fmt: skip
    except (RuntimeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if master and "EADDRINUSE" in str(e):
            raise RendezvousError(
                f"rendezvous: rank 0 cannot listen on port {dist_env.master_port}: it is already in use on "
                f"{socket.gethostname()} (another job?); set MASTER_PORT to a free port"
            ) from None
        raise RendezvousError(
            f"rendezvous: rank {dist_env.rank} of world size {dist_env.world_size} could not open the store at "
            f"{dist_env.master_addr}:{dist_env.master_port}: {first}"
        ) from None


def rendezvous(dist_env, timeout_s: float, environ: Mapping[str, str] | None = None):
    """Meet every rank at ``dist_env``'s master address and port; return the store for
    ``init_process_group``. Raises :class:`RendezvousError` after ``timeout_s`` seconds."""
    environ = os.environ if environ is None else environ
    where = f"{dist_env.master_addr}:{dist_env.master_port}"
    deadline = time.monotonic() + timeout_s
    if dist_env.rank == 0 and dist_env.world_size > 1:
        logger.info("rendezvous: rank 0 listening at %s (%s), waiting up to %gs for world size %d",
                    where, _SOURCE.get(dist_env.launcher, dist_env.launcher), timeout_s, dist_env.world_size)  # fmt: skip
    store = _open_store(dist_env, deadline, timeout_s, environ)
    # torchrun's store outlives restarted workers: count each restart separately.
    key = f"{_JOINED}/{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    joined = store.add(key, 1)
    next_note = time.monotonic() + _PROGRESS_EVERY_S
    while joined < dist_env.world_size:
        now = time.monotonic()
        if now >= deadline:
            side = "master" if dist_env.rank == 0 else "worker"
            raise RendezvousError(
                f"rendezvous: rank {dist_env.rank} waited {timeout_s:g}s at {where} for world size "
                f"{dist_env.world_size} and {joined} rank(s) joined; likely cause: "
                f"{_likely_cause(dist_env, environ, side)}"
            )
        if now >= next_note:
            log = logger.info if dist_env.rank == 0 else logger.warning
            log("rendezvous: %d of %d ranks joined at %s (%.0fs left)", joined, dist_env.world_size, where,
                deadline - now)  # fmt: skip
            next_note = now + _PROGRESS_EVERY_S
        time.sleep(0.1)
        try:
            joined = store.add(key, 0)
        except RuntimeError:
            raise RendezvousError(
                f"rendezvous: rank {dist_env.rank} lost the master {where} while waiting for world size "
                f"{dist_env.world_size}; likely cause: rank 0 exited (see its log)"
            ) from None
    if dist_env.rank == 0 and dist_env.world_size > 1:
        logger.info("rendezvous: all %d ranks joined at %s", dist_env.world_size, where)
    return store
