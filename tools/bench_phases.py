"""Step time per phase (generate / score / teach / update / sync), colocated vs disjoint placement.

    .venv/bin/python tools/bench_phases.py                                   # demo config, 2 ranks, 6 steps
    .venv/bin/python tools/bench_phases.py --config configs/demo_cpu.yaml --nproc 2 --steps 6 -- rollout.prompts_per_step=16

Runs the same config twice under torchrun on ``--nproc`` ranks: ``parallel.placement=colocated``
(every rank holds both branches; data parallel over all ranks) and ``disjoint`` (each branch on
its own ranks), then prints, from each run's metrics.jsonl, the mean seconds per step of every
phase per branch and the wall time per step (first step excluded: warm-up). Needs the demo base
(``make demo`` builds it) or ``--base DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("generate", "score", "teach", "update", "sync")


def _run(placement: str, args, out: Path) -> list[dict]:
    run_dir = out / placement
    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc-per-node={args.nproc}", "-m", "copd_megatron.cli", args.config,
           f"run_dir={run_dir}", f"parallel.placement={placement}", f"tokenizer={args.base}/tokenizer.model",
           f"checkpoint.base={args.base}/checkpoint", "schedule.cycles=1", f"schedule.s_rl={args.steps // 2}",
           f"schedule.s_opd={args.steps - args.steps // 2}", "merge.method=none", "eval.prompts_per_domain=4",
           *args.overrides]  # fmt: skip
    print(f"[{placement}] {' '.join(cmd[3:])}", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(out / f"{placement}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True, timeout=3600)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _table(results: dict[str, list[dict]]) -> str:
    branches = sorted({k.split("/")[1] for rows in results.values() for k in rows[0] if k.startswith("branch/")})
    head = "| placement | branch | " + " | ".join(PHASES) + " | step wall (s) |"
    lines = [head, "|---|---|" + "---:|" * (len(PHASES) + 1)]
    for placement, rows in results.items():
        rows = rows[1:] or rows  # the first step warms up caches and allocators
        wall = sum(r["time/step"] for r in rows) / len(rows)
        for b in branches:
            cells = [sum(r.get(f"branch/{b}/time/{p}", 0.0) for r in rows) / len(rows) for p in PHASES]
            lines.append(f"| {placement} | {b} | " + " | ".join(f"{c:.3f}" for c in cells) + f" | {wall:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/demo_cpu.yaml")
    p.add_argument("--base", default="runs/demo/base", help="base directory with tokenizer.model and checkpoint/")
    p.add_argument("--nproc", type=int, default=2, help="ranks (disjoint: a multiple of the number of branches)")
    p.add_argument("--steps", type=int, default=6, help="steps per run (half Phase I, half Phase II)")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for both runs")
    args = p.parse_args(argv)
    if not (Path(args.base) / "checkpoint").is_dir():
        print(f"bench_phases: error: {args.base}/checkpoint not found; run `make demo` or pass --base", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        results = {pl: _run(pl, args, Path(tmp)) for pl in ("colocated", "disjoint")}
    print(f"\nmean seconds per step ({args.nproc} ranks, {args.steps} steps, first excluded)\n")
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
