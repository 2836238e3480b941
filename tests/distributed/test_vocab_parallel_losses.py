"""Every vocab-parallel loss function at TP=1, 2 and 4 equals a plain single-process PyTorch
reference (fp64) on the gathered logits: values and gradients, with a padded vocabulary whose
padding columns hold large junk, temperature != 1, chunking that does not divide the token
count, extreme logits (±1e4) and bf16 inputs. Also the pipeline broadcast helper.

One spawned world of 4 ranks holds every layout at once: a group of one per rank (TP=1),
two groups of two (TP=2) and the world (TP=4); process start-up costs seconds on 2 cores.

Tolerances (vs fp64 on the same, possibly bf16-rounded, inputs):
  fp32 inputs: values and gradients rtol = atol = 2e-6;
  ±1e4 logits: rtol 1e-5, atol 2e-3 (divergences of size ~1e4 carry ~1e-3 of fp32 rounding);
  bf16 inputs: values as fp32 (computed in fp32), gradients rtol 1e-2, atol 1e-3
  (they are returned in the input dtype, bf16: 2^-8 relative).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from copd_megatron import losses as L
from copd_megatron.distributed.comm import broadcast_from_last_stage
from copd_megatron.testing import run_distributed

V, VOCAB, B, T = 64, 61, 3, 5  # padded vocabulary 64 (divisible by 4), true vocabulary 61
K, CHUNK, BETA_JSD = 5, 4, 0.3  # chunk 4 does not divide the 15 tokens
CASES = [("float32", False, 0.7), ("float32", True, 1.3), ("bfloat16", False, 0.7)]  # dtype, extreme, temperature
TPS = (1, 2, 4)


def _inputs(dtype_name: str, extreme: bool):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, V, generator=g) * 3
    t = s + torch.randn(B, T, V, generator=g)  # a teacher close to the student
    s[..., VOCAB:] = t[..., VOCAB:] = 1e4 if extreme else 50.0  # junk in the padding: must be ignored
    if extreme:
        s[0, 0, 5], s[0, 1, 40], t[0, 2, 7], s[1, 0, :VOCAB], t[1, 1, 3] = 1e4, -1e4, 1e4, -1e4, -1e4
    y = torch.randint(0, VOCAB, (B, T), generator=g)
    ids = torch.randint(0, VOCAB, (B, T, 3), generator=g)
    up = torch.randn(B, T, generator=g)  # upstream gradient weights
    mask = (torch.rand(B, T, generator=g) > 0.3).float()
    old = torch.randn(B, T, generator=g) * 0.3  # old log-prob offsets: some tokens get clipped
    adv = torch.randn(B, 1, generator=g)
    dtype = getattr(torch, dtype_name)
    return s.to(dtype), t.to(dtype), y, ids, up, mask, old, adv


# ---- the plain single-process reference (fp64, gathered logits, padding dropped) --------------
def _lsm(z, temp):
    return F.log_softmax(z[..., :VOCAB] / temp, -1)


def _kl(lp, lq):
    return (lp.exp() * (lp - lq)).sum(-1)


def _ref_jsd(ls, lt, beta):
    lm = torch.logsumexp(torch.stack([lt + math.log(beta), ls + math.log(1 - beta)]), 0)
    return beta * _kl(lt, lm) + (1 - beta) * _kl(ls, lm)


def _ref_topk_kl(s, t, temp):
    vals, ids = torch.topk(t[..., :VOCAB] / temp, K, -1)
    lt, ls = F.log_softmax(vals, -1), F.log_softmax(s.gather(-1, ids) / temp, -1)
    return _kl(lt, ls)


def _ref_policy(s, t, y, ids, mask, old, adv, temp):
    lp = _lsm(s, temp).gather(-1, y[..., None]).squeeze(-1)
    ratio = torch.exp(torch.where(mask > 0, lp - (lp.detach() + old), torch.zeros(())))
    loss = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.28) * adv) * mask
    return loss.sum() / mask.sum()


def _reference(name, s, t, y, ids, mask, old, adv, temp):
    ls, lt = _lsm(s, temp), _lsm(t, temp)
    return {
        "logprobs": lambda: ls.gather(-1, y[..., None]).squeeze(-1),
        "logprobs_unchunked": lambda: ls.gather(-1, y[..., None]).squeeze(-1),
        "entropy": lambda: -(ls.exp() * ls).sum(-1),
        "log_softmax": lambda: ls.gather(-1, ids),
        "gather_at": lambda: s.gather(-1, ids),
        "reverse_kl": lambda: _kl(ls, lt),
        "forward_kl": lambda: _kl(lt, ls),
        "jsd": lambda: _ref_jsd(ls, lt, BETA_JSD),
        "symmetric_kl": lambda: _kl(ls, lt) + _kl(lt, ls),
        "topk_kl": lambda: _ref_topk_kl(s, t, temp),
        "policy_loss": lambda: _ref_policy(s, t, y, ids, mask, old, adv, temp),
    }[name]()


# ---- ours, on a shard ------------------------------------------------------------------------
def _ours(name, s, t, y, ids, mask, old, adv, temp, group):
    kw = dict(tp_group=group, vocab_size=VOCAB, temperature=temp)
    if name == "logprobs":
        return L.token_logprobs(s, y, chunk_size=CHUNK, **kw)
    if name == "logprobs_unchunked":
        return L.token_logprobs(s, y, **kw)
    if name == "entropy":
        return L.entropy_from_logits(s, chunk_size=CHUNK, **kw)
    if name == "log_softmax":  # the local shard of the global log-softmax, read at global ids
        return L.gather_at(L.log_softmax(s, **kw), ids, tp_group=group)
    if name == "gather_at":
        return L.gather_at(s, ids, tp_group=group).float()
    if name in ("reverse_kl", "forward_kl", "symmetric_kl"):
        return L.vocab_divergence(s, t, name, chunk_size=CHUNK, **kw)
    if name == "jsd":
        return L.vocab_divergence(s, t, "jsd", beta=BETA_JSD, chunk_size=CHUNK, **kw)
    if name == "topk_kl":
        return L.topk_kl(s, t, K, chunk_size=CHUNK, **kw)
    lp = L.token_logprobs(s, y, chunk_size=CHUNK, **kw)
    per_token, _ = L.policy_loss(lp, lp.detach() + old, adv, mask)
    num, den = L.aggregate(per_token, mask, "token_mean")
    return num / den


NAMES = ["logprobs", "logprobs_unchunked", "entropy", "log_softmax", "gather_at", "reverse_kl", "forward_kl",
         "jsd", "symmetric_kl", "topk_kl", "policy_loss"]  # fmt: skip


def _case(dtype_name, extreme, temp, group, tp, pos) -> dict:
    """This rank's results on shard ``pos`` of ``tp`` (its place in its TP group, known from how the
    groups were built — not from the functions under test)."""
    s, t, y, ids, up, mask, old, adv = _inputs(dtype_name, extreme)
    lo, hi = pos * V // tp, (pos + 1) * V // tp
    out = {}
    for name in NAMES:
        shard = s[..., lo:hi].clone().requires_grad_(True)
        teacher = t[..., lo:hi].clone().requires_grad_(True)  # must receive no gradient
        val = _ours(name, shard, teacher, y, ids, mask, old, adv, temp, group)
        weights = up[..., None] if val.dim() == 3 else up if val.dim() == 2 else 1.0
        (val * weights).sum().backward()
        out[name] = (val.detach(), shard.grad.float(), teacher.grad)
    kw = dict(tp_group=group, vocab_size=VOCAB)
    sl, tl = s[..., lo:hi], t[..., lo:hi]
    student_lp = L.token_logprobs(sl, y, temperature=temp, **kw)
    teacher_lp = L.token_logprobs(tl, y, temperature=temp, **kw)
    disjoint_s, disjoint_t = torch.zeros(B, T, V), torch.zeros(B, T, V)
    disjoint_s[..., :10], disjoint_t[..., 30:40] = 5.0, 5.0  # top-10 sets {0..9} and {30..39}
    out["topk"] = L.global_topk(sl, K, temperature=temp, chunk_size=CHUNK, **kw)
    out["overlap"] = L.topk_overlap(sl, tl, mask, 10, **kw)
    out["overlap_self"] = L.topk_overlap(sl, sl.float() + 3.0, mask, 10, **kw)[1]  # same distribution
    out["overlap_disjoint"] = L.topk_overlap(disjoint_s[..., lo:hi], disjoint_t[..., lo:hi], mask, 10, **kw)[1]
    out["symkl"] = L.symmetric_kl(sl, tl, mask, temperature=temp, **kw)
    out["opd_adv"] = L.opd_advantage(teacher_lp, student_lp, 0.5, mask)
    out["opd_adv_self"] = L.opd_advantage(student_lp, student_lp, 1.0, mask)
    return out


def _pp_broadcast() -> dict:
    rank = dist.get_rank()
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]  # two 2-stage pipelines
    last = rank == 3
    payload = {"logprobs": torch.arange(6.0).view(2, 3), "ids": torch.tensor([[7, 8]])} if last else None
    got = {
        "dict": broadcast_from_last_stage(payload, dist.group.WORLD),
        "tensor": broadcast_from_last_stage(torch.full((2,), 5.0) if last else None, dist.group.WORLD),
        "object": broadcast_from_last_stage({"overlap": 0.9} if last else None, dist.group.WORLD),
        "pair": broadcast_from_last_stage(torch.tensor([float(rank)]) if rank >= 2 else None, pairs[rank % 2]),
        "none_group": broadcast_from_last_stage("mine", None),
    }
    return got


def _world() -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    groups = {}
    for tp in TPS:  # every rank creates every group, in the same order (a collective)
        for start in range(0, world, tp):
            g = dist.new_group(list(range(start, start + tp)))
            if start <= rank < start + tp:
                groups[tp] = (g, rank - start)
    # Groups that do not hold global rank 0 (ranks 2-3 at TP=2, as the second data-parallel replica of
    # a TP=2×DP=2 layout; ranks 1, 2, 3 at TP=1) must use their group rank for the shard offset.
    results = {tp: [_case(d, e, temp, groups[tp][0], tp, groups[tp][1]) for d, e, temp in CASES] for tp in TPS}
    return {"tp": results, "pp": _pp_broadcast()}


@pytest.fixture(scope="module")
def world():
    return run_distributed(_world, 4, timeout=150)


def _tolerances(dtype_name, extreme):
    tol = dict(rtol=1e-5, atol=2e-3) if extreme else dict(rtol=2e-6, atol=2e-6)
    return tol, (dict(rtol=1e-2, atol=1e-3) if dtype_name == "bfloat16" else tol)


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{d}-{'extreme' if e else 'normal'}-T{t}" for d, e, t in CASES])
def test_values_and_gradients_match_reference(world, case):
    dtype_name, extreme, temp = CASES[case]
    s, t, y, ids, up, mask, old, adv = _inputs(dtype_name, extreme)
    tol, grad_tol = _tolerances(dtype_name, extreme)
    for name in NAMES:
        leaf = s.double().clone().requires_grad_(True)
        ref = _reference(name, leaf, t.double(), y, ids, mask.double(), old.double(), adv.double(), temp)
        weights = up.double()[..., None] if ref.dim() == 3 else up.double() if ref.dim() == 2 else 1.0
        (ref * weights).sum().backward()
        ref_grad = torch.cat([leaf.grad[..., :VOCAB], torch.zeros(B, T, V - VOCAB, dtype=torch.float64)], -1)
        for tp, start in ((tp, start) for tp in TPS for start in range(0, len(world), tp)):  # every group
            ranks = [world[r]["tp"][tp][case][name] for r in range(start, start + tp)]
            val, grad = ranks[0][0], torch.cat([r[1] for r in ranks], -1)
            where = f"{name} tp={tp} ranks {start}..{start + tp - 1} {CASES[case]}"
            assert torch.isfinite(val).all() and torch.isfinite(grad).all(), where
            assert all(r[2] is None for r in ranks), f"{where}: the teacher received a gradient"
            for r in ranks[1:]:  # every rank of the group holds the same per-token result
                assert torch.equal(r[0], val), where
            torch.testing.assert_close(val, ref.detach().float(), **tol, msg=lambda m, w=where: f"{w} value: {m}")
            torch.testing.assert_close(grad, ref_grad.float(), **grad_tol, msg=lambda m, w=where: f"{w} grad: {m}")
            assert grad[..., VOCAB:].abs().max() == 0, f"{where}: padded vocabulary got a gradient"


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{d}-{'extreme' if e else 'normal'}-T{t}" for d, e, t in CASES])
def test_topk_overlap_symmetric_kl_and_opd_advantage(world, case):
    dtype_name, extreme, temp = CASES[case]
    s, t, y, ids, up, mask, old, adv = _inputs(dtype_name, extreme)
    tol, _ = _tolerances(dtype_name, extreme)
    x, xt = s.float().clone(), t.float().clone()
    x[..., VOCAB:] = xt[..., VOCAB:] = float("-inf")
    ref_lp_s = _lsm(s.double(), temp).gather(-1, y[..., None]).squeeze(-1)
    ref_lp_t = _lsm(t.double(), temp).gather(-1, y[..., None]).squeeze(-1)
    ref_sym = _kl(_lsm(s.double(), temp), _lsm(t.double(), temp)) + _kl(_lsm(t.double(), temp), _lsm(s.double(), temp))
    for tp, rank in ((tp, r) for tp in TPS for r in range(len(world))):  # every rank of every group
        out = world[rank]["tp"][tp][case]
        vals, top_ids = out["topk"]
        # The same values as a full-vocabulary top-k, and the ids point at them (ties may reorder ids).
        torch.testing.assert_close(vals, torch.topk(x / temp, K, -1).values, rtol=0, atol=0)
        assert torch.equal(x.gather(-1, top_ids) / temp, vals) and int(top_ids.max()) < VOCAB, f"top-k tp={tp}"
        per_token, mean = out["overlap"]
        a, b = torch.topk(x, 10, -1).indices, torch.topk(xt, 10, -1).indices
        ref_per = (a[..., :, None] == b[..., None, :]).any(-1).sum(-1).float() / 10
        assert torch.equal(per_token, ref_per), f"overlap tp={tp}"
        assert float(mean) == pytest.approx(float((ref_per * mask).sum() / mask.sum()), abs=1e-6)
        assert float(out["overlap_self"]) == 1.0 and float(out["overlap_disjoint"]) == 0.0
        sym_per, sym_mean = out["symkl"]
        torch.testing.assert_close(sym_per, ref_sym.float(), **tol)
        assert float(sym_mean) == pytest.approx(float((ref_sym * mask).sum() / mask.sum()), rel=1e-5, abs=1e-3)
        torch.testing.assert_close(out["opd_adv"], (0.5 * (ref_lp_t - ref_lp_s) * mask).float(), **tol)
        assert torch.equal(out["opd_adv_self"], torch.zeros(B, T)), "OPD advantage must be exactly 0 for teacher == student"


def test_broadcast_from_last_stage(world):
    for rank, out in enumerate(world):
        pp = out["pp"]
        assert torch.equal(pp["dict"]["logprobs"], torch.arange(6.0).view(2, 3))
        assert torch.equal(pp["dict"]["ids"], torch.tensor([[7, 8]]))
        assert torch.equal(pp["tensor"], torch.full((2,), 5.0))
        assert pp["object"] == {"overlap": 0.9}
        assert pp["pair"].item() == float(2 + rank % 2)  # the last stage of pipeline [0, 2] is 2, of [1, 3] is 3
        assert pp["none_group"] == "mine"
