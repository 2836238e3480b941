"""Sweep the CPU testbed: which base and which RLVR settings make single-domain RLVR learn.

For every point of a grid it builds a base with ``tools/make_base.py`` (cached per base
setting) and runs ``copd-train`` in ``schedule.mode=expert`` (every branch is an independent
single-domain expert from that base), then tabulates, per domain: the base's held-out greedy
pass@1 and sampled mean@n (T = 1), each expert's score on its own domain and on the other
domains, and the cost (wall seconds, updates, seconds per branch update, the machine's load
average while it ran: the CPU is shared, so seconds are noisy and updates are the budget).

    .venv/bin/python tools/sweep_testbed.py --out runs/sweep --families max min --difficulty 4 \\
        --sft-steps 150 250 --lr 3e-4 1e-3 --steps 60 --seeds 1 2
    .venv/bin/python tools/sweep_testbed.py --out runs/sweep --table-only   # the table of what ran

Every finished point is appended to ``<out>/results.jsonl`` and skipped when the sweep is run
again, so a sweep can be stopped and resumed, and widened by calling it with more values.
A run's output is ``<out>/runs/<point>/<base>.log`` beside its run_dir (``<out>/bases/<base>.log``
for a base); a point stopped halfway starts over.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="sweep directory (results.jsonl, bases, runs)")
    p.add_argument("--families", nargs="+", default=["asc", "desc"])
    p.add_argument("--difficulty", type=int, nargs="+", default=[4])
    p.add_argument("--model", nargs="+", default=["4x128"], help="LAYERSxHIDDEN (ffn = 2.75·hidden)")
    p.add_argument("--sft-steps", type=int, nargs="+", default=[125], help="base SFT steps")
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--sft-schedule", default="constant", choices=["constant", "cosine"])
    p.add_argument("--vocab-size", type=int, default=280)
    p.add_argument("--lr", type=float, nargs="+", default=[1e-4])
    p.add_argument("--steps", type=int, nargs="+", default=[60], help="RLVR updates per expert")
    p.add_argument("--group-size", type=int, nargs="+", default=[8])
    p.add_argument("--prompts", type=int, nargs="+", default=[16], help="prompts per update")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--eval-samples", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=20, help="held-out evaluation every N updates (learning curve)")
    p.add_argument("--extra", nargs="*", default=[], help="more copd-train overrides for every run")
    p.add_argument("--nice", type=int, default=5, help="niceness of the children (the CPU is shared)")
    p.add_argument("--table-only", action="store_true", help="print the table of results.jsonl and exit")
    return p


def _run(cmd: list[str], log: Path, nice: int) -> float:
    """Run ``cmd`` (output to ``log``); return wall seconds; exit 1 with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call(["nice", "-n", str(nice), *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        sys.exit(f"sweep_testbed: {' '.join(cmd[:4])} ... failed (exit {rc}); see {log}:\n" + "\n".join(tail))
    return time.perf_counter() - t0


def _model_args(spec: str) -> list[str]:
    layers, hidden = (int(x) for x in spec.lower().split("x"))
    ffn = round(hidden * 2.75 / 16) * 16
    return [f"model.num_layers={layers}", f"model.hidden_size={hidden}", f"model.ffn_hidden_size={ffn}"]


def build_base(a, difficulty: int, model: str, sft_steps: int) -> Path:
    out = a.out / "bases" / f"{'-'.join(a.families)}_d{difficulty}_{model}_sft{sft_steps}{a.sft_schedule[:3]}"
    if not (out / "base.json").exists():
        cmd = [sys.executable, "tools/make_base.py", "--out", str(out), "--families", *a.families,
               "--difficulty", str(difficulty), "--steps", str(sft_steps), "--lr", str(a.sft_lr), "--lr-schedule", a.sft_schedule,
               "--vocab-size", str(a.vocab_size), "--eval-prompts", str(a.eval_prompts),
               "--model", *_model_args(model)]  # fmt: skip
        print(f"base {out.name}: building", flush=True)
        _run(cmd, a.out / "bases" / f"{out.name}.log", a.nice)
    return out


def run_point(a, base: Path, difficulty: int, model: str, point: dict) -> dict:
    run_dir = a.out / "runs" / "_".join(f"{k}{v}" for k, v in point.items()) / base.name
    meta = json.loads((base / "base.json").read_text())
    n_branches = len(a.families)
    branches = [f"{{name: {f}, data: 'synthetic:{f}', verifier: synthetic_{f}, difficulty: {difficulty}}}"
                for f in a.families]  # fmt: skip
    cmd = [sys.executable, "-m", "copd_megatron.cli", str(ROOT / "configs" / "demo_cpu.yaml"),
           f"run_dir={run_dir}", f"seed={point['seed']}", f"tokenizer={base / 'tokenizer.model'}",
           f"checkpoint.base={base / 'checkpoint'}", f"model.vocab_size={meta['vocab_size']}", *_model_args(model),
           f"branches=[{', '.join(branches)}]", "schedule.mode=expert", "schedule.cycles=1",
           f"schedule.s_rl={point['steps']}", "schedule.s_opd=0", f"optimizer.lr={point['lr']}",
           f"rollout.group_size={point['G']}", f"rollout.prompts_per_step={point['P']}",
           f"rollout.max_new_tokens={a.max_new_tokens}", f"eval.prompts_per_domain={a.eval_prompts}",
           f"eval.samples={a.eval_samples}", f"eval.every={a.eval_every}", *a.extra, "--force"]  # fmt: skip
    load0 = os.getloadavg()[0]
    # --force: a point stopped halfway starts over. Its output goes beside the run_dir (the
    # trainer writes its own train.log inside, and a run_dir holds one run only).
    wall = _run(cmd, run_dir.parent / f"{run_dir.name}.log", a.nice)
    table = json.loads((run_dir / "eval.json").read_text())["table"]
    curve = {}  # step -> expert -> own-domain sampled pass@1
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        own = {f: r[k] for f in a.families if (k := f"eval/{f}/{f}/mean@{a.eval_samples}") in r}
        if own:
            curve[r["step"]] = own
    return {"curve": curve, "base": base.name, "difficulty": difficulty, "model": model, **point, "wall_s": round(wall, 1),
            "updates": point["steps"] * n_branches, "load": round((load0 + os.getloadavg()[0]) / 2, 2),
            "table": table}  # fmt: skip


def _fmt(table: dict, model: str, domain: str, metric: str) -> str:
    return f"{100 * table[model][domain][metric]:.0f}"


def _steps_to(row: dict, domain: str, metric: str, gain: float) -> int | None:
    """First evaluated update count at which the expert of ``domain`` is ``gain`` above the base."""
    base = row["table"]["base"][domain][metric]
    hits = [int(s) for s, own in row.get("curve", {}).items() if own.get(domain, 0.0) >= base + gain]
    return min(hits) if hits else None


def print_table(rows: list[dict], families: list[str], samples: int) -> str:
    """One line per (base, settings), seeds averaged: base and experts, greedy / sampled."""
    m = f"mean@{samples}"
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["base"], r["lr"], r["steps"], r["G"], r["P"])
        groups.setdefault(key, []).append(r)
    doms = [f for f in families if all(f in r["table"]["base"] for r in rows)]
    head = ["base", "lr", "steps", "G", "P", "seeds"]
    head += [f"base {d} (g/s)" for d in doms]
    head += [f"{e}-expert on {d} (g/s)" for e in doms for d in doms]
    head += ["Δ own sampled", "updates to +20", "s/update", "load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rs in groups.items():

        def cell(model, d, rs=rs):
            g = statistics.fmean(100 * r["table"][model][d]["pass@1"] for r in rs)
            s = statistics.fmean(100 * r["table"][model][d].get(m, float("nan")) for r in rs)
            return f"{g:.0f}/{s:.0f}"

        gains = [100 * (r["table"][d][d][m] - r["table"]["base"][d][m]) for r in rs for d in doms]
        reach = [_steps_to(r, d, m, 0.20) for r in rs for d in doms]
        cells = [*map(str, key), str(len(rs))]
        cells += [cell("base", d) for d in doms]
        cells += [cell(e, d) for e in doms for d in doms]
        cells += [f"{statistics.fmean(gains):+.0f}", "/".join(str(x) if x else "–" for x in reach),
                  f"{statistics.fmean(r['wall_s'] / r['updates'] for r in rs):.2f}",
                  f"{statistics.fmean(r['load'] for r in rs):.1f}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    a = _parser().parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    results = a.out / "results.jsonl"
    rows = [json.loads(x) for x in results.read_text().splitlines()] if results.exists() else []
    if not a.table_only:
        grid = list(
            itertools.product(a.difficulty, a.model, a.sft_steps, a.lr, a.steps, a.group_size, a.prompts, a.seeds)
        )
        done_keys = {(r["base"], r["lr"], r["steps"], r["G"], r["P"], r["seed"]) for r in rows}
        t_start, finished = time.perf_counter(), 0
        for i, (d, model, sft, lr, steps, G, P, seed) in enumerate(grid):
            base = build_base(a, d, model, sft)
            point = {"lr": lr, "steps": steps, "G": G, "P": P, "seed": seed}
            if (base.name, lr, steps, G, P, seed) in done_keys:
                continue
            row = run_point(a, base, d, model, point)
            rows.append(row)
            with results.open("a") as f:
                f.write(json.dumps(row) + "\n")
            finished += 1
            left = len(grid) - i - 1
            eta = (time.perf_counter() - t_start) / finished * left
            print(
                f"[{i + 1}/{len(grid)}] {base.name} {point}: {row['wall_s']:.0f}s; ETA {eta / 60:.1f} min", flush=True
            )
    text = print_table(rows, a.families, a.eval_samples)
    (a.out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
