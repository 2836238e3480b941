"""Where a run starts from: ``checkpoint.load_dir`` resolved to one directory, or a fresh start.

``checkpoint.load_dir`` takes three kinds of value:

* ``auto`` (the default): the run's own newest *complete* checkpoint in its save directory
  (``checkpoint.save_dir``, else ``<run_dir>/checkpoints``) if there is one, otherwise a fresh
  start. A job that is requeued, or simply started again after a crash, with the same command
  line continues where it stopped, and a first start needs no different command. "Complete"
  means the iteration directory carries ``COMPLETE`` (written after every rank finished every
  branch); the newest one is found by scanning the iteration directories rather than trusting
  ``latest`` alone, because a job killed between ``COMPLETE`` and the rename of ``latest``
  leaves a complete iteration newer than ``latest``.
* ``null``: start fresh.
* a path: a save directory (its ``latest``) or one ``iter_*`` directory, e.g. another run's;
  a missing or incomplete one is an error, never a silent fresh start.

The decision is logged on rank 0 in one line that says "first start" or "resuming", so a
job's log shows what each allocation did.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

logger = logging.getLogger(__name__)

AUTO = "auto"
_ITER = re.compile(r"^iter_(\d{7})$")


def latest_complete(save_dir: str | Path) -> Path | None:
    """The newest ``iter_*`` directory of ``save_dir`` with a ``COMPLETE`` marker, or None."""
    root = Path(save_dir)
    if not root.is_dir():
        return None
    done = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _ITER.match(p.name)) and (p / "COMPLETE").is_file()
    )
    return done[-1][1] if done else None


def _same_on_every_rank(found: Path | None) -> Path | None:
    """Rank 0's answer everywhere: on a shared file system another node's directory listing can
    lag behind (attribute caches), and ranks resuming different iterations would corrupt the run."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return found
    box = [None if found is None else str(found)]
    dist.broadcast_object_list(box, src=0)
    return None if box[0] is None else Path(box[0])


def resolve_load_dir(load_dir: str | None, save_dir: str | Path) -> str | Path | None:
    """What to resume from (a path for ``CheckpointManager.load``), or None for a fresh start.

    ``auto`` looks for a complete checkpoint in ``save_dir``; other values pass through
    (``CheckpointManager.resolve`` checks explicit paths when it loads them).
    """
    restart = os.environ.get("SLURM_RESTART_COUNT")
    job = f" (Slurm job {os.environ['SLURM_JOB_ID']}, restart {restart})" if restart and "SLURM_JOB_ID" in os.environ else ""
    if load_dir is None:
        logger.info("first start: checkpoint.load_dir is null, starting fresh%s", job)
        return None
    if load_dir != AUTO:
        logger.info("resuming from checkpoint.load_dir=%s%s", load_dir, job)
        return load_dir
    found = _same_on_every_rank(latest_complete(save_dir))
    if found is None:
        stale = [p.name for p in Path(save_dir).glob("iter_*")] if Path(save_dir).is_dir() else []
        note = f"; ignoring {len(stale)} incomplete checkpoint dir(s)" if stale else ""
        logger.info("first start: no complete checkpoint in %s (checkpoint.load_dir=auto)%s%s", save_dir, note, job)
        return None
    logger.info("resuming from %s, the newest complete checkpoint in %s (checkpoint.load_dir=auto)%s",
                found.name, save_dir, job)  # fmt: skip
    return found
