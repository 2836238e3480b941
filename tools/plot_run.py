"""Plots of one run's metrics.jsonl: reward per branch, and top-k overlap between branches with
the Phase II (mutual OPD) steps shaded.

    .venv/bin/python tools/plot_run.py runs/demo/copd --out runs/demo/copd/plots
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _shade_opd(ax, rows: list[dict]) -> None:
    start = None
    for r in rows + [{"step": rows[-1]["step"] + 1, "phase_opd": 0.0}]:
        if r.get("phase_opd") == 1.0 and start is None:
            start = r["step"] - 0.5
        if r.get("phase_opd") != 1.0 and start is not None:
            ax.axvspan(start, r["step"] - 0.5, color="tab:orange", alpha=0.12, lw=0)
            start = None


def plot(run_dir: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    series = sorted({k for r in rows for k in r if k.startswith("branch/") and k.endswith("/native/reward")})
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in series:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), label=key.split("/")[1], marker=".")
    _shade_opd(ax, rows)
    ax.set(xlabel="step", ylabel="reward (own domain, sampled)", title="Reward per branch (shaded: Phase II)")
    ax.legend()
    fig.tight_layout()
    written.append(out / "reward.png")
    fig.savefig(written[-1], dpi=120)
    pairs = sorted({k for r in rows for k in r if k.startswith("pair/") and k.endswith("/overlap")})
    if pairs:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        for key in pairs:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*pts), label=key.split("/")[1], marker="o")
        _shade_opd(ax, rows)
        ax.set(xlabel="step", ylabel="top-10 overlap", title="Top-k overlap between branches (shaded: Phase II)")
        ax.legend()
        fig.tight_layout()
        written.append(out / "overlap.png")
        fig.savefig(written[-1], dpi=120)
    plt.close("all")
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    for path in plot(a.run_dir, a.out or a.run_dir / "plots"):
        print(path)


if __name__ == "__main__":
    main()
