"""On-policy distillation signals between two branches, over vocab-parallel logits.

Student S = the branch being trained (its own rollouts, gradients flow to its logits only);
teacher T = the peer branch (always detached). s_j = softmax(z_S / τ)_j, t_j likewise, with the
sampling temperature τ; padded vocabulary entries have s_j = t_j = 0.

Sampled-token advantage (paper §3 Eq. delta, CoPD's default; = Thinking Machines' OPD):
    Â_t = β · (log π_T(y_t | ·) − log π_S(y_t | ·))       (stop-gradient, 0 outside the mask)
a one-sample estimate of −KL(π_S ‖ π_T) at the sampled token, fed to the GRPO surrogate as a
per-token advantage. It is exactly 0 where teacher and student agree.

Full-vocabulary divergences (beyond the paper; options), per token, student and teacher
sharded the same way on the same TP ranks (colocated branches):
    reverse KL     KL(S ‖ T) = Σ_j s_j (log s_j − log t_j)         ∂/∂x_j = s_j (log s_j/t_j − KL(S‖T))
    forward KL     KL(T ‖ S) = Σ_j t_j (log t_j − log s_j)         ∂/∂x_j = s_j − t_j
    JSD(β)         β·KL(T ‖ M) + (1 − β)·KL(S ‖ M),  M = β·T + (1 − β)·S
                                                                   ∂/∂x_j = (1 − β) s_j (log s_j/m_j − KL(S‖M))
    symmetric KL   KL(S ‖ T) + KL(T ‖ S)                           (sum of the two gradients)
(x = z_S / τ; ∂/∂z = ∂/∂x / τ). JSD follows TRL's GKD convention with P = teacher, Q = student:
JSD(β)(T‖S) ≈ β·KL(T‖S) for small β and ≈ (1 − β)·KL(S‖T) near β = 1, so β = 0 and β = 1 are
special-cased to the *unscaled* forward KL and reverse KL (the mixture formula is 0 there).

Each per-token sum over the vocabulary is a local partial sum all-reduced over TP; the
divergence is chunked over tokens like the log-probs (fp32 per chunk, forward saves only the
inputs and a few numbers per token, backward recomputes the chunk with no collective).

Top-k KL: forward KL on the teacher's global top-k ids, both distributions renormalised over
that support (NeMo-RL's default): KL(T_k ‖ S_k) = Σ_{j∈K} t̂_j (log t̂_j − log ŝ_j) with
t̂ = softmax over K of the teacher's logits, ŝ likewise for the student; only k values per
token are gathered, never the vocabulary.

Behaviour metrics (paper §2 Eq. overlap, k = 10): |TopK(S) ∩ TopK(T)| / k per token, and the
symmetric KL; both averaged over response tokens with a mask (denominator: masked tokens).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from copd_megatron.losses.vocab_parallel import (
    PAD_FILL,
    _all_reduce,
    chunks,
    gather_at,
    global_topk,
    scaled_masked,
)

KINDS = ("reverse_kl", "forward_kl", "jsd", "symmetric_kl")


def opd_advantage(
    teacher_logp: torch.Tensor, student_logp: torch.Tensor, beta: float, mask: torch.Tensor
) -> torch.Tensor:
    """β·(log π_T − log π_S) on masked tokens, exactly 0 elsewhere; detached (a constant signal)."""
    adv = beta * (teacher_logp.detach().float() - student_logp.detach().float())
    return torch.where(mask.bool(), adv, torch.zeros((), device=adv.device))  # no 0·inf = NaN on padding


def _log_softmax_chunk(z: torch.Tensor, cfg: dict) -> torch.Tensor:
    """fp32 local shard of the global log-softmax of one chunk (no gradient)."""
    x = scaled_masked(z, fill=PAD_FILL, **cfg)
    m = x.max(-1, keepdim=True).values
    _all_reduce(m, dist.ReduceOp.MAX, cfg["tp_group"])  # global max over the vocabulary (stability)
    x.sub_(m)
    s = x.exp().sum(-1, keepdim=True)
    _all_reduce(s, dist.ReduceOp.SUM, cfg["tp_group"])  # Σ exp over every shard: the normaliser
    return x.sub_(s.log())


def _terms(ls: torch.Tensor, lt: torch.Tensor, kind: str, beta: float):
    """Local per-token partial sums of the divergence, and the pieces its gradient needs.

    Returns (partial [n, c], grad_fn) where grad_fn(totals [n, c]) → ∂D/∂x on this shard."""
    s = ls.exp()
    if kind in ("reverse_kl", "forward_kl", "symmetric_kl"):
        t = lt.exp()
        d = ls - lt  # log s/t; padding: (−1e30) − (−1e30) = 0 exactly
        rev, fwd = (s * d).sum(-1), -(t * d).sum(-1)
        partial = torch.stack([rev, fwd], -1)

        def grad(tot):
            if kind == "forward_kl":
                return s - t
            g_rev = s * (d - tot[:, :1])  # s_j (log s_j/t_j − KL(S‖T)), KL(S‖T) all-reduced in forward
            return g_rev + (s - t) if kind == "symmetric_kl" else g_rev

        return partial, grad
    lm = torch.logaddexp(lt + math.log(beta), ls + math.log(1 - beta))  # log M, M = βT + (1 − β)S
    kl_tm = (lt.exp() * (lt - lm)).sum(-1)
    kl_sm = (s * (ls - lm)).sum(-1)
    partial = torch.stack([kl_tm, kl_sm], -1)
    return partial, lambda tot: (1 - beta) * s * ((ls - lm) - tot[:, 1:2])


def _combine(tot: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    if kind == "reverse_kl":
        return tot[:, 0]
    if kind == "forward_kl":
        return tot[:, 1]
    if kind == "symmetric_kl":
        return tot[:, 0] + tot[:, 1]
    return beta * tot[:, 0] + (1 - beta) * tot[:, 1]


class _VocabDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, kind, beta, cfg, chunk_size):
        zs, zt = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        totals = torch.empty(zs.shape[0], 2, dtype=torch.float32, device=zs.device)
        for a, b in chunks(zs.shape[0], chunk_size):
            partial, _ = _terms(_log_softmax_chunk(zs[a:b], cfg), _log_softmax_chunk(zt[a:b], cfg), kind, beta)
            totals[a:b] = _all_reduce(partial, dist.ReduceOp.SUM, cfg["tp_group"])  # Σ over every shard
        ctx.save_for_backward(student, teacher, totals)
        ctx.cfg = (kind, beta, cfg, chunk_size)
        return _combine(totals, kind, beta).view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, totals = ctx.saved_tensors
        kind, beta, cfg, chunk_size = ctx.cfg
        zs, zt = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        g = grad_out.reshape(-1, 1).float() / cfg["temperature"]
        grad = torch.empty(zs.shape, dtype=student.dtype, device=zs.device)
        for a, b in chunks(zs.shape[0], chunk_size):
            # Recomputed per chunk (the normalisers' collectives again, no fp32 copy kept from forward).
            _, grad_fn = _terms(_log_softmax_chunk(zs[a:b], cfg), _log_softmax_chunk(zt[a:b], cfg), kind, beta)
            grad[a:b] = (grad_fn(totals[a:b]) * g[a:b]).to(student.dtype)
        return grad.view(student.shape), None, None, None, None, None


def vocab_divergence(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "reverse_kl", *, beta: float = 0.5,
    tp_group=None, vocab_size: int | None = None, temperature: float = 1.0, chunk_size: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Per-token full-vocabulary divergence ``[...]`` (fp32) between ``[..., V/tp]`` shards;
    ``kind`` in reverse_kl, forward_kl, jsd (with ``beta``), symmetric_kl. Differentiable
    w.r.t. the student only."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "jsd":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"jsd beta must be in [0, 1], got {beta}")
        kind = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")  # TRL's end points
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
    cfg = dict(tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
    return _VocabDivergence.apply(student_logits, teacher_logits.detach(), kind, beta, cfg, chunk_size)


def topk_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, *, tp_group=None,
    vocab_size: int | None = None, temperature: float = 1.0, chunk_size: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """KL(T_k ‖ S_k) per token ``[...]`` on the teacher's global top-k, both renormalised over it."""
    t_vals, ids = global_topk(teacher_logits.detach(), k, tp_group=tp_group, vocab_size=vocab_size,
                              temperature=temperature, chunk_size=chunk_size)  # fmt: skip
    return topk_kl_from(student_logits, ids, t_vals, tp_group=tp_group, temperature=temperature)


def topk_kl_from(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_vals: torch.Tensor, *, tp_group=None,
    temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """KL(T_k ‖ S_k) from the teacher's top-k *global* ids ``[..., k]`` and their values (logits / T
    or log-probs: renormalising over the k entries removes any per-token constant). This is what
    travels between branches on different ranks: k ids and k numbers per token, never logits."""
    # Gather k student logits first, then upcast: never an fp32 copy of the student's vocabulary.
    s_vals = gather_at(student_logits, teacher_ids, tp_group=tp_group).float() / temperature
    t_logp = torch.log_softmax(teacher_vals.detach().float(), -1)
    s_logp = torch.log_softmax(s_vals, -1)
    return (t_logp.exp() * (t_logp - s_logp)).sum(-1)


def ids_overlap(student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """Per-token ``|S ∩ T| / k`` of two duplicate-free top-k id lists ``[..., k]``."""
    k = student_ids.shape[-1]
    return (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(-1).sum(-1).float() / k


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ x·mask / Σ mask (0 when the mask is empty); masked entries may hold anything finite."""
    m = mask.to(torch.float32)
    return (torch.where(m > 0, x.float(), torch.zeros((), device=x.device)) * m).sum() / m.sum().clamp(min=1)


@torch.no_grad()
def topk_overlap(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, k: int = 10, *,
    tp_group=None, vocab_size: int | None = None, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token ``|TopK(S) ∩ TopK(T)| / k`` ``[...]`` and its mean over ``mask`` (paper: k = 10).

    Temperature does not change a top-k set, so there is no temperature argument."""
    kw = dict(tp_group=tp_group, vocab_size=vocab_size, chunk_size=chunk_size)
    _, s_ids = global_topk(student_logits, k, **kw)
    _, t_ids = global_topk(teacher_logits, k, **kw)
    per_token = ids_overlap(s_ids, t_ids)
    return per_token, masked_mean(per_token, mask)


@torch.no_grad()
def symmetric_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, *, tp_group=None,
    vocab_size: int | None = None, temperature: float = 1.0, chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-token KL(S ‖ T) + KL(T ‖ S) ``[...]`` over the full vocabulary and its mean over ``mask``."""
    per_token = vocab_divergence(student_logits, teacher_logits, "symmetric_kl", tp_group=tp_group,
                                 vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size)  # fmt: skip
    return per_token, masked_mean(per_token, mask)

