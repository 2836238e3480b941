"""On-policy distillation signals between two branches, over vocab-parallel logits.

Sampled-token advantage (the paper's Eq. delta, CoPD's default; = Thinking Machines' OPD):
    Â_t = β · (log π_teacher(y_t | ·) − log π_student(y_t | ·))       (stop-gradient)
a one-sample estimate of −KL(π_student ‖ π_teacher), fed to the GRPO surrogate. It is exactly
0 where teacher and student agree.

Full-vocabulary divergences (beyond the paper, options), per token, student S and teacher T
sharded the same way on the same TP ranks (colocated branches), gradients w.r.t. S only:
    reverse KL  KL(S ‖ T) = Σ_j s_j (log s_j − log t_j)
    forward KL  KL(T ‖ S) = Σ_j t_j (log t_j − log s_j)
    JSD(β)      β·KL(T ‖ M) + (1 − β)·KL(S ‖ M),  M = β·T + (1 − β)·S
JSD follows TRL's GKD convention: β = 0 is forward KL and β = 1 reverse KL (special-cased,
since the mixture formula degenerates to 0 at both ends).
Top-k KL: forward KL on the teacher's global top-k, both distributions renormalised over
that support (NeMo-RL's default), computed from k gathered values per token.

Behaviour metrics (paper Eq. overlap, k = 10): |TopK(S) ∩ TopK(T)| / k per token, and the
symmetric KL(S ‖ T) + KL(T ‖ S); both averaged over response tokens with a mask.
"""

from __future__ import annotations

import math

import torch

from copd_megatron.losses.vocab_parallel import (
    gather_at,
    global_topk,
    log_softmax,
    reduce_sum,
)


def opd_advantage(teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float, mask: torch.Tensor) -> torch.Tensor:
    """β·(log π_T − log π_S) on masked tokens, detached (the teacher signal is a constant)."""
    return (beta * (teacher_logp.detach() - student_logp.detach())) * mask


def _kl(logp: torch.Tensor, logq: torch.Tensor, tp_group) -> torch.Tensor:
    """KL(P ‖ Q) per token from local shards of two global log-softmaxes (padding: p = 0 exactly)."""
    return reduce_sum((torch.exp(logp) * (logp - logq)).sum(-1), tp_group)


def vocab_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "reverse_kl", *, beta: float = 0.5,
    tp_group=None, vocab_size: int | None = None, temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """Per-token full-vocabulary divergence ``[...]`` (fp32), differentiable w.r.t. the student."""
    kw = dict(tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
    s = log_softmax(student_logits, **kw)
    with torch.no_grad():
        t = log_softmax(teacher_logits.detach(), **kw)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        return _kl(s, t, tp_group)
    if kind == "forward_kl" or (kind == "jsd" and beta == 0.0):
        return _kl(t, s, tp_group)
    if kind == "jsd":
        m = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log(1 - beta)]), dim=0)
        return beta * _kl(t, m, tp_group) + (1 - beta) * _kl(s, m, tp_group)
    raise ValueError(f"unknown divergence {kind!r}; expected reverse_kl, forward_kl or jsd")


def topk_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, *, tp_group=None,
    vocab_size: int | None = None, temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """KL(T_k ‖ S_k) on the teacher's global top-k, both renormalised over it; per token."""
    t_vals, ids = global_topk(teacher_logits.detach(), k, tp_group=tp_group, vocab_size=vocab_size,
                              temperature=temperature)  # fmt: skip
    s_vals = gather_at(student_logits.float() / temperature, ids, tp_group=tp_group)
    t_logp = torch.log_softmax(t_vals, -1)
    s_logp = torch.log_softmax(s_vals, -1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def topk_overlap(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, k: int = 10, *,
    tp_group=None, vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token ``|TopK(S) ∩ TopK(T)| / k`` and its mean over ``mask`` (paper: k = 10)."""
    _, s_ids = global_topk(student_logits, k, tp_group=tp_group, vocab_size=vocab_size)
    _, t_ids = global_topk(teacher_logits, k, tp_group=tp_group, vocab_size=vocab_size)
    per_token = (s_ids.unsqueeze(-1) == t_ids.unsqueeze(-2)).any(-1).float().sum(-1) / k
    return per_token, _masked_mean(per_token, mask)


@torch.no_grad()
def symmetric_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *, tp_group=None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token KL(S ‖ T) + KL(T ‖ S) over the full vocabulary and its mean over ``mask``."""
    kw = dict(tp_group=tp_group, vocab_size=vocab_size)
    s, t = log_softmax(student_logits, **kw), log_softmax(teacher_logits, **kw)
    per_token = _kl(s, t, tp_group) + _kl(t, s, tp_group)
    return per_token, _masked_mean(per_token, mask)
