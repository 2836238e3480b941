"""Policy-gradient updates from rollouts: GRPO tokens and OPD tokens through one surrogate.

An update batch (:class:`copd_megatron.data.batch.Batch`) holds sequences (prompt + response) with
*per-token* advantages, so one update can mix native GRPO samples (the sequence's group advantage
on every response token) and CoPD's cross-branch samples (``β·(log π_teacher − log π_student)``
per token, paper §4). Both go through the same clipped surrogate (DAPO clip-higher), computed over
vocab-parallel logits: the full vocabulary is never gathered. Fields of an update batch:

    loss_mask         target [n, L-1]  1 where the target token is a response token
    advantages        target [n, L-1]  GRPO: the group advantage; OPD (sampled): β·(log π_T − log π_S)
    old_logprobs      target [n, L-1]  the trainer's log-probs before this update (recomputed)
    sampler_logprobs  target [n, L-1]  the rollout engine's log-probs: per-step mismatch metrics
                                       (rollout_logp_abs_diff, rollout_k3_kl) and, with loss.rollout_is,
                                       the importance weights that multiply the surrogate
    opd_weight        row    [n]       β on cross rows whose teacher signal is a divergence, else 0
    teacher_topk_ids  target [n, L-1, k] / teacher_topk_vals: the teacher's top-k (opd.loss topk_kl)
    teacher_logits    ragged           the teacher's vocab-parallel logits [len, V/tp] of a cross row
                                       (full-vocabulary opd.loss, colocated placement, last stage only)

Old log-probs are recomputed by the trainer before the update, never taken from the sampler
(train/inference mismatch); with one update per batch the ratio starts at 1 and the clip acts
through the order of gradient accumulation only. The full PPO form is kept so stale-sampler
setups (asynchronous engines, importance-sampling corrections) stay correct.
"""

from __future__ import annotations

import torch

from copd_megatron.config.schema import LossConfig, OPDConfig
from copd_megatron.data.batch import Batch, MicroBatch
from copd_megatron.distributed.device import runtime_device
from copd_megatron.losses import (
    aggregate,
    entropy_from_logits,
    policy_loss,
    token_logprobs,
    topk_kl_from,
    vocab_divergence,
)
from copd_megatron.losses.mismatch import log_ratio, rollout_is_weights
from copd_megatron.model.build import BranchModel
from copd_megatron.training.step import StepResult, train_step


def make_policy_loss(loss: LossConfig, opd: OPDConfig, *, temperature: float, vocab_size: int, max_len: int,
                     tp_group=None):  # fmt: skip
    """The per-micro-batch loss of :func:`train_step` for policy updates.

    Log-probs are taken at the sampling ``temperature`` (the distribution the rollouts came from).
    Rows with an ``opd_weight`` add β·D(student ‖ teacher) per token to the surrogate (top-k or
    full-vocabulary, see ``opd.loss``)."""

    def loss_fn(logits: torch.Tensor, mb: MicroBatch):
        mask = mb.loss_mask
        logp = token_logprobs(logits, mb.labels, tp_group=tp_group, vocab_size=vocab_size, temperature=temperature,
                              chunk_size=loss.logprob_chunk_size or None)  # fmt: skip
        per_token, stats = policy_loss(logp, mb.fields["old_logprobs"], mb.fields["advantages"], mask,
                                       eps_low=loss.eps_low, eps_high=loss.eps_high)  # fmt: skip
        if "sampler_logprobs" in mb.fields:  # rollout/trainer mismatch: metrics, and the IS correction
            per_token, mismatch = _rollout_correction(per_token, mb, mask, loss)
            stats.update(mismatch)
        if opd.loss != "sampled" and "opd_weight" in mb.fields:
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


def _rollout_correction(per_token: torch.Tensor, mb: MicroBatch, mask: torch.Tensor, loss: LossConfig):
    """Multiply the surrogate by the rollout importance weights (``loss.rollout_is``; the divergence
    term of full-vocabulary OPD is not a sampled estimate and is not weighted) and return per-token
    mismatch metrics between the engine's and the trainer's old log-probs (``losses/mismatch.py``)."""
    old, sampler = mb.fields["old_logprobs"], mb.fields["sampler_logprobs"].to(per_token.device)
    delta = log_ratio(old, sampler, mask)
    stats = {"rollout_logp_abs_diff": delta.abs(), "rollout_k3_kl": torch.exp(delta) - delta - 1}
    if loss.rollout_is != "none":
        w = rollout_is_weights(old, sampler, mask, mode=loss.rollout_is, level=loss.rollout_is_level,
                               cap=loss.rollout_is_cap, low=loss.rollout_is_low)  # fmt: skip
        per_token = per_token * w
        stats["rollout_is_weight"] = w
    return per_token, stats


def _divergence(logits, mb: MicroBatch, opd: OPDConfig, tp_group, vocab_size: int, temperature: float) -> torch.Tensor:
    """β_row · D(student ‖ teacher) per token over vocab-parallel logits (0 on native rows)."""
    weight = mb.fields["opd_weight"].to(logits.device).reshape(-1, 1)
    if opd.loss == "topk_kl":
        div = topk_kl_from(logits, mb.fields["teacher_topk_ids"], mb.fields["teacher_topk_vals"], tp_group=tp_group,
                           temperature=temperature)  # fmt: skip
        return weight * div
    teacher = _stack_teacher_logits(mb.fields["teacher_logits"], logits)
    div = vocab_divergence(logits, teacher, opd.loss, beta=opd.jsd_beta, tp_group=tp_group, vocab_size=vocab_size,
                           temperature=temperature)  # fmt: skip
    return weight * div


def _stack_teacher_logits(rows: list, like: torch.Tensor) -> torch.Tensor:
    """``[b, s, V/tp]`` from per-row teacher logits (native rows: None → zeros, weight 0)."""
    out = torch.zeros_like(like, dtype=torch.float32)
    for i, t in enumerate(rows):
        if t is not None:
            n = min(t.shape[0], out.shape[1])
            out[i, :n] = t[:n].to(out.device, torch.float32)
    return out


def policy_update(
    branch: BranchModel, batch: Batch, loss: LossConfig, opd: OPDConfig, *, micro_batch_size: int,
    temperature: float, vocab_size: int, max_len: int, step_index: int = -1, trim: bool | None = None,
    pad_multiple: int = 1,
) -> StepResult:  # fmt: skip
    """One optimizer step of the clipped surrogate on ``batch`` (fields: see module doc; the batch
    may live on the host, its micro-batches are moved to the runtime device)."""
    g = branch.groups
    trim = (g is None or g.pp_size == 1) if trim is None else trim  # pipeline stages exchange fixed shapes
    mbs = batch.micro_batches(micro_batch_size, trim=trim, pad_multiple=pad_multiple, device=runtime_device())
    tp_group = g.tp if g is not None else None
    loss_fn = make_policy_loss(loss, opd, temperature=temperature, vocab_size=vocab_size, max_len=max_len,
                               tp_group=tp_group)  # fmt: skip
    return train_step(branch, mbs, loss_fn, with_labels=False, step_index=step_index)
