"""The comparison table from ``<root>/<recipe>/seed<k>/eval.json`` (examples/reproduce_table_cpu.sh).

    .venv/bin/python tools/compare_runs.py runs/table --out runs/table/table.md --plot runs/table/accuracy.png

Rows as in the paper's Table 1 (base, experts, mixed RLVR, static OPD both ways, MOPD, CoPD,
plus CoPD's branches without merging); columns: held-out greedy pass@1 per domain and the
overall average over domains; each cell is mean ± std over seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

# (row label, recipe directory, model name in its eval table; "{d}" = the domain's own expert)
ROWS = [
    ("Base", "copd", "base"),
    ("{D}-Expert", "expert", "{d}"),
    ("Mixed RLVR", "mixed", "mixed"),
    ("Static OPD sort→count", "static_opd_s2c", "count"),
    ("Static OPD count→sort", "static_opd_c2s", "sort"),
    ("MOPD", "mopd", "student"),
    ("CoPD (merged)", "copd", "merged"),
    ("CoPD {D} branch (no merge)", "copd", "{d}"),
]


def _collect(root: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for f in sorted(root.glob("*/seed*/eval.json")):
        runs.setdefault(f.parent.parent.name, []).append(json.loads(f.read_text())["table"])
    return runs


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def table(root: Path, metric: str = "pass@1") -> tuple[str, dict[str, dict[str, list[float]]]]:
    runs = _collect(root)
    domains = sorted({d for tables in runs.values() for t in tables for m in t.values() for d in m})
    rows: dict[str, dict[str, list[float]]] = {}
    for label, recipe, model in ROWS:
        expand = [(label.format(D=d.capitalize()), model.format(d=d)) for d in domains] if "{d}" in model else [(label, model)]
        for name, m in expand:
            per = {d: [t[m][d][metric] for t in runs.get(recipe, []) if m in t and metric in t[m][d]] for d in domains}
            per["Overall Avg."] = [statistics.fmean(vals) for vals in zip(*(per[d] for d in domains))] if domains else []
            if any(per.values()):
                rows[name] = per
    seeds = max((len(v) for v in runs.values()), default=0)
    head = "| Model | " + " | ".join(domains) + " | Overall Avg. |"
    what = "greedy pass@1" if metric == "pass@1" else f"{metric} (sampled, T=1)"
    lines = [f"Held-out {what} (%), mean ± std over {seeds} seed(s).", "", head,
             "|---|" + "---:|" * (len(domains) + 1)]  # fmt: skip
    for name, per in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(per[d]) for d in domains + ["Overall Avg."]) + " |")
    return "\n".join(lines) + "\n", rows


def plot(rows: dict[str, dict[str, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    cols = [c for c in next(iter(rows.values()))]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(cols)
    for i, c in enumerate(cols):
        means = [100 * statistics.fmean(rows[n][c]) if rows[n][c] else 0 for n in names]
        errs = [100 * statistics.stdev(rows[n][c]) if len(rows[n][c]) > 1 else 0 for n in names]
        ax.bar([x + i * width for x in range(len(names))], means, width, yerr=errs, label=c, capsize=2)
    ax.set_xticks([x + width * (len(cols) - 1) / 2 for x in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("held-out pass@1 (%)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--metric", nargs="+", default=["pass@1", "mean@4"], help="eval metrics, one table each")
    a = p.parse_args()
    texts, rows = [], {}
    for i, metric in enumerate(a.metric):
        t, r = table(a.root, metric)
        if r:
            texts.append(t)
            rows = rows or r
    text = "\n".join(texts)
    if a.out:
        a.out.write_text(text)
    if a.plot and rows:
        plot(rows, a.plot)
    print(text)


if __name__ == "__main__":
    main()
