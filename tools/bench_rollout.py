"""Rollout engines side by side on the same weights and prompts: Megatron engine, vLLM, and
transformers ``generate`` (the reference a user would reach for), at several model sizes.

    .venv/bin/python tools/bench_rollout.py                                # 2 sizes, 16 prompts x 16 tokens, 64 new
    .venv/bin/python tools/bench_rollout.py --new-tokens 256 --sizes 41m
    .venv/bin/python tools/bench_rollout.py --engines megatron megatron-nokv hf   # the KV cache's effect, no vLLM
    .venv/bin/python tools/bench_rollout.py --engines hf megatron --ragged       # prompts of 8..32 tokens
    python tools/bench_rollout.py --engines hf megatron --sizes 41m 1b --dtype bf16 --batch 32 --prompt-len 64 --new-tokens 128   # on a GPU

One process builds a random Llama-style Megatron model (``--dtype``, TP=1, on the GPU where there is
one, as the trainer does), exports it in memory to
HF tensors (the live export vLLM is synced with), loads the same tensors into transformers'
``LlamaForCausalLM`` and starts vLLM (its CPU build here) from them. Every engine decodes the
same prompts greedily; a "same tokens" column counts the rows whose new tokens equal transformers'
(a row can part on a near-tie of two logits: the engines sum in different orders).

Columns: tokens/s = new tokens / wall time of one ``generate`` (best of ``--repeats``); TTFT =
wall time of a ``generate`` with one new token (prefill + first sample, batch included);
vLLM's weight sync = ``update_weights`` of the whole model (export from the Megatron shards,
bucketed transfer to vLLM's process, layerwise reload), mean over ``--syncs`` updates; vLLM's
start-up time and the resident memory of its processes (what one more engine per branch costs;
a shared engine instead pays one sync per switch of branch). Megatron and transformers run with
``--threads`` torch threads in this process; vLLM runs in its own processes with its own
OpenMP threads.
"""

from __future__ import annotations

import argparse
import time

import torch

from copd_megatron.testing import run_distributed

SIZES = {
    # name: (layers, hidden, ffn, heads, kv heads, vocab); tied embeddings. 41m = the model.
    "11m": (4, 256, 688, 4, 4, 32000),
    "41m": (8, 512, 1376, 8, 8, 32000),
    "41m-gqa": (8, 512, 1376, 8, 2, 32000),  # grouped-query attention (4 query heads per KV head)
    "1b": (16, 2048, 5632, 16, 8, 32000),  # ~1.1B, the GPU check's train-step model (for a GPU)
}


def _model_cfg(size: str, seq: int) -> dict:
    layers, hidden, ffn, heads, groups, vocab = SIZES[size]
    return {"num_layers": layers, "hidden_size": hidden, "ffn_hidden_size": ffn, "num_attention_heads": heads,
            "num_query_groups": groups, "vocab_size": vocab, "seq_length": seq, "tie_embeddings": True,
            "init_method_std": 0.05}  # fmt: skip


def _hf_model(cfg, tensors: dict, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    from copd_megatron.checkpoint.hf import hf_config_from_model

    config = AutoConfig.for_model(**{k: v for k, v in hf_config_from_model(cfg.model).items()
                                     if k not in ("architectures",)})  # fmt: skip
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(tensors, strict=False)  # tied lm_head follows the embedding
    model.tie_weights()
    return model.eval()


def _rss_mb_of_children() -> float:
    import psutil

    return sum(c.memory_info().rss for c in psutil.Process().children(recursive=True)) / 2**20


def _bench(size: str, engines: list[str], batch: int, prompt_len: int, new_tokens: int, repeats: int,
           syncs: int, threads: int, ragged: bool = False, dtype: str = "fp32") -> list[dict]:  # fmt: skip
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from types import SimpleNamespace

    from copd_megatron.checkpoint.hf_export import export_hf_weights
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.device import runtime_device
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import DTYPES, build_model_chunks
    from copd_megatron.rollout.megatron_engine import MegatronEngine
    from copd_megatron.rollout.types import SamplingParams

    torch.set_num_threads(threads)
    device = runtime_device()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": _model_cfg(size, 2 * prompt_len + new_tokens + 8),
                            "precision": {"params_dtype": dtype},
                            "rollout": {"vllm": {"kv_cache_gb": 0.5, "max_num_seqs": batch}}})  # fmt: skip
    init_model_parallel(validate(cfg, dist.get_world_size()))
    set_seed(0)
    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision)
    groups = SimpleNamespace(tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                             mp=ps.get_model_parallel_group())  # fmt: skip
    export = lambda: export_hf_weights(chunks, cfg.model, groups)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    if ragged:  # lengths spread over [prompt_len / 2, 2 * prompt_len], as RL prompts are
        lens = torch.randint(max(1, prompt_len // 2), 2 * prompt_len + 1, (batch,), generator=g).tolist()
    else:
        lens = [prompt_len] * batch
    prompts = [torch.randint(3, cfg.model.vocab_size, (n,), generator=g).tolist() for n in lens]
    longest = max(lens)
    # Each engine's new tokens, row by row (every row generates exactly new_tokens: min_new_tokens).
    responses = lambda b: torch.stack([b.tokens[i, n : n + new_tokens] for i, n in enumerate(lens)])  # noqa: E731
    greedy, first = SamplingParams(max_new_tokens=new_tokens, greedy=True), SamplingParams(max_new_tokens=1, greedy=True)
    params = sum(p.numel() for c in chunks for p in c.parameters())
    runs: dict[str, tuple] = {}  # engine name -> (generate(params), tokens of its output, extra columns)
    if "hf" in engines:
        model = _hf_model(cfg, dict(export()), DTYPES[dtype]).to(device)
        # Left-padded with an attention mask, as transformers batches prompts of different lengths.
        ids = torch.tensor([[0] * (longest - len(q)) + q for q in prompts], device=device)
        attention = torch.tensor([[0] * (longest - len(q)) + [1] * len(q) for q in prompts], device=device)

        def hf_gen(p):
            with torch.no_grad():
                return model.generate(ids, attention_mask=attention, max_new_tokens=p.max_new_tokens,
                                      min_new_tokens=p.max_new_tokens, do_sample=False, pad_token_id=0)  # fmt: skip

        runs["transformers generate"] = (hf_gen, lambda out: out[:, longest:].cpu(), {})
    for name, kv in (("megatron", True), ("megatron-nokv", False)):
        if name in engines:
            engine_m = MegatronEngine(chunks[0], cfg.model.vocab_size, use_kv_cache=kv)
            runs[f"Megatron engine{'' if kv else ' (no KV cache)'}"] = (
                lambda p, e=engine_m: e.generate(prompts, p), responses, {})
    vllm_engine = None
    if "vllm" in engines:
        from copd_megatron.rollout.engine import EngineContext, build_engine

        t0 = time.perf_counter()
        ctx = EngineContext(cfg.model, cfg.rollout, chunks, None, SimpleNamespace(pad_id=0), groups, export)
        vllm_engine = build_engine("vllm", ctx)
        extra = {"start_s": time.perf_counter() - t0, "rss_mb": _rss_mb_of_children()}
        runs["vLLM (CPU build)"] = (lambda p: vllm_engine.generate(prompts, p), responses, extra)
    # Interleaved repeats (engine A, B, C, A, B, C, ...) so that a burst of load from other jobs on
    # the machine hits every engine alike; the best time of each is reported.
    # Also the CPU time of this process per full generate: with one torch thread it is the work the
    # in-process engines do, and unlike wall time it hardly moves when other jobs load the machine
    # (vLLM computes in its own process, so it has no such column).
    best = {name: [float("inf"), float("inf"), None, float("inf")] for name in runs}
    for name, (gen, _, _) in runs.items():
        gen(first)  # warm-up
    for _ in range(repeats):
        for name, (gen, _, _) in runs.items():
            for i, p in enumerate((first, greedy)):
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                out = gen(p)
                sync()
                best[name][i] = min(best[name][i], time.perf_counter() - t0)
            best[name][2] = out
            best[name][3] = min(best[name][3], time.process_time() - c0)
    rows, reference = [], None
    for name, (gen, tokens_of, extra) in runs.items():
        ttft, seconds, out, cpu = best[name]
        cpu_col = {} if name.startswith("vLLM") else {"cpu_ms": 1e3 * cpu / (batch * new_tokens)}
        rows.append({"size": size, "params_m": params / 1e6, "engine": name, "tokens_per_s": batch * new_tokens / seconds,
                     "ttft_s": ttft, "tokens": tokens_of(out), **cpu_col, **extra})  # fmt: skip
        if name == "transformers generate":
            reference = rows[-1]["tokens"]
    if vllm_engine is not None:
        for v in range(1, syncs + 1):
            vllm_engine.update_weights(export(), v)
        rows[-1]["sync_s"] = sum(vllm_engine.sync_seconds) / len(vllm_engine.sync_seconds)
        vllm_engine.close()
    for r in rows:
        r["same"] = "-" if reference is None else f"{int((r.pop('tokens') == reference).all(1).sum())}/{batch}"
        r.pop("tokens", None)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["11m", "41m"], choices=list(SIZES))
    p.add_argument("--engines", nargs="+", default=["hf", "megatron", "vllm"],
                   choices=["hf", "megatron", "megatron-nokv", "vllm"])  # fmt: skip
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--ragged", action="store_true",
                   help="prompt lengths spread over [prompt-len/2, 2*prompt-len] (transformers: left-padded)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--syncs", type=int, default=3, help="vLLM weight updates to time")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the Megatron / transformers engines")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights and compute dtype")
    a = p.parse_args()
    prompt = f"{max(1, a.prompt_len // 2)}-{2 * a.prompt_len} (ragged)" if a.ragged else a.prompt_len
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"batch={a.batch} prompt={prompt} new_tokens={a.new_tokens} greedy {a.dtype} TP=1 "
          f"threads={a.threads} device={device} (best of {a.repeats})")  # fmt: skip
    print("| model | engine | tokens/s | TTFT (s) | CPU ms per token | same tokens as transformers | vLLM start (s) "
          "| vLLM RSS (MiB) | weight sync per update (s) |\n|---|---|---:|---:|---:|---|---:|---:|---:|")  # fmt: skip
    for size in a.sizes:
        rows = run_distributed(_bench, 1, args=(size, a.engines, a.batch, a.prompt_len, a.new_tokens, a.repeats,
                                                a.syncs, a.threads, a.ragged, a.dtype), timeout=3600)[0]  # fmt: skip
        for r in rows:
            extra = [f"{r[k]:.{d}f}" if k in r else "" for k, d in (("start_s", 1), ("rss_mb", 0), ("sync_s", 2))]
            cpu = f"{r['cpu_ms']:.2f}" if "cpu_ms" in r else ""
            print(f"| {size} ({r['params_m']:.1f}M) | {r['engine']} | {r['tokens_per_s']:.0f} | {r['ttft_s']:.3f} "
                  f"| {cpu} | {r['same']} | " + " | ".join(extra) + " |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
