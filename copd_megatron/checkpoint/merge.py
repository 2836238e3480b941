"""Merging branches that share a base: pure tensor math on one (shard of a) parameter.

Notation: θ_k are the K branch tensors, θ_0 the shared base, τ_k = θ_k − θ_0 task vectors,
w_k weights (uniform 1/K by default), λ a scale.

* ``average``: θ* = Σ_k w_k θ_k, weights normalised to sum to 1. With a shared base this is
  task arithmetic with λ = 1 (CoPD's "simple parameter merging", paper §4).
* ``task_arithmetic`` (Ilharco et al. 2023): θ* = θ_0 + λ Σ_k w_k τ_k.
* ``ties`` (Yadav et al. 2023): trim each τ_k to its top-``density`` fraction by magnitude,
  elect a sign per entry s = sign(Σ_k w_k τ̂_k), average (weighted) only the entries whose sign
  agrees with s, θ* = θ_0 + λ·τ_merged.
* ``dare`` (Yu et al. 2024): drop each entry of τ_k with probability p, rescale survivors by
  1/(1−p), then combine linearly (θ_0 + λ Σ w_k τ̂_k) or, with ``dare_ties``, with TIES's sign
  election.

Layout independence. Every function works on a shard of a tensor and gives exactly the
entries the full tensor would give: TIES's magnitude threshold is a property of the *whole*
tensor, so callers pass it in (``ties_thresholds``: computed once per tensor, see the CLI),
and DARE's random drop mask is a counter-based hash of (seed, key, branch, global element
index), so a merge at TP=8 keeps exactly the entries a merge at TP=1 keeps.
"""

from __future__ import annotations

from typing import Sequence

import torch

METHODS = ("average", "task_arithmetic", "ties", "dare", "dare_ties")
NEEDS_BASE = {"task_arithmetic", "ties", "dare", "dare_ties"}

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (murmur3 finaliser) on int64 tensors holding values < 2³²."""
    x = x & _M32
    x = (x ^ (x >> 16)) * 0x85EBCA6B & _M32
    x = (x ^ (x >> 13)) * 0xC2B2AE35 & _M32
    return x ^ (x >> 16)


def _key_seed(seed: int, key: str, branch: int) -> int:
    h = seed & _M32
    for ch in f"{key}\x00{branch}".encode():
        h = (h * 31 + ch) & _M32
    return int(_mix32(torch.tensor(h, dtype=torch.int64)))


def uniform_from_index(index: torch.Tensor, seed: int, key: str, branch: int) -> torch.Tensor:
    """Deterministic U[0, 1) per global element index (the same at any sharding)."""
    s = _key_seed(seed, key, branch)
    lo, hi = index & _M32, (index >> 32) & _M32
    h = _mix32(_mix32(lo ^ s) ^ hi)
    return h.double() / 2.0**32


def global_index(local_shape: Sequence[int], global_offset: Sequence[int], global_shape: Sequence[int]) -> torch.Tensor:
    """Row-major global linear index of every element of a shard placed at ``global_offset``."""
    idx = torch.zeros(local_shape, dtype=torch.int64)
    stride = 1
    for dim in reversed(range(len(global_shape))):
        shape = [1] * len(local_shape)
        shape[dim] = local_shape[dim]
        coord = torch.arange(global_offset[dim], global_offset[dim] + local_shape[dim]).view(shape)
        idx = idx + coord * stride
        stride *= global_shape[dim]
    return idx


def magnitude_threshold(tau: torch.Tensor, density: float) -> float:
    """The |τ| value at which TIES keeps the top ``density`` fraction of the *whole* tensor."""
    k = max(1, int(round(density * tau.numel())))
    return float(torch.topk(tau.abs().flatten().float(), k).values[-1])


def _normalised(weights: Sequence[float] | None, k: int, normalise: bool) -> list[float]:
    w = [1.0 / k] * k if weights is None else list(weights)
    if len(w) != k:
        raise ValueError(f"merge: {len(w)} weights for {k} checkpoints")
    if normalise:
        total = sum(w)
        if total == 0:
            raise ValueError("merge: weights sum to 0")
        w = [x / total for x in w]
    return w


def merge_tensor(
    tensors: Sequence[torch.Tensor],
    method: str = "average",
    *,
    base: torch.Tensor | None = None,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
    density: float = 0.2,
    drop_p: float = 0.9,
    seed: int = 0,
    key: str = "",
    index: torch.Tensor | None = None,
    ties_thresholds: Sequence[float] | None = None,
) -> torch.Tensor:
    """Merge one tensor (or shard) of K branches; computed in fp32, returned in the input dtype.

    ``index`` (global element indices, for DARE) defaults to the tensor being whole;
    ``ties_thresholds`` (one per branch, for TIES) default to thresholds of this tensor.
    """
    if method not in METHODS:
        raise ValueError(f"merge: unknown method {method!r}; expected one of {METHODS}")
    if method in NEEDS_BASE and base is None:
        raise ValueError(f"merge: method {method!r} needs the base checkpoint")
    k, dtype = len(tensors), tensors[0].dtype
    xs = [t.float() for t in tensors]
    if method == "average":
        w = _normalised(weights, k, normalise=True)
        return sum(wi * x for wi, x in zip(w, xs)).to(dtype)
    b = base.float()
    taus = [x - b for x in xs]
    w = _normalised(weights, k, normalise=False)
    if method in ("dare", "dare_ties"):
        idx = index if index is not None else torch.arange(b.numel()).view(b.shape)
        # Keep with probability 1-p, rescale by 1/(1-p) so the expectation is unchanged.
        taus = [t * (uniform_from_index(idx, seed, key, i) >= drop_p).float() / (1.0 - drop_p) for i, t in enumerate(taus)]
    if method in ("ties", "dare_ties"):
        if method == "ties":
            th = ties_thresholds or [magnitude_threshold(t, density) for t in taus]
            taus = [t * (t.abs() >= thi).float() for t, thi in zip(taus, th)]
        merged = _disjoint_mean(taus, w)
    else:
        merged = sum(wi * t for wi, t in zip(w, taus))
    return (b + lam * merged).to(dtype)


def _disjoint_mean(taus: list[torch.Tensor], w: list[float]) -> torch.Tensor:
    """TIES: elect a sign per entry, then the weighted mean of the agreeing, non-zero entries."""
    stacked = torch.stack([wi * t for wi, t in zip(w, taus)])
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    wsum = torch.stack([torch.full_like(t, wi) for wi, t in zip(w, taus)])
    num = (stacked * agree).sum(0)
    den = (wsum * agree).sum(0)
    # Entries where no branch agrees (all zero after trimming) stay at the base.
    return torch.where(den > 0, num / den.clamp(min=1e-12), torch.zeros_like(num))
