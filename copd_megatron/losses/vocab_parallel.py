"""Log-probs, entropy and top-k over vocab-parallel logits, without gathering the vocabulary.

TP rank r holds logits ``z^(r)`` for vocabulary ids ``[r·V/tp, (r+1)·V/tp)`` (Megatron's
``VocabUtility`` convention), shape ``[..., V/tp]``. With temperature T the sampling
distribution is softmax(z/T); every function here applies the same T so trainer log-probs
match what the sampler drew from. Vocabulary padding (ids >= ``vocab_size``, added so TP
divides the vocabulary) is treated as −inf: it never has probability mass, never receives a
gradient and is never in a top-k. ``tp_group=None`` means no tensor parallelism.

Token log-probs (per token, x = z/T):
    m    = all_reduce_MAX(max_j x_j)                      (detached: its gradient cancels)
    logZ = m + log all_reduce_SUM(Σ_j exp(x_j − m))
    log p(y) = all_reduce_SUM(x_y − m if y is on this rank else 0) − (logZ − m)
    ∂ log p(y)/∂z_j = (1[j = y] − p_j) / T                  (local: backward needs no collective)
Entropy: H = −Σ_j p_j log p_j = logZ − E_p[x],   ∂H/∂z_j = −p_j (log p_j + H) / T.

Both run over chunks of the flattened token dimension (``chunk_size``); inside a chunk the
work is fp32 whatever the input dtype (bf16 logits are fine) and outputs are fp32. Forward
saves the input logits (no copy) and two fp32 numbers per token (m, log Σ exp); backward
recomputes the softmax of one chunk at a time, so the peak never holds an fp32 copy of all
logits, only one ``[chunk, V/tp]`` fp32 buffer (plus the gradient in the input dtype).

Global top-k: local top-k on each shard, all-gather the k·TP candidates with their global
ids, top-k again: O(k·TP) per token, never O(V).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NEG_INF = float("-inf")
PAD_FILL = -1e30  # finite "minus infinity" for differentiable paths (exp underflows to exactly 0)


def tp_size_rank(tp_group) -> tuple[int, int]:
    """(size, rank) of ``tp_group``; (1, 0) for ``None`` or without a process group."""
    if tp_group is None or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(tp_group), dist.get_rank(tp_group)


def vocab_range(v_local: int, tp_group) -> tuple[int, int]:
    """Global ids ``[lo, hi)`` held by this rank's shard of width ``v_local``."""
    _, rank = tp_size_rank(tp_group)
    return rank * v_local, (rank + 1) * v_local


def _all_reduce(t: torch.Tensor, op, tp_group) -> torch.Tensor:
    if tp_size_rank(tp_group)[0] > 1:
        dist.all_reduce(t, op=op, group=tp_group)
    return t


def scaled_masked(
    logits: torch.Tensor, *, tp_group, vocab_size: int | None, temperature: float, fill: float = NEG_INF
) -> torch.Tensor:
    """fp32 ``logits / T`` with padded vocabulary entries set to ``fill`` (always a new tensor)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (greedy decoding has no log-probs)")
    x = logits.to(torch.float32, copy=True)  # one fp32 buffer per chunk, never an alias of the input
    if temperature != 1.0:
        x.div_(temperature)
    lo, hi = vocab_range(x.shape[-1], tp_group)
    if vocab_size is not None and hi > vocab_size:
        x[..., max(vocab_size - lo, 0) :] = fill
    return x


def max_and_logsum(x: torch.Tensor, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """``m`` and ``log Σ exp(x − m)`` over the whole (sharded) vocabulary; logZ = m + that.

    Kept apart: forming ``x_y − m`` before subtracting the small log-sum avoids cancelling two
    large numbers (logits of ±1e4 would lose 1e-3 in fp32). No gradient."""
    m = x.max(dim=-1).values
    _all_reduce(m, dist.ReduceOp.MAX, tp_group)  # global max over the vocabulary, for stability
    s = torch.exp(x - m.unsqueeze(-1)).sum(-1)
    _all_reduce(s, dist.ReduceOp.SUM, tp_group)  # Σ exp over every shard: the partition function
    return m, torch.log(s)


def chunks(n: int, chunk_size: int | None) -> list[tuple[int, int]]:
    """``[(start, end)]`` row ranges of at most ``chunk_size`` rows (all rows for None / <= 0).

    Every TP rank sees the same token count, so every rank runs the same number of chunks and
    the per-chunk collectives pair up."""
    step = n if not chunk_size or chunk_size <= 0 else chunk_size
    return [(i, min(i + step, n)) for i in range(0, n, max(step, 1))]


def _owned(targets: torch.Tensor, v_local: int, tp_group) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of targets on this shard and their local indices (0 where not owned)."""
    lo, hi = vocab_range(v_local, tp_group)
    own = (targets >= lo) & (targets < hi)
    return own, torch.where(own, targets - lo, torch.zeros_like(targets))


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp_group, vocab_size, temperature, chunk_size):
        z, y = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
        own, local = _owned(y, z.shape[-1], tp_group)
        out = torch.empty(y.shape[0], dtype=torch.float32, device=z.device)
        m, log_s = torch.empty_like(out), torch.empty_like(out)
        single = tp_size_rank(tp_group)[0] == 1
        for a, b in chunks(y.shape[0], chunk_size):
            x = scaled_masked(z[a:b], tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
            if single:  # one shard: torch's fused log-softmax, same numerics ((x − m) − log s)
                out[a:b] = torch.log_softmax(x, -1).gather(-1, y[a:b, None]).squeeze(-1)
                continue
            m[a:b], log_s[a:b] = max_and_logsum(x, tp_group)
            shifted = x.gather(-1, local[a:b, None]).squeeze(-1) - m[a:b]
            picked = torch.where(own[a:b], shifted, torch.zeros((), device=x.device))
            # Exactly one rank owns each target: the sum hands every rank x_y − m.
            out[a:b] = _all_reduce(picked, dist.ReduceOp.SUM, tp_group) - log_s[a:b]
        ctx.save_for_backward(logits, own, local, m, log_s)
        ctx.cfg = (tp_group, vocab_size, temperature, chunk_size)
        return out.view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, own, local, m, log_s = ctx.saved_tensors
        tp_group, vocab_size, temperature, chunk_size = ctx.cfg
        z = logits.reshape(-1, logits.shape[-1])
        g = grad_out.reshape(-1).float()
        grad = torch.empty(z.shape, dtype=logits.dtype, device=z.device)
        single = tp_size_rank(tp_group)[0] == 1
        for a, b in chunks(z.shape[0], chunk_size):
            x = scaled_masked(z[a:b], tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
            if single:
                p = torch.softmax(x, -1)  # fused; recomputed per chunk instead of stored
            else:  # the saved global m, log s: no collective in backward
                p = x.sub_(m[a:b, None]).sub_(log_s[a:b, None]).exp_()  # in place: one fp32 chunk buffer
            scale = g[a:b] / temperature
            p.mul_(-scale[:, None])  # −p_j · g / T
            rows = torch.arange(b - a, device=p.device)[own[a:b]]
            p[rows, local[a:b][own[a:b]]] += scale[own[a:b]]  # + 1[j = y] · g / T on the owning shard
            grad[a:b] = p.to(logits.dtype)
        return grad.view(logits.shape), None, None, None, None, None


def token_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, tp_group=None, vocab_size: int | None = None,
    temperature: float = 1.0, chunk_size: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """fp32 ``log softmax(logits/T)[target]`` per token, shape ``targets.shape``.

    ``logits [..., V/tp]`` (any float dtype), ``targets [...]`` with *global* vocabulary ids
    (< ``vocab_size``); differentiable w.r.t. ``logits``. ``chunk_size`` tokens per fp32 chunk."""
    return _TokenLogprobs.apply(logits, targets, tp_group, vocab_size, temperature, chunk_size)


class _Entropy(torch.autograd.Function):
    # H = −Σ_j p_j log p_j with log p_j = (x_j − m) − log s formed per element: subtracting two
    # large numbers (logZ − E_p[x]) would lose the digits of a small entropy.
    @staticmethod
    def forward(ctx, logits, tp_group, vocab_size, temperature, chunk_size):
        z = logits.reshape(-1, logits.shape[-1])
        ent = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
        m, log_s = torch.empty_like(ent), torch.empty_like(ent)
        for a, b in chunks(z.shape[0], chunk_size):
            x = scaled_masked(z[a:b], tp_group=tp_group, vocab_size=vocab_size, temperature=temperature, fill=PAD_FILL)
            m[a:b], log_s[a:b] = max_and_logsum(x, tp_group)
            logp = x.sub_(m[a:b, None]).sub_(log_s[a:b, None])  # in place; padding: p = 0 exactly
            plogp = (logp.exp() * logp).sum(-1)
            ent[a:b] = -_all_reduce(plogp, dist.ReduceOp.SUM, tp_group)  # Σ_j p_j log p_j over every shard
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
        for a, b in chunks(z.shape[0], chunk_size):
            x = scaled_masked(z[a:b], tp_group=tp_group, vocab_size=vocab_size, temperature=temperature, fill=PAD_FILL)
            logp = x.sub_(m[a:b, None]).sub_(log_s[a:b, None])
            # ∂H/∂x_j = −p_j (log p_j + H): local, H was all-reduced in forward. Padding: p = 0.
            d = logp.exp().mul_(logp.add(ent[a:b, None])).mul_(-(g[a:b, None] / temperature))
            grad[a:b] = d.to(logits.dtype)
        return grad.view(logits.shape), None, None, None, None


def entropy_from_logits(
    logits: torch.Tensor, *, tp_group=None, vocab_size: int | None = None, temperature: float = 1.0,
    chunk_size: int | None = None,
) -> torch.Tensor:  # fmt: skip
    """Entropy of softmax(logits/T) per token ``[...]`` (fp32, nats), differentiable w.r.t. ``logits``."""
    return _Entropy.apply(logits, tp_group, vocab_size, temperature, chunk_size)


@torch.no_grad()
def global_topk(
    logits: torch.Tensor, k: int, *, tp_group=None, vocab_size: int | None = None, temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Top-k of the full vocabulary: values (fp32 logits / T) and *global* ids, both ``[..., k]``,
    identical on every TP rank, sorted descending. Padded ids are never returned (while the
    true vocabulary has at least k entries)."""
    tp, _ = tp_size_rank(tp_group)
    z = logits.reshape(-1, logits.shape[-1])
    lo, _ = vocab_range(z.shape[-1], tp_group)
    out_v = torch.empty(z.shape[0], k, dtype=torch.float32, device=z.device)
    out_i = torch.empty(z.shape[0], k, dtype=torch.long, device=z.device)
    for a, b in chunks(z.shape[0], chunk_size):
        x = scaled_masked(z[a:b], tp_group=tp_group, vocab_size=vocab_size, temperature=temperature)
        vals, idx = torch.topk(x, min(k, x.shape[-1]), dim=-1)
        idx = idx + lo  # local → global ids
        if tp > 1:
            # k candidates from every shard: the global top-k is among these k·TP.
            all_vals = [torch.empty_like(vals) for _ in range(tp)]
            all_idx = [torch.empty_like(idx) for _ in range(tp)]
            dist.all_gather(all_vals, vals.contiguous(), group=tp_group)
            dist.all_gather(all_idx, idx.contiguous(), group=tp_group)
            vals, idx = torch.cat(all_vals, -1), torch.cat(all_idx, -1)
        if vals.shape[-1] < k:
            raise ValueError(f"k={k} exceeds the vocabulary ({vals.shape[-1]} entries)")
        top_vals, pos = torch.topk(vals, k, dim=-1)
        out_v[a:b], out_i[a:b] = top_vals, idx.gather(-1, pos)
    shape = (*logits.shape[:-1], k)
    return out_v.view(shape), out_i.view(shape)


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


def log_softmax(
    logits: torch.Tensor, *, tp_group=None, vocab_size: int | None = None, temperature: float = 1.0
) -> torch.Tensor:
    """Differentiable local shard ``[..., V/tp]`` (fp32) of the *global* log-softmax of logits / T.

    Not chunked (it returns a full fp32 tensor); the losses use the chunked functions. Padding
    gets a huge *finite* negative value instead of −inf: its probability is still exactly 0,
    but expressions like p·(log p − log q) stay 0 instead of 0·NaN in autograd."""
    x = scaled_masked(logits, tp_group=tp_group, vocab_size=vocab_size, temperature=temperature, fill=PAD_FILL)
    m = x.detach().max(dim=-1, keepdim=True).values
    _all_reduce(m, dist.ReduceOp.MAX, tp_group)  # global max, detached: log-softmax is shift-invariant
    # The normaliser feeds every rank's own shard of log p: its gradient is summed over ranks.
    s = _ReduceReduceGrad.apply(torch.exp(x - m).sum(-1, keepdim=True), tp_group)
    return (x - m) - torch.log(s)


def gather_at(logits_or_logp: torch.Tensor, ids: torch.Tensor, *, tp_group=None) -> torch.Tensor:
    """Differentiable values ``[..., k]`` at *global* ids ``[..., k]`` from a vocab-parallel
    tensor ``[..., V/tp]`` (in its dtype), identical on every rank. Gradient flows to the
    owning shard only (identity backward of the sum, see :func:`reduce_sum`)."""
    own, local = _owned(ids, logits_or_logp.shape[-1], tp_group)
    picked = logits_or_logp.gather(-1, local)
    picked = torch.where(own, picked, torch.zeros((), dtype=picked.dtype, device=picked.device))
    return reduce_sum(picked, tp_group)  # one owner per id: the sum is that owner's value
