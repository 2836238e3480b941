"""What every command-line tool shares: one-line errors with exit code 2, printed once.

A user mistake (a bad flag, a missing file, a config value) is one line on stderr,
``<prog>: error: <what is wrong and what was expected>``, and exit code 2, without a usage
block or a traceback. Under ``torchrun`` or ``srun`` every rank finds the same mistake; only
global rank 0 prints it, so a 64-rank launch shows one line, not 64 (see :func:`report_error`
for how the other ranks make sure that line is not lost).
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

EXIT_USER_ERROR = 2


class OneLineParser(argparse.ArgumentParser):
    """``argparse`` whose errors are one line (``--help`` shows the usage) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


LAUNCHER_INTEGERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                     "SLURM_LOCALID", "SLURM_JOB_ID")  # fmt: skip


def launcher_env_problem(environ=None) -> str | None:
    """A one-line description of a launcher variable that is not an integer, or None."""
    import os

    env = os.environ if environ is None else environ
    for name in LAUNCHER_INTEGERS:
        value = env.get(name)
        if value is not None and not value.strip().lstrip("-").isdigit():
            return f"launcher environment: {name}={value!r} is not an integer (set by torchrun or Slurm; unset it to run one process)"
    return None


def report_error(prog: str, error: object, rank: int = 0, grace_s: float = 20.0) -> int:
    """Print ``error`` as one line on rank 0; return the exit code every rank should use.

    Another rank must not exit first: torchrun (and ``srun --kill-on-bad-exit``) would then
    kill rank 0 before it printed. So it waits ``grace_s`` seconds, during which rank 0's exit
    normally ends it. If it is still alive afterwards, rank 0 did not fail this way (a file
    only this node lacks, say), and it prints the error itself, naming its rank."""
    text = " ".join(str(error).split("\n"))
    if rank != 0:
        import signal
        import threading
        import time

        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the launcher's SIGTERM ends the wait
        time.sleep(grace_s)
        text = f"[rank {rank}] {text}"
    print(f"{prog}: error: {text}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def doc_summary(doc: str | None) -> str:
    """The first paragraph of a module docstring as one line (an ``argparse`` description)."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(first.split())
