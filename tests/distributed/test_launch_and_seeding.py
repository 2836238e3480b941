"""The spawn helper fails fast on hangs and errors; seeding gives Megatron's RNG semantics on CPU."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from copd_megatron.testing import DistributedTestError, run_distributed


def _sum_ranks(scale: float) -> float:
    t = torch.ones(1) * (dist.get_rank() + 1) * scale
    dist.all_reduce(t)
    return t.item()


def _rank1_hangs() -> None:
    if dist.get_rank() == 1:
        time.sleep(3600)
    dist.all_reduce(torch.ones(1))


def _rank0_raises() -> None:
    if dist.get_rank() == 0:
        raise ValueError("boom on purpose")
    dist.barrier()


def test_results_come_back_per_rank():
    assert run_distributed(_sum_ranks, 2, args=(2.0,), timeout=180) == [6.0, 6.0]


def test_a_hang_fails_after_the_timeout():
    t0 = time.monotonic()
    with pytest.raises(DistributedTestError, match="did not finish within 8s"):
        run_distributed(_rank1_hangs, 2, timeout=8)
    assert time.monotonic() - t0 < 30


def test_an_exception_carries_the_rank_and_traceback():
    with pytest.raises(DistributedTestError, match=r"(?s)failed on rank 0.*boom on purpose"):
        run_distributed(_rank0_raises, 2, timeout=180)


def _rng_draws() -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.config.layout import Layout

    init_model_parallel(Layout(4, tp=2, pp=1, cp=1, ep=1, dp=2, vpp=None))
    set_seed(42)
    default = torch.rand(4)
    with get_cuda_rng_tracker().fork():
        tp_stream = torch.rand(4)
    after = torch.rand(4)
    return {"tp": ps.get_tensor_model_parallel_rank(), "default": default, "tp_stream": tp_stream, "after": after}


def test_seeding_is_identical_for_replicated_and_per_tp_rank_for_sharded():
    draws = run_distributed(_rng_draws, 4, timeout=120)
    for d in draws[1:]:  # the default stream (replicated params) is the same everywhere...
        torch.testing.assert_close(d["default"], draws[0]["default"], rtol=0, atol=0)
        # ...and fork() restores it, so later replicated draws also agree.
        torch.testing.assert_close(d["after"], draws[0]["after"], rtol=0, atol=0)
    by_tp = {}
    for d in draws:  # the model-parallel stream agrees across DP and differs across TP ranks
        if d["tp"] in by_tp:
            torch.testing.assert_close(d["tp_stream"], by_tp[d["tp"]], rtol=0, atol=0)
        by_tp[d["tp"]] = d["tp_stream"]
    assert not torch.equal(by_tp[0], by_tp[1])
    assert not torch.equal(by_tp[0], draws[0]["default"])
