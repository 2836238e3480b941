"""Figures of CoPD's mechanism from a multi-seed reproduction (tools/reproduce_table.py), mean ± std.

    .venv/bin/python tools/plot_mechanism.py runs/table --out runs/table/figures

* ``transfer.png``: every branch's held-out accuracy on every domain over training. Solid:
  CoPD branches; dashed: independent single-domain experts. Transfer is CoPD branch A on
  domain B rising toward expert B, while expert A on domain B does not.
* ``overlap.png``: top-k overlap between the two branches over training (both directions
  averaged), CoPD vs the same rhythm with β = 0 (independent RLVR), Phase II shaded.
* ``merge.png``: merged models against the models they merge: CoPD's branches and their
  average; the independent experts and their Param-Merges (average, TIES, DARE).

Reads ``<root>/<recipe>/seed<k>/{metrics.jsonl,eval.json}`` (step 0 = the base's evaluation).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_runs  # a sibling tool


def _rows(run: Path) -> list[dict]:
    f = run / "metrics.jsonl"
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def curves(root: Path, recipe: str, key_of, metric: str) -> dict[str, dict[int, list[float]]]:
    """series name -> step -> values over seeds; ``key_of(key)`` names the series of a metric key or None."""
    out: dict[str, dict[int, list[float]]] = {}
    for run in sorted((root / recipe).glob("seed*")):
        ev = json.loads((run / "eval.json").read_text())["table"] if (run / "eval.json").exists() else {}
        for row in _rows(run):
            for key, v in row.items():
                name = key_of(key)
                if name is not None:
                    out.setdefault(name, {}).setdefault(row["step"], []).append(v)
        for name, series in out.items():  # step 0: every branch is the base
            dom = name.rsplit(" on ", 1)[-1]
            if " on " in name and "base" in ev and dom in ev["base"] and metric in ev["base"][dom]:
                series.setdefault(0, []).append(ev["base"][dom][metric])
    return out


def _band(ax, series: dict[int, list[float]], scale: float = 100.0, **kw) -> None:
    steps = sorted(series)
    mean = [scale * statistics.fmean(series[s]) for s in steps]
    sd = [scale * statistics.stdev(series[s]) if len(series[s]) > 1 else 0.0 for s in steps]
    (line,) = ax.plot(steps, mean, marker=".", **kw)
    ax.fill_between(steps, [m - e for m, e in zip(mean, sd)], [m + e for m, e in zip(mean, sd)],
                    color=line.get_color(), alpha=0.15, lw=0)  # fmt: skip


def plot_transfer(plt, root: Path, metric: str, path: Path) -> Path | None:
    def key_of(prefix):
        def f(key):
            parts = key.split("/")
            if len(parts) == 4 and parts[0] == "eval" and parts[3] == metric and parts[1] not in ("merged", "base"):
                return f"{prefix} {parts[1]} on {parts[2]}"
            return None

        return f

    copd = curves(root, "copd", key_of("CoPD"), metric)
    indep = curves(root, "expert", key_of("expert"), metric) or curves(root, "copd_beta0", key_of("expert"), metric)
    domains = sorted({n.rsplit(" on ", 1)[1] for n in {**copd, **indep}})
    if not domains:
        return None
    branches = sorted({n.split(" ")[1] for n in {**copd, **indep}})
    colors = {b: f"C{i}" for i, b in enumerate(branches)}
    fig, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 3.6), sharey=True)
    for ax, d in zip(list(axes) if len(domains) > 1 else [axes], domains):
        for b in branches:
            if f"CoPD {b} on {d}" in copd:
                _band(ax, copd[f"CoPD {b} on {d}"], color=colors[b], label=f"CoPD {b} branch")
            if f"expert {b} on {d}" in indep:
                _band(ax, indep[f"expert {b} on {d}"], color=colors[b], ls="--", label=f"{b} expert")
        ax.set(title=f"held-out {d}", xlabel="update", ylabel=f"{metric} (%)" if d == domains[0] else None)
        ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("Transfer: each model on every domain (mean ± std over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_overlap(plt, root: Path, path: Path) -> Path | None:
    def pair(key):
        return "overlap" if key.startswith("pair/") and key.endswith("/overlap") else None

    # Both directions a->b and b->a of a pair are averaged per step before the seed statistics.
    series = {}
    for recipe, label in (("copd", "CoPD"), ("copd_beta0", "independent RLVR (β = 0)")):
        per_seed = []
        for run in sorted((root / recipe).glob("seed*")):
            pts = {r["step"]: statistics.fmean(v for k, v in r.items() if pair(k)) for r in _rows(run)
                   if any(pair(k) for k in r)}  # fmt: skip
            per_seed.append(pts)
        merged: dict[int, list[float]] = {}
        for pts in per_seed:
            for s, v in pts.items():
                merged.setdefault(s, []).append(v)
        if merged:
            series[label] = merged
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for i, (label, s) in enumerate(series.items()):
        _band(ax, s, scale=1.0, color=f"C{i + 2}", label=label, ls="-" if i == 0 else "--")
    runs = sorted((root / "copd").glob("seed*"))
    rows = _rows(runs[0]) if runs else []
    start = None
    for r in rows + [{"step": (rows[-1]["step"] + 1) if rows else 0, "phase_opd": 0.0}]:
        if r.get("phase_opd") == 1.0 and start is None:
            start = r["step"] - 1
        if r.get("phase_opd") != 1.0 and start is not None:
            ax.axvspan(start, r["step"] - 1, color="tab:orange", alpha=0.12, lw=0)
            start = None
    ax.set(xlabel="update", ylabel="top-10 overlap", title="Top-k overlap between the two branches (shaded: Phase II)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_merge(plt, root: Path, metric: str, path: Path) -> Path | None:
    runs = compare_runs.collect(root)
    domains = sorted({d for t in runs.get("copd", {}).values() for m in t.values() for d in m})
    if not domains:
        return None
    groups = [[("CoPD " + d + " branch", "copd", d) for d in domains] + [("CoPD merged", "copd", "merged")],
              [(d + " expert", "expert", d) for d in domains]
              + [(compare_runs._merge_label(r).replace("Param-Merge (", "merge: ").removesuffix(")"), r, "merged") for r in sorted(runs)
                 if r.startswith("merge_")]]  # fmt: skip
    labels, values = [], []
    for group in groups:
        for label, recipe, model in group:
            sc = compare_runs.scores(runs, recipe, model, domains, metric)
            if sc:
                labels.append(label)
                values.append(sc)
        labels.append("")
        values.append({})
    cols = domains + [compare_runs.AVG]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    width = 0.8 / len(cols)
    for i, c in enumerate(cols):
        xs = [x + i * width for x, v in enumerate(values) if v]
        vals = [[p[c] for p in v.values()] for v in values if v]
        ax.bar(xs, [statistics.fmean(v) for v in vals], width, label=c, capsize=2, color=f"C{i}",
               yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals])  # fmt: skip
    ax.set_xticks([x + width * (len(cols) - 1) / 2 for x in range(len(labels))], labels, rotation=30, ha="right",
                  fontsize=8)  # fmt: skip
    ax.set(ylabel=f"{metric} (%)", title="Merged models vs the models they merge (mean ± std over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--metric", default="mean@4", help="eval metric of the accuracy figures")
    a = p.parse_args()
    out = a.out or a.root / "figures"
    out.mkdir(parents=True, exist_ok=True)
    for path in (plot_transfer(plt, a.root, a.metric, out / "transfer.png"), plot_overlap(plt, a.root, out / "overlap.png"),
                 plot_merge(plt, a.root, a.metric, out / "merge.png")):  # fmt: skip
        if path:
            print(path)
    plt.close("all")


if __name__ == "__main__":
    main()
