"""Every vocab-parallel loss at TP=1, 2 and 4 equals a plain PyTorch reference on the gathered
logits: values and gradients, with padded vocabulary, masks, temperature != 1, chunking,
extreme logits (±1e4) and bf16 inputs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from copd_megatron import losses as L
from copd_megatron.testing import run_distributed

V, VOCAB, N = 64, 61, 12  # padded vocabulary of 64 (divisible by 4), true vocabulary 61
T = 0.7


def _inputs(dtype=torch.float32, extreme=False):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(N, V, generator=g) * 3
    t = s + torch.randn(N, V, generator=g)  # a teacher close to the student
    if extreme:
        s[0, 5], s[1, 40], t[2, 7], s[3, :] = 1e4, -1e4, 1e4, -1e4
    y = torch.randint(0, VOCAB, (N,), generator=g)
    up = torch.randn(N, generator=g)
    mask = (torch.rand(N, generator=g) > 0.25).float()
    return s.to(dtype), t.to(dtype), y, up, mask


def _ref_logsoftmax(z, temperature=1.0):
    """Plain log-softmax over the true vocabulary only (the padding columns are dropped)."""
    return F.log_softmax(z.double()[..., :VOCAB] / temperature, -1)


def _ref_kl(lp, lq):
    return (lp.exp() * (lp - lq)).sum(-1)


REFERENCES = {
    "logprobs": lambda s, t, y: _ref_logsoftmax(s, T).gather(-1, y[:, None]).squeeze(-1),
    "entropy": lambda s, t, y: -(_ref_logsoftmax(s, T).exp() * _ref_logsoftmax(s, T)).sum(-1),
    "reverse_kl": lambda s, t, y: _ref_kl(_ref_logsoftmax(s), _ref_logsoftmax(t)),
    "forward_kl": lambda s, t, y: _ref_kl(_ref_logsoftmax(t), _ref_logsoftmax(s)),
    "jsd": lambda s, t, y: _ref_jsd(_ref_logsoftmax(s), _ref_logsoftmax(t), 0.3),
    "topk_kl": lambda s, t, y: _ref_topk_kl(s, t, 5),
}  # fmt: skip


def _ref_jsd(ls, lt, beta):
    m = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), 0)
    return beta * _ref_kl(lt, m) + (1 - beta) * _ref_kl(ls, m)


def _ref_topk_kl(s, t, k):
    vals, ids = torch.topk(t.double()[:, :VOCAB], k, -1)
    lt, ls = F.log_softmax(vals, -1), F.log_softmax(s.double().gather(-1, ids), -1)
    return (lt.exp() * (lt - ls)).sum(-1)


def _ours(name, s, t, y, tp):
    kw = dict(tp_group=tp, vocab_size=VOCAB)
    if name == "logprobs":
        return L.token_logprobs(s, y, temperature=T, chunk_size=5, **kw)
    if name == "entropy":
        return L.entropy_from_logits(s, temperature=T, chunk_size=5, **kw)
    if name in ("reverse_kl", "forward_kl"):
        return L.vocab_divergence(s, t, name, **kw)
    if name == "jsd":
        return L.vocab_divergence(s, t, "jsd", beta=0.3, **kw)
    return L.topk_kl(s, t, 5, **kw)


CASES = [("float32", False), ("float32", True), ("bfloat16", False)]


def _worker_all() -> list[dict]:
    """Every case in one world (process start-up costs seconds on 2 cores)."""
    return [_worker(d, e) for d, e in CASES]


def _worker(dtype_name: str, extreme: bool) -> dict:
    dtype = getattr(torch, dtype_name)
    tp, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD if tp > 1 else None
    s, t, y, up, mask = _inputs(dtype, extreme)
    lo, hi = rank * V // tp, (rank + 1) * V // tp
    out = {}
    for name in REFERENCES:
        shard = s[:, lo:hi].clone().requires_grad_(True)
        val = _ours(name, shard, t[:, lo:hi], y, group)
        (val * up).sum().backward()
        out[name] = (val.detach(), shard.grad.float())
    ids = L.global_topk(s[:, lo:hi], 4, tp_group=group, vocab_size=VOCAB)
    overlap_self = L.topk_overlap(s[:, lo:hi], s[:, lo:hi], mask, 10, tp_group=group, vocab_size=VOCAB)[1]
    symkl = L.symmetric_kl(s[:, lo:hi], t[:, lo:hi], mask, tp_group=group, vocab_size=VOCAB)[1]
    overlap = L.topk_overlap(s[:, lo:hi], t[:, lo:hi], mask, 10, tp_group=group, vocab_size=VOCAB)[1]
    return {"fns": out, "topk_ids": ids, "overlap_self": overlap_self, "overlap": overlap, "symkl": symkl}


def test_losses_match_reference_at_tp_1_2_4():
    worlds = {tp: run_distributed(_worker_all, tp, timeout=180) for tp in (1, 2, 4)}
    for i, (dtype, extreme) in enumerate(CASES):
        _check_case(dtype, extreme, {tp: [rank[i] for rank in ranks] for tp, ranks in worlds.items()})


def _check_case(dtype: str, extreme: bool, worlds: dict) -> None:
    s, t, y, up, mask = _inputs(getattr(torch, dtype), extreme)
    # fp32 inputs: within 2e-6 of an fp64 reference; bf16 inputs (computed in fp32 from the
    # rounded logits): the same, the reference sees the same rounded values.
    tol = dict(rtol=2e-6, atol=2e-6)
    if extreme:  # logits of ±1e4: KL terms of size ~1e4 carry ~1e-3 absolute fp32 rounding
        tol = dict(rtol=1e-4, atol=1e-3)
    # bf16 logits: values are computed in fp32 (tight), gradients come back in bf16 (2^-8 relative).
    grad_tol = dict(rtol=1e-2, atol=1e-3) if dtype == "bfloat16" else tol
    refs = {}
    for name, fn in REFERENCES.items():
        leaf = s.double().clone().requires_grad_(True)  # exact (fp64) reference on the same inputs
        val = fn(leaf, t.double(), y)
        (val * up.double()).sum().backward()
        refs[name] = (val.detach().float(), leaf.grad.float())
    for tp, ranks in worlds.items():
        for name, (ref_val, ref_grad) in refs.items():
            val = ranks[0]["fns"][name][0]
            grad = torch.cat([r["fns"][name][1] for r in ranks], dim=-1)
            assert torch.isfinite(val).all() and torch.isfinite(grad).all(), f"{name} tp={tp}"
            torch.testing.assert_close(val, ref_val, **tol, msg=lambda m, n=name, k=tp: f"{n} value tp={k}: {m}")
            torch.testing.assert_close(grad, ref_grad, **grad_tol, msg=lambda m, n=name, k=tp: f"{n} grad tp={k}: {m}")
            assert grad[:, VOCAB:].abs().max() == 0, f"{name}: padded vocabulary got a gradient"
        x = s.float().clone()
        x[:, VOCAB:] = float("-inf")
        vals, ids = ranks[0]["topk_ids"]
        # Same values as a full-vocabulary top-k, and the ids point at them (ties may reorder ids).
        assert torch.equal(vals, torch.topk(x, 4, -1).values), f"global top-k tp={tp}"
        assert torch.equal(x.gather(-1, ids), vals) and int(ids.max()) < VOCAB
        assert float(ranks[0]["overlap_self"]) == 1.0
        ref_overlap = _ref_overlap(s, t, mask)
        assert float(ranks[0]["overlap"]) == pytest.approx(ref_overlap, abs=1e-6)
        ref_sym = ((REFERENCES["reverse_kl"](s, t, y) + REFERENCES["forward_kl"](s, t, y)) * mask).sum() / mask.sum()
        assert float(ranks[0]["symkl"]) == pytest.approx(float(ref_sym), rel=1e-4, abs=1e-5)


def _ref_overlap(s, t, mask, k=10):
    def ids(z):
        z = z.float().clone()
        z[:, VOCAB:] = float("-inf")
        return torch.topk(z, k, -1).indices

    a, b = ids(s), ids(t)
    per = torch.tensor([len(set(a[i].tolist()) & set(b[i].tolist())) / k for i in range(a.shape[0])])
    return float((per * mask).sum() / mask.sum())
