"""Peak memory and time of vocab-parallel token log-probs (+ backward) vs gather-then-compute.

    .venv/bin/python tools/bench_losses.py                        # 8x512 tokens, vocab 32k, TP 1/2/4
    .venv/bin/python tools/bench_losses.py --tokens 1024 --vocab 16384 --tp 1 2

Each (path, TP) runs in fresh processes so the peak resident memory (ru_maxrss) belongs to that
path alone; the baseline all-gathers the full vocabulary on every rank, upcasts to fp32 and uses
``log_softmax`` + ``gather``; ours keeps the V/TP shard and chunks the fp32 work. Logits are bf16
(what a bf16 model emits). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.distributed as dist

from copd_megatron.testing import run_distributed


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _bench(path: str, tokens: int, vocab: int, chunk: int, repeats: int) -> dict:
    from copd_megatron.losses import token_logprobs

    tp, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD if tp > 1 else None
    g = torch.Generator().manual_seed(rank)
    local = torch.randn(tokens, vocab // tp, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0))
    before = _peak_mb()
    times = []
    for _ in range(repeats):
        x = local.clone().requires_grad_(True)
        t0 = time.perf_counter()
        if path == "sharded":
            lp = token_logprobs(x, targets, tp_group=group, chunk_size=chunk)
        else:  # gather the whole vocabulary on every rank, then the plain formula
            parts = [torch.empty_like(x) for _ in range(tp)]
            if tp > 1:
                dist.all_gather(parts, x.detach())
                parts[rank] = x
                full = torch.cat(parts, -1)
            else:
                full = x
            lp = torch.log_softmax(full.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
        lp.sum().backward()
        times.append(time.perf_counter() - t0)
    return {"seconds": statistics.median(times), "peak_mb": _peak_mb(), "input_mb": before}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8 * 512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=1024, help="tokens per fp32 chunk of the sharded path")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    rows = []
    for tp in a.tp:
        for path in ("gather", "sharded"):
            res = run_distributed(_bench, tp, args=(path, a.tokens, a.vocab, a.chunk, a.repeats), timeout=1800)
            rows.append((tp, path, max(r["peak_mb"] for r in res), max(r["seconds"] for r in res)))
    print(f"token log-probs + backward, {a.tokens} tokens x vocab {a.vocab}, bf16 logits, chunk {a.chunk}")
    print("| TP | path | peak RSS per rank (MB) | time (s) | sharded / gather memory | sharded / gather time |")
    print("|---:|---|---:|---:|---:|---:|")
    by = {(tp, path): (mem, sec) for tp, path, mem, sec in rows}
    for tp, path, mem, sec in rows:
        ratio = ""
        if path == "sharded":
            gm, gs = by[(tp, "gather")]
            ratio = f"{mem / gm:.2f} | {sec / gs:.2f}"
        else:
            ratio = " | "
        print(f"| {tp} | {path} | {mem:.0f} | {sec:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
