"""Loss formulas against hand-computed numbers, without a process group (tp_group=None).

The TP=1/2/4 equivalence with a gathered reference lives in
tests/distributed/test_vocab_parallel_losses.py; here: advantages, the clipped surrogate,
reference-KL estimators, aggregation, the OPD advantage, the JSD(β) convention, chunking,
temperature and padding on one shard.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from copd_megatron import losses as L
from copd_megatron.distributed.comm import broadcast_from_last_stage


# ---- group advantages ------------------------------------------------------------------------
def test_group_advantages_grpo_drgrpo_and_degenerate_groups():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv, degenerate = L.group_advantages(r, "grpo")
    assert degenerate == 1
    assert torch.equal(adv[1], torch.zeros(4))  # exactly zero, and counted
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)  # std 0.5
    std = math.sqrt((3 * 0.75**2 + 2.25**2) / 4)  # population std of (0, 0, 0, 3)
    torch.testing.assert_close(adv[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / (std + 1e-6))
    dr, n = L.group_advantages(r, "drgrpo")
    assert n == 1 and torch.equal(dr[1], torch.zeros(4))
    torch.testing.assert_close(dr[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]))


def test_group_advantages_flat_input_keeps_its_shape():
    flat = torch.tensor([0.0, 1.0, 2.0, 2.0, 5.0, 5.0])
    adv, degenerate = L.group_advantages(flat, "drgrpo", group_size=2)
    assert adv.shape == (6,) and degenerate == 2
    assert adv.tolist() == [-0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="group_size"):
        L.group_advantages(flat, group_size=4)
    with pytest.raises(ValueError, match="mode"):
        L.group_advantages(flat.view(3, 2), "ppo")


# ---- clipped surrogate -----------------------------------------------------------------------
def test_clipped_surrogate_asymmetric_clip_and_metrics():
    old = torch.zeros(5)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7, 0.75]))  # the ratios ρ
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0])
    loss, stats = L.policy_loss(logp, old, adv, mask, entropy=torch.full((5,), 2.0))
    # ρ=1.5, A>0: clipped at 1 + 0.28; ρ=0.5, A<0: −min(−0.5, −0.8) = 0.8 (clipped at 1 − 0.2);
    # ρ=1.1, A<0: unclipped; masked: 0; ρ=0.75, A>0: min(0.75, 0.8) = 0.75, unclipped.
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8, 1.1, 0.0, -0.75]))
    assert stats["clip_frac"].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]
    # approx_kl = k3 of KL(π_old ‖ π_θ) = 1/ρ + log ρ − 1 on each token (0 where masked).
    expect = [1 / 1.5 + math.log(1.5) - 1, 1 / 0.5 + math.log(0.5) - 1, 1 / 1.1 + math.log(1.1) - 1, 0.0,
              1 / 0.75 + math.log(0.75) - 1]  # fmt: skip
    torch.testing.assert_close(stats["approx_kl"], torch.tensor(expect))
    assert stats["entropy"].tolist() == [2.0] * 5
    assert L.masked_mean(stats["clip_frac"], mask).item() == pytest.approx(0.5)


def test_surrogate_gradient_is_cut_exactly_where_clipped():
    logp = torch.log(torch.tensor([1.5, 1.1])).requires_grad_(True)
    loss, _ = L.policy_loss(logp, torch.zeros(2), torch.tensor([1.0, 1.0]), torch.ones(2))
    loss.sum().backward()
    assert logp.grad[0] == 0.0  # clipped above 1 + ε_high: no gradient
    assert logp.grad[1].item() == pytest.approx(-1.1)  # d(−ρA)/d log π = −ρA


def test_masked_padding_never_produces_nan():
    logp = torch.tensor([[-1.0, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.2, float("-inf")]])
    mask = torch.tensor([[1.0, 0.0]])
    loss, stats = L.policy_loss(logp, old, torch.ones(1, 1), mask, ref_logprobs=old, ref_kl_coef=0.1)
    num, den = L.aggregate(loss, mask)
    (num / den).backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all() and loss[0, 1] == 0
    assert all(torch.isfinite(v).all() for v in stats.values())


def test_reference_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    r = -0.5  # log π_ref − log π_θ
    assert L.ref_kl(logp, ref, "k1").item() == pytest.approx(0.5)
    assert L.ref_kl(logp, ref, "k3").item() == pytest.approx(math.exp(r) - r - 1)
    assert L.ref_kl(logp, ref, "low_var_kl").item() == pytest.approx(math.exp(r) - r - 1)
    assert L.ref_kl(torch.tensor([-30.0]), torch.tensor([0.0]), "low_var_kl").item() == 10.0  # clamped
    loss, _ = L.policy_loss(logp, logp, torch.zeros(1), torch.ones(1), ref_logprobs=ref, ref_kl_coef=0.1,
                            ref_kl_estimator="k1")  # fmt: skip
    assert loss.item() == pytest.approx(0.05)
    with pytest.raises(ValueError, match="estimator"):
        L.ref_kl(logp, ref, "k9")


# ---- aggregation -----------------------------------------------------------------------------
def test_aggregation_modes_and_global_denominator():
    per = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0], [7.0, 7.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # row 3: padding row
    s, c = L.aggregate(per, mask, "token_mean")
    assert (s.item(), c.item()) == (10.0, 4.0)
    s, c = L.aggregate(per, mask, "seq_mean")
    assert (s / c).item() == pytest.approx((2 + 4) / 2)
    s, c = L.aggregate(per, mask, "drgrpo", max_len=8)
    assert (s / c).item() == pytest.approx((6 / 8 + 4 / 8) / 2)
    # Two data-parallel ranks with 4 and 6 tokens: each divides by the global 10, the sum is the mean.
    s, c = L.aggregate(per, mask, "token_mean", global_denominator=10)
    assert c.item() == 10.0 and (s / c).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_len"):
        L.aggregate(per, mask, "drgrpo")


# ---- OPD -------------------------------------------------------------------------------------
def test_opd_advantage_exactly_zero_for_identical_policies_and_masked():
    lp = torch.randn(3, 5, requires_grad=True)
    mask = torch.ones(3, 5)
    assert torch.equal(L.opd_advantage(lp, lp, 1.0, mask), torch.zeros(3, 5))
    adv = L.opd_advantage(lp + 1, lp, 0.5, mask)
    torch.testing.assert_close(adv, torch.full((3, 5), 0.5))
    assert not adv.requires_grad  # a constant signal (stop-gradient)
    teacher = torch.full((1, 2), float("-inf"))  # padding positions may hold −inf
    out = L.opd_advantage(teacher, torch.zeros(1, 2), 1.0, torch.tensor([[0.0, 0.0]]))
    assert torch.equal(out, torch.zeros(1, 2))


def _dists():
    s = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    t = torch.log(torch.tensor([[0.1, 0.3, 0.6]]))
    return s, t


def test_divergences_against_hand_computed_numbers():
    s, t = _dists()
    p, q = [0.7, 0.2, 0.1], [0.1, 0.3, 0.6]
    rev = sum(a * math.log(a / b) for a, b in zip(p, q))
    fwd = sum(b * math.log(b / a) for a, b in zip(p, q))
    beta = 0.3  # TRL/GKD: M = β·teacher + (1 − β)·student, JSD = β KL(T‖M) + (1 − β) KL(S‖M)
    m = [beta * b + (1 - beta) * a for a, b in zip(p, q)]
    jsd = beta * sum(b * math.log(b / c) for b, c in zip(q, m)) + (1 - beta) * sum(a * math.log(a / c) for a, c in zip(p, m))
    got = {k: L.vocab_divergence(s, t, k, beta=beta).item() for k in ("reverse_kl", "forward_kl", "jsd", "symmetric_kl")}
    assert got == pytest.approx({"reverse_kl": rev, "forward_kl": fwd, "jsd": jsd, "symmetric_kl": rev + fwd}, rel=1e-5)
    # The end points are the unscaled KLs; near them JSD(β) ≈ β·forward KL and ≈ (1 − β)·reverse KL.
    assert L.vocab_divergence(s, t, "jsd", beta=0.0).item() == pytest.approx(fwd, rel=1e-6)
    assert L.vocab_divergence(s, t, "jsd", beta=1.0).item() == pytest.approx(rev, rel=1e-6)
    assert L.vocab_divergence(s, t, "jsd", beta=1e-3).item() / 1e-3 == pytest.approx(fwd, rel=1e-2)
    assert L.vocab_divergence(s, t, "jsd", beta=1 - 1e-3).item() / 1e-3 == pytest.approx(rev, rel=1e-2)
    with pytest.raises(ValueError, match="divergence"):
        L.vocab_divergence(s, t, "tv")


def test_topk_kl_with_full_support_is_forward_kl_and_teacher_gets_no_gradient():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 6, generator=g).requires_grad_(True)
    t = torch.randn(4, 6, generator=g).requires_grad_(True)
    full = L.topk_kl(s, t, 6)
    torch.testing.assert_close(full, L.vocab_divergence(s, t, "forward_kl"))
    full.sum().backward()
    assert t.grad is None and s.grad is not None


def test_overlap_extremes_and_symmetric_kl_of_identical_policies():
    logits = torch.randn(2, 4, 40)
    mask = torch.ones(2, 4)
    assert L.topk_overlap(logits, logits, mask, 10)[1].item() == 1.0
    a, b = torch.zeros(2, 4, 40), torch.zeros(2, 4, 40)
    a[..., :10], b[..., 10:20] = 5.0, 5.0  # disjoint top-10 sets
    assert L.topk_overlap(a, b, mask, 10)[1].item() == 0.0
    b[..., 5:10] = 6.0  # half of the student's top-10 now in the teacher's
    per, mean = L.topk_overlap(a, b, mask, 10)
    assert torch.equal(per, torch.full((2, 4), 0.5)) and mean.item() == 0.5
    assert L.symmetric_kl(logits, logits, mask)[1].item() == pytest.approx(0.0, abs=1e-6)


# ---- one shard: chunking, temperature, padding -----------------------------------------------
def test_chunking_temperature_and_padding_on_one_shard():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(7, 12, generator=g) * 4
    z[:, 10:] = 100.0  # padding columns (true vocabulary 10) with junk that must be ignored
    y = torch.randint(0, 10, (7,), generator=g)
    ref = F.log_softmax(z[:, :10] / 0.6, -1)
    for chunk in (None, 1, 3, 100):
        lp = L.token_logprobs(z, y, vocab_size=10, temperature=0.6, chunk_size=chunk)
        torch.testing.assert_close(lp, ref.gather(-1, y[:, None]).squeeze(-1))
        ent = L.entropy_from_logits(z, vocab_size=10, temperature=0.6, chunk_size=chunk)
        torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))
    uniform = L.entropy_from_logits(torch.zeros(2, 12), vocab_size=10)
    torch.testing.assert_close(uniform, torch.full((2,), math.log(10)))  # log of the *true* vocabulary
    vals, ids = L.global_topk(z, 3, vocab_size=10)
    assert int(ids.max()) < 10 and torch.equal(vals, torch.topk(z[:, :10], 3).values)
    with pytest.raises(ValueError, match="temperature"):
        L.token_logprobs(z, y, temperature=0.0)


def test_chunked_gradients_equal_unchunked_and_keep_the_input_dtype():
    z = torch.randn(9, 16).to(torch.bfloat16)
    y = torch.randint(0, 16, (9,))
    grads = []
    for chunk in (None, 2):
        x = z.clone().requires_grad_(True)
        (L.token_logprobs(x, y, chunk_size=chunk).sum() + L.entropy_from_logits(x, chunk_size=chunk).sum()).backward()
        assert x.grad.dtype == torch.bfloat16
        grads.append(x.grad)
    assert torch.equal(grads[0], grads[1])
    assert L.token_logprobs(z, y).dtype == torch.float32


def test_broadcast_without_a_pipeline_returns_the_value():
    t = torch.ones(2)
    assert broadcast_from_last_stage(t, None) is t
