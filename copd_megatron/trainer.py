"""The training loop: CoPD (and its baselines) as stages of steps, each step a sequence of phases.

    for stage in stages(cfg):                         # copd; or experts → static OPD / MOPD; mixed
        for plan in stage.rhythm:                     # Phase I / Phase II steps, teachers per branch
            generate → score (+ teachers, barrier) → update → sync    (copd/step.py)
            observe: metrics, behaviour, evaluation, checkpoint
    save → merge the final branches → evaluate base, branches and merge

``schedule.mode: smoke`` is the smallest end-to-end job: one branch trained as a language model
on a synthetic counting corpus (each sequence counts up from a random start, modulo the
vocabulary, so the loss falls from ``ln V`` towards 0 in tens of steps). It exercises everything
below the RL algorithm: config → launcher → parallel groups → model → Megatron schedule →
optimizer → metrics → checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from copd_megatron.checkpoint.manager import CheckpointManager, PreemptionFlag
from copd_megatron.checkpoint.resume import resolve_load_dir
from copd_megatron.config.layout import Layout
from copd_megatron.config.load import check_resume, config_hash, experiment_dict
from copd_megatron.config.precision import token_pad_multiple
from copd_megatron.config.schema import Config
from copd_megatron.data.batch import MicroBatch
from copd_megatron.distributed.device import runtime_device
from copd_megatron.model.build import build_branch, count_parameters
from copd_megatron.training.step import train_step
from copd_megatron.utils.logging import MetricsWriter, log_to_file
from copd_megatron.utils.progress import format_seconds

logger = logging.getLogger(__name__)


def counting_batch(step: int, seed: int, batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    """``[batch, seq_len + 1]`` token ids counting up from random starts (same on every rank)."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    return (start + torch.arange(seq_len + 1)) % vocab


def read_resume_state(cfg: Config, manager: CheckpointManager) -> tuple[str | None, dict | None]:
    """The checkpoint to resume from and its run state: ``checkpoint.load_dir`` (``auto``: the run's
    own newest complete checkpoint, if any), or (None, None) for a fresh start. A checkpoint of
    another experiment config is refused, naming the first key that differs."""
    load_dir = resolve_load_dir(cfg.checkpoint.load_dir, manager.save_dir)
    if load_dir is None:
        return None, None
    state = manager.read_run_state(load_dir)
    check_resume(cfg, state, str(load_dir))
    return str(load_dir), state


def fresh_state(cfg: Config, **extra) -> dict:
    """The run state of a fresh start (the experiment config travels with every checkpoint)."""
    return {"config_hash": config_hash(cfg), "experiment": experiment_dict(cfg), **extra}


def make_manager(cfg: Config) -> CheckpointManager:
    c = cfg.checkpoint
    return CheckpointManager(c.save_dir or f"{cfg.run_dir}/checkpoints", c.keep_last, c.keep_every, c.async_save,
                             fully_parallel_save=c.fully_parallel_save, fully_parallel_load=c.fully_parallel_load)  # fmt: skip


def run_smoke(cfg: Config, layout: Layout) -> list[float]:
    """Train one branch on the counting corpus for ``schedule.train_steps`` steps; return losses."""
    branch = build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, cfg.schedule.train_steps)
    rank0 = torch.distributed.get_rank() == 0
    manager = make_manager(cfg)
    load_dir, state = read_resume_state(cfg, manager)
    state = manager.load(load_dir, {"main": branch}) if state else fresh_state(cfg, step=0)
    preempt = PreemptionFlag()
    writer = MetricsWriter(cfg.run_dir, enabled=rank0, tensorboard=cfg.logging.tensorboard,
                           resume_step=state.get("iteration"))  # fmt: skip
    logger.info("branch built: %d parameters on rank 0 (a 1/(tp*pp) shard)", count_parameters(branch.chunks))
    g = branch.groups
    mbs_per_rank = cfg.rollout.prompts_per_step // (cfg.parallel.micro_batch_size * g.dp_size) or 1
    global_batch = mbs_per_rank * cfg.parallel.micro_batch_size * g.dp_size
    m = token_pad_multiple(cfg.precision, cfg.parallel)  # FP8 / sequence-parallel token multiples
    seq = max(m, min(cfg.model.seq_length, 32) // m * m)
    losses = []
    for step in range(state["step"] + 1, cfg.schedule.train_steps + 1):
        t0 = time.perf_counter()
        tokens = counting_batch(step, cfg.seed, global_batch, seq, cfg.model.vocab_size)
        # This data-parallel rank's slice of the global batch, cut into micro-batches.
        mine = tokens.chunk(g.dp_size)[g.dp_rank]
        mbs = [MicroBatch.from_tokens(m).to(runtime_device()) for m in mine.split(cfg.parallel.micro_batch_size)]
        res = train_step(branch, mbs, step_index=step)
        dt = time.perf_counter() - t0
        losses.append(res.loss)
        metrics = {"loss": res.loss, "grad_norm": res.grad_norm, "lr": res.lr, "tokens_per_s": res.num_tokens / dt}
        writer.write(step, metrics)
        if step % cfg.logging.log_interval == 0 or step == cfg.schedule.train_steps:
            logger.info(
                "step %d/%d | loss %.4f | grad_norm %.3f | lr %.2e | %.0f tokens/s",
                step, cfg.schedule.train_steps, res.loss, res.grad_norm, res.lr, metrics["tokens_per_s"],
            )  # fmt: skip
        state["step"] = step
        every = cfg.checkpoint.save_interval
        stop = preempt.should_stop()
        if stop or (every and step % every == 0) or step == cfg.schedule.train_steps:
            manager.save(step, {"main": branch}, state, cfg.model, cfg.precision.params_dtype)
        manager.poll()
        if stop:
            logger.warning("signal received: saved step %d, exiting cleanly", step)
            break
    manager.wait()
    writer.close()
    return losses


def run_recipe(cfg: Config, layout: Layout) -> dict:
    """CoPD or a baseline, stage by stage and step by step (module docstring); returns the eval table."""
    from copd_megatron.copd.recipes import final_models, stages
    from copd_megatron.copd.runtime import build_run, evaluate_base, rollout_parity
    from copd_megatron.copd.step import StepState, generate_phase, score_phase, sync_phase, update_phase
    from copd_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    plan_stages = stages(cfg)
    total = max(sum(st.rhythm.total_steps() for st in plan_stages), 1)
    run = build_run(cfg, tok, total)
    manager, preempt = make_manager(cfg), PreemptionFlag()
    state = _resume(cfg, manager, run, plan_stages)
    rollout_parity(run)  # logs the engine-vs-trainer log-prob mismatch of every branch (warns above a threshold)
    writer = MetricsWriter(cfg.run_dir, enabled=dist.get_rank() == 0, tensorboard=cfg.logging.tensorboard,
                           resume_step=state.get("iteration"))  # fmt: skip
    if "base_eval" not in state:  # every branch is still the base: evaluate it once, for the table
        state["base_eval"] = evaluate_base(run)
    counter, t_start, done = state["counter"], time.perf_counter(), 0
    remaining = total - counter  # steps this invocation runs (for the ETA)
    for si, stage in enumerate(plan_stages):
        if si < state["stage"]:
            continue
        frac = cfg.schedule.native_fraction if stage.native_fraction is None else stage.native_fraction
        for plan in stage.rhythm:
            if si == state["stage"] and plan.global_step < state["step"]:
                continue  # done before the resume (the adaptive rhythm replays its decisions)
            t0 = time.perf_counter()
            st = StepState(stage, plan)
            measure = _phase_ends(stage, plan) or cfg.schedule.adaptive
            generate_phase(run.env, st, frac)
            score_phase(run.env, st, _pairs(cfg, stage), measure, state["versions"])  # barrier inside
            results = update_phase(run.env, st, counter + 1)
            sync_phase(run.env, st)
            counter, done = counter + 1, done + 1
            for n in stage.trainable:
                state["versions"][n] += 1
            metrics = _observe(cfg, run, si, stage, plan, st, results, time.perf_counter() - t0, measure)
            if cfg.schedule.adaptive:
                stage.rhythm.observe_overlap(_mean_overlap(metrics, stage.rhythm.pairs))
            if _eval_due(cfg, stage, plan, counter):
                from copd_megatron.copd.runtime import evaluate_workers

                metrics.update(_flat_eval(evaluate_workers(run)))
            writer.write(counter, metrics)
            _log_step(stage, plan, metrics, (counter, total), (done, remaining), time.perf_counter() - t_start)
            state.update(stage=si, step=plan.global_step + 1, counter=counter, rhythm=stage.rhythm.state_dict())
            stop = preempt.should_stop()
            if stop or (cfg.checkpoint.save_interval and counter % cfg.checkpoint.save_interval == 0):
                _save(cfg, manager, run, counter, state)
            manager.poll()
            if stop:
                manager.wait()
                logger.warning("signal received: saved step %d, exiting cleanly", counter)
                return {}
        state.update(stage=si + 1, step=0, rhythm=None)
    final_dir = _save(cfg, manager, run, counter, state)
    manager.wait()
    table = _final_table(cfg, run, state["base_eval"], final_models(cfg), final_dir)
    _write_eval(cfg, table, final_models(cfg), dist.get_rank() == 0)
    writer.close()
    return table


def _resume(cfg: Config, manager: CheckpointManager, run, plan_stages: list) -> dict:
    """Load every local branch (model, optimizer, scheduler, RNG) and the run state, or start fresh."""
    load_dir, state = read_resume_state(cfg, manager)
    if state is None:
        names = run.placement.names
        return fresh_state(cfg, stage=0, step=0, counter=0, versions={n: 0 for n in names})
    models = {n: (run.workers[n].model if n in run.workers else None) for n in run.placement.names}
    state = manager.load(load_dir, models)
    for n, w in run.workers.items():
        w.load_state_dict(state["workers"][n])
    if state.get("rhythm") and state["stage"] < len(plan_stages):  # the adaptive rhythm's decisions so far
        plan_stages[state["stage"]].rhythm.load_state_dict(state["rhythm"])
    return state


def _save(cfg: Config, manager: CheckpointManager, run, counter: int, state: dict) -> Path:
    """Every branch (held here or not) and the run state with every worker's streams."""
    mine = {n: w.state_dict() for n, w in run.workers.items()}
    if run.placement.kind == "disjoint":
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        mine = {n: s for p in parts for n, s in p.items()}
    state["workers"] = mine
    models = {n: (run.workers[n].model if n in run.workers else None) for n in run.placement.names}
    owners = run.placement.ranks if run.placement.kind == "disjoint" else None
    for w in run.workers.values():  # offloaded branches come back to be written
        w.activate(optimizer=True)
    manager.save(counter, models, state, cfg.model, cfg.precision.params_dtype, owners=owners)
    if cfg.memory.offload_weights or cfg.memory.offload_optimizer:
        manager.wait()  # a background writer may still read the tensors offloading would release
    for w in run.workers.values():
        w.deactivate()
    return manager.save_dir / f"iter_{counter:07d}"


def _final_table(cfg: Config, run, base_eval: dict, finals: list[str], final_dir: Path) -> dict:
    from copd_megatron.copd.runtime import evaluate_checkpoint, evaluate_workers, merge_final

    shown = [n for n in run.placement.names if n != "student" or cfg.schedule.mode == "mopd"]
    table = {**base_eval, **evaluate_workers(run, shown)}
    if len(finals) > 1 and cfg.merge.method != "none":
        out = f"{cfg.run_dir}/merged"
        merge_final(cfg, [str(final_dir / n) for n in finals], out)
        table["merged"] = evaluate_checkpoint(cfg, run.env.tokenizer, out, run.sources, run.placement)
    return table


def _pairs(cfg: Config, stage) -> list[tuple[str, str]]:
    """Directed (student, teacher) pairs whose behaviour is measured: the stage's teacher pairs, or
    (stages without distillation) the topology over the stage's branches, both directions."""
    from copd_megatron.copd.topology import edges_for

    undirected = stage.rhythm.pairs
    if not undirected:
        names = [n for n in stage.rhythm.names if n in {b.name for b in cfg.branches}]
        topo = cfg.schedule.topology if len(names) == len(cfg.branches) else "full"
        undirected = edges_for(names, topo, cfg.schedule.hub, cfg.schedule.edges) if len(names) > 1 else []
    return [p for a, b in undirected for p in ((a, b), (b, a)) if p[0] in stage.trainable]


def _observe(cfg: Config, run, si: int, stage, plan, st, results: dict, seconds: float, measured: bool) -> dict:
    """The step's metrics, reduced over each branch's data-parallel ranks and shared by every rank."""
    from copd_megatron.copd.step import dp_mean, dp_sum

    out: dict[str, float] = {"stage": float(si), "cycle": float(plan.cycle), "phase_opd": float(plan.phase == "opd"),
                             "time/step": seconds}  # fmt: skip
    for name, res in results.items():
        w = run.workers[name]
        m = dp_mean(st.metrics.get(name, {}), w.groups)
        times = {f"time/{k}": v for k, v in st.times.get(name, {}).items()}
        m.update(loss=res.loss, grad_norm=res.grad_norm, lr=res.lr, **res.metrics, **times,
                 train_tokens_per_s=res.num_tokens / max(times.get("time/update", 0.0), 1e-9))  # fmt: skip
        out.update({f"branch/{name}/{k}": v for k, v in m.items()})
    if measured:
        for s, t in _pairs(cfg, stage):
            if s in run.workers:  # the student reduces over its own data-parallel ranks
                ov, kl, n = dp_sum(st.behaviour.get(f"{s}->{t}", [0.0, 0.0, 0.0]), run.workers[s].groups)
                out[f"pair/{s}->{t}/overlap"], out[f"pair/{s}->{t}/kl"] = ov / max(n, 1.0), kl / max(n, 1.0)
    if run.placement.kind == "disjoint":  # each rank reduced its own branch: share everything
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, out)
        for p in parts:
            out.update(p)
    return out


def _mean_overlap(metrics: dict, pairs) -> float | None:
    """Mean top-k overlap over the connected pairs, both directions (the adaptive rhythm's signal)."""
    vals = [metrics[f"pair/{s}->{t}/overlap"] for a, b in pairs for s, t in ((a, b), (b, a))
            if f"pair/{s}->{t}/overlap" in metrics]  # fmt: skip
    return sum(vals) / len(vals) if vals else None


def _phase_ends(stage, plan) -> bool:
    r = stage.rhythm
    return plan.step_in_phase == (r.s_rl if plan.phase == "rl" else r.s_opd) - 1


def _eval_due(cfg: Config, stage, plan, counter: int) -> bool:
    if cfg.eval.every:
        return counter % cfg.eval.every == 0
    return _phase_ends(stage, plan) and (plan.phase == "opd" or stage.rhythm.s_opd == 0)  # a cycle ends


def _flat_eval(table: dict) -> dict[str, float]:
    return {f"eval/{m}/{d}/{k}": v for m, doms in table.items() for d, vals in doms.items() for k, v in vals.items()
            if k != "n"}  # fmt: skip


def _log_step(stage, plan, metrics: dict, step: tuple[int, int], done: tuple[int, int], elapsed: float) -> None:
    """One line per step: the run's step (continued after a resume) and the ETA of what is left."""
    eta = elapsed / max(done[0], 1) * max(done[1] - done[0], 0)
    parts = []
    for key, v in metrics.items():
        if key.startswith("branch/") and key.endswith(("/native/reward", "/loss")):
            parts.append(f"{key.removeprefix('branch/')} {v:.3f}")
        if key.startswith("pair/") and key.endswith("/overlap"):
            parts.append(f"{key.removeprefix('pair/')} {v:.3f}")
    logger.info("%s c%d %s s%d | step %d/%d | ETA %s | %s", stage.name, plan.cycle, plan.phase, plan.step_in_phase,
                *step, format_seconds(eta), " | ".join(parts))  # fmt: skip


def _write_eval(cfg: Config, table: dict, finals: list[str], rank0: bool) -> None:
    if not rank0:
        return
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    Path(cfg.run_dir, "eval.json").write_text(json.dumps({"mode": cfg.schedule.mode, "final": finals, "table": table},
                                                         indent=1))  # fmt: skip
    domains = sorted({d for doms in table.values() for d in doms})
    lines = ["| model | " + " | ".join(domains) + " | avg |", "|---" * (len(domains) + 2) + "|"]
    for m, doms in table.items():
        vals = [doms[d]["pass@1"] for d in domains]
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in vals) + f" | {sum(vals) / len(vals):.3f} |")
    print("\n".join(lines))
    log_to_file("evaluation (greedy pass@1):\n" + "\n".join(lines))
