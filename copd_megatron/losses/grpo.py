"""GRPO / DAPO policy loss and group advantages (paper §4 Eq. rlvr; DAPO; Dr. GRPO).

Group advantage of G samples of one prompt:
    grpo:    Â_i = (r_i − mean(r)) / (std(r) + ε)      (std with Bessel's correction off: population std)
    drgrpo:  Â_i = r_i − mean(r)                        (Liu et al.: no std division)
A group whose rewards are all equal carries no signal: its advantages are exactly 0 and it
is counted (``degenerate``), so a run can see how much of its batch was wasted.

Clipped surrogate per token (DAPO clip-higher, ε_low = 0.2, ε_high = 0.28):
    ρ = exp(log π_θ − log π_old)
    ℓ = −min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â)  [+ β_ref · KL_est(π_θ ‖ π_ref)]
Reference-KL estimators (verl's names), with r = log π_ref − log π_θ:
    k1 = −r,   k3 = low_var_kl = exp(r) − r − 1 (low_var_kl clamped to [−10, 10]).
Aggregation turns per-token losses into (sum, count) so that dividing by the *global* count
(Megatron's per-token loss normalisation over micro-batches and data-parallel ranks) gives
the token-level mean (DAPO), the mean of per-sequence means, or Dr. GRPO's sum / (B·L_max).
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, mode: str = "grpo", eps: float = 1e-6) -> tuple[torch.Tensor, int]:
    """``rewards [groups, G]`` → advantages ``[groups, G]`` and the number of all-equal groups."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, G], got shape {tuple(rewards.shape)}")
    r = rewards.float()
    centred = r - r.mean(-1, keepdim=True)
    degenerate = (r.max(-1).values == r.min(-1).values)
    if mode == "grpo":
        adv = centred / (r.std(-1, unbiased=False, keepdim=True) + eps)
    elif mode == "drgrpo":
        adv = centred
    else:
        raise ValueError(f"unknown advantage mode {mode!r}; expected 'grpo' or 'drgrpo'")
    adv = torch.where(degenerate[:, None], torch.zeros_like(adv), adv)  # exactly zero, not ~1e-9
    return adv, int(degenerate.sum())


def ref_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "low_var_kl") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from sampled-token log-probs."""
    r = ref_logp - logp
    if estimator == "k1":
        return -r
    if estimator in ("k3", "low_var_kl"):
        kl = torch.exp(r) - r - 1
        return kl.clamp(-10, 10) if estimator == "low_var_kl" else kl
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k3 or low_var_kl")


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    eps_low: float = 0.2, eps_high: float = 0.28, ref_logprobs: torch.Tensor | None = None,
    ref_kl_coef: float = 0.0, ref_kl_estimator: str = "low_var_kl",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Per-token clipped-surrogate loss (masked to 0 outside ``mask``) and per-token metrics:
    ``clip_frac`` (1 where the clipped branch is the active minimum), ``approx_kl``
    (k3 estimate of KL(π_old ‖ π_θ)), ``ratio``; average them over ``mask`` for reporting."""
    log_ratio = (logp - old_logp.detach()) * mask
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if ref_logprobs is not None and ref_kl_coef > 0:
        loss = loss + ref_kl_coef * ref_kl(logp, ref_logprobs.detach(), ref_kl_estimator)
    with torch.no_grad():
        stats = {
            "clip_frac": (clipped < unclipped).float(),
            "approx_kl": torch.exp(-log_ratio) + log_ratio - 1,
            "ratio": ratio.detach(),
        }
    return loss * mask, stats


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean",
              max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(sum, count)`` over ``[n, T]`` per-token losses; the mean is ``sum / global count``."""
    mask = mask.float()
    if mode == "token_mean":
        return (per_token * mask).sum(), mask.sum()
    has = (mask.sum(-1) > 0).float()
    if mode == "seq_mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1) * has).sum(), has.sum()
    if mode == "drgrpo":
        if not max_len:
            raise ValueError("drgrpo aggregation needs max_len (the constant response budget)")
        return ((per_token * mask).sum(-1) / max_len).sum(), has.sum()
    raise ValueError(f"unknown aggregation {mode!r}; expected token_mean, seq_mean or drgrpo")
