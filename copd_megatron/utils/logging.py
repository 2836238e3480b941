"""Rank-aware logging, the run's log file, the known-harmless noise, and the metrics stream.

Rank 0 logs at the configured level, the other ranks log warnings only, so a 1,000-rank
job prints one line per step. ``copd-train`` also writes rank 0's log to
``<run_dir>/train.log`` (appended to on resume). Metrics are always written as JSONL (one
object per step, keys prefixed by branch: ``branch/<name>/...``); TensorBoard is optional.

Known-harmless noise is filtered here and nowhere else (each entry says why it is harmless):

* ``No CUDA runtime is found`` (torch's cpp_extension on a CPU machine: the CPU path is meant);
* ``GPTModel IS DEPRECATED`` (Megatron-Core 0.19 points at HybridModel; GPTModel is supported);
* ``full_param_layout not provided`` (Megatron's DDP computes the layout itself, as we want);
* ``MCore's async save is deprecated`` (printed for every torch_dist save, async or not; the
  NVRx alternative is not installed here);
* Megatron's warnings about optional GPU packages we deliberately lack on CPU, experimental
  modules we never use, and torch.distributed(.checkpoint)'s own API deprecations.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

# (logger name, message prefix) of records that are dropped.
KNOWN_NOISE = (
    ("torch.utils.cpp_extension", "No CUDA runtime is found"),
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"),
    ("megatron.core.distributed.distributed_data_parallel", "DistributedDataParallel: full_param_layout not provided"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCore's async save is deprecated"),
)
_FORMAT = "%(asctime)s [rank{rank}] %(name)s: %(message)s"
_FILE_LOGGER = "copd_megatron.run_log"  # records for the log file only (tables the console already shows)


class _DropKnownNoise(logging.Filter):
    def __init__(self, prefixes: list[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def filter_known_noise() -> None:
    """Install the filters (idempotent; call before Megatron is imported to catch import-time noise)."""
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\..* is deprecated")
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
    by_logger: dict[str, list[str]] = {}
    for name, prefix in KNOWN_NOISE:
        by_logger.setdefault(name, []).append(prefix)
    for name, prefixes in by_logger.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in log.filters):
            log.addFilter(_DropKnownNoise(prefixes))


def setup_logging(level: str = "INFO", rank: int = 0) -> None:
    filter_known_noise()
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format=_FORMAT.format(rank=rank),
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    # Megatron logs per-layer details at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)


def attach_log_file(run_dir: str | Path, rank: int = 0) -> Path | None:
    """Rank 0 also logs to ``<run_dir>/train.log`` (appended to); returns its path."""
    if rank != 0:
        return None
    path = Path(run_dir) / "train.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT.format(rank=rank), datefmt="%Y-%m-%d %H:%M:%S"))
    logging.getLogger().addHandler(handler)
    file_only = logging.getLogger(_FILE_LOGGER)
    file_only.propagate = False
    file_only.setLevel(logging.INFO)
    file_only.handlers = [handler]
    return path


def log_to_file(text: str) -> None:
    """Append ``text`` to the run's log file only (e.g. a table already printed to the console)."""
    logging.getLogger(_FILE_LOGGER).info(text)


class MetricsWriter:
    """Append one JSON object per step to ``<run_dir>/metrics.jsonl`` (rank 0 only).

    ``resume_step``: the run continues from a checkpoint of that step, so rows of later steps
    (written before the interruption, replayed now) are dropped first and TensorBoard is told
    to hide its events from ``resume_step + 1`` on (its ``purge_step``): every step is then
    recorded once."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False,
                 resume_step: int | None = None) -> None:  # fmt: skip
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step is not None:
                truncate_metrics(self.path, resume_step)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    purge = resume_step + 1 if resume_step is not None else None
                    self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)
                except ImportError:
                    logging.getLogger(__name__).warning(
                        "logging.tensorboard: tensorboard is not installed (pip install -e '.[tensorboard]'); "
                        "metrics go to metrics.jsonl only"
                    )

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def truncate_metrics(path: Path, last_step: int) -> int:
    """Keep the rows of steps ``<= last_step`` (and drop a partial last line left by a kill);
    returns the number of rows dropped. Rewritten through a temporary file and a rename."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] > last_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.parent / f".{path.name}.partial"
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return dropped
