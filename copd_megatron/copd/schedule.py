"""The CoPD rhythm as a pure state machine: which phase, step and teachers come next.

N cycles of Phase I (``s_rl`` GRPO steps) and Phase II (``s_opd`` mutual-OPD steps). In a
step every branch makes exactly one update; within a step all branches read their peers'
weights *before* any branch updates (synchronous semantics), so the teacher used at Phase II
step s is the peer after its step s−1: live, never frozen, never from the future.

The adaptive rhythm (off by default, beyond the paper) ends a Phase I early when the mean
top-k overlap between connected branches falls below ``overlap_floor``, and a Phase II early
when it rises above ``overlap_ceiling``; the cycle count is unchanged and every phase runs at
least one step. Without it the sequence of events depends on the config alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

from copd_megatron.copd.topology import teachers_of

RL, OPD = "rl", "opd"


@dataclass(frozen=True)
class StepPlan:
    """One synchronous step: every branch updates once."""

    cycle: int  # 0-based cycle index
    phase: str  # "rl" (Phase I) or "opd" (Phase II)
    step_in_phase: int  # 0-based
    global_step: int  # 0-based count of steps so far (== each branch's update count)
    teachers: dict[str, tuple[str, ...]]  # per student branch; empty tuple = pure GRPO this step


@dataclass
class Rhythm:
    """Iterate :class:`StepPlan` s; call :meth:`observe_overlap` between steps (adaptive mode)."""

    names: Sequence[str]
    pairs: Sequence[tuple[str, str]]
    betas: dict[str, float]
    cycles: int
    s_rl: int
    s_opd: int
    adaptive: bool = False
    overlap_floor: float = 0.90
    overlap_ceiling: float = 0.97
    _overlap: float | None = None
    _cursor: tuple[int, int, int, int] = (0, 0, 0, 0)  # (cycle, phase index, step in phase, global step) to consider next

    def observe_overlap(self, overlap: float | None) -> None:
        self._overlap = overlap

    def _teachers(self, phase: str) -> dict[str, tuple[str, ...]]:
        if phase == RL:
            return {n: () for n in self.names}
        # β = 0 makes a branch's Phase II plain GRPO: no cross samples, no teacher.
        return {n: tuple(teachers_of(n, self.names, self.pairs)) if self.betas[n] != 0 else () for n in self.names}

    def _end_early(self, phase: str, step_in_phase: int) -> bool:
        if not self.adaptive or self._overlap is None or step_in_phase == 0:
            return False
        return self._overlap < self.overlap_floor if phase == RL else self._overlap > self.overlap_ceiling

    def __iter__(self) -> Iterator[StepPlan]:
        """Plans from the cursor on (the start, or where :meth:`load_state_dict` left it)."""
        phases = ((RL, self.s_rl), (OPD, self.s_opd))
        cycle, ph, s, g = self._cursor
        while cycle < self.cycles:
            phase, length = phases[ph]
            if s == 0:
                self._overlap = None  # a phase's early end depends on overlaps measured inside it
            if s < length and not self._end_early(phase, s):
                self._cursor = (cycle, ph, s + 1, g + 1)
                yield StepPlan(cycle, phase, s, g, self._teachers(phase))
                cycle, ph, s, g = self._cursor
                continue
            cycle, ph, s = (cycle, 1, 0) if ph == 0 else (cycle + 1, 0, 0)
            self._cursor = (cycle, ph, s, g)

    def state_dict(self) -> dict:
        """Where the rhythm stands and the last overlap it saw: an adaptive run resumes exactly."""
        return {"cursor": list(self._cursor), "overlap": self._overlap}

    def load_state_dict(self, state: dict) -> None:
        self._cursor = tuple(int(v) for v in state["cursor"])
        self._overlap = state["overlap"]

    def total_steps(self) -> int:
        """Steps per branch without adaptive early ends: N·(S_RL + S_OPD)."""
        return self.cycles * (self.s_rl + self.s_opd)
