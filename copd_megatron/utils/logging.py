"""Rank-aware logging and the metrics JSONL stream.

Rank 0 logs at the configured level, the other ranks log warnings only, so a 1,000-rank
job prints one line per step. Metrics are always written as JSONL (one object per step,
keys prefixed by branch: ``branch/<name>/reward``); TensorBoard is optional.
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path


def setup_logging(level: str = "INFO", rank: int = 0) -> None:
    # Megatron-Core warns about optional GPU packages we deliberately lack on CPU, experimental
    # modules we never use, and its own use of deprecated torch.distributed names.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\..* is deprecated")
    # torch.distributed.checkpoint (under dist_checkpointing) warns about its own API evolution.
    warnings.filterwarnings("ignore", module=r"torch\.distributed\.checkpoint")
    logging.basicConfig(
        level=getattr(logging, level) if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stdout,
        force=True,
    )
    # Megatron logs a deprecation banner for GPTModel and per-layer details at INFO.
    logging.getLogger("megatron").setLevel(logging.WARNING)


class MetricsWriter:
    """Append one JSON object per step to ``<run_dir>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
                except ImportError:
                    logging.getLogger(__name__).warning("tensorboard is not installed; metrics go to JSONL only")

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
