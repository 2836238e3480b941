"""The reproduction's bookkeeping: the comparison table's statistics and labels
(tools/compare_runs.py) and the commands the driver runs (tools/reproduce_table.py)."""

from __future__ import annotations

import json
import statistics
import sys
from argparse import Namespace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import compare_runs
import reproduce_table


def _write(root: Path, recipe: str, seed: int, data: dict) -> None:
    d = root / recipe / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "eval.json").write_text(json.dumps(data))


def _cell(a: float, b: float) -> dict:
    return {"a": {"pass@1": a, "mean@4": a / 2}, "b": {"pass@1": b, "mean@4": b / 2}}


def test_table_rows_means_paired_deltas_and_verdict(tmp_path):
    merged = {1: (0.60, 0.70), 2: (0.62, 0.74), 3: (0.58, 0.66)}
    for seed, (a, b) in merged.items():
        _write(tmp_path, "copd", seed, {"table": {"base": _cell(0.3, 0.4), "merged": _cell(a, b),
                                                  "a": _cell(a, 0.5), "b": _cell(0.4, b)}})  # fmt: skip
        _write(tmp_path, "expert", seed, {"table": {"base": _cell(0.3, 0.4), "a": _cell(0.8, 0.2), "b": _cell(0.1, 0.9)}})
        _write(tmp_path, "merge_ties_d0.2", seed, {"checkpoint": "x", "results": _cell(0.5 + seed / 100, 0.6)})
        _write(tmp_path, "static_opd_b_to_a", seed, {"table": {"a": _cell(0.45, 0.45), "b": _cell(0.1, 0.9)}})
    text, rows = compare_runs.table(tmp_path, "pass@1")
    assert list(rows) == ["Base", "A-Expert", "B-Expert", "Static OPD b→a", "Param-Merge (TIES, density 0.2)",
                          "**CoPD (merged)**", "CoPD a branch (no merge)", "CoPD b branch (no merge)"]  # fmt: skip
    avgs = [100 * (a + b) / 2 for a, b in merged.values()]
    line = next(x for x in text.splitlines() if x.startswith("| **CoPD (merged)**"))
    assert f"{statistics.fmean(avgs):.1f} ± {statistics.stdev(avgs):.1f}" in line
    deltas = [x - 35.0 for x in avgs]  # base average: (30 + 40) / 2
    assert f"| {statistics.fmean(deltas):.1f} ± {statistics.stdev(deltas):.1f} |" in line
    ties = next(x for x in text.splitlines() if x.startswith("| Param-Merge (TIES"))
    paired = [100 * ((0.5 + s / 100 + 0.6) / 2) - avg for s, avg in zip(merged, avgs)]
    assert f"{statistics.fmean(paired):.1f} ± {statistics.stdev(paired):.1f} |" in ties.split("|")[-2] + "|"
    ratio = statistics.fmean(deltas) / statistics.stdev(deltas)
    assert f"by {ratio:.1f}× the seed-to-seed std (well outside the seed spread)" in text
    sampled, _ = compare_runs.table(tmp_path, "mean@4")
    assert "sampled pass@1 (mean@4, T = 1)" in sampled


def test_verdict_says_when_a_gain_is_inside_the_spread():
    assert "NOT clearly outside" in compare_runs.verdict([1.0, -0.5, 2.0], "x")
    assert "1 seed: no spread" in compare_runs.verdict([3.0], "x")


def test_driver_plans_every_recipe_and_merges_on_the_trainers_held_out_sets(tmp_path):
    from copd_megatron.config import load_config

    cfg = load_config(ROOT / "configs/demo_cpu.yaml", [])
    a = Namespace(base=tmp_path / "base", root=tmp_path / "t", config=Path("configs/demo_cpu.yaml"), seeds=[7],
                  skip=["mopd"], merges=["average", "ties_d0.5", "dare_ties_p0.9"], overrides=["optimizer.lr=2e-4"])  # fmt: skip
    jobs = {j.name: j for j in reproduce_table.plan(a, cfg, "PY")}
    assert set(jobs) == {"copd", "copd_beta0", "expert", "mixed", "static_opd_asc_to_desc", "static_opd_desc_to_asc",
                         "merge_average", "merge_ties_d0.5", "merge_dare_ties_p0.9"}  # fmt: skip
    beta0 = jobs["copd_beta0"].cmds[0]
    assert {"branches.0.beta=0", "branches.1.beta=0", "seed=7", "optimizer.lr=2e-4", "--force"} <= set(beta0)
    # The driver's capture of a run's output lies beside its run_dir, never inside (one run per run_dir).
    assert jobs["copd_beta0"].log == a.root / "copd_beta0" / "seed7.log"
    merge, ev = jobs["merge_ties_d0.5"].cmds
    assert merge[merge.index("--method") + 1 :][:3] == ["ties", "--density", "0.5"]
    assert merge[merge.index("--base") + 1] == str(a.base / "checkpoint")
    assert "--base" not in jobs["merge_average"].cmds[0]  # copd-merge refuses a base that average does not use
    # copd-eval sees exactly the trainer's held-out prompts: same family, level, count and seed.
    assert "--set=asc=synthetic:asc:4" in ev and "--set=desc=synthetic:desc:4" in ev
    for flag, value in (("--limit", cfg.eval.prompts_per_domain), ("--heldout-seed", cfg.eval.seed),
                        ("--seed", cfg.eval.seed),
                        ("--max-new-tokens", cfg.rollout.max_new_tokens), ("--samples", cfg.eval.samples)):  # fmt: skip
        assert ev[ev.index(flag) + 1] == str(value)
    # Work is counted in branch updates: CoPD = 2 branches x (36 RL + 1.3 x 24 OPD).
    assert jobs["copd"].cost == pytest.approx(2 * (36 + 1.3 * 24)) and jobs["mixed"].cost == 120
    with pytest.raises(SystemExit, match="expected METHOD"):
        reproduce_table.merge_args("ties_x0.2")
