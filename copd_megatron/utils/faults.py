"""Deterministic fault injection for resilience tests (never active unless asked for).

``COPD_FAULT=<point>@<step>`` makes every rank SIGKILL itself when it reaches ``point`` at
``step``: ``train`` (after forward/backward, before the optimizer step), ``save`` (after the
shards are written, before the checkpoint is marked complete). Tests use it to prove that a
run killed at the worst moment resumes exactly.

``COPD_FAULT=<point>@<step>:pause`` instead makes every rank wait there until it receives
SIGUSR1 or SIGTERM (at most ``COPD_FAULT_PAUSE_S`` seconds, default 120), printing one line
first, so a test can deliver a preemption signal at a known step (Slurm's time-limit signal
arrives at an arbitrary moment; a test needs a reproducible one). The signal still reaches the
handler that was installed (the trainer's preemption flag); the step then completes as usual.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def maybe_die(point: str, step: int) -> None:
    spec = os.environ.get("COPD_FAULT")
    if not spec:
        return
    where, _, action = spec.partition(":")
    if where != f"{point}@{step}":
        return
    if action == "pause":
        _pause_until_signal(where, float(os.environ.get("COPD_FAULT_PAUSE_S", "120")))
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def _pause_until_signal(where: str, max_s: float) -> None:
    got: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM)}

    def chained(signum, frame) -> None:
        got.append(signum)
        handler = previous[signum]
        if callable(handler):
            handler(signum, frame)

    for s in previous:
        signal.signal(s, chained)
    print(f"COPD_FAULT: pid {os.getpid()} paused at {where} until SIGUSR1/SIGTERM", file=sys.stderr, flush=True)
    try:
        deadline = time.monotonic() + max_s
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
