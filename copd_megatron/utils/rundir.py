"""One run per ``run_dir``: refuse to mix two runs, resume cleanly, start over only when asked.

A run writes ``config.yaml``, ``metrics.jsonl``, ``train.log``, ``tensorboard/``,
``checkpoints/`` (or ``checkpoint.save_dir``), ``merged/``, ``eval.json`` (and
``tools/plot_run.py`` adds ``plots/``). Starting a run in a directory that already holds
something would interleave two runs' metrics, move ``checkpoints/latest`` and replace
``merged/``, so ``copd-train`` (before any process group starts):

* refuses a non-empty ``run_dir`` (or a ``save_dir`` holding checkpoints) unless the run
  resumes (``checkpoint.load_dir``) or ``--force`` is given;
* with ``--force`` (and no resume) removes the previous run's outputs listed above, and
  nothing else; it refuses if one of the run's inputs (tokenizer, data, ``checkpoint.base``)
  lies inside what it would remove;
* on resume keeps everything; the metrics writer drops the rows (and hides the TensorBoard
  events) of steps after the resumed checkpoint, which the resumed run replays
  (``utils/logging.py``), and the log file is appended to.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from copd_megatron.utils.errors import ConfigError

RUN_OUTPUTS = ("config.yaml", "metrics.jsonl", "train.log", "tensorboard", "checkpoints", "merged", "eval.json",
               "plots", ".merged.partial", ".merged.replaced", ".eval.json.partial", ".metrics.jsonl.partial")  # fmt: skip


def _inside(path: Path, container: Path) -> bool:
    p, c = path.resolve(), container.resolve()
    return p == c or p.is_relative_to(c)


def _save_dir_outputs(save_dir: Path) -> list[Path]:
    if not save_dir.is_dir():
        return []
    return sorted(p for p in save_dir.iterdir() if p.name == "latest" or p.name.startswith(("iter_", "latest.")))


def check_run_dir(
    run_dir: str | Path, *, resuming: bool, force: bool, save_dir: str | Path | None = None,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
) -> list[Path]:  # fmt: skip
    """Refuse a run that would mix with another; return what ``--force`` will remove (maybe nothing).

    ``inputs`` are (config key, path) pairs that must survive ``--force``. No side effects."""
    d = Path(run_dir)
    if d.exists() and not d.is_dir():
        raise ConfigError(f"run_dir: {d} is a file; expected a directory (new or empty)")
    save = Path(save_dir) if save_dir is not None else d / "checkpoints"
    if save.exists() and not save.is_dir():
        raise ConfigError(f"checkpoint.save_dir: {save} is a file; expected a directory")
    if resuming:
        return []
    held = sorted(p.name for p in d.iterdir()) if d.is_dir() else []
    # A save_dir other than run_dir/checkpoints (inside run_dir or elsewhere): its iterations.
    old_checkpoints = _save_dir_outputs(save) if save.resolve() != (d / "checkpoints").resolve() else []
    if not held and not old_checkpoints:
        return []
    removals = [d / n for n in RUN_OUTPUTS if (d / n).exists() or (d / n).is_symlink()] + old_checkpoints
    if not force:
        where = f"{d} is not empty (holds {', '.join(held[:4])}{', ...' if len(held) > 4 else ''})" if held else \
            f"checkpoint.save_dir {save} holds checkpoints of another run"  # fmt: skip
        raise ConfigError(f"run_dir: {where}; resume it with checkpoint.load_dir={save}, choose another run_dir, "
                          "or pass --force to start over (removes the previous run's outputs)")  # fmt: skip
    for key, path in inputs:
        if path is None or str(path).startswith("synthetic:"):
            continue
        for r in removals:
            if _inside(Path(path), r):
                raise ConfigError(f"--force: would remove {r}, which holds {key}={path}; move the input or choose "
                                  "another run_dir")  # fmt: skip
    return removals


def remove_outputs(paths: Iterable[Path]) -> None:
    """Delete what :func:`check_run_dir` listed (rank 0, before the run starts)."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
