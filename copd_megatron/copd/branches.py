"""K colocated branches: models, data sources, and what one branch does in one step.

Colocated placement (DESIGN §2): every rank holds its shard of every branch in the same
TP/PP layout, branches update in turn, and a teacher's logits live on the student's ranks.
All branches start from the same base checkpoint (``checkpoint.base``).

A step of branch k with teachers J (from the rhythm):
  * J empty (Phase I, or β_k = 0): P prompts from k's own data → GRPO batch;
  * otherwise (Phase II): ``native_fraction``·P native prompts → GRPO, the rest split over the
    teachers j ∈ J, prompts from D_j, rollouts from π_k, advantage β_k·(log π_j − log π_k),
    all in ONE update.
Every rank draws the same global prompt list and keeps its data-parallel share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from copd_megatron.config.schema import Config
from copd_megatron.copd.rlvr import (
    Scored,
    concat,
    cross_batch,
    derived_seed,
    native_batch,
    rollout,
)
from copd_megatron.data.prompts import PromptSample, PromptStream, load_prompts
from copd_megatron.model.build import BranchModel
from copd_megatron.rewards import synthetic
from copd_megatron.rewards.registry import get_verifier
from copd_megatron.rollout.megatron_engine import MegatronEngine
from copd_megatron.rollout.types import SamplingParams
from copd_megatron.training.policy import PolicyBatch


@dataclass
class Source:
    """Prompts of one domain and the verifier that scores them."""

    domain: str
    train: list[PromptSample]
    held_out: list[PromptSample]
    verifier: object


@dataclass
class Branch:
    name: str
    model: BranchModel
    engine: MegatronEngine
    beta: float
    native: list[tuple[Source, PromptStream]]  # one source, or every domain for mixed RLVR
    cross: dict[str, PromptStream] = field(default_factory=dict)  # teacher name -> stream over its data
    trainable: bool = True


def make_source(cfg: Config, index: int, tokenizer) -> Source:
    b = cfg.branches[index]
    if b.data.startswith("synthetic:"):
        family = b.data.split(":", 1)[1]
        train = synthetic.generate(family, 20000, b.difficulty, seed=cfg.seed)
        held = synthetic.generate(family, cfg.eval.prompts_per_domain, b.difficulty, seed=cfg.eval.seed)
        domain = family
    else:
        train, _ = load_prompts(b.data, domain=b.name)
        domain = train[0].domain
        held = load_prompts(b.eval_data, domain=b.name)[0] if b.eval_data else train[-cfg.eval.prompts_per_domain :]
        if not b.eval_data:
            train = train[: -cfg.eval.prompts_per_domain] or train
    return Source(domain, train, held[: cfg.eval.prompts_per_domain], get_verifier(b.verifier))


def sampling(cfg: Config, tokenizer, seed: int) -> SamplingParams:
    r = cfg.rollout
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          stop_token_ids=(tokenizer.eos_id,), stop_strings=tuple(r.stop), seed=seed)  # fmt: skip


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _mine(items: list, dp_rank: int, dp: int) -> list:
    return items[dp_rank::dp]


@dataclass
class Collected:
    """One branch's update batch for this step and what it cost."""

    batch: PolicyBatch
    metrics: dict[str, float]


def collect(cfg: Config, tokenizer, branches: dict[str, Branch], name: str, teachers: tuple[str, ...], step: int,
            dp_rank: int, dp: int, native_fraction: float | None = None) -> Collected:  # fmt: skip
    """Rollouts, rewards, old and teacher log-probs for ``name``'s update at ``step`` (no update)."""
    br = branches[name]
    G, P = cfg.rollout.group_size, cfg.rollout.prompts_per_step
    frac = cfg.schedule.native_fraction if native_fraction is None else native_fraction
    n_native = P if not teachers else round(frac * P)
    kw = dict(micro_batch_size=cfg.parallel.micro_batch_size, temperature=cfg.rollout.temperature,
              vocab_size=cfg.model.vocab_size)  # fmt: skip
    t0 = time.perf_counter()
    parts, metrics, scored_native = [], {}, None
    if n_native:
        samples = _pooled(br.native, n_native)
        params = sampling(cfg, tokenizer, derived_seed(cfg.seed, name, step, "native", dp_rank))
        scored_native = rollout(br.engine, tokenizer, _mine(samples, dp_rank, dp), G, params, _verifier_of(br, samples))
    t_roll = time.perf_counter() - t0
    if scored_native is not None:
        batch, stats = native_batch(br.model.chunks, scored_native, G, cfg.loss, **kw)
        parts.append(batch)
        metrics.update(_rollout_metrics(scored_native, "native"), **stats)
    for j, n in zip(teachers, _split(P - n_native, len(teachers)) if teachers else []):
        t1 = time.perf_counter()
        stream = br.cross[j]
        samples = stream.take(n)
        params = sampling(cfg, tokenizer, derived_seed(cfg.seed, name, step, "cross", j, dp_rank))
        scored = rollout(br.engine, tokenizer, _mine(samples, dp_rank, dp), G, params,
                         branches[j].native[0][0].verifier)  # fmt: skip
        t_roll += time.perf_counter() - t1
        batch, stats = cross_batch(br.model.chunks, branches[j].model.chunks, scored, br.beta, cfg.loss,
                                   opd_loss=cfg.schedule.opd_loss, **kw)  # fmt: skip
        parts.append(batch)
        metrics.update({f"cross/{j}/{k}": v for k, v in {**stats, **_rollout_metrics(scored, "reward")}.items()})
    metrics["time/rollout"] = t_roll
    metrics["time/logprob"] = time.perf_counter() - t0 - t_roll
    return Collected(concat(parts, tokenizer.pad_id), metrics)


def _pooled(native: list[tuple[Source, PromptStream]], n: int) -> list[PromptSample]:
    """Prompts from one source, or round-robin over every domain (mixed RLVR's pooled data)."""
    counts = _split(n, len(native))
    return [s for (_, stream), c in zip(native, counts) for s in stream.take(c)]


def _verifier_of(br: Branch, samples: list[PromptSample]):
    by_domain = {src.domain: src.verifier for src, _ in br.native}
    return lambda completion, sample: by_domain[sample.domain](completion, sample)


def _rollout_metrics(scored: Scored, prefix: str) -> dict[str, float]:
    lens = scored.rollouts.response_lens.float()
    return {
        f"{prefix}/reward": float(scored.rewards.mean()) if scored.rewards.numel() else 0.0,
        # pass@1 of the sampled completions (reward 1 = verified correct)
        f"{prefix}/pass@1": float((scored.rewards >= 1.0).float().mean()) if scored.rewards.numel() else 0.0,
        f"{prefix}/response_len": float(lens.mean()) if lens.numel() else 0.0,
        f"{prefix}/rollout_tokens_per_s": float(scored.rollouts.meta.get("tokens_per_s", 0.0)),
    }


def init_cross_streams(cfg: Config, branches: dict[str, Branch]) -> None:
    """Each (student, teacher) pair reads the teacher's data through its own stream, so
    cross prompts never disturb the teacher's native data order."""
    for name, br in branches.items():
        for j, other in branches.items():
            if j != name and other.native:
                src = other.native[0][0]
                br.cross[j] = PromptStream(src.train, derived_seed(cfg.seed, "cross", name, j))


def data_state(branches: dict[str, Branch]) -> dict:
    return {n: {"native": [s.state_dict() for _, s in b.native], "cross": {j: s.state_dict() for j, s in b.cross.items()}}
            for n, b in branches.items()}  # fmt: skip


def load_data_state(branches: dict[str, Branch], state: dict) -> None:
    for n, b in branches.items():
        for (_, s), st in zip(b.native, state[n]["native"]):
            s.load_state_dict(st)
        for j, st in state[n]["cross"].items():
            b.cross[j].load_state_dict(st)


def reduce_over_dp(metrics: dict[str, float]) -> dict[str, float]:
    """Average rank-local rollout metrics over the data-parallel group."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not metrics or not dist.is_initialized() or ps.get_data_parallel_world_size() == 1:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return {k: float(v) / ps.get_data_parallel_world_size() for k, v in zip(keys, t)}
