"""Log-probs, entropy and top-k over vocab-parallel logits, without gathering the vocabulary.

TP rank r holds logits ``z^(r)`` for vocabulary ids ``[r·V/tp, (r+1)·V/tp)`` (Megatron's
convention). With temperature T the sampling distribution is softmax(z/T); every function
here applies the same T so trainer log-probs match what the sampler drew from. Vocabulary
padding (ids >= ``vocab_size``, added so TP divides the vocabulary) gets −inf: it never has
probability mass and is never in a top-k.

Token log-probs (per token, x = z/T):
    m    = all_reduce_MAX(max_j x_j)                      (detached: its gradient cancels)
    logZ = m + log all_reduce_SUM(Σ_j exp(x_j − m))
    log p(y) = all_reduce_SUM(x_y if y is on this rank else 0) − logZ
    ∂ log p(y)/∂z_j = (1[j = y] − p_j) / T                  (local: backward needs no collective)
Entropy: H = −Σ_j p_j log p_j, ∂H/∂z_j = −p_j (log p_j + H) / T.

Both run over chunks of tokens in fp32 (``chunk_size``), and backward recomputes the softmax
of one chunk at a time from the saved (possibly bf16) logits and per-token logZ, so peak
memory never holds an fp32 copy of all logits. Global top-k: local top-k on each shard,
all-gather the k·TP candidates with their global ids, top-k again: O(k·TP) per token.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NEG_INF = float("-inf")
PAD_FILL = -1e30  # finite "minus infinity" for differentiable paths (exp underflows to exactly 0)


def tp_size_rank(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _all_reduce(t: torch.Tensor, op, tp_group) -> torch.Tensor:
    if tp_size_rank(tp_group)[0] > 1:
        dist.all_reduce(t, op=op, group=tp_group)
    return t


def scaled_masked(
    logits: torch.Tensor, *, tp_group, vocab_size: int | None, temperature: float, fill: float = NEG_INF
) -> torch.Tensor:
    """fp32 ``logits / T`` with padded vocabulary entries set to ``fill`` (a new tensor)."""
    x = logits.to(torch.float32, copy=True)  # one fp32 buffer per chunk, never an alias of the input
    if temperature != 1.0:
        x.div_(temperature)
    v_local = x.shape[-1]
    _, rank = tp_size_rank(tp_group)
    if vocab_size is not None and (rank + 1) * v_local > vocab_size:
        first_pad = max(vocab_size - rank * v_local, 0)
        x[..., first_pad:] = fill
    return x


def max_and_logsum(x: torch.Tensor, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` and ``log Σ exp(x − m)`` over the whole (sharded) vocabulary; logZ = m + that.

    Kept apart: forming ``x_y − m`` before subtracting the small log-sum avoids cancelling two
    large numbers (logits of ±1e4 would lose 1e-3 in fp32). No gradient."""
    m = x.max(dim=-1).values
    _all_reduce(m, dist.ReduceOp.MAX, tp_group)  # global max over the vocabulary, for stability
    s = torch.exp(x - m.unsqueeze(-1)).sum(-1)
    _all_reduce(s, dist.ReduceOp.SUM, tp_group)  # Σ exp over every shard
    return m, torch.log(s)


def _chunks(n: int, chunk_size: int | None):
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    return [(i, min(i + step, n)) for i in range(0, max(n, 1), step)] if n else []


def _owned(targets: torch.Tensor, v_local: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of targets on this shard and their local indices (0 where not owned)."""
    lo = rank * v_local
    own = (targets >= lo) & (targets < lo + v_local)
    return own, torch.where(own, targets - lo, torch.zeros_like(targets))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp_group, vocab_size, temperature, chunk_size):
        shape = targets.shape
        z, y = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        _, rank = tp_size_rank(tp_group)
        own, local = _owned(y, z.shape[-1], rank)
        out = torch.empty(y.shape[0], dtype=torch.float32, device=z.device)
        m, log_s = torch.empty_like(out), torch.empty_like(out)
        single = tp_size_rank(tp_group)[0] == 1
        for a, b in _chunks(y.shape[0], chunk_size):
            x = scaled_masked(z[a:b], tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
            if single:  # one shard: torch's fused log-softmax, same numerics ((x − m) − log s)
                out[a:b] = torch.log_softmax(x, -1).gather(-1, y[a:b, None]).squeeze(-1)
                continue
            m[a:b], log_s[a:b] = max_and_logsum(x, tp_group)
            shifted = x.gather(-1, local[a:b, None]).squeeze(-1) - m[a:b]
            picked = torch.where(own[a:b], shifted, torch.zeros(()))
            out[a:b] = _all_reduce(picked, dist.ReduceOp.SUM, tp_group) - log_s[a:b]  # owner contributes x_y − m
        ctx.save_for_backward(logits, own, local, m, log_s)
        ctx.cfg = (tp_group, vocab_size, temperature, chunk_size, shape)
        return out.view(shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, own, local, m, log_s = ctx.saved_tensors
        tp_group, vocab_size, temperature, chunk_size, _ = ctx.cfg
        z = logits.reshape(-1, logits.shape[-1])
        g = grad_out.reshape(-1).float()
        grad = torch.empty(z.shape, dtype=logits.dtype, device=z.device)
        single = tp_size_rank(tp_group)[0] == 1
        for a, b in _chunks(z.shape[0], chunk_size):
            x = scaled_masked(z[a:b], tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
            if single:
                p = torch.softmax(x, -1)  # fused; recomputed per chunk instead of stored
            else:
                p = x.sub_(m[a:b, None]).sub_(log_s[a:b, None]).exp_()  # in place: one fp32 chunk buffer
            scale = g[a:b] / temperature
            p.mul_(-scale[:, None])  # −p_j · g / T
            rows = torch.arange(b - a)[own[a:b]]
            p[rows, local[a:b][own[a:b]]] += scale[own[a:b]]  # + 1[j = y] · g / T on the owning shard
            grad[a:b] = p.to(logits.dtype)
        return grad.view(logits.shape), None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, tp_group=None, vocab_size: int | None = None,
    temperature: float = 1.0, chunk_size: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """fp32 ``log softmax(logits/T)[target]`` per token. ``logits [..., V/tp]``, ``targets [...]``
    with *global* vocabulary ids; differentiable w.r.t. ``logits``."""
    return _TokenLogprobs.apply(logits, targets, tp_group, vocab_size, temperature, chunk_size)


class _Entropy(torch.autograd.Function):
    # H = −Σ_j p_j log p_j with log p_j = x_j − logZ formed per element: subtracting two large
    # numbers (logZ − E_p[x]) would lose the digits of a small entropy.
    @staticmethod
    def forward(ctx, logits, tp_group, vocab_size, temperature, chunk_size):
        z = logits.reshape(-1, logits.shape[-1])
        ent = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
        m, log_s = torch.empty_like(ent), torch.empty_like(ent)
        for a, b in _chunks(z.shape[0], chunk_size):
            x = scaled_masked(z[a:b], tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
            m[a:b], log_s[a:b] = max_and_logsum(x, tp_group)
            logp = (x - m[a:b, None]) - log_s[a:b, None]
            plogp = torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros(()))  # padding: 0·(−inf) = 0
            ent[a:b] = -_all_reduce(plogp.sum(-1), dist.ReduceOp.SUM, tp_group)  # Σ over every shard
        ctx.save_for_backward(logits, m, log_s, ent)
        ctx.cfg = (tp_group, vocab_size, temperature, chunk_size)
        return ent.view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        logits, m, log_s, ent = ctx.saved_tensors
        tp_group, vocab_size, temperature, chunk_size = ctx.cfg
        z = logits.reshape(-1, logits.shape[-1])
        g = grad_out.reshape(-1).float()
        grad = torch.empty(z.shape, dtype=logits.dtype, device=z.device)
        for a, b in _chunks(z.shape[0], chunk_size):
            x = scaled_masked(z[a:b], tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
            logp = (x - m[a:b, None]) - log_s[a:b, None]
            # ∂H/∂x_j = −p_j (log p_j + H); padding has p = 0.
            d = torch.where(torch.isfinite(logp), -logp.exp() * (logp + ent[a:b, None]), torch.zeros(()))
            grad[a:b] = (d * (g[a:b, None] / temperature)).to(logits.dtype)
        return grad.view(logits.shape), None, None, None, None


def entropy_from_logits(
    logits: torch.Tensor, *, tp_group=None, vocab_size: int | None = None, temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Entropy of softmax(logits/T) per token (fp32), differentiable w.r.t. ``logits``."""
    return _Entropy.apply(logits, tp_group, vocab_size, temperature, chunk_size)


@torch.no_grad()
def global_topk(
    logits: torch.Tensor, k: int, *, tp_group=None, vocab_size: int | None = None, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the full vocabulary: values (scaled logits) and *global* ids, ``[..., k]``."""
    x = scaled_masked(logits, tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
    tp, rank = tp_size_rank(tp_group)
    kk = min(k, x.shape[-1])
    vals, idx = torch.topk(x, kk, dim=-1)
    idx = idx + rank * x.shape[-1]
    if tp > 1:
        # k candidates from every shard: the global top-k is among these k·TP.
        all_vals = [torch.empty_like(vals) for _ in range(tp)]
        all_idx = [torch.empty_like(idx) for _ in range(tp)]
        dist.all_gather(all_vals, vals.contiguous(), group=tp_group)
        dist.all_gather(all_idx, idx.contiguous(), group=tp_group)
        vals, idx = torch.cat(all_vals, -1), torch.cat(all_idx, -1)
    top_vals, pos = torch.topk(vals, min(k, vals.shape[-1]), dim=-1)
    return top_vals, idx.gather(-1, pos)


class _ReduceIdentityGrad(torch.autograd.Function):
    """All-reduce SUM forward, identity backward: every TP rank then computes the same loss
    from the reduced value, so each receives the full upstream gradient for its own part."""

    @staticmethod
    def forward(ctx, t, tp_group):
        return _all_reduce(t.clone(), dist.ReduceOp.SUM, tp_group)

    @staticmethod
    def backward(ctx, g):
        return g, None


class _ReduceReduceGrad(torch.autograd.Function):
    """All-reduce SUM forward *and* backward: for a reduced value (like the softmax normaliser)
    that each rank then uses in its own, different, local computation, the gradient w.r.t.
    it is the sum of every rank's contribution."""

    @staticmethod
    def forward(ctx, t, tp_group):
        ctx.tp_group = tp_group
        return _all_reduce(t.clone(), dist.ReduceOp.SUM, tp_group)

    @staticmethod
    def backward(ctx, g):
        return _all_reduce(g.clone(), dist.ReduceOp.SUM, ctx.tp_group), None


def reduce_sum(t: torch.Tensor, tp_group) -> torch.Tensor:
    """Differentiable sum over TP shards whose result feeds a computation that is identical
    on every rank (a per-token loss): identity backward (see :class:`_ReduceIdentityGrad`)."""
    return _ReduceIdentityGrad.apply(t, tp_group)


def log_softmax(logits: torch.Tensor, *, tp_group=None, vocab_size=None, temperature: float = 1.0) -> torch.Tensor:
    """Differentiable local shard of the *global* log-softmax ``[..., V/tp]`` (fp32).

    Padding gets a huge *finite* negative value instead of −inf: its probability is still
    exactly 0, but expressions like p·(log p − log q) stay 0 instead of 0·NaN in autograd."""
    x = scaled_masked(logits, tp_group=tp_group, vocab_size=vocab_size, temperature=temperature, fill=PAD_FILL)
    m = x.detach().max(dim=-1, keepdim=True).values
    _all_reduce(m, dist.ReduceOp.MAX, tp_group)
    # The normaliser feeds every rank's own shard of log p: its gradient is summed over ranks.
    s = _ReduceReduceGrad.apply(torch.exp(x - m).sum(-1, keepdim=True), tp_group)
    return (x - m) - torch.log(s)


def gather_at(logits_or_logp: torch.Tensor, ids: torch.Tensor, *, tp_group=None) -> torch.Tensor:
    """Differentiable values at *global* ids ``[..., k]`` from a vocab-parallel tensor."""
    _, rank = tp_size_rank(tp_group)
    own, local = _owned(ids, logits_or_logp.shape[-1], rank)
    picked = logits_or_logp.gather(-1, local)
    picked = torch.where(own, picked, torch.zeros((), dtype=picked.dtype))
    return reduce_sum(picked, tp_group)
