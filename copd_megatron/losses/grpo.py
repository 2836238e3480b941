"""GRPO / DAPO policy loss and group advantages (paper §3 Eq. rlvr; DAPO; Dr. GRPO).

Group advantage of the G samples of one prompt (rewards r_1..r_G):
    grpo:    Â_i = (r_i − mean(r)) / (std(r) + ε)      (population std, ε = 1e-6)
    drgrpo:  Â_i = r_i − mean(r)                        (Liu et al.: no std division)
A group whose rewards are all equal carries no signal: its advantages are exactly 0 (not
~1e-9) and it is counted (``degenerate``), so a run can see how much of its batch was wasted.

Clipped surrogate per token (DAPO clip-higher, ε_low = 0.2, ε_high = 0.28, no ref-KL by default):
    ρ = exp(log π_θ − log π_old)            (log ρ clamped to ±20 so exp never overflows)
    ℓ = −min(ρ·Â, clip(ρ, 1 − ε_low, 1 + ε_high)·Â)  [+ c_ref · KL_est(π_θ ‖ π_ref)]
Reference-KL estimators (verl's names), with r = log π_ref − log π_θ at the sampled token:
    k1 = −r = log π_θ − log π_ref,    k3 = exp(r) − r − 1,    low_var_kl = clamp(k3, −10, 10)
    (low_var_kl also clamps r to ±20 first).
Metrics per token: clip_frac (1 where the clipped branch is the active minimum, i.e. the token's
gradient is cut), approx_kl = k3 estimate of KL(π_old ‖ π_θ), ratio, and entropy when given.

Aggregation over a micro-batch ``[n, T]`` returns (numerator, denominator); the loss is
numerator / denominator, and the denominator may be the data-parallel *global* count
(``global_denominator``, Megatron's per-token loss normalisation):
    token_mean (DAPO):  Σ_i Σ_t ℓ_it m_it          / Σ_i Σ_t m_it        (masked tokens)
    seq_mean   (GRPO):  Σ_i (Σ_t ℓ_it m_it / Σ_t m_it) / #sequences     (rows with a masked token)
    drgrpo:             Σ_i Σ_t ℓ_it m_it / L_max  / #sequences          (L_max a constant budget)
"""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 20.0  # |log ρ| above this is a broken sample, not a signal; exp(20) ≈ 5e8


def group_advantages(
    rewards: torch.Tensor, mode: str = "grpo", eps: float = 1e-6, *, group_size: int | None = None
) -> tuple[torch.Tensor, int]:
    """Advantages (fp32, same shape as ``rewards``) and the number of all-equal groups.

    ``rewards`` is ``[groups, G]``, or flat ``[groups·G]`` with ``group_size=G`` (samples of one
    prompt contiguous)."""
    if rewards.dim() == 1:
        if not group_size or rewards.numel() % group_size:
            raise ValueError(f"flat rewards of length {rewards.numel()} need group_size dividing it, got {group_size}")
        adv, degenerate = group_advantages(rewards.view(-1, group_size), mode, eps)
        return adv.view(-1), degenerate
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [groups, G] or [groups*G], got shape {tuple(rewards.shape)}")
    r = rewards.float()
    centred = r - r.mean(-1, keepdim=True)
    degenerate = r.max(-1).values == r.min(-1).values
    if mode == "grpo":
        adv = centred / (r.std(-1, unbiased=False, keepdim=True) + eps)
    elif mode == "drgrpo":
        adv = centred
    else:
        raise ValueError(f"unknown advantage mode {mode!r}; expected 'grpo' or 'drgrpo'")
    adv = torch.where(degenerate[:, None], torch.zeros_like(adv), adv)  # exactly zero, not ~1e-9
    return adv, int(degenerate.sum())


def ref_kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "low_var_kl") -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from sampled-token log-probs (differentiable in ``logp``)."""
    r = ref_logp - logp
    if estimator == "k1":
        return -r
    if estimator == "k3":
        return torch.exp(r) - r - 1
    if estimator == "low_var_kl":
        r = r.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        return (torch.exp(r) - r - 1).clamp(-10, 10)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected k1, k3 or low_var_kl")


def policy_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
    eps_low: float = 0.2, eps_high: float = 0.28, ref_logprobs: torch.Tensor | None = None,
    ref_kl_coef: float = 0.0, ref_kl_estimator: str = "low_var_kl", entropy: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:  # fmt: skip
    """Per-token clipped-surrogate loss ``[n, T]`` (exactly 0 outside ``mask``) and per-token
    metrics (``clip_frac``, ``approx_kl``, ``ratio``, ``entropy`` if given); reduce the loss with
    :func:`aggregate` and the metrics with ``masked_mean``. ``advantages`` may be ``[n, 1]``
    (sequence-level) or ``[n, T]`` (token-level, e.g. OPD); they and ``old_logp`` are detached."""
    on = mask.bool()
    # Masked positions get log ρ = 0 (ρ = 1) so garbage there (−inf padding) never becomes NaN.
    log_ratio = torch.where(on, logp - old_logp.detach(), torch.zeros((), device=logp.device))
    log_ratio = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if ref_logprobs is not None and ref_kl_coef > 0:
        safe_ref = torch.where(on, ref_logprobs.detach(), logp.detach())
        loss = loss + ref_kl_coef * ref_kl(logp, safe_ref, ref_kl_estimator)
    with torch.no_grad():
        stats = {
            "clip_frac": (clipped < unclipped).float(),  # the clipped branch is the smaller one
            "approx_kl": torch.exp(-log_ratio) + log_ratio - 1,  # k3 of KL(π_old ‖ π_θ)
            "ratio": ratio.detach(),
        }
        if entropy is not None:
            stats["entropy"] = entropy.detach().float()
    return torch.where(on, loss, torch.zeros((), device=loss.device)), stats


def aggregate(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token_mean", max_len: int | None = None, *,
    global_denominator: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(numerator, denominator)`` of the loss over ``[n, T]`` per-token losses (see module doc).

    The denominator is this micro-batch's count (tokens for token_mean, non-empty sequences
    otherwise) unless ``global_denominator`` gives the same count summed over micro-batches and
    data-parallel ranks; then every rank's numerator / denominator adds up to the global mean."""
    m = mask.float()
    masked = torch.where(m > 0, per_token, torch.zeros((), device=per_token.device)) * m
    has = (m.sum(-1) > 0).float()  # rows with at least one response token (padding rows excluded)
    if mode == "token_mean":
        num, count = masked.sum(), m.sum()
    elif mode == "seq_mean":
        num, count = (masked.sum(-1) / m.sum(-1).clamp(min=1) * has).sum(), has.sum()
    elif mode == "drgrpo":
        if not max_len:
            raise ValueError("drgrpo aggregation needs max_len (the constant response budget)")
        num, count = (masked.sum(-1) / max_len).sum(), has.sum()
    else:
        raise ValueError(f"unknown aggregation {mode!r}; expected token_mean, seq_mean or drgrpo")
    if global_denominator is not None:
        count = torch.as_tensor(global_denominator, dtype=torch.float32, device=num.device)
    return num, count
