"""Peak memory and time of ``copd-convert`` in both directions, at two model depths.

    .venv/bin/python tools/bench_convert.py          # hidden 1024, 8 and 24 layers, bf16, 100MB output shards
    .venv/bin/python tools/bench_convert.py --layers 4 16 --hidden 512 --max-shard-size 200MB

For each depth: build a random Llama-style ``LlamaForCausalLM`` with transformers (no hub),
``save_pretrained`` it as bf16 safetensors, then run ``copd-convert hf-to-mcore`` and
``copd-convert mcore-to-hf`` as child processes. Peak memory is the child's peak resident set
(``wait4``'s ``ru_maxrss``; the models are built in other children, since a forked child's
peak counts its parent's pages until it execs) minus that of a child that only imports the
same libraries, so the table shows what the conversion itself added; B is the size of the weights. Import is
expected near 1·B (one model copy, what ``dist_checkpointing.save`` needs); export near one
decoder layer plus one output shard, whatever the depth. Not a test: prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLI = [sys.executable, "-m", "copd_megatron.checkpoint.convert_cli"]
IMPORTS = ("import torch, torch.distributed.checkpoint, megatron.core, megatron.core.dist_checkpointing, safetensors, "
           "copd_megatron.checkpoint.convert, copd_megatron.model.build")


def _anon_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _run(cmd: list[str]) -> tuple[float, float, float]:
    """(peak RSS MB, peak anonymous RSS MB, wall seconds) of one child process.

    Peak RSS is exact (``wait4``); it also counts file-backed pages, e.g. a memory-mapped
    safetensors file that was read (page cache the kernel reclaims under pressure). Anonymous
    RSS (the process's own allocations) is sampled every 10 ms from /proc."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    start, anon = time.monotonic(), 0.0
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        anon = max(anon, _anon_mb(proc.pid))
        time.sleep(0.01)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    return usage.ru_maxrss / 1024, anon, time.monotonic() - start  # Linux: KiB


def _make_hf_in_child(out: Path, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    """Build the model in a child: a forked child's peak RSS counts the parent's pages until it
    execs, so the parent (this process) must never hold a model or even torch."""
    code = f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_convert as b; " \
           f"print(b._make_hf({str(out)!r}, {layers}, {hidden}, {ffn}, {vocab}))"  # fmt: skip
    return int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()[-1])


def _make_hf(out: str, layers: int, hidden: int, ffn: int, vocab: int) -> int:
    """A random bf16 Llama-3-style model in ``out``; returns the weights' size in bytes."""
    import torch
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                   num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                   num_key_value_heads=max(1, hidden // 256), max_position_embeddings=4096,
                                   torch_dtype="bfloat16")  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, nargs="+", default=[8, 24])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--max-shard-size", default="100MB", help="passed to mcore-to-hf (the output buffer)")
    p.add_argument("--workdir", type=Path, help="default: a temporary directory, removed at the end")
    args = p.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_convert_"))
    base_mb, base_anon, _ = _run([sys.executable, "-c", IMPORTS])
    rows = []
    try:
        for layers in args.layers:
            root = work / f"L{layers}"
            shutil.rmtree(root, ignore_errors=True)
            size = _make_hf_in_child(root / "hf", layers, args.hidden, args.ffn, args.vocab) / 2**20
            imp = _run(CLI + ["hf-to-mcore", "--hf-dir", str(root / "hf"), "--out", str(root / "mcore")])
            exp = _run(CLI + ["mcore-to-hf", "--mcore-dir", str(root / "mcore"), "--out", str(root / "out"),
                              "--max-shard-size", args.max_shard_size])  # fmt: skip
            rows.append((layers, size, imp, exp))
            shutil.rmtree(root)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"libraries alone: {base_mb:.0f} MB peak RSS, {base_anon:.0f} MB anonymous (subtracted below); hidden "
          f"{args.hidden}, ffn {args.ffn}, vocab {args.vocab}, bf16, export --max-shard-size {args.max_shard_size}\n")
    print("| layers | weights B (MB) | direction | added RSS (MB) | / B | added anonymous (MB) | / B | time (s) |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for layers, b, imp, exp in rows:
        for name, (peak, anon, secs) in (("hf-to-mcore", imp), ("mcore-to-hf", exp)):
            rss, own = peak - base_mb, anon - base_anon
            print(f"| {layers} | {b:.0f} | {name} | {rss:.0f} | {rss / b:.2f} | {own:.0f} | {own / b:.2f} | {secs:.1f} |")


if __name__ == "__main__":
    main()
