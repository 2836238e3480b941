"""Progress lines with an ETA for long stretches (evaluation, merging, benchmarks).

A log line, not a redrawn bar: it reads the same in a terminal, a Slurm output file and the
run's log file. The first update and then one update every ``every_s`` seconds are logged, plus
the last one, so a 2-second stretch prints two lines and a 2-hour one a line a minute:

    evaluation: 3/8 models·domains (38%) | 41s elapsed | ETA 1m08s | count on sort

The ETA is the mean time per unit so far times the units left.
"""

from __future__ import annotations

import logging
import time


def format_seconds(s: float) -> str:
    """``75`` → ``1m15s``; ``3700`` → ``1h01m``."""
    s = max(0.0, s)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


class Progress:
    """Count units of work and log ``label: done/total (pct) | elapsed | ETA | note``."""

    def __init__(self, label: str, total: int, logger: logging.Logger, *, unit: str = "", every_s: float = 30.0,
                 enabled: bool = True) -> None:  # fmt: skip
        self.label, self.total, self.logger, self.unit = label, max(int(total), 0), logger, unit
        self.every_s, self.enabled = every_s, enabled
        self.done = 0
        self.start = time.perf_counter()
        self._last_log: float | None = None

    def eta(self, now: float | None = None) -> float:
        """Seconds left at the mean rate so far."""
        elapsed = (time.perf_counter() if now is None else now) - self.start
        return elapsed / max(self.done, 1) * max(self.total - self.done, 0)

    def line(self, note: str = "", now: float | None = None) -> str:
        now = time.perf_counter() if now is None else now
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        unit = f" {self.unit}" if self.unit else ""
        text = (f"{self.label}: {self.done}/{self.total}{unit}{pct} | {format_seconds(now - self.start)} elapsed | "
                f"ETA {format_seconds(self.eta(now))}")  # fmt: skip
        return f"{text} | {note}" if note else text

    def update(self, n: int = 1, note: str = "") -> None:
        """``n`` more units done; log if it is the first, the last, or ``every_s`` passed."""
        self.done += n
        now = time.perf_counter()
        due = self._last_log is None or now - self._last_log >= self.every_s or self.done >= self.total
        if self.enabled and due:
            self.logger.info(self.line(note, now))
            self._last_log = now
