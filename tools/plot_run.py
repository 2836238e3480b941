"""Plots of one run's metrics.jsonl: reward per branch, and top-k overlap between branches with
the Phase II (mutual OPD) steps shaded.

    .venv/bin/python tools/plot_run.py runs/demo/copd --out runs/demo/copd/plots
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from copd_megatron.utils.cli import doc_summary


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


def _line_plot(plt, rows: list[dict], keys: list[str], part: int, ylabel: str, title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key in keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), label=key.split("/")[part], marker=".")
    _shade_opd(ax, rows)
    ax.set(xlabel="step", ylabel=ylabel, title=f"{title} (shaded: Phase II)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def plot(run_dir: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = lambda prefix, suffix: sorted({k for r in rows for k in r if k.startswith(prefix) and k.endswith(suffix)})  # noqa: E731
    written = [_line_plot(plt, rows, keys("branch/", "/native/reward"), 1, "reward (own domain, sampled)",
                          "Reward per branch", out / "reward.png")]  # fmt: skip
    if keys("pair/", "/overlap"):
        written.append(_line_plot(plt, rows, keys("pair/", "/overlap"), 1, "top-10 overlap",
                                  "Top-k overlap between branches", out / "overlap.png"))  # fmt: skip
    plt.close("all")
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=doc_summary(__doc__))
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    for path in plot(a.run_dir, a.out or a.run_dir / "plots"):
        print(path)


if __name__ == "__main__":
    main()
