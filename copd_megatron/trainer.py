"""Run recipes. For now: ``schedule.mode: smoke``, the smallest end-to-end job.

``smoke`` builds one branch (a Megatron GPTModel at the configured TP/PP/DP layout) and
trains it as a language model on a synthetic, learnable corpus: each sequence counts up
from a random start, ``a, a+1, a+2, ...`` modulo the vocabulary, so the loss falls from
``ln V`` towards 0 in tens of steps. It exercises everything below the RL algorithm:
config → launcher → parallel groups → model → Megatron schedule → optimizer → metrics.
The CoPD recipes (GRPO branches, mutual OPD, baselines) plug in here as further modes.
"""

from __future__ import annotations

import logging
import time

import torch

from copd_megatron.checkpoint.manager import CheckpointManager, PreemptionFlag
from copd_megatron.config.layout import Layout
from copd_megatron.config.load import check_resume, config_hash, experiment_dict
from copd_megatron.config.schema import Config
from copd_megatron.model.build import build_branch, count_parameters
from copd_megatron.training.step import MicroBatch, train_step
from copd_megatron.utils.logging import MetricsWriter, log_to_file
from copd_megatron.utils.progress import format_seconds

logger = logging.getLogger(__name__)


def counting_batch(step: int, seed: int, batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    """``[batch, seq_len + 1]`` token ids counting up from random starts (same on every rank)."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    return (start + torch.arange(seq_len + 1)) % vocab


def resume_or_start(cfg: Config, manager: CheckpointManager, branches: dict) -> dict:
    """Load the run state (and every branch) from ``checkpoint.load_dir``, or start fresh."""
    if cfg.checkpoint.load_dir is None:  # the experiment config travels with every checkpoint
        return {"step": 0, "config_hash": config_hash(cfg), "experiment": experiment_dict(cfg)}
    check_resume(cfg, manager.read_run_state(cfg.checkpoint.load_dir), str(cfg.checkpoint.load_dir))
    return manager.load(cfg.checkpoint.load_dir, branches)


def make_manager(cfg: Config) -> CheckpointManager:
    c = cfg.checkpoint
    return CheckpointManager(c.save_dir or f"{cfg.run_dir}/checkpoints", c.keep_last, c.keep_every, c.async_save,
                             fully_parallel_save=c.fully_parallel_save, fully_parallel_load=c.fully_parallel_load)  # fmt: skip


def run_smoke(cfg: Config, layout: Layout) -> list[float]:
    """Train one branch on the counting corpus for ``schedule.train_steps`` steps; return losses."""
    from megatron.core import parallel_state as ps

    branch = build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, cfg.schedule.train_steps)
    rank0 = torch.distributed.get_rank() == 0
    manager = make_manager(cfg)
    state = resume_or_start(cfg, manager, {"main": branch})
    preempt = PreemptionFlag()
    writer = MetricsWriter(cfg.run_dir, enabled=rank0, tensorboard=cfg.logging.tensorboard,
                           resume_step=state.get("iteration"))  # fmt: skip
    logger.info("branch built: %d parameters on rank 0 (a 1/(tp*pp) shard)", count_parameters(branch.chunks))
    mbs_per_rank = cfg.rollout.prompts_per_step // (cfg.parallel.micro_batch_size * layout.dp) or 1
    global_batch = mbs_per_rank * cfg.parallel.micro_batch_size * layout.dp
    seq = min(cfg.model.seq_length, 32)
    losses = []
    for step in range(state["step"] + 1, cfg.schedule.train_steps + 1):
        t0 = time.perf_counter()
        tokens = counting_batch(step, cfg.seed, global_batch, seq, cfg.model.vocab_size)
        # This data-parallel rank's slice of the global batch, cut into micro-batches.
        mine = tokens.chunk(layout.dp)[ps.get_data_parallel_rank()]
        mbs = [MicroBatch.from_tokens(m) for m in mine.split(cfg.parallel.micro_batch_size)]
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
    """CoPD (or a baseline): rollouts → rewards → advantages → peer log-probs → update, per
    branch and step; behaviour metrics and evaluation per phase; merge and evaluate at the end."""
    from megatron.core import parallel_state as ps

    from copd_megatron.copd import branches as B
    from copd_megatron.copd.build import build_branches, eval_table, merge_branches
    from copd_megatron.copd.recipes import final_models, stages
    from copd_megatron.data.tokenizer import load_tokenizer
    from copd_megatron.training.policy import policy_update

    tok = load_tokenizer(cfg.tokenizer)
    plan_stages = stages(cfg)
    total = max(sum(st.rhythm.total_steps() for st in plan_stages), 1)
    branches, sources = build_branches(cfg, tok, total)
    B.init_cross_streams(cfg, branches)
    manager, preempt = make_manager(cfg), PreemptionFlag()
    models = {n: b.model for n, b in branches.items()}
    state = resume_or_start(cfg, manager, models)
    if "data" in state:
        B.load_data_state(branches, state["data"])
    state.setdefault("stage", 0)
    rank0 = torch.distributed.get_rank() == 0
    writer = MetricsWriter(cfg.run_dir, enabled=rank0, tensorboard=cfg.logging.tensorboard,
                           resume_step=state.get("iteration"))  # fmt: skip
    dp, dp_rank = layout.dp, ps.get_data_parallel_rank()
    # The base, evaluated before any update (every branch starts from it), for the result table.
    base_eval = state.get("base_eval") or eval_table(cfg, tok, {"base": next(iter(branches.values())).engine}, sources)
    state["base_eval"] = base_eval
    done, t_start, counter = 0, time.perf_counter(), state.get("counter", 0)
    remaining = total - counter
    for si, stage in enumerate(plan_stages):
        if si < state["stage"]:
            continue
        native_fraction = cfg.schedule.native_fraction if stage.native_fraction is None else stage.native_fraction
        plans = list(stage.rhythm) if not cfg.schedule.adaptive else stage.rhythm
        for plan in plans:
            if si == state["stage"] and plan.global_step < state.get("step", 0):
                continue  # already done before the resume
            t0 = time.perf_counter()
            # Every branch reads its peers' weights BEFORE any branch updates: live teachers,
            # never from the future (paper §4, synchronous co-evolution).
            batches = {n: B.collect(cfg, tok, branches, n, plan.teachers[n], plan.global_step, dp_rank, dp,
                                    native_fraction) for n in stage.trainable}  # fmt: skip
            metrics = {"stage": si, "cycle": plan.cycle, "phase_opd": float(plan.phase == "opd")}
            for n, col in batches.items():
                if cfg.optimizer.offload_inactive:  # only the updating branch's optimizer state on device
                    branches[n].model.optimizer.restore_from_cpu()
                t_train = time.perf_counter()
                res = policy_update(branches[n].model, col.batch, cfg.loss, micro_batch_size=cfg.parallel.micro_batch_size,
                                    temperature=cfg.rollout.temperature, vocab_size=cfg.model.vocab_size,
                                    max_len=cfg.rollout.max_new_tokens, step_index=counter + 1,
                                    opd=(cfg.schedule.opd_loss, cfg.schedule.jsd_beta, cfg.schedule.opd_topk))  # fmt: skip
                if cfg.optimizer.offload_inactive:
                    branches[n].model.optimizer.offload_to_cpu()
                t_train = time.perf_counter() - t_train
                m = {**B.reduce_over_dp(col.metrics), "loss": res.loss, "grad_norm": res.grad_norm, "lr": res.lr,
                     **res.metrics, "time/train": t_train, "train_tokens_per_s": res.num_tokens / max(t_train, 1e-9),
                     "time/step": time.perf_counter() - t0}  # fmt: skip
                metrics.update({f"branch/{n}/{k}": v for k, v in m.items()})
            counter += 1
            done += 1
            if _phase_ends(stage, plan) or cfg.schedule.adaptive:
                behaviour = _behaviour(cfg, branches, stage, plan, dp_rank, dp, tok)
                metrics.update(behaviour)
                if cfg.schedule.adaptive and behaviour:
                    stage.rhythm.observe_overlap(min(v for k, v in behaviour.items() if k.endswith("/overlap")))
            cycle_ends = _phase_ends(stage, plan) and (plan.phase == "opd" or stage.rhythm.s_opd == 0)
            if (cfg.eval.every and counter % cfg.eval.every == 0) or (not cfg.eval.every and cycle_ends):
                # Every branch on every domain's held-out prompts, not only its own.
                metrics.update(_flat_eval(eval_table(cfg, tok, {n: b.engine for n, b in branches.items()}, sources)))
            writer.write(counter, metrics)
            _log_step(stage, plan, metrics, (counter, total), (done, remaining), time.perf_counter() - t_start)
            state.update(stage=si, step=plan.global_step + 1, counter=counter, data=B.data_state(branches))
            stop = preempt.should_stop()
            if stop or (cfg.checkpoint.save_interval and counter % cfg.checkpoint.save_interval == 0):
                manager.save(counter, models, state, cfg.model, cfg.precision.params_dtype)
            manager.poll()
            if stop:
                manager.wait()
                logger.warning("signal received: saved step %d, exiting cleanly", counter)
                return {}
        state.update(stage=si + 1, step=0)
    manager.save(counter, models, state, cfg.model, cfg.precision.params_dtype)
    manager.wait()
    engines = {n: b.engine for n, b in branches.items() if n != "student" or cfg.schedule.mode == "mopd"}
    finals = final_models(cfg)
    if len(finals) > 1 and cfg.schedule.merge != "none":
        engines["merged"] = merge_branches(cfg, branches, finals, f"{cfg.run_dir}/merged")
    table = {**base_eval, **eval_table(cfg, tok, engines, sources)}
    _write_eval(cfg, table, finals, rank0)
    writer.close()
    return table


def _phase_ends(stage, plan) -> bool:
    r = stage.rhythm
    return plan.step_in_phase == (r.s_rl if plan.phase == "rl" else r.s_opd) - 1


def _behaviour(cfg: Config, branches: dict, stage, plan, dp_rank: int, dp: int, tok) -> dict[str, float]:
    """Top-k overlap and symmetric KL of every pair of data branches, each on the student's own
    rollouts of held-out prompts of its domain (paper Fig. 5)."""
    from copd_megatron.copd.branches import sampling
    from copd_megatron.copd.metrics import pair_behaviour
    from copd_megatron.copd.rlvr import derived_seed, rollout
    from copd_megatron.copd.topology import edges_for

    out: dict[str, float] = {}
    names = [b.name for b in cfg.branches if b.name in branches]
    for a, b in edges_for(names, "full"):
        for s, t in ((a, b), (b, a)):
            src = branches[s].native[0][0]
            prompts = src.held_out[: cfg.eval.overlap_prompts][dp_rank::dp]
            params = sampling(cfg, tok, derived_seed(cfg.seed, "overlap", s, plan.global_step, dp_rank))
            scored = rollout(branches[s].engine, tok, prompts, 1, params, src.verifier)
            m = pair_behaviour(branches[s].model.chunks, branches[t].model.chunks, scored.rollouts.tokens,
                               scored.rollouts.response_mask[:, 1:], k=cfg.schedule.overlap_k,
                               vocab_size=cfg.model.vocab_size, micro_batch_size=cfg.parallel.micro_batch_size)  # fmt: skip
            out.update({f"pair/{s}->{t}/{k}": v for k, v in m.items()})
    return out


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
    import json
    from pathlib import Path

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
