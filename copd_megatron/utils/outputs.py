"""Outputs that never destroy work: refusal rules, and staged directories renamed into place.

Every tool that writes a result (``copd-merge``, ``copd-convert``, ``copd-eval --out``,
``tools/make_base.py``, the trainer's ``merged/``) follows the same two rules:

* **Refusal, before any work.** An existing non-empty output is replaced only with ``--force``;
  an output that *is* one of the tool's inputs, lies inside one, or contains one is refused even
  with ``--force`` (replacing it would destroy what is being read, or a merge's base would
  silently become the merge).
* **Staging.** The result is written into a hidden sibling (``.<name>.partial``, same
  filesystem) and renamed to its final name only when complete. A run killed halfway leaves
  no half-written directory under the final name (the next attempt clears the stale sibling),
  and a replaced output is moved aside before the rename, so the final name always holds one
  complete result. In a distributed job every rank writes into the same staging directory and
  global rank 0 renames it after a barrier.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from copd_megatron.utils.errors import ConfigError


def _relation(out: Path, inp: Path) -> str | None:
    """How ``out`` overlaps ``inp`` ("is", "contains", "is inside"), or None."""
    o, i = out.resolve(), inp.resolve()
    if o == i:
        return "is"
    if i.is_relative_to(o):
        return "contains"
    if o.is_relative_to(i):
        return "is inside"
    return None


def check_output(
    out: str | Path, inputs: Iterable[str | Path | None], *, force: bool, flag: str = "--out", kind: str = "directory"
) -> None:
    """Refuse an output that overlaps an input (always) or replaces something without ``force``.

    ``kind`` is ``directory`` (non-empty directories need ``force``) or ``file`` (any existing
    file needs ``force``). Raises :class:`ConfigError` with one line naming ``flag``.
    """
    out = Path(out)
    for inp in inputs:
        if inp is None:
            continue
        rel = _relation(out, Path(inp))
        if rel is not None:
            raise ConfigError(f"{flag}: {out} {rel} the input {inp}; write the result elsewhere "
                              "(--force never writes over an input)")  # fmt: skip
    if not out.exists() and not out.is_symlink():
        return
    if kind == "directory" and not out.is_dir():
        raise ConfigError(f"{flag}: {out} exists and is not a directory")
    if kind == "file" and out.is_dir():
        raise ConfigError(f"{flag}: {out} is a directory; expected a file name")
    if kind == "directory" and not any(out.iterdir()):
        return
    if not force:
        what = "is not empty" if kind == "directory" else "already exists"
        raise ConfigError(f"{flag}: {out} {what}; pass --force to replace it, or choose another path")


def staging_path(final: str | Path) -> Path:
    """The hidden sibling a result is written into before it gets its final name."""
    final = Path(final)
    return final.parent / f".{final.name}.partial"


def replace_with(final: Path, staged: Path) -> None:
    """Move ``staged`` to ``final`` (renames on one filesystem); an existing ``final`` is moved
    aside first and deleted only after the new one is in place."""
    aside = final.parent / f".{final.name}.replaced"
    if aside.exists():
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink()
    if final.exists() or final.is_symlink():
        os.rename(final, aside)
    os.rename(staged, final)
    if aside.exists():
        shutil.rmtree(aside) if aside.is_dir() else aside.unlink()


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield a fresh staging directory; on success it becomes ``final``.

    Collective when ``torch.distributed`` is initialised (every rank must enter and leave it);
    global rank 0 prepares and renames. On an exception a single process removes the staging
    directory; in a distributed job it is left for the next attempt to clear (other ranks may
    still be writing into it)."""
    final = Path(final)
    stage = staging_path(final)
    dist = _dist()
    rank0 = dist is None or dist.get_rank() == 0
    if rank0:
        if stage.exists():
            shutil.rmtree(stage)  # a stale attempt that never finished
        stage.mkdir(parents=True)
    if dist is not None:
        dist.barrier()
    try:
        yield stage
    except BaseException:
        if dist is None and stage.exists():
            shutil.rmtree(stage, ignore_errors=True)  # one process: nobody else writes there
        raise
    if dist is not None:
        dist.barrier()  # every rank finished writing its part
    if rank0:
        replace_with(final, stage)
    if dist is not None:
        dist.barrier()  # nobody reads `final` before it exists


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a file through a sibling temporary file and an atomic rename."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.partial"
    tmp.write_text(text)
    os.replace(tmp, path)
