"""Tokens/s of the Megatron-native rollout engine with vs without the KV cache (CPU, tiny model).

    .venv/bin/python tools/bench_rollout.py                      # defaults: 16 prompts x 64 new tokens
    .venv/bin/python tools/bench_rollout.py --tp 2 --new-tokens 128

Prints a Markdown table. Without the cache every step re-runs the whole sequence, so the
cost grows quadratically with the response length; with it each step is one token.
"""

from __future__ import annotations

import argparse

import torch.distributed as dist

from copd_megatron.testing import run_distributed


def _bench(tp: int, batch: int, prompt_len: int, new_tokens: int, preset: str, repeats: int) -> list[dict]:
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks
    from copd_megatron.rollout.megatron_engine import MegatronEngine
    from copd_megatron.rollout.types import SamplingParams

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": {"preset": preset, "seq_length": 1024},
                            "parallel": {"tp": tp}, "precision": {"params_dtype": "fp32"}})  # fmt: skip
    init_model_parallel(validate(cfg, dist.get_world_size()))
    set_seed(0)
    (model,) = build_model_chunks(cfg.model, cfg.parallel, cfg.precision)
    prompts = [[(7 * i + j) % cfg.model.vocab_size for j in range(prompt_len)] for i in range(batch)]
    params = SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=1)
    rows = []
    for kv in (True, False):
        engine = MegatronEngine(model, cfg.model.vocab_size, use_kv_cache=kv)
        engine.generate(prompts[:2], SamplingParams(max_new_tokens=4))  # warm-up
        best = min(engine.generate(prompts, params).meta["seconds"] for _ in range(repeats))
        rows.append({"kv": kv, "seconds": best, "tokens_per_s": batch * new_tokens / best})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rows = run_distributed(_bench, a.tp, args=(a.tp, a.batch, a.prompt_len, a.new_tokens, a.preset, a.repeats),
                           timeout=1800)[0]  # fmt: skip
    print(f"model={a.preset} tp={a.tp} batch={a.batch} prompt={a.prompt_len} new_tokens={a.new_tokens} (best of {a.repeats})")
    print("| KV cache | seconds | tokens/s |\n|---|---:|---:|")
    for r in rows:
        print(f"| {'yes' if r['kv'] else 'no'} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} |")
    print(f"speed-up with KV cache: {rows[1]['seconds'] / rows[0]['seconds']:.1f}x")


if __name__ == "__main__":
    main()
