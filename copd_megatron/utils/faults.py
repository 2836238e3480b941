"""Deterministic fault injection for resilience tests (never active unless asked for).

``COPD_FAULT=<point>@<step>`` makes every rank SIGKILL itself when it reaches ``point`` at
``step``: ``train`` (after forward/backward, before the optimizer step), ``save`` (after the
shards are written, before the checkpoint is marked complete). Tests use it to prove that a
run killed at the worst moment resumes exactly.
"""

from __future__ import annotations

import os
import signal


def maybe_die(point: str, step: int) -> None:
    spec = os.environ.get("COPD_FAULT")
    if spec and spec == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
