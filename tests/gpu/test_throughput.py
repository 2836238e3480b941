"""GPU: tokens/s, model FLOP utilisation and peak memory of a ~1B Llama-style train step (bf16, TP=1).

The model: 16 layers, hidden 2048, SwiGLU 5632, 16 query heads / 8 KV groups, vocabulary 32000
(≈1.1B parameters), micro-batches of 4 × 2048 tokens, 2 micro-batches per step, Adam with the
distributed optimizer (one rank). MFU counts Megatron's model FLOPs per token,
6·N + 12·layers·hidden·seq (attention scores), against the dense bf16 peak of the device
(989 TFLOP/s for H100/H200 SXM; other devices: the report says the peak it assumed). Timed over 5
steps after 2 warm-up steps. These are figures for the report, not assertions (only sanity bounds).
"""

from __future__ import annotations

import pytest
import torch

from copd_megatron.testing import run_distributed
from tests.gpu.conftest import HAS_TE, NEEDS_CUDA

pytestmark = [pytest.mark.gpu, NEEDS_CUDA]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12}
SEQ, MBS, N_MB = 2048, 4, 2


def _bench(impl: str) -> dict:
    import time

    from copd_megatron.config import config_from_dict
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.data.batch import MicroBatch
    from copd_megatron.distributed.device import runtime_device
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_branch, count_parameters
    from copd_megatron.training.step import train_step

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": {
        "num_layers": 16, "hidden_size": 2048, "ffn_hidden_size": 5632, "num_attention_heads": 16,
        "num_query_groups": 8, "vocab_size": 32000, "seq_length": SEQ, "transformer_impl": impl},
        "precision": {"params_dtype": "bf16"}, "parallel": {"micro_batch_size": MBS}})  # fmt: skip
    init_model_parallel(resolve_layout(cfg.parallel, cfg.model, 1))
    set_seed(1)
    branch = build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, 10)
    n = count_parameters(branch.chunks)
    g = torch.Generator().manual_seed(0)
    mbs = [MicroBatch.from_tokens(torch.randint(0, 32000, (MBS, SEQ + 1), generator=g)).to(runtime_device())
           for _ in range(N_MB)]  # fmt: skip
    for _ in range(2):
        train_step(branch, mbs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(5):
        train_step(branch, mbs)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 5
    tokens = MBS * SEQ * N_MB
    flops_per_token = 6 * n + 12 * cfg.model.num_layers * cfg.model.hidden_size * SEQ
    name = torch.cuda.get_device_name(0)
    peak = next((v for k, v in PEAK_BF16.items() if k in name), 989e12)
    return {"params": n, "tokens_per_s": tokens / dt, "tflops": flops_per_token * tokens / dt / 1e12,
            "mfu": flops_per_token * tokens / dt / peak, "peak_mib": torch.cuda.max_memory_allocated() / 2**20,
            "step_s": dt, "device": name, "assumed_peak": peak}  # fmt: skip


@pytest.mark.parametrize("impl", ["local", pytest.param("transformer_engine", marks=pytest.mark.skipif(
    not HAS_TE, reason="needs Transformer Engine"))])  # fmt: skip
def test_1b_train_step_throughput(impl: str, record) -> None:
    r = run_distributed(_bench, 1, args=(impl,), timeout=420)[0]
    note = f"{r['params'] / 1e9:.2f}B params, {MBS}x{SEQ} x {N_MB} micro-batches, peak {r['assumed_peak'] / 1e12:.0f} TFLOP/s"
    record("throughput", f"{impl} spec: tokens/s", round(r["tokens_per_s"]), "tokens/s", note)
    record("throughput", f"{impl} spec: model TFLOP/s", r["tflops"], "TFLOP/s")
    record("throughput", f"{impl} spec: MFU", r["mfu"], "", "6N + attention FLOPs")
    record("throughput", f"{impl} spec: step time", r["step_s"], "s")
    record("memory", f"~1B train step ({impl} spec): update", r["peak_mib"], "MiB", "torch.cuda.max_memory_allocated")
    assert 0.8e9 < r["params"] < 1.5e9 and 0.0 < r["mfu"] < 1.0
