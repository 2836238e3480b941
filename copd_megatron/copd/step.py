"""One CoPD step as phases: generate → score → (barrier) → update → sync. Observing is the loop's.

At a step every trainable branch makes exactly one update (paper Algorithm 1, synchronous):

* generate  each student samples its native prompts (Phase I: all of them; Phase II: a
            ``native_fraction`` of them) and, in Phase II, cross prompts from each teacher's data;
* score     each student recomputes the old log-probs of its rollouts; every teacher answers the
            score requests on its students' cross rollouts (and, when behaviour is measured, on
            their native rollouts) with its current weights. ``Router.answer`` returns only when
            every answer exists — the barrier: no branch has updated yet, so every teacher score at
            step s comes from weights after s−1, which the stamped weight versions assert;
* update    one optimizer step per trainable branch on its mixed batch;
* sync      the new weights go to each branch's rollout engine.

Colocated branches run each phase in turn on the same ranks; disjoint branches run them at the
same time on their own ranks and meet only inside the score phase's exchange.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from copd_megatron.config.schema import Config
from copd_megatron.copd.rlvr import Rollouts, cross_batch, native_batch, roll, rollout_metrics
from copd_megatron.copd.router import Router, ScoreRequest
from copd_megatron.copd.sources import Source, sampling, split_evenly
from copd_megatron.data.batch import Batch
from copd_megatron.distributed.device import all_reduce_values
from copd_megatron.losses import ids_overlap

FULL_VOCAB = ("reverse_kl", "forward_kl", "jsd")


@dataclass
class StepEnv:
    """What the phases share for the whole run."""

    cfg: Config
    tokenizer: object
    workers: dict  # the branches this rank holds: name → BranchWorker
    router: Router
    sources: dict[str, Source]  # data branch name → its source
    betas: dict[str, float]  # β of each branch (opd.beta where the branch sets none)


@dataclass
class StepState:
    """One step in flight on this rank: rollouts, batches, timings and metrics per local branch."""

    stage: object
    plan: object
    rollouts: dict[str, list[Rollouts]] = field(default_factory=dict)
    empty: dict[str, list] = field(default_factory=dict)  # branch → purposes (teacher, None = native) with no prompts on this rank
    batches: dict[str, Batch] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)  # branch → rank-local (sum, count) pairs
    behaviour: dict[str, list] = field(default_factory=dict)  # "s->t" → [overlap·n, kl·n, n] on this rank
    times: dict[str, dict] = field(default_factory=dict)

    def timed(self, name: str, phase: str, seconds: float) -> None:
        self.times.setdefault(name, {})[phase] = self.times.get(name, {}).get(phase, 0.0) + seconds


def _mine(items: list, groups) -> tuple[list, list[int]]:
    """This data-parallel rank's share of a global prompt list, with the prompts' global indices."""
    idx = list(range(groups.dp_rank, len(items), groups.dp_size))
    return [items[i] for i in idx], idx


def _native_prompts(worker, n: int) -> list:
    """``n`` prompts from the branch's native streams (mixed RLVR: round-robin over every domain)."""
    native = [s for k, s in worker.streams.items() if k.startswith("native/")]
    return [p for stream, c in zip(native, split_evenly(n, len(native))) for p in stream.take(c)]


def _verifier(sources: dict[str, Source]):
    by_domain = {s.domain: s.verifier for s in sources.values()}
    return lambda completion, sample: by_domain[sample.domain](completion, sample)


def generate_phase(env: StepEnv, st: StepState, native_fraction: float) -> None:
    """Rollouts of every local trainable branch: native prompts, then cross prompts per teacher."""
    cfg, G, P = env.cfg, env.cfg.rollout.group_size, env.cfg.rollout.prompts_per_step
    params, verify = sampling(cfg, env.tokenizer), _verifier(env.sources)
    for name in st.stage.trainable:
        if name not in env.workers:
            continue
        w, teachers = env.workers[name], st.plan.teachers[name]
        t0 = time.perf_counter()
        w.activate()
        # Counts depend on the config only (never on the layout); a data-parallel rank whose share
        # of a purpose is empty skips it and reports zero counts for it.
        n_native = P if not teachers else round(native_fraction * P)
        out, empty = [], []
        seed = (cfg.seed, st.stage.name, name, st.plan.global_step)
        purposes = [(None, n_native)] + list(zip(teachers, split_evenly(P - n_native, len(teachers)) if teachers else []))
        for j, n in purposes:
            if n == 0:
                continue
            pool = _native_prompts(w, n) if j is None else w.streams[f"cross/{j}"].take(n)
            prompts, idx = _mine(pool, w.groups)
            if not prompts:
                empty.append(j)
            elif j is None:
                out.append(roll(w, env.tokenizer, prompts, idx, G, params, verify, None, *seed, "native"))
            else:
                out.append(roll(w, env.tokenizer, prompts, idx, G, params, env.sources[j].verifier, j, *seed, "cross", j))
        st.empty[name] = empty
        w.deactivate()
        st.rollouts[name] = out
        st.timed(name, "generate", time.perf_counter() - t0)


def _behaviour_rows(rolls: list[Rollouts], teacher: str, prompts: int) -> Batch | None:
    """The student's own rollouts used to compare it with ``teacher``: its native rows (else its
    cross rows on the teacher's prompts) of the step's first ``prompts`` prompts (chosen by global
    prompt index, so every data-parallel layout measures the same rows)."""
    pick = next((r for r in rolls if r.teacher is None), None) or next((r for r in rolls if r.teacher == teacher), None)
    if pick is None:
        return None
    rows = [i for i, p in enumerate(pick.indices) if p < prompts]
    return pick.as_batch().select(rows) if rows else None


def score_phase(env: StepEnv, st: StepState, pairs: list[tuple[str, str]], measure: bool,
                expected_versions: dict[str, int]) -> None:  # fmt: skip
    """Old log-probs of every local student; teachers' answers (the barrier); the update batches."""
    cfg, opd = env.cfg, env.cfg.opd
    requests, own, wanted = [], {}, []
    for name, rolls in st.rollouts.items():
        w = env.workers[name]
        t0 = time.perf_counter()
        w.activate()
        own[name] = [w.score(r.as_batch())["logprobs"] for r in rolls]
        for r in rolls:
            if r.teacher is not None:
                wanted.append(("cross", name, r.teacher))
                requests.append(ScoreRequest(name, r.teacher, r.as_batch(), topk=opd.topk if opd.loss == "topk_kl" else 0,
                                             full_logits=opd.loss in FULL_VOCAB))  # fmt: skip
        if measure:
            for s, t in pairs:
                rows = _behaviour_rows(rolls, t, cfg.eval.overlap_prompts) if s == name else None
                if rows is not None:
                    mine = w.score(rows, topk=cfg.schedule.overlap_k)
                    wanted.append(("pair", name, t, rows, mine))
                    requests.append(ScoreRequest(name, t, rows, topk=cfg.schedule.overlap_k))
        w.deactivate()
        st.timed(name, "score", time.perf_counter() - t0)
    t0 = time.perf_counter()
    answers = env.router.answer(requests)  # every teacher answers before anyone updates
    for name in st.rollouts:
        st.timed(name, "teach", time.perf_counter() - t0)
    for want, ans in zip(wanted, answers):
        if ans["weight_version"] != expected_versions[want[2]]:
            raise RuntimeError(f"live-teacher invariant broken: {want[2]} answered {want[1]} with weights of "
                               f"version {ans['weight_version']}, expected {expected_versions[want[2]]}")  # fmt: skip
    _build_batches(env, st, own, wanted, answers)


def _build_batches(env: StepEnv, st: StepState, own: dict, wanted: list, answers: list) -> None:
    cfg = env.cfg
    cross_answers = iter([a for w, a in zip(wanted, answers) if w[0] == "cross"])
    for name, rolls in st.rollouts.items():
        parts, m = [], st.metrics.setdefault(name, {})
        for j in st.empty.get(name, []):  # this rank had no prompts of the purpose: zero counts, same keys
            if j is None:
                m.update(rollout_metrics(None, "native"), degenerate_frac=(0.0, 0.0), rows=(0.0, 1.0))
            else:
                m.update({f"cross/{j}/opd_logratio": (0.0, 0.0), f"cross/{j}/rows": (0.0, 1.0),
                          f"cross/{j}/teacher_version": (0.0, 0.0)}, **rollout_metrics(None, f"cross/{j}"))  # fmt: skip
        for r, old in zip(rolls, own[name]):
            if r.teacher is None:
                batch, stats = native_batch(r, old, cfg.rollout.group_size, cfg.loss.advantage)
                m.update(rollout_metrics(r, "native"), **stats)
            else:
                batch, stats = cross_batch(r, old, next(cross_answers), env.betas[name], cfg.opd.loss)
                m.update({f"cross/{r.teacher}/{k}": v for k, v in stats.items()}, **rollout_metrics(r, f"cross/{r.teacher}"))
            parts.append(batch)
        st.batches[name] = Batch.concat(parts, env.tokenizer.pad_id)
    for w, ans in zip(wanted, answers):
        if w[0] != "pair":
            continue
        _, s, t, rows, mine = w
        mask = rows["loss_mask"]
        ov = ids_overlap(mine["topk_ids"], ans["topk_ids"].to(mask.device))
        kl = mine["logprobs"] - ans["logprobs"].to(mask.device)  # sampled-token estimate of KL(s ‖ t)
        st.behaviour[f"{s}->{t}"] = [float((ov * mask).sum()), float((kl * mask).sum()), float(mask.sum())]


def update_phase(env: StepEnv, st: StepState, step_index: int) -> dict:
    """One optimizer step per local trainable branch; returns name → StepResult."""
    results = {}
    for name, batch in st.batches.items():
        w = env.workers[name]
        t0 = time.perf_counter()
        w.activate(optimizer=True)
        results[name] = w.update(batch, step_index)
        w.deactivate()
        st.timed(name, "update", time.perf_counter() - t0)
    return results


def sync_phase(env: StepEnv, st: StepState) -> None:
    """Hand every updated branch's weights to its rollout engine."""
    for name in st.batches:
        t0 = time.perf_counter()
        w = env.workers[name]
        w.activate()  # an engine of its own reads the weights from the trainer's shards
        w.sync_weights()
        w.deactivate()
        st.timed(name, "sync", time.perf_counter() - t0)


def dp_mean(pairs: dict[str, tuple[float, float]], groups) -> dict[str, float]:
    """Σsum / Σcount of rank-local (sum, count) pairs over the branch's data-parallel group (the same
    keys on every rank): the global batch's mean whatever each rank's share (0 where nothing was counted)."""
    if not pairs:
        return {}
    keys = sorted(pairs)
    flat = [x for k in keys for x in pairs[k]]
    if groups is not None and groups.dp_size > 1:
        flat = all_reduce_values(flat, groups.dp)  # one collective through the runtime device
    return {k: (s / c if c else 0.0) for k, s, c in zip(keys, flat[0::2], flat[1::2])}


def dp_sum(values: list[float], groups) -> list[float]:
    if groups is None or groups.dp_size == 1:
        return values
    return all_reduce_values(values, groups.dp)
