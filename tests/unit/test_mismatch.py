"""Rollout/trainer mismatch: importance weights and metrics against hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from copd_megatron.losses.mismatch import mismatch_metrics, rollout_is_weights

# Two sequences, three positions; row 0 has three response tokens, row 1 two (last is padding).
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -3.0, -9.0]])
ROLL = torch.tensor([[-1.0 - math.log(3), -2.0 + math.log(4), -0.5], [-1.0 - math.log(1.5), -3.0, 50.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
# δ = old − rollout: row 0: ln 3, −ln 4, 0 (ratios 3, 1/4, 1); row 1: ln 1.5, 0 (ratios 1.5, 1).


def test_token_level_tis_and_mis_weights():
    tis = rollout_is_weights(OLD, ROLL, MASK, mode="tis", level="token", cap=2.0)
    torch.testing.assert_close(tis, torch.tensor([[2.0, 0.25, 1.0], [1.5, 1.0, 0.0]]))
    mis = rollout_is_weights(OLD, ROLL, MASK, mode="mis", level="token", cap=2.0, low=0.5)
    torch.testing.assert_close(mis, torch.tensor([[0.0, 0.0, 1.0], [1.5, 1.0, 0.0]]))
    none = rollout_is_weights(OLD, ROLL, MASK, mode="none")
    assert torch.equal(none, MASK)


def test_sequence_and_geometric_levels():
    # Row 0: product 3 · 1/4 · 1 = 0.75; row 1: 1.5 · 1 = 1.5 (padding ignored).
    seq = rollout_is_weights(OLD, ROLL, MASK, mode="tis", level="sequence", cap=2.0)
    torch.testing.assert_close(seq, torch.tensor([[0.75, 0.75, 0.75], [1.5, 1.5, 0.0]]))
    # Geometric means: 0.75^(1/3) and 1.5^(1/2).
    geo = rollout_is_weights(OLD, ROLL, MASK, mode="mis", level="geometric", cap=1.2, low=0.5)
    torch.testing.assert_close(geo, torch.tensor([[0.75 ** (1 / 3)] * 3, [0.0, 0.0, 0.0]]))


def test_weights_carry_no_gradient_and_reject_unknown_modes():
    old = OLD.clone().requires_grad_(True)
    assert not rollout_is_weights(old, ROLL, MASK, mode="tis").requires_grad
    with pytest.raises(ValueError, match="mode"):
        rollout_is_weights(OLD, ROLL, MASK, mode="clip")
    with pytest.raises(ValueError, match="level"):
        rollout_is_weights(OLD, ROLL, MASK, level="batch")


def test_mismatch_metrics_hand_computed():
    w = rollout_is_weights(OLD, ROLL, MASK, mode="tis", cap=2.0)
    m = mismatch_metrics(OLD, ROLL, MASK, w, mode="tis", cap=2.0)
    deltas = [math.log(3), -math.log(4), 0.0, math.log(1.5), 0.0]
    assert m["logp_abs_diff"] == pytest.approx(sum(abs(d) for d in deltas) / 5)
    assert m["logp_abs_diff_max"] == pytest.approx(math.log(4))
    assert m["kl"] == pytest.approx(-sum(deltas) / 5)
    assert m["k3_kl"] == pytest.approx(sum(math.exp(d) - d - 1 for d in deltas) / 5)
    assert m["prob_ratio_err"] == pytest.approx(sum(math.exp(abs(d)) for d in deltas) / 5)
    assert m["is_weight_mean"] == pytest.approx((2.0 + 0.25 + 1.0 + 1.5 + 1.0) / 5)
    assert m["is_weight_max"] == pytest.approx(2.0) and m["is_masked_frac"] == pytest.approx(1 / 5)
    mis = rollout_is_weights(OLD, ROLL, MASK, mode="mis", cap=2.0, low=0.5)
    assert mismatch_metrics(OLD, ROLL, MASK, mis, mode="mis")["is_masked_frac"] == pytest.approx(2 / 5)
    same = mismatch_metrics(OLD, OLD, MASK)
    assert same["logp_abs_diff"] == 0 and same["k3_kl"] == 0 and same["prob_ratio_err"] == 1.0
    assert mismatch_metrics(OLD, ROLL, torch.zeros_like(MASK)) == {}


def test_rollout_is_and_vllm_fields_are_validated():
    from copd_megatron.config import config_from_dict
    from copd_megatron.config.schema import ConfigError

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "loss": {"rollout_is": "mis", "rollout_is_level": "geometric"},
                            "rollout": {"vllm": {"share_across_branches": True, "sleep_level": 2}}})  # fmt: skip
    assert cfg.loss.rollout_is == "mis" and cfg.rollout.vllm.share_across_branches and cfg.rollout.vllm.sleep_level == 2
    for bad, key in ((({"loss": {"rollout_is_cap": 0.5}}), "loss.rollout_is_cap"),
                     (({"rollout": {"vllm": {"sleep_level": 3}}}), "rollout.vllm.sleep_level"),
                     (({"rollout": {"vllm": {"kv_cache": 1}}}), "rollout.vllm.kv_cache"),
                     (({"loss": {"rollout_is": "clip"}}), "loss.rollout_is")):  # fmt: skip
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            config_from_dict({"schedule": {"mode": "smoke"}, **bad})
