"""Rollout/trainer mismatch: measuring it, and importance weights that correct the policy loss.

The rollout engine samples y ~ π_rollout (vLLM's kernels, another precision, possibly stale by a
sync) while the trainer's surrogate uses π_old, its own recomputation of the same weights. The
two differ a little; a training signal computed on samples from π_rollout is then slightly
off-policy for π_old. Per response token t, with the sampled token's log-probs

    δ_t = log π_old(y_t) − log π_rollout(y_t)           (clamped to ±20; no gradient)

Importance weights (``loss.rollout_is``), at ``loss.rollout_is_level``:

    token:      w_t = exp(δ_t)
    sequence:   w_t = exp(Σ_s δ_s) for every token t of the sequence (product of token ratios)
    geometric:  w_t = exp(mean_s δ_s)                     (per-token geometric mean of the sequence)

    tis (truncated IS, Ionides 2008; verl / slime default C = 2):   w ← min(w, C)
    mis (masked IS, "IcePop"):                                        w ← w · 1[low ≤ w ≤ C]

The policy loss per token becomes w_t · ℓ_t (``ℓ`` the clipped surrogate of ``losses/grpo.py``).
TIS bounds the variance a rare large ratio would add; MIS drops tokens (or whole sequences) the
two engines disagree on, which are more likely numerical accidents than signal.

Metrics (:func:`mismatch_metrics`, over response tokens; y sampled from π_rollout):

    logp_abs_diff   mean |δ|                  logp_abs_diff_max   max |δ|
    kl              mean(−δ)  = k1 estimate of KL(π_rollout ‖ π_old)
    k3_kl           mean(e^δ − δ − 1)  ≥ 0, a lower-variance estimate of the same KL
    prob_ratio_err  mean e^|δ|  (NeMo-RL's token_mult_prob_error; 1.0 = identical)
    is_weight_mean / is_weight_max / is_masked_frac (fraction of tokens with weight 0 under mis,
    or truncated under tis) when weights are given.

With top-k / top-p sampling the engine's log-prob is under the *truncated* distribution while
the trainer's is not, so δ also contains the truncation (that is the correct importance ratio).
"""

from __future__ import annotations

import torch

LOG_RATIO_CLAMP = 20.0


def _masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (torch.where(mask > 0, x, torch.zeros((), dtype=x.dtype)) * mask).sum()


def log_ratio(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """δ = log π_old − log π_rollout on masked tokens (0 elsewhere), clamped, without gradient."""
    delta = (old_logp.detach().float() - rollout_logp.detach().float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.where(mask > 0, delta, torch.zeros((), dtype=delta.dtype))


def rollout_is_weights(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, *, mode: str = "tis",
    level: str = "token", cap: float = 2.0, low: float = 0.5,
) -> torch.Tensor:  # fmt: skip
    """Importance weights ``[n, T]`` (detached; exactly 1 for ``mode="none"``, 0 outside ``mask``)."""
    m = mask.float()
    if mode == "none":
        return m.clone()
    delta = log_ratio(old_logp, rollout_logp, m)
    if level == "token":
        w = torch.exp(delta)
    elif level in ("sequence", "geometric"):
        total = delta.sum(-1, keepdim=True)
        if level == "geometric":
            total = total / m.sum(-1, keepdim=True).clamp(min=1)
        w = torch.exp(total.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)).expand_as(delta)
    else:
        raise ValueError(f"unknown importance-sampling level {level!r}; expected token, sequence or geometric")
    if mode == "tis":
        w = w.clamp(max=cap)
    elif mode == "mis":
        w = torch.where((w >= low) & (w <= cap), w, torch.zeros((), dtype=w.dtype))
    else:
        raise ValueError(f"unknown importance-sampling mode {mode!r}; expected none, tis or mis")
    return w * m


def mismatch_metrics(
    old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None,
    *, mode: str = "none", cap: float = 2.0,
) -> dict[str, float]:  # fmt: skip
    """Per-batch summary of the mismatch over response tokens (see the module docstring)."""
    m = mask.float()
    n = float(m.sum())
    if n == 0:
        return {}
    delta = log_ratio(old_logp, rollout_logp, m)
    absd = delta.abs()
    out = {
        "logp_abs_diff": float(_masked_sum(absd, m)) / n,
        "logp_abs_diff_max": float(torch.where(m > 0, absd, torch.zeros(())).max()),
        "kl": float(_masked_sum(-delta, m)) / n,
        "k3_kl": float(_masked_sum(torch.exp(delta) - delta - 1, m)) / n,
        "prob_ratio_err": float(_masked_sum(torch.exp(absd), m)) / n,
    }
    if weights is not None and mode != "none":
        on = m > 0
        out["is_weight_mean"] = float(weights[on].mean())
        out["is_weight_max"] = float(weights[on].max())
        if mode == "mis":
            out["is_masked_frac"] = float((weights[on] == 0).float().mean())
        else:  # tis: tokens whose untruncated weight exceeded the cap
            out["is_masked_frac"] = float((weights[on] >= cap).float().mean())
    return out
