"""CoPD end to end on CPU: live teachers, identical branches, TP=2 == TP=1, baselines, CLI run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from copd_megatron.testing import run_distributed

from tests.distributed.conftest import ROOT, TINY, base_overrides, run_recipe_here, tiny_config


def _config(base: Path, run_dir: Path, *overrides: str):
    return tiny_config(base, run_dir, "optimizer.lr=5e-5", *overrides)


def _run(cfg):
    return run_recipe_here(cfg)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_teachers_are_live_peers_from_the_previous_step(base, tmp_path):
    """At step s (0-based) every branch has made s updates; a teacher must answer with exactly that
    weight version (its weights after step s-1), which the trainer asserts and records."""
    run_dir = tmp_path / "run"
    cfg = _config(base, run_dir, "schedule.s_rl=2", "schedule.s_opd=2", "optimizer.lr=1e-2")
    run_distributed(_run, 1, args=(cfg,), timeout=300)
    rows = _metrics(run_dir)
    assert [r["phase_opd"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    for s, row in enumerate(rows[2:], start=2):
        assert row["branch/count/cross/sort/teacher_version"] == s  # sort after its update of step s-1
        assert row["branch/sort/cross/count/teacher_version"] == s


def test_a_teacher_from_the_future_is_refused(base, tmp_path):
    """The barrier is checked, not assumed: scoring with weights one update ahead fails loudly."""
    with pytest.raises(Exception, match="live-teacher invariant broken"):
        run_distributed(_future_teacher, 1, args=(str(base), str(tmp_path / "run")), timeout=300)


def _future_teacher(base: str, run_dir: str) -> None:
    from copd_megatron.copd import step as S

    orig = S.score_phase

    def ahead(env, st, pairs, measure, expected):  # pretend the peers already updated at this step
        return orig(env, st, pairs, measure, {k: v - 1 for k, v in expected.items()})

    S.score_phase = ahead
    _run(_config(Path(base), Path(run_dir), "schedule.s_rl=0", "schedule.s_opd=1"))


def test_identical_branches_give_zero_opd_advantage_and_full_overlap(base, tmp_path):
    run_dir = tmp_path / "same"
    cfg = _config(base, run_dir, "schedule.s_rl=0", "schedule.s_opd=1", "optimizer.lr=0.0")
    run_distributed(_run, 1, args=(cfg,), timeout=300)
    (row,) = _metrics(run_dir)
    assert row["branch/count/cross/sort/opd_logratio"] == 0.0
    assert row["branch/sort/cross/count/opd_logratio"] == 0.0
    assert row["pair/count->sort/overlap"] == 1.0 and row["pair/sort->count/overlap"] == 1.0
    assert row["pair/count->sort/kl"] == 0.0 and row["pair/sort->count/kl"] == 0.0


def _two_layouts(base: str, root: str) -> None:
    from megatron.core import parallel_state as ps

    _run(_config(Path(base), Path(root) / f"tp{ps.get_tensor_model_parallel_world_size()}", "parallel.tp=2"))


def test_tp2_matches_tp1(base, tmp_path):
    run_distributed(_run, 1, args=(_config(base, tmp_path / "tp1"),), timeout=300)
    run_distributed(_run, 2, args=(_config(base, tmp_path / "tp2", "parallel.tp=2"),), timeout=300)
    one, two = _metrics(tmp_path / "tp1"), _metrics(tmp_path / "tp2")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        for key in a:
            if key.endswith(("/loss", "/reward", "/grad_norm", "opd_logratio", "/overlap")):
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), key


@pytest.mark.parametrize("mode", ["expert", "mixed", "static_opd", "mopd"])
def test_baselines_run_with_the_same_trainer(base, tmp_path, mode):
    extra = ["schedule.static_teacher=sort", "schedule.static_student=count"] if mode == "static_opd" else []
    run_dir = tmp_path / mode
    run_distributed(_run, 1, args=(_config(base, run_dir, f"schedule.mode={mode}", *extra),), timeout=300)
    result = json.loads((run_dir / "eval.json").read_text())
    expected = {"expert": {"count", "sort"}, "mixed": {"mixed"}, "static_opd": {"count", "sort"},
                "mopd": {"count", "sort", "student"}}[mode]  # fmt: skip
    assert expected | {"base"} <= set(result["table"])
    steps = len(_metrics(run_dir))
    assert steps == {"expert": 2, "mixed": 4, "static_opd": 2, "mopd": 4}[mode]  # the budget accounting


def test_cli_run_produces_merged_checkpoint_eval_table_and_metrics(base, tmp_path):
    run_dir = tmp_path / "cli"
    cfg_args = [*base_overrides(base), f"run_dir={run_dir}"]
    out = subprocess.run([sys.executable, "-m", "copd_megatron.cli", str(TINY), *cfg_args], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert (run_dir / "merged" / "metadata.json").is_file()
    table = json.loads((run_dir / "eval.json").read_text())["table"]
    assert {"base", "count", "sort", "merged"} <= set(table)
    assert all(0.0 <= table[m][d]["pass@1"] <= 1.0 for m in table for d in ("count", "sort"))
    assert len(_metrics(run_dir)) == 2 and "| merged |" in out.stdout


def _variants(base: str, root: str) -> dict:
    out = {}
    for kind in ("sampled", "reverse_kl", "jsd", "topk_kl"):
        from megatron.core import parallel_state as ps

        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        run_dir = Path(root) / kind
        _run(_config(Path(base), run_dir, f"opd.loss={kind}", "optimizer.lr=1e-3"))
        out[kind] = _metrics(run_dir)[-1]
    return out


def test_full_vocabulary_opd_options_change_the_phase_two_loss(base, tmp_path):
    rows = run_distributed(_variants, 1, args=(str(base), str(tmp_path)), timeout=400)[0]
    sampled = rows.pop("sampled")["branch/count/loss"]
    for kind, row in rows.items():
        loss = row["branch/count/loss"]
        assert loss == loss and abs(loss) < 10, kind  # finite
        assert loss != sampled, f"{kind}: the divergence term must reach the loss"


def test_adaptive_rhythm_ends_phases_on_the_measured_overlap(base, tmp_path):
    """Floor 1.0: Phase I ends after one step (overlap < 1); ceiling 0: Phase II after one step."""
    run_dir = tmp_path / "adaptive"
    cfg = _config(base, run_dir, "schedule.s_rl=3", "schedule.s_opd=3", "schedule.adaptive=true",
                  "schedule.overlap_floor=1.01", "schedule.overlap_ceiling=0.0", "optimizer.lr=1e-3")  # fmt: skip
    run_distributed(_run, 1, args=(cfg,), timeout=300)
    rows = _metrics(run_dir)
    assert [r["phase_opd"] for r in rows] == [0.0, 1.0]  # 2 steps instead of 6
    assert all("pair/count->sort/overlap" in r for r in rows)  # measured after every step
