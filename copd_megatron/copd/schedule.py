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

    def observe_overlap(self, overlap: float) -> None:
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
        g = 0
        for cycle in range(self.cycles):
            for phase, length in ((RL, self.s_rl), (OPD, self.s_opd)):
                self._overlap = None
                for s in range(length):
                    if self._end_early(phase, s):
                        break
                    yield StepPlan(cycle, phase, s, g, self._teachers(phase))
                    g += 1

    def total_steps(self) -> int:
        """Steps per branch without adaptive early ends: N·(S_RL + S_OPD)."""
        return self.cycles * (self.s_rl + self.s_opd)
