"""The comparison table from ``<root>/<recipe>/seed<k>/eval.json`` (examples/reproduce_table_cpu.sh).

    .venv/bin/python tools/compare_runs.py runs/table --out runs/table/table.md --plot runs/table/accuracy.png

Rows as in the paper's Table 1 and its ablations: base, single-domain experts, mixed RLVR,
static OPD (both directions), MOPD, Param-Merge of the independent experts (average, TIES,
DARE), CoPD merged, CoPD's branches without merging, CoPD with β = 0 (independent RLVR that
still merges). Columns: held-out accuracy per domain, the overall average over domains, and
the paired per-seed difference of that average to the base and to CoPD (merged). Each cell
is mean ± std over seeds (sample std); a row without CoPD or base runs of the same seed has
no paired cell.

A recipe directory is read by its name: ``copd``, ``copd_beta0``, ``expert``, ``mixed``,
``mopd``, ``static_opd_<teacher>_to_<student>``, ``merge_<method>[_<param>]`` (a ``copd-eval``
result of a merged expert checkpoint). Trainer runs write ``{"table": {model: {domain: ...}}}``;
``copd-eval`` writes ``{"results": {domain: ...}}``, read as the model ``merged``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path

AVG = "Overall Avg."
MERGE_NAMES = {"average": "average", "ties": "TIES", "dare": "DARE", "dare_ties": "DARE-TIES",
               "task_arithmetic": "task arithmetic"}  # fmt: skip


def collect(root: Path) -> dict[str, dict[int, dict]]:
    """recipe -> seed -> eval table (model -> domain -> metrics)."""
    runs: dict[str, dict[int, dict]] = {}
    for f in sorted(root.glob("*/seed*/eval.json")):
        seed = int(f.parent.name.removeprefix("seed"))
        data = json.loads(f.read_text())
        table = data["table"] if "table" in data else {"merged": data["results"]}
        runs.setdefault(f.parent.parent.name, {})[seed] = table
    return runs


def _merge_label(recipe: str) -> str:
    rest = recipe.removeprefix("merge_")
    m = re.fullmatch(r"(.+?)(?:_(d|p|lam)([\d.]+))?", rest)
    method, knob, value = m.groups() if m else (rest, None, None)
    name = MERGE_NAMES.get(method, method)
    knob_name = {"d": "density", "p": "drop p", "lam": "λ"}.get(knob or "", "")
    return f"Param-Merge ({name}{f', {knob_name} {value}' if knob else ''})"


def row_specs(runs: dict, domains: list[str]) -> list[tuple[str, str, str]]:
    """(label, recipe, model) in the table's order, for the recipes that exist."""
    rows = [("Base", "copd", "base")]
    rows += [(f"{d.capitalize()}-Expert", "expert", d) for d in domains]
    rows += [("Mixed RLVR", "mixed", "mixed")]
    for recipe in sorted(r for r in runs if r.startswith("static_opd_")):
        teacher, _, student = recipe.removeprefix("static_opd_").partition("_to_")
        rows.append((f"Static OPD {teacher}→{student}", recipe, student))
    rows += [("MOPD", "mopd", "student")]
    rows += [(_merge_label(r), r, "merged") for r in sorted(runs) if r.startswith("merge_")]
    rows += [("CoPD β=0 (merged)", "copd_beta0", "merged")]
    rows += [("**CoPD (merged)**", "copd", "merged")]
    rows += [(f"CoPD {d} branch (no merge)", "copd", d) for d in domains]
    return [r for r in rows if r[1] in runs]


def scores(runs: dict, recipe: str, model: str, domains: list[str], metric: str) -> dict[int, dict[str, float]]:
    """seed -> {domain..., AVG} in percent, for the seeds where ``model`` was evaluated."""
    out = {}
    for seed, table in runs.get(recipe, {}).items():
        if model in table and all(metric in table[model].get(d, {}) for d in domains):
            per = {d: 100 * table[model][d][metric] for d in domains}
            per[AVG] = statistics.fmean(per.values())
            out[seed] = per
    return out


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    return f"{mean:.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def paired(a: dict[int, dict], b: dict[int, dict]) -> list[float]:
    return [a[s][AVG] - b[s][AVG] for s in sorted(set(a) & set(b))]


def table(root: Path, metric: str) -> tuple[str, dict[str, dict[int, dict]]]:
    runs = collect(root)
    domains = sorted({d for tables in runs.values() for t in tables.values() for m in t.values() for d in m})
    rows = {label: scores(runs, recipe, model, domains, metric) for label, recipe, model in row_specs(runs, domains)}
    rows = {k: v for k, v in rows.items() if v}
    base, copd = rows.get("Base", {}), rows.get("**CoPD (merged)**", {})
    seeds = max((len(v) for v in rows.values()), default=0)
    what = "greedy pass@1" if metric == "pass@1" else f"sampled pass@1 ({metric}, T = 1)"
    head = f"| Model | {' | '.join(domains)} | {AVG} | Δ avg vs Base | Δ avg vs CoPD |"
    lines = [f"Held-out {what} (%), mean ± std over {seeds} seed(s); Δ: paired per-seed differences.", "",
             head, "|---|" + "---:|" * (len(domains) + 3)]  # fmt: skip
    for label, per in rows.items():
        cells = [mean_std([p[c] for p in per.values()]) for c in domains + [AVG]]
        cells.append(mean_std(paired(per, base)) if label != "Base" else "")
        cells.append(mean_std(paired(per, copd)) if label != "**CoPD (merged)**" else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if base and copd:
        lines += ["", verdict(paired(copd, base), what)]
    return "\n".join(lines) + "\n", rows


def verdict(deltas: list[float], what: str) -> str:
    """One line: CoPD (merged) minus Base on the overall average, against the seed spread."""
    mean = statistics.fmean(deltas)
    if len(deltas) < 2:
        return f"CoPD (merged) − Base, {AVG} {what}: {mean:+.1f} points (1 seed: no spread to compare with)."
    sd = statistics.stdev(deltas)
    ratio = abs(mean) / sd if sd > 0 else float("inf")
    word = "above" if mean > 0 else "below"
    clear = "well outside" if ratio >= 3 else "NOT clearly outside"
    return (f"CoPD (merged) − Base, {AVG} {what}: {mean:+.1f} ± {sd:.1f} points over {len(deltas)} seeds: "
            f"{word} the base by {ratio:.1f}× the seed-to-seed std ({clear} the seed spread).")  # fmt: skip


def plot(rows: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    cols = list(next(iter(next(iter(rows.values())).values())))
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.8 / len(cols)
    for i, c in enumerate(cols):
        vals = [[p[c] for p in rows[n].values()] for n in names]
        means = [statistics.fmean(v) for v in vals]
        errs = [statistics.stdev(v) if len(v) > 1 else 0 for v in vals]
        ax.bar([x + i * width for x in range(len(names))], means, width, yerr=errs, label=c, capsize=2)
    labels = [n.replace("**", "") for n in names]
    ax.set_xticks([x + width * (len(cols) - 1) / 2 for x in range(len(names))], labels, rotation=35, ha="right",
                  fontsize=8)  # fmt: skip
    ax.set_ylabel("held-out accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--out", type=Path)
    p.add_argument("--plot", type=Path, help="bar chart of the first metric's table")
    p.add_argument("--metric", nargs="+", default=["mean@4", "pass@1"], help="eval metrics, one table each")
    a = p.parse_args()
    texts, first = [], {}
    for metric in a.metric:
        t, r = table(a.root, metric)
        if r:
            texts.append(t)
            first = first or r
    text = "\n".join(texts)
    if a.out:
        a.out.write_text(text)
    if a.plot and first:
        plot(first, a.plot)
    print(text)


if __name__ == "__main__":
    main()
