"""CoPD end to end on CPU: live teachers, identical branches, TP=2 == TP=1, baselines, CLI run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from copd_megatron.testing import run_distributed

ROOT = Path(__file__).resolve().parents[2]
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A small base (tokenizer + briefly SFT-ed tiny model) shared by the tests of this module."""
    out = tmp_path_factory.mktemp("base")
    cmd = [sys.executable, "tools/make_base.py", "--out", str(out), "--families", "count", "sort", "--difficulty", "4",
           "--steps", "60", "--eval-prompts", "8", "--model", *MODEL]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=300)
    return out


def _config(base: Path, run_dir: Path, *overrides: str):
    from copd_megatron.config import load_config

    vocab = json.loads((base / "base.json").read_text())["vocab_size"]
    return load_config(ROOT / "configs/count_sort_cpu.yaml", [
        f"tokenizer={base / 'tokenizer.model'}", f"checkpoint.base={base / 'checkpoint'}", f"run_dir={run_dir}",
        f"model.vocab_size={vocab}", *MODEL, "schedule.cycles=1", "schedule.s_rl=1", "schedule.s_opd=1",
        "rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_new_tokens=6", "eval.prompts_per_domain=8",
        "eval.overlap_prompts=4", "parallel.micro_batch_size=8", *overrides,
    ])  # fmt: skip


def _run(cfg):
    from copd_megatron.config import validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.trainer import run_recipe

    layout = validate(cfg, torch.distributed.get_world_size())
    init_model_parallel(layout)
    set_seed(cfg.seed)
    return run_recipe(cfg, layout)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _live_teacher_worker(base: str, run_dir: str) -> dict:
    """Record the teacher weights used for OPD and every branch's weights after each update."""
    from copd_megatron.copd import rlvr
    from copd_megatron.training import policy

    def fingerprint(chunks) -> float:
        return float(sum(p.detach().double().sum() for c in chunks for p in c.parameters()))

    seen = {"teacher": [], "after": []}
    orig_cross, orig_update = rlvr.cross_batch, policy.policy_update

    def cross_batch(student_chunks, teacher_chunks, *a, **k):
        seen["teacher"].append(fingerprint(teacher_chunks))
        return orig_cross(student_chunks, teacher_chunks, *a, **k)

    def policy_update(branch, *a, **k):
        out = orig_update(branch, *a, **k)
        seen["after"].append(fingerprint(branch.chunks))
        return out

    rlvr.cross_batch = cross_batch
    import copd_megatron.copd.branches as B

    B.cross_batch = cross_batch
    policy.policy_update = policy_update
    _run(_config(Path(base), Path(run_dir), "schedule.s_rl=2", "schedule.s_opd=2", "optimizer.lr=1e-2"))
    return seen


def test_teachers_are_live_peers_from_the_previous_step(base, tmp_path):
    seen = run_distributed(_live_teacher_worker, 1, args=(str(base), str(tmp_path / "run")), timeout=300)[0]
    after = seen["after"]  # per step: [count, sort]; steps 0,1 RL, steps 2,3 OPD
    assert len(after) == 8 and len(seen["teacher"]) == 4
    for s, (t_count_student, t_sort_student) in zip((2, 3), zip(seen["teacher"][::2], seen["teacher"][1::2])):
        prev_count, prev_sort = after[2 * (s - 1)], after[2 * (s - 1) + 1]
        assert t_count_student == prev_sort  # count's teacher = sort after step s-1 ...
        assert t_sort_student == prev_count  # ... and sort's teacher = count after step s-1
        assert t_count_student != after[2 * s + 1]  # not the future (sort after step s)


def test_identical_branches_give_zero_opd_advantage_and_full_overlap(base, tmp_path):
    run_dir = tmp_path / "same"
    cfg = _config(base, run_dir, "schedule.s_rl=0", "schedule.s_opd=1", "optimizer.lr=0.0")
    run_distributed(_run, 1, args=(cfg,), timeout=300)
    (row,) = _metrics(run_dir)
    assert row["branch/count/cross/sort/opd_logratio"] == 0.0
    assert row["branch/sort/cross/count/opd_logratio"] == 0.0
    assert row["pair/count->sort/overlap"] == 1.0 and row["pair/sort->count/overlap"] == 1.0
    assert row["pair/count->sort/sym_kl"] == pytest.approx(0.0, abs=1e-6)


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
    cfg_args = [f"tokenizer={base / 'tokenizer.model'}", f"checkpoint.base={base / 'checkpoint'}", f"run_dir={run_dir}",
                f"model.vocab_size={json.loads((base / 'base.json').read_text())['vocab_size']}", *MODEL,
                "schedule.cycles=1", "schedule.s_rl=1", "schedule.s_opd=1", "rollout.prompts_per_step=4",
                "rollout.group_size=4", "eval.prompts_per_domain=8", "eval.overlap_prompts=4"]  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "copd_megatron.cli", "configs/count_sort_cpu.yaml", *cfg_args], cwd=ROOT,
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
        _run(_config(Path(base), run_dir, f"schedule.opd_loss={kind}", "optimizer.lr=1e-3"))
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


def test_copd_resume_after_sigkill_matches_the_uninterrupted_run(base, tmp_path):
    """Data streams, sampling seeds, optimizer and scheduler state all come back: the resumed
    run's steps are the uninterrupted run's steps."""
    import os
    import uuid

    from copd_megatron.testing import reap

    vocab = json.loads((base / "base.json").read_text())["vocab_size"]
    common = [f"tokenizer={base / 'tokenizer.model'}", f"checkpoint.base={base / 'checkpoint'}",
              f"model.vocab_size={vocab}", *MODEL, "schedule.cycles=1", "schedule.s_rl=2", "schedule.s_opd=2",
              "rollout.prompts_per_step=4", "rollout.group_size=4", "eval.prompts_per_domain=8",
              "eval.overlap_prompts=4", "checkpoint.save_interval=2", "optimizer.lr=1e-3"]  # fmt: skip

    def cli(run_dir, *extra, fault=None):
        token = uuid.uuid4().hex
        env = {**os.environ, "COPD_TEST_SESSION": token, **({"COPD_FAULT": fault} if fault else {})}
        with open(tmp_path / f"{run_dir.name}.log", "w") as log:
            try:
                return subprocess.run([sys.executable, "-m", "copd_megatron.cli", "configs/count_sort_cpu.yaml",
                                       f"run_dir={run_dir}", *common, *extra], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, timeout=300).returncode  # fmt: skip
            finally:
                reap(token)

    assert cli(tmp_path / "full") == 0
    assert cli(tmp_path / "killed", fault="train@3") != 0  # dies inside step 3 (Phase II)
    ckpts = tmp_path / "killed" / "checkpoints"
    assert cli(tmp_path / "resumed", f"checkpoint.load_dir={ckpts}") == 0
    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for key in ("branch/count/loss", "branch/sort/loss", "branch/count/native/reward",
                    "branch/sort/cross/count/opd_logratio", "branch/count/grad_norm"):  # fmt: skip
            assert a[key] == b[key], key
