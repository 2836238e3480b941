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
from copd_megatron.config.load import config_hash
from copd_megatron.config.schema import Config, ConfigError
from copd_megatron.model.build import build_branch, count_parameters
from copd_megatron.training.step import MicroBatch, train_step
from copd_megatron.utils.logging import MetricsWriter

logger = logging.getLogger(__name__)


def counting_batch(step: int, seed: int, batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    """``[batch, seq_len + 1]`` token ids counting up from random starts (same on every rank)."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    return (start + torch.arange(seq_len + 1)) % vocab


def resume_or_start(cfg: Config, manager: CheckpointManager, branches: dict) -> dict:
    """Load the run state (and every branch) from ``checkpoint.load_dir``, or start fresh."""
    if cfg.checkpoint.load_dir is None:
        return {"step": 0, "config_hash": config_hash(cfg)}
    state = manager.read_run_state(cfg.checkpoint.load_dir)
    if state.get("config_hash") != config_hash(cfg):
        raise ConfigError(
            f"checkpoint.load_dir: {cfg.checkpoint.load_dir} was written by a different experiment config "
            f"(hash {state.get('config_hash')} != {config_hash(cfg)}); only parallel/checkpoint/logging and "
            "schedule.train_steps may change on resume"
        )
    return manager.load(cfg.checkpoint.load_dir, branches)


def make_manager(cfg: Config) -> CheckpointManager:
    c = cfg.checkpoint
    return CheckpointManager(c.save_dir or f"{cfg.run_dir}/checkpoints", c.keep_last, c.keep_every, c.async_save)


def run_smoke(cfg: Config, layout: Layout) -> list[float]:
    """Train one branch on the counting corpus for ``schedule.train_steps`` steps; return losses."""
    from megatron.core import parallel_state as ps

    branch = build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, cfg.schedule.train_steps)
    rank0 = torch.distributed.get_rank() == 0
    manager = make_manager(cfg)
    state = resume_or_start(cfg, manager, {"main": branch})
    preempt = PreemptionFlag()
    writer = MetricsWriter(cfg.run_dir, enabled=rank0, tensorboard=cfg.logging.tensorboard)
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
