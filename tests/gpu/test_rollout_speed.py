"""GPU: the Megatron rollout engine vs transformers ``generate`` on the same weights (bf16, TP=1).

``tools/bench_rollout.py``'s measurement on the GPU: a random Llama-style model built by Megatron
(local spec: the layers whose decode steps the engine runs as one function) and exported in memory
to transformers' ``LlamaForCausalLM``; 32 prompts of 64 tokens, 128 new tokens, greedy, best of 3
interleaved repeats, at 41M parameters (bound by per-step host work) and ~1.1B (bound by the GPU).
Figures for the report: tokens/s of both engines and their ratio, time to first token, and the rows
whose tokens equal transformers' (bf16 kernels of the two engines sum in different orders, so a
greedy row can part on a near-tie). The test asserts only that both engines generated every token.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from copd_megatron.testing import run_distributed
from tests.gpu.conftest import NEEDS_CUDA

pytestmark = [pytest.mark.gpu, NEEDS_CUDA]
BATCH, PROMPT, NEW = 32, 64, 128


def _run(size: str) -> list[dict]:
    path = Path(__file__).resolve().parents[2] / "tools" / "bench_rollout.py"
    spec = importlib.util.spec_from_file_location("bench_rollout", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench._bench(size, ["hf", "megatron"], BATCH, PROMPT, NEW, 3, 0, 1, False, "bf16")


@pytest.mark.parametrize("size", ["41m", "1b"])
def test_megatron_engine_vs_transformers_generate(size: str, record) -> None:
    rows = {r["engine"]: r for r in run_distributed(_run, 1, args=(size,), timeout=480)[0]}
    hf, ours = rows["transformers generate"], rows["Megatron engine"]
    note = f"{ours['params_m']:.0f}M params, {BATCH} prompts x {PROMPT} tokens, {NEW} new, greedy, bf16, TP=1"
    record("rollout", f"{size}: transformers generate tokens/s", round(hf["tokens_per_s"]), "tokens/s", note)
    record("rollout", f"{size}: Megatron engine tokens/s", round(ours["tokens_per_s"]), "tokens/s", note)
    ratio = round(ours["tokens_per_s"] / hf["tokens_per_s"], 3)
    record("rollout", f"{size}: Megatron engine / transformers", ratio, "x")
    record("rollout", f"{size}: time to first token, transformers / Megatron",
           f"{hf['ttft_s']:.3f} / {ours['ttft_s']:.3f}", "s")  # fmt: skip
    record("rollout", f"{size}: rows with transformers' tokens", ours["same"], "", "greedy, bf16")
    assert hf["tokens_per_s"] > 0 and ours["tokens_per_s"] > 0
