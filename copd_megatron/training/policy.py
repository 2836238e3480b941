"""Policy-gradient updates from rollouts: GRPO tokens and OPD tokens through one surrogate.

A :class:`PolicyBatch` holds sequences (prompt + response) with *per-token* advantages, so one
update can mix native GRPO samples (the sequence's group advantage on every response token)
and CoPD's cross-branch samples (``β·(log π_teacher − log π_student)`` per token, paper §4).
Both go through the same clipped surrogate (DAPO clip-higher), computed over vocab-parallel
logits: the full vocabulary is never gathered.

Alignment: position ``t`` of ``logprobs``/``advantages``/``loss_mask`` ([n, L−1]) refers to
predicting ``tokens[:, t + 1]`` from ``tokens[:, :t + 1]``.

Old log-probs are recomputed by the trainer (``compute_logprobs``) before the update, never
taken from the sampler (train/inference mismatch). With one update per batch the ratio is
1 at the start, and the clip matters only through gradient accumulation order; we keep the
full PPO form so ``ppo_epochs > 1`` and stale-sampler setups stay correct.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from copd_megatron.config.schema import LossConfig
from copd_megatron.losses import (
    aggregate,
    entropy_from_logits,
    policy_loss,
    token_logprobs,
    topk_kl,
    vocab_divergence,
)
from copd_megatron.model.build import BranchModel
from copd_megatron.rollout.types import RolloutBatch
from copd_megatron.training.forward import forward_collect
from copd_megatron.training.step import MicroBatch, StepResult, train_step


@dataclass
class PolicyBatch:
    """Sequences on this data-parallel rank, ready for an update. ``n`` rows."""

    tokens: torch.Tensor  # [n, L] prompt + response ids, right-padded
    loss_mask: torch.Tensor  # [n, L-1] 1 where the target token is a response token
    advantages: torch.Tensor  # [n, L-1] per-token advantage (GRPO: group advantage; OPD: β·δ)
    old_logprobs: torch.Tensor  # [n, L-1] trainer log-probs before this update
    # Per-row extras with leading dim n, e.g. for full-vocabulary OPD: "teacher_logits"
    # [n, L-1, V/tp] (last pipeline stage only) and "opd_weight" [n] (β on cross rows, else 0).
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]


def response_mask(rollouts: RolloutBatch) -> torch.Tensor:
    """Target-aligned response mask ``[n, L-1]`` of a rollout batch."""
    return rollouts.response_mask[:, 1:].contiguous()


def microbatches(tokens: torch.Tensor, mask: torch.Tensor, size: int, **per_token: torch.Tensor) -> list[MicroBatch]:
    """Cut ``[n, L]`` sequences into micro-batches of ``size`` rows. Pipeline stages exchange
    fixed-shape activations, so a short last micro-batch is filled with masked copies of row 0."""
    pad = (-tokens.shape[0]) % size
    if pad:
        tokens = torch.cat([tokens, tokens[:1].expand(pad, -1)])
        mask = torch.cat([mask, torch.zeros(pad, mask.shape[1], dtype=mask.dtype)])
        per_token = {k: torch.cat([v, v[:1].expand(pad, *v.shape[1:])]) for k, v in per_token.items()}
    # Padding-aware: without pipeline stages (fixed activation shapes), each micro-batch is cut
    # to its own longest sequence, so short responses do not pay for the longest one.
    trim = _pipeline_size() == 1
    out = []
    for i in range(0, tokens.shape[0], size):
        m = mask[i : i + size]
        used = mask.shape[1]
        if trim:
            nz = m.sum(0).nonzero()
            used = int(nz[-1]) + 1 if nz.numel() else 1
        mb = MicroBatch.from_tokens(tokens[i : i + size, : used + 1])
        mb.loss_mask = m[:, :used].float()
        mb.extra = {k: (v[i : i + size, :used] if v.dim() >= 2 else v[i : i + size]) for k, v in per_token.items()}
        out.append(mb)
    return out


def pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad dim 1 of a trimmed micro-batch result back to the batch's full width."""
    pad = [0, 0] * (t.dim() - 2) + [0, width - t.shape[1]]
    return torch.nn.functional.pad(t, pad)


def _pipeline_size() -> int:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_world_size() if dist.is_initialized() and ps.model_parallel_is_initialized() else 1


def compute_logprobs(
    chunks: list, tokens: torch.Tensor, mask: torch.Tensor, micro_batch_size: int, *, temperature: float,
    vocab_size: int, chunk_size: int = 0,
) -> torch.Tensor:  # fmt: skip
    """Log-probs ``[n, L-1]`` of every next token under ``chunks`` (no gradient), on all ranks."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()

    width = tokens.shape[1] - 1

    def fn(logits, mb):
        lp = token_logprobs(logits, mb.labels, tp_group=tp_group, vocab_size=vocab_size, temperature=temperature,
                            chunk_size=chunk_size or None)  # fmt: skip
        return {"logprobs": pad_to(lp.float(), width)}

    return forward_collect(chunks, microbatches(tokens, mask, micro_batch_size), fn)["logprobs"][: tokens.shape[0]]


def make_policy_loss(loss: LossConfig, *, temperature: float, vocab_size: int, max_len: int, opd: tuple = ("sampled",)):
    """The per-micro-batch loss of :func:`train_step` for policy updates.

    ``opd`` = (kind, jsd_beta, topk): with a full-vocabulary kind, rows that carry
    ``teacher_logits`` add β·divergence(student ‖ teacher) per token to the surrogate."""
    from megatron.core import parallel_state as ps

    tp_group = ps.get_tensor_model_parallel_group()

    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        mask = mb.loss_mask
        logp = token_logprobs(logits, mb.labels, tp_group=tp_group, vocab_size=vocab_size, temperature=temperature,
                              chunk_size=loss.logprob_chunk_size or None)  # fmt: skip
        per_token, stats = policy_loss(
            logp, mb.extra["old_logprobs"], mb.extra["advantages"], mask, eps_low=loss.eps_low, eps_high=loss.eps_high,
            ref_logprobs=mb.extra.get("ref_logprobs"), ref_kl_coef=loss.ref_kl_coef, ref_kl_estimator=loss.ref_kl_estimator,
        )  # fmt: skip
        if "teacher_logits" in mb.extra:
            per_token = per_token + _divergence(logits, mb, opd, tp_group, vocab_size, temperature) * mask
        loss_sum, count = aggregate(per_token, mask, loss.aggregation, max_len)
        with torch.no_grad():
            ent = entropy_from_logits(logits, tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
        n = mask.sum().detach()
        metrics = {
            "loss": torch.stack([loss_sum.detach(), count.detach().float()]),
            "entropy": torch.stack([(ent * mask).sum(), n]),
            **{k: torch.stack([(v * mask).sum(), n]) for k, v in stats.items()},
        }
        return loss_sum, count.to(torch.int), metrics

    return loss_fn


def _divergence(logits, mb: MicroBatch, opd: tuple, tp_group, vocab_size: int, temperature: float) -> torch.Tensor:
    """β_row · D(student ‖ teacher) per token over vocab-parallel logits (0 on native rows)."""
    kind, jsd_beta, topk = opd
    teacher = mb.extra["teacher_logits"]
    kw = dict(tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
    if kind == "topk_kl":
        div = topk_kl(logits, teacher, topk, **kw)
    else:
        div = vocab_divergence(logits, teacher, kind, beta=jsd_beta, **kw)
    return mb.extra["opd_weight"].reshape(-1, 1) * div


def policy_update(
    branch: BranchModel, batch: PolicyBatch, loss: LossConfig, *, micro_batch_size: int, temperature: float,
    vocab_size: int, max_len: int, step_index: int = -1, opd: tuple = ("sampled",),
) -> StepResult:  # fmt: skip
    """One optimizer step of the clipped surrogate on ``batch``."""
    extra = {k: v for k, v in batch.extra.items() if v is not None}
    mbs = microbatches(batch.tokens, batch.loss_mask, micro_batch_size,
                       advantages=batch.advantages, old_logprobs=batch.old_logprobs, **extra)  # fmt: skip
    loss_fn = make_policy_loss(loss, temperature=temperature, vocab_size=vocab_size, max_len=max_len, opd=opd)
    return train_step(branch, mbs, loss_fn, with_labels=False, step_index=step_index)
