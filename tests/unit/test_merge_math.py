"""Merge math against small, plainly written reference implementations."""

import pytest
import torch

from copd_megatron.checkpoint.merge import global_index, magnitude_threshold, merge_tensor, uniform_from_index


def _branches(k=3, shape=(6, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base, [base + 0.1 * torch.randn(shape, generator=g) for _ in range(k)]


def test_average_is_the_manual_mean_and_weighted_average_normalises():
    base, xs = _branches()
    torch.testing.assert_close(merge_tensor(xs), (xs[0] + xs[1] + xs[2]) / 3)
    torch.testing.assert_close(merge_tensor(xs, weights=[2, 1, 1]), (2 * xs[0] + xs[1] + xs[2]) / 4)
    # With a shared base, uniform averaging equals task arithmetic with weights 1/K and λ = 1.
    torch.testing.assert_close(merge_tensor(xs, "task_arithmetic", base=base), merge_tensor(xs), rtol=1e-6, atol=1e-6)
    ta = merge_tensor(xs, "task_arithmetic", base=base, weights=[1, 1, 1], lam=0.5)
    torch.testing.assert_close(ta, base + 0.5 * sum(x - base for x in xs))


def _ties_reference(base, xs, density, lam=1.0):
    out = torch.empty_like(base).flatten()
    taus = [(x - base).flatten() for x in xs]
    kept = []
    for t in taus:  # trim: keep the top-density fraction by magnitude
        k = max(1, round(density * t.numel()))
        keep = set(torch.topk(t.abs(), k).indices.tolist())
        kept.append([float(t[i]) if i in keep else 0.0 for i in range(t.numel())])
    for i in range(out.numel()):
        vals = [kv[i] for kv in kept]
        total = sum(v / len(xs) for v in vals)
        sign = (total > 0) - (total < 0)
        agree = [v for v in vals if v != 0 and ((v > 0) - (v < 0)) == sign]
        out[i] = base.flatten()[i] + lam * (sum(agree) / len(agree) if agree else 0.0)
    return out.view(base.shape)


def test_ties_matches_reference():
    base, xs = _branches(seed=1)
    torch.testing.assert_close(merge_tensor(xs, "ties", base=base, density=0.3), _ties_reference(base, xs, 0.3))


def test_dare_matches_reference_and_is_seeded():
    base, xs = _branches(seed=2)
    p = 0.5
    out = merge_tensor(xs, "dare", base=base, drop_p=p, seed=7, key="w")
    idx = torch.arange(base.numel()).view(base.shape)
    ref = base.clone()
    for i, x in enumerate(xs):
        keep = (uniform_from_index(idx, 7, "w", i) >= p).float()
        ref += (x - base) * keep / (1 - p) / len(xs)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out, merge_tensor(xs, "dare", base=base, drop_p=p, seed=7, key="w"))
    assert not torch.equal(out, merge_tensor(xs, "dare", base=base, drop_p=p, seed=8, key="w"))
    # About p of the entries are dropped.
    u = uniform_from_index(torch.arange(100000), 3, "k", 0)
    assert abs(float((u < 0.5).float().mean()) - 0.5) < 0.01


@pytest.mark.parametrize("method", ["dare", "ties", "dare_ties"])
def test_shard_merge_equals_whole_merge(method):
    """A column shard merged on its own equals the same columns of the whole-tensor merge."""
    base, xs = _branches(seed=3, shape=(4, 8))
    kw = dict(base=base, drop_p=0.3, density=0.4, seed=1, key="layer.w")
    whole = merge_tensor(xs, method, **kw)
    thresholds = [magnitude_threshold(x - base, 0.4) for x in xs]
    half = [x[:, 4:] for x in xs]
    shard = merge_tensor(half, method, **{**kw, "base": base[:, 4:]},
                         index=global_index((4, 4), (0, 4), (4, 8)), ties_thresholds=thresholds)  # fmt: skip
    torch.testing.assert_close(shard, whole[:, 4:])


def test_methods_that_need_a_base_refuse_without_one():
    _, xs = _branches()
    for method in ("task_arithmetic", "ties", "dare", "dare_ties"):
        with pytest.raises(ValueError, match="needs the base checkpoint"):
            merge_tensor(xs, method)
