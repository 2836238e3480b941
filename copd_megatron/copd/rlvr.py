"""Building update batches for one branch: native GRPO samples and cross-branch OPD samples.

Native (paper Eq. rlvr): prompts x ~ D_k, G completions each from π_k, rewards r_k, group
advantage Â_i = (r_i − mean)/(std + ε) on every response token.

Cross (paper Eq. delta): prompts x' ~ D_j from a peer's data, completions from the *student*
π_k, no task reward; per-token advantage Â_t = β_k·(log π_j(y_t|·) − log π_k(y_t|·)) with the
peer's current weights (stop-gradient), computed over vocab-parallel logits.

Every random choice is derived from (run seed, branch, step, purpose, data-parallel rank), so a
resumed run samples exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from copd_megatron.data.tokenizer import encode_prompt
from copd_megatron.losses import group_advantages, opd_advantage
from copd_megatron.rollout.types import RolloutBatch, SamplingParams
from copd_megatron.training.forward import forward_collect
from copd_megatron.training.policy import PolicyBatch, compute_logprobs, microbatches, pad_to, response_mask


def derived_seed(*parts) -> int:
    """A 31-bit seed from any tuple of names and numbers (stable across runs and machines)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


@dataclass
class Scored:
    """Rollouts of one purpose (native or cross) on this data-parallel rank."""

    rollouts: RolloutBatch  # [n = prompts·G, L]
    texts: list[str]  # decoded responses
    rewards: torch.Tensor  # [n] task rewards (cross samples: the teacher domain's verifier, for metrics)
    samples: list  # the PromptSample of each row


def rollout(engine, tokenizer, samples: list, group_size: int, params: SamplingParams, verifier) -> Scored:
    """G completions per prompt with ``engine``; decode and score them with ``verifier``."""
    rows = [s for s in samples for _ in range(group_size)]
    prompt_ids = [encode_prompt(tokenizer, s.prompt) for s in rows]
    batch = engine.generate(prompt_ids, params)
    texts = [tokenizer.decode(_strip_stop(batch.response_ids(i), params.stop_token_ids)) for i in range(len(rows))]
    rewards = torch.tensor([float(verifier(t, s)) for t, s in zip(texts, rows)])
    return Scored(batch, texts, rewards, rows)


def _strip_stop(ids: list[int], stop_ids) -> list[int]:
    return ids[:-1] if ids and ids[-1] in set(stop_ids) else ids


def native_batch(chunks, scored: Scored, group_size: int, loss_cfg, *, micro_batch_size: int, temperature: float,
                 vocab_size: int) -> tuple[PolicyBatch, dict]:  # fmt: skip
    """GRPO: group advantages broadcast over response tokens; old log-probs from the trainer."""
    tokens, mask = scored.rollouts.tokens, response_mask(scored.rollouts)
    adv, degenerate = group_advantages(scored.rewards.view(-1, group_size), mode=loss_cfg.advantage)
    old = compute_logprobs(chunks, tokens, mask, micro_batch_size, temperature=temperature, vocab_size=vocab_size,
                           chunk_size=loss_cfg.logprob_chunk_size)  # fmt: skip
    per_token = adv.reshape(-1, 1).float() * mask
    stats = {"degenerate_groups": float(degenerate), "groups": float(scored.rewards.numel() // group_size)}
    return PolicyBatch(tokens, mask, per_token, old), stats


def cross_batch(student_chunks, teacher_chunks, scored: Scored, beta: float, loss_cfg, *, micro_batch_size: int,
                temperature: float, vocab_size: int, opd_loss: str = "sampled") -> tuple[PolicyBatch, dict]:  # fmt: skip
    """OPD: β·(log π_teacher − log π_student) per sampled token, teacher = the peer's live weights.

    With a full-vocabulary ``opd_loss`` (reverse_kl, forward_kl, jsd, topk_kl) the teacher's
    vocab-parallel logits travel with the batch instead and the loss adds β·D(student ‖ teacher)."""
    tokens, mask = scored.rollouts.tokens, response_mask(scored.rollouts)
    kw = dict(temperature=temperature, vocab_size=vocab_size, chunk_size=loss_cfg.logprob_chunk_size)
    student = compute_logprobs(student_chunks, tokens, mask, micro_batch_size, **kw)
    teacher = compute_logprobs(teacher_chunks, tokens, mask, micro_batch_size, **kw)
    n = mask.sum().clamp(min=1)
    stats = {"opd_logratio": float(((teacher - student) * mask).sum() / n)}
    if opd_loss == "sampled":
        return PolicyBatch(tokens, mask, opd_advantage(teacher, student, beta, mask), student), stats
    width = tokens.shape[1] - 1
    logits = forward_collect(teacher_chunks, microbatches(tokens, mask, micro_batch_size),
                             lambda lg, mb: {"logits": pad_to(lg.float(), width)}, broadcast=False).get("logits")  # fmt: skip
    extra = {"teacher_logits": None if logits is None else logits[: tokens.shape[0]],
             "opd_weight": torch.full((tokens.shape[0],), float(beta))}  # fmt: skip
    return PolicyBatch(tokens, mask, torch.zeros_like(mask), student, extra), stats


def concat(batches: list[PolicyBatch], pad_id: int) -> PolicyBatch:
    """One batch from several (right-padding to the longest sequence)."""
    length = max(b.tokens.shape[1] for b in batches)

    def pad(t: torch.Tensor, width: int, value) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return PolicyBatch(
        torch.cat([pad(b.tokens, length, pad_id) for b in batches]),
        torch.cat([pad(b.loss_mask, length - 1, 0.0) for b in batches]),
        torch.cat([pad(b.advantages, length - 1, 0.0) for b in batches]),
        torch.cat([pad(b.old_logprobs, length - 1, 0.0) for b in batches]),
        _concat_extra(batches, length - 1),
    )


def _concat_extra(batches: list[PolicyBatch], width: int) -> dict:
    """Per-row extras over the whole batch: rows without an entry get zeros (weight 0)."""
    keys = {k for b in batches for k, v in b.extra.items() if v is not None}
    out = {}
    for k in keys:
        like = next(b.extra[k] for b in batches if b.extra.get(k) is not None)
        parts = []
        for b in batches:
            v = b.extra.get(k)
            if v is None:
                v = torch.zeros((len(b), *like.shape[1:]), dtype=like.dtype)
            if v.dim() >= 2:  # [n, L-1, ...]: pad the sequence dimension
                v = torch.nn.functional.pad(v, (0, 0) * (v.dim() - 2) + (0, width - v.shape[1]))
            parts.append(v)
        out[k] = torch.cat(parts)
    return out
