"""Helper processes die with the process that started them.

Megatron's checkpoint writer starts two kinds of helpers: a ``multiprocessing`` manager (a
*spawned* interpreter that holds the write-results queue, ~750 MB because it re-imports the
training script) on the first save, and a *forked* writer per asynchronous save. When the
training process is killed with SIGKILL (OOM killer, ``kill -9``, a node agent) nothing runs
in it any more, so the helpers must notice by themselves; otherwise they live on as orphans
(parent pid 1) indefinitely. Slurm reaps them with the job's cgroup; a login node, a
container without an init, or a workstation does not.

:func:`die_with_parent` runs *in the child*: on Linux it asks the kernel for SIGKILL when the
parent dies (``prctl(PR_SET_PDEATHSIG)``; the "parent" is the thread that started the child,
which here is always the main thread), then re-checks the parent pid, in case the parent died
before the request. Elsewhere a daemon thread polls the parent pid once a second.
:func:`helpers_die_with_this_process` arranges that in the training process: forked children
run it through an at-fork hook, and the manager is started by us with it as its initializer
(see ``checkpoint/dist_ckpt.py``).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_PR_SET_PDEATHSIG = 1
_installed = False


def die_with_parent(parent_pid: int) -> None:
    """In a child process: exit as soon as ``parent_pid`` is no longer our parent."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
                if os.getppid() != parent_pid:  # the parent died before the request took effect
                    os._exit(1)
                return
        except (OSError, AttributeError):
            pass  # no prctl: fall back to polling

    def watch() -> None:
        import time

        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()


def helpers_die_with_this_process() -> None:
    """Make every child this process forks from now on exit when its parent dies (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    os.register_at_fork(before=_remember_forking_pid, after_in_child=_die_with_forking_process)


_forking_pid = 0


def _remember_forking_pid() -> None:
    global _forking_pid
    _forking_pid = os.getpid()  # copied into the child's memory by the fork


def _die_with_forking_process() -> None:
    die_with_parent(_forking_pid)
