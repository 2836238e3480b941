"""Peak memory and time of vocab-parallel token log-probs (or entropy), forward + backward, vs
gather-then-compute, at several TP sizes. Not a test: prints a Markdown table.

    .venv/bin/python tools/bench_losses.py                         # 8x512 tokens, vocab 32768, TP 1 2 4
    .venv/bin/python tools/bench_losses.py --tokens 1024 --vocab 8192 --tp 1 2 --fn entropy

Paths (both see the same bf16 logits shard ``[tokens, V/tp]`` per rank, what a bf16 LM head emits):
  gather   all-gather the full vocabulary on every rank (differentiable for the own shard),
           upcast to fp32, ``log_softmax`` + ``gather`` (or the entropy formula), backward;
  sharded  ``token_logprobs`` / ``entropy_from_logits`` on the shard, chunked fp32 (``--chunk``).

How memory is measured: every (path, TP) runs in fresh processes. After inputs exist and one
warm-up iteration has run, each rank reads its resident set (VmRSS), resets the kernel's
high-water mark (``echo 5 > /proc/self/clear_refs``) and runs the timed iterations; the peak
is ``VmHWM − VmRSS_before``: memory the computation itself added on top of the libraries and
the input shard (the gathered vocabulary, fp32 buffers, saved tensors, and the gradient of the
shard, which both paths must produce: ``tokens·V/tp`` bf16). It is the
resident set, so it counts everything torch's CPU allocator asked the OS for. The table shows
the largest rank. Time: median of ``--repeats`` iterations, slowest rank.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
import torch.distributed as dist

from copd_megatron.testing import run_distributed
from copd_megatron.utils.cli import doc_summary
from copd_megatron.utils.progress import Progress

logger = logging.getLogger("bench_losses")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def _gathered(x: torch.Tensor, targets: torch.Tensor, fn: str, tp: int, rank: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(tp)]
    if tp > 1:
        dist.all_gather(parts, x.detach())  # the whole vocabulary on every rank
    parts[rank] = x  # the gradient flows back to the own shard through cat
    logp = torch.log_softmax(torch.cat(parts, -1).float(), -1)
    if fn == "entropy":
        return -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets[:, None]).squeeze(-1)


def _bench(path: str, fn: str, tokens: int, vocab: int, chunk: int, repeats: int) -> dict:
    from copd_megatron.losses import entropy_from_logits, token_logprobs

    tp, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD if tp > 1 else None
    torch.manual_seed(rank)
    shard = torch.randn(tokens, vocab // tp, dtype=torch.bfloat16)  # no fp32 temporary
    targets = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(0))

    x = shard.requires_grad_(True)  # one leaf; each step drops the previous gradient

    def step() -> float:
        x.grad = None
        dist.barrier()  # ranks start together: the time includes waiting on collectives, not skew
        t0 = time.perf_counter()
        if path == "sharded" and fn == "entropy":
            out = entropy_from_logits(x, tp_group=group, chunk_size=chunk)
        elif path == "sharded":
            out = token_logprobs(x, targets, tp_group=group, chunk_size=chunk)
        else:
            out = _gathered(x, targets, fn, tp, rank)
        out.sum().backward()
        return time.perf_counter() - t0

    step()  # warm-up: lazy initialisation, allocator pools
    x.grad = None  # the baseline holds the input shard only
    dist.barrier()
    base_kb = _status_kb("VmRSS")
    _reset_peak()
    times = [step() for _ in range(repeats)]
    peak_kb = _status_kb("VmHWM")
    return {"seconds": statistics.median(times), "peak_mb": (peak_kb - base_kb) / 1024, "base_mb": base_kb / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("--tokens", type=int, default=8 * 512)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--chunk", type=int, default=512, help="tokens per fp32 chunk of the sharded path")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--fn", choices=["logprobs", "entropy"], default="logprobs")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    from copd_megatron.utils.logging import setup_logging

    setup_logging("INFO")
    by = {}
    # Each case is a fresh world (start-up dominates small cases); the ETA is the mean case time.
    progress = Progress("bench_losses", 2 * len(a.tp), logger, unit="cases", every_s=0.0)
    for tp in a.tp:
        for path in ("gather", "sharded"):
            res = run_distributed(_bench, tp, args=(path, a.fn, a.tokens, a.vocab, a.chunk, a.repeats), timeout=1800)
            progress.update(note=f"tp={tp} {path}")
            by[(tp, path)] = (max(r["peak_mb"] for r in res), max(r["seconds"] for r in res),
                              max(r["base_mb"] for r in res))  # fmt: skip
    shard_mb = a.tokens * a.vocab * 2 / 2**20
    print(f"{a.fn} forward + backward, {a.tokens} tokens x vocab {a.vocab}, bf16 logits "
          f"({shard_mb:.0f} MiB for the full vocabulary), sharded chunk {a.chunk}")  # fmt: skip
    print("| TP | path | peak MiB per rank (above inputs) | resident before (MiB) | time (s) "
          "| sharded / gather memory | sharded / gather time |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|")
    for (tp, path), (mem, sec, base) in by.items():
        ratio = " | "
        if path == "sharded":
            gm, gs, _ = by[(tp, "gather")]
            ratio = f"{mem / gm:.2f} | {sec / gs:.2f}"
        print(f"| {tp} | {path} | {mem:.0f} | {base:.0f} | {sec:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
