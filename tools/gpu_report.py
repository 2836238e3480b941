"""Assemble the GPU check's report from what the GPU tests recorded.

    python3 tools/gpu_report.py runs/gpu_check [--command "bash tools/gpu_check.sh"]

Reads ``<dir>/records.jsonl`` (one JSON object per line, written by ``tests/gpu/conftest.py``):
``{"kind": "env", ...}`` once (device, torch, CUDA, Transformer Engine status), ``{"kind":
"outcome", "test", "outcome", "reason"}`` per test, and ``{"kind": "figure", "section", "name",
"value", "unit", "note"}`` per measured figure. Writes ``<dir>/report.md`` and prints it: the
machine and the command, every test's outcome (skips with their reason), one table per section,
and the sections nothing was measured for, named (so a missing TE shows as "not measured").
Exit code 1 when there are no records at all (the tests never ran).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

SECTIONS = {
    "parity": "Train step on GPU (TP=1, bf16) vs the CPU fp32 reference",
    "copd": "CoPD tiny config end to end on GPU",
    "te_spec": "Transformer Engine spec vs local spec (same converted base)",
    "fp8": "FP8 train step vs bf16 (Transformer Engine)",
    "throughput": "Throughput of a ~1B Llama-style train step",
    "rollout": "Rollouts: Megatron engine vs transformers generate (same weights)",
    "memory": "Peak GPU memory per phase",
}


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def build_report(records: list[dict], command: str, commit: str, date: str) -> str:
    env = next((r for r in records if r.get("kind") == "env"), {})
    lines = ["# GPU check report", "",
             f"- date: {date}", f"- command: `{command}`", f"- commit: {commit}",
             f"- device: {env.get('device', 'unknown')}", f"- torch: {env.get('torch', '?')} (CUDA {env.get('cuda', '?')})",
             f"- megatron-core: {env.get('megatron_core', '?')}",
             f"- Transformer Engine: {env.get('te', 'unknown')}", "", "## Tests", "",
             "| test | outcome | reason |", "|---|---|---|"]  # fmt: skip
    for r in records:
        if r.get("kind") == "outcome":
            lines.append(f"| {r['test']} | {r['outcome']} | {r.get('reason', '')} |")
    figures = [r for r in records if r.get("kind") == "figure"]
    missing = []
    for key, title in SECTIONS.items():
        rows = [r for r in figures if r.get("section") == key]
        if not rows:
            missing.append(title)
            continue
        lines += ["", f"## {title}", "", "| figure | value | unit | note |", "|---|---:|---|---|"]
        lines += [f"| {r['name']} | {_fmt(r['value'])} | {r.get('unit', '')} | {r.get('note', '')} |" for r in rows]
    if missing:
        lines += ["", "## Not measured", ""] + [f"- {t} (see the tests' skip reasons above)" for t in missing]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", type=Path, help="the report directory (holds records.jsonl)")
    p.add_argument("--command", default="bash tools/gpu_check.sh", help="the command that produced the records")
    args = p.parse_args(argv)
    path = args.dir / "records.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    if not records:
        print(f"gpu_report: error: {path} has no records (did the GPU tests run?)", file=sys.stderr)
        return 1
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    commit = done.stdout.strip() or "unknown"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = build_report(records, args.command, commit, date)
    (args.dir / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
