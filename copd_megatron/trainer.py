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

from copd_megatron.config.schema import Config
from copd_megatron.config.layout import Layout
from copd_megatron.model.build import build_branch, count_parameters
from copd_megatron.training.step import MicroBatch, train_step
from copd_megatron.utils.logging import MetricsWriter

logger = logging.getLogger(__name__)


def counting_batch(step: int, seed: int, batch: int, seq_len: int, vocab: int) -> torch.Tensor:
    """``[batch, seq_len + 1]`` token ids counting up from random starts (same on every rank)."""
    g = torch.Generator().manual_seed(seed * 100003 + step)
    start = torch.randint(0, vocab, (batch, 1), generator=g)
    return (start + torch.arange(seq_len + 1)) % vocab


def run_smoke(cfg: Config, layout: Layout) -> list[float]:
    """Train one branch on the counting corpus for ``schedule.train_steps`` steps; return losses."""
    from megatron.core import parallel_state as ps

    branch = build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, cfg.schedule.train_steps)
    rank0 = torch.distributed.get_rank() == 0
    writer = MetricsWriter(cfg.run_dir, enabled=rank0, tensorboard=cfg.logging.tensorboard)
    logger.info("branch built: %d parameters on rank 0 (a 1/(tp*pp) shard)", count_parameters(branch.chunks))
    mbs_per_rank = cfg.rollout.prompts_per_step // (cfg.parallel.micro_batch_size * layout.dp) or 1
    global_batch = mbs_per_rank * cfg.parallel.micro_batch_size * layout.dp
    seq = min(cfg.model.seq_length, 32)
    losses = []
    for step in range(1, cfg.schedule.train_steps + 1):
        t0 = time.perf_counter()
        tokens = counting_batch(step, cfg.seed, global_batch, seq, cfg.model.vocab_size)
        # This data-parallel rank's slice of the global batch, cut into micro-batches.
        mine = tokens.chunk(layout.dp)[ps.get_data_parallel_rank()]
        mbs = [MicroBatch.from_tokens(m) for m in mine.split(cfg.parallel.micro_batch_size)]
        res = train_step(branch, mbs)
        dt = time.perf_counter() - t0
        losses.append(res.loss)
        metrics = {"loss": res.loss, "grad_norm": res.grad_norm, "lr": res.lr, "tokens_per_s": res.num_tokens / dt}
        writer.write(step, metrics)
        if step % cfg.logging.log_interval == 0 or step == cfg.schedule.train_steps:
            logger.info(
                "step %d/%d | loss %.4f | grad_norm %.3f | lr %.2e | %.0f tokens/s",
                step, cfg.schedule.train_steps, res.loss, res.grad_norm, res.lr, metrics["tokens_per_s"],
            )  # fmt: skip
    writer.close()
    return losses
