"""CoPD and its baselines as stages of one trainer, with the same step accounting.

Budget: a CoPD branch makes T = N·(S_RL + S_OPD) updates (each on ``prompts_per_step``
prompts × G samples). Then (paper §5 and its step-budget statement):

* ``copd``        every branch: N cycles of S_RL GRPO steps + S_OPD mixed OPD steps.
* ``expert``      every branch: T GRPO steps on its own data, no distillation.
* ``mixed``       one model ("mixed"): K·T GRPO steps on the pooled data of all branches
                  (= the sum of the experts' steps, "same data throughput").
* ``static_opd``  experts for N·S_RL steps, then the student expert makes N·S_OPD mixed steps
                  with the *frozen* teacher expert (one-way); the student is the final model.
* ``mopd``        experts for T steps, then a student from the base makes T steps of pure
                  distillation (native_fraction 0) from the frozen experts, routed by prompt domain.

A stage is a rhythm (which branch learns from whom, step by step) plus the branches that update.
"""

from __future__ import annotations

from dataclasses import dataclass

from copd_megatron.config.schema import Config
from copd_megatron.copd.schedule import Rhythm
from copd_megatron.copd.topology import edges_for


@dataclass
class Stage:
    name: str
    rhythm: Rhythm
    trainable: list[str]
    native_fraction: float | None = None  # override of schedule.native_fraction


def branch_names(cfg: Config) -> list[str]:
    """Model branches of the run (mixed RLVR trains one pooled model; MOPD adds a student)."""
    names = [b.name for b in cfg.branches]
    if cfg.schedule.mode == "mixed":
        return ["mixed"]
    if cfg.schedule.mode == "mopd":
        return names + ["student"]
    return names


def final_models(cfg: Config) -> list[str]:
    """Branches whose weights form the run's result (merged when more than one)."""
    mode = cfg.schedule.mode
    if mode == "copd":
        return [b.name for b in cfg.branches]
    if mode == "static_opd":
        return [cfg.schedule.static_student]
    if mode == "mopd":
        return ["student"]
    if mode == "mixed":
        return ["mixed"]
    return []  # experts are reported one by one


def stages(cfg: Config) -> list[Stage]:
    s, names = cfg.schedule, [b.name for b in cfg.branches]
    betas = {b.name: cfg.opd.beta if b.beta is None else b.beta for b in cfg.branches}
    total = s.cycles * (s.s_rl + s.s_opd)
    solo = lambda steps, who: Rhythm(who, [], {n: 0.0 for n in who}, 1, steps, 0)  # noqa: E731
    if s.mode == "copd":
        pairs = edges_for(names, s.topology, s.hub, s.edges)
        rhythm = Rhythm(names, pairs, betas, s.cycles, s.s_rl, s.s_opd, s.adaptive, s.overlap_floor, s.overlap_ceiling)
        return [Stage("copd", rhythm, names)]
    if s.mode == "expert":
        return [Stage("expert", solo(total, names), names)]
    if s.mode == "mixed":
        return [Stage("mixed", solo(len(names) * total, ["mixed"]), ["mixed"])]
    if s.mode == "static_opd":
        teacher, student = s.static_teacher, s.static_student
        opd = Rhythm([student, teacher], [(student, teacher)], {student: betas[student], teacher: 0.0}, 1, 0,
                     s.cycles * s.s_opd)  # fmt: skip
        return [Stage("experts", solo(s.cycles * s.s_rl, names), names), Stage("static_opd", opd, [student])]
    if s.mode == "mopd":
        pairs = [("student", n) for n in names]
        opd = Rhythm(["student", *names], pairs, {"student": cfg.opd.beta, **{n: 0.0 for n in names}}, 1, 0, total)
        return [Stage("experts", solo(total, names), names), Stage("mopd", opd, ["student"], native_fraction=0.0)]
    raise ValueError(f"unknown schedule.mode {s.mode!r}")
