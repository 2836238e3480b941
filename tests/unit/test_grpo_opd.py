"""GRPO / OPD formulas against hand-computed numbers (no process group)."""

import math

import pytest
import torch

from copd_megatron import losses as L


def test_group_advantages_and_degenerate_groups():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    adv, degenerate = L.group_advantages(r, "grpo")
    assert degenerate == 1
    assert torch.equal(adv[1], torch.zeros(4))  # exactly zero, and counted
    torch.testing.assert_close(adv[0], torch.tensor([1.0, -1.0, -1.0, 1.0]), atol=1e-5, rtol=0)
    std = math.sqrt((3 * 0.75**2 + 2.25**2) / 4)
    torch.testing.assert_close(adv[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]) / (std + 1e-6))
    dr, _ = L.group_advantages(r, "drgrpo")
    torch.testing.assert_close(dr[2], torch.tensor([-0.75, -0.75, -0.75, 2.25]))


def test_clipped_surrogate_asymmetric_clip():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 0.7]))  # ratios
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    loss, stats = L.policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # ρ=1.5, A>0: clipped at 1.28; ρ=0.5, A<0: clipped at 0.8 → -min(-0.5, -0.8) = 0.8; ρ=1.1: unclipped.
    torch.testing.assert_close(loss, torch.tensor([-1.28, 0.8, 1.1, 0.0]))
    assert stats["clip_frac"].tolist() == [1.0, 1.0, 0.0, 0.0]


def test_reference_kl_estimators():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    r = -0.5
    assert L.ref_kl(logp, ref, "k1").item() == pytest.approx(0.5)
    assert L.ref_kl(logp, ref, "k3").item() == pytest.approx(math.exp(r) - r - 1)
    loss, _ = L.policy_loss(logp, logp, torch.zeros(1), torch.ones(1), ref_logprobs=ref, ref_kl_coef=0.1,
                            ref_kl_estimator="k1")  # fmt: skip
    assert loss.item() == pytest.approx(0.05)


def test_aggregation_modes():
    per = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    s, c = L.aggregate(per, mask, "token_mean")
    assert (s / c).item() == pytest.approx(10 / 4)
    s, c = L.aggregate(per, mask, "seq_mean")
    assert (s / c).item() == pytest.approx((2 + 4) / 2)
    s, c = L.aggregate(per, mask, "drgrpo", max_len=8)
    assert (s / c).item() == pytest.approx((6 / 8 + 4 / 8) / 2)


def test_opd_advantage_is_zero_for_identical_policies_and_overlap_extremes():
    lp = torch.randn(3, 5)
    mask = torch.ones(3, 5)
    assert torch.equal(L.opd_advantage(lp, lp, 1.0, mask), torch.zeros(3, 5))
    torch.testing.assert_close(L.opd_advantage(lp + 1, lp, 0.5, mask), torch.full((3, 5), 0.5))
    logits = torch.randn(2, 4, 40)
    assert L.topk_overlap(logits, logits, torch.ones(2, 4), 10)[1].item() == 1.0
    a = torch.zeros(2, 4, 40)
    b = torch.zeros(2, 4, 40)
    a[..., :10], b[..., 10:20] = 5.0, 5.0  # disjoint top-10 sets
    assert L.topk_overlap(a, b, torch.ones(2, 4), 10)[1].item() == 0.0
    assert L.symmetric_kl(logits, logits, torch.ones(2, 4))[1].item() == pytest.approx(0.0, abs=1e-6)
