"""Slurm signals every process of a job step; only the ranks may act on the preemption signals.

A helper process started inside ``children_block`` (as Megatron's checkpoint writer is) lives
through SIGUSR1 and SIGTERM, while the same helper started outside dies of them, which is what
broke the save on preemption under a real Slurm. The training process itself still receives a
signal that arrives inside the block. (End to end: tests/slurm/test_sbatch.py.)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

from copd_megatron.checkpoint.manager import PREEMPTION_SIGNALS, children_block


def test_helpers_started_inside_the_block_survive_the_preemption_signals():
    ctx = mp.get_context("spawn")
    got: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in PREEMPTION_SIGNALS}
    children = []
    try:
        with children_block():
            shielded = ctx.Process(target=time.sleep, args=(60,))
            shielded.start()
            children.append(shielded)
            os.kill(os.getpid(), signal.SIGUSR1)  # for this process: must not be lost
        deadline = time.monotonic() + 5
        while signal.SIGUSR1 not in got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert signal.SIGUSR1 in got

        bare = ctx.Process(target=time.sleep, args=(60,))
        bare.start()
        children.append(bare)
        for child in children:
            for s in PREEMPTION_SIGNALS:
                os.kill(child.pid, s)
        bare.join(timeout=30)
        assert bare.exitcode in (-signal.SIGUSR1, -signal.SIGTERM)  # what happened to the checkpoint writer
        shielded.join(timeout=2)
        assert shielded.is_alive() and shielded.exitcode is None
    finally:
        for child in children:
            child.kill()
            child.join(timeout=10)
        for s, handler in previous.items():
            signal.signal(s, handler)
