"""CoPD with vision-language branches: a text hub with image and video spokes (the paper's setting).

A tiny VLM base is built once (``tools/make_base.py --vision tiny`` on count, shape_count and
video_motion). Identical branches give an OPD advantage of exactly 0 on cross samples that carry
images and videos (the hub scores its spokes' rollouts of their own image/video prompts, and the
spokes the hub's text ones); a run killed by SIGKILL inside a Phase II step resumes to exactly
the uninterrupted run's numbers and final weights (vision tower, projector and Adam moments
included), and produces a merged checkpoint and an evaluation table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from copd_megatron.testing import reap, run_distributed
from tests.distributed.conftest import ROOT, launch_cli, metrics, run_recipe_here

VLM = ROOT / "tests" / "configs" / "copd_vlm_tiny.yaml"
BRANCHES = ("text", "image", "video")


@pytest.fixture(scope="module")
def vlm_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vlm_base")
    cmd = [sys.executable, "tools/make_base.py", "--out", str(out), "--vision", "tiny", "--families", "count",
           "shape_count", "video_motion", "--steps", "40", "--batch", "24", "--eval-prompts", "4"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def _overrides(base: Path, run_dir: Path) -> list[str]:
    vocab = json.loads((base / "base.json").read_text())["vocab_size"]
    return [f"tokenizer={base / 'tokenizer.model'}", f"checkpoint.base={base / 'checkpoint'}",
            f"model.vocab_size={vocab}", f"run_dir={run_dir}"]  # fmt: skip


def _run(base: str, run_dir: str, overrides: list[str]):
    from copd_megatron.config import load_config

    return run_recipe_here(load_config(VLM, [*_overrides(Path(base), Path(run_dir)), *overrides]))


def test_identical_branches_give_zero_opd_advantage_on_image_and_video_cross_samples(vlm_base, tmp_path):
    run_dir = tmp_path / "same"
    overrides = ["schedule.s_rl=0", "schedule.s_opd=1", "optimizer.lr=0.0"]
    run_distributed(_run, 1, args=(str(vlm_base), str(run_dir), overrides), timeout=400)
    (row,) = metrics(run_dir)
    for student, teacher in [("text", "image"), ("text", "video"), ("image", "text"), ("video", "text")]:
        assert row[f"branch/{student}/cross/{teacher}/rows"] > 0
        assert row[f"branch/{student}/cross/{teacher}/opd_logratio"] == 0.0, (student, teacher)
        assert row[f"pair/{student}->{teacher}/overlap"] == 1.0
    assert "pair/image->video/overlap" not in row  # hub topology: spokes do not teach each other


RESUME = ["schedule.s_rl=1", "schedule.s_opd=2", "checkpoint.save_interval=2"]
COMPARED = ("/loss", "/native/reward", "/grad_norm", "/opd_logratio", "/teacher_version", "/overlap", "/entropy")


def _cli(base: Path, run_dir: Path, *extra: str, fault: str | None = None) -> tuple[int, str]:
    """Exit code and output of a CLI run. Output goes to a file and every process of the run is reaped
    by its environment token: Megatron's checkpoint writer starts helpers that outlive a SIGKILLed
    rank and would hold a pipe open forever."""
    token = uuid.uuid4().hex
    env = {**os.environ, "COPD_TEST_SESSION": token, "OMP_NUM_THREADS": "1"}
    env.pop("COPD_FAULT", None)
    if fault:
        env["COPD_FAULT"] = fault
    cmd = [sys.executable, "-m", "copd_megatron.cli", str(VLM), *_overrides(base, run_dir), *RESUME, *extra]
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600).returncode
        finally:
            reap(token)
    return rc, log.read_text()


def _final(run_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    ckpts = Path(run_dir) / "checkpoints"
    it = ckpts / (ckpts / "latest").read_text().strip()
    return {b: {k: v for k, v in dist_checkpointing.load_plain_tensors(str(it / b)).items() if isinstance(v, torch.Tensor)}
            for b in BRANCHES}  # fmt: skip


def _two(a: str, b: str):
    return _final(a), _final(b)


def test_hub_run_resumes_after_sigkill_exactly_and_merges(vlm_base, tmp_path):
    rc, out = _cli(vlm_base, tmp_path / "full")
    assert rc == 0, out[-3000:]
    rc, _ = _cli(vlm_base, tmp_path / "killed", fault="train@3")  # inside the second Phase II step
    assert rc != 0
    ckpts = tmp_path / "killed" / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000002"
    rc, out = _cli(vlm_base, tmp_path / "resumed", f"checkpoint.load_dir={ckpts}")
    assert rc == 0, out[-3000:]

    a, b = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert [r["step"] for r in b] == [3]
    keys = [k for k in a[2] if k.endswith(COMPARED)]
    assert any("/cross/image/" in k for k in keys) and any("/cross/video/" in k for k in keys)
    for k in keys:
        assert a[2][k] == b[0][k], k
    wa, wb = run_distributed(_two, 1, args=(str(tmp_path / "full"), str(tmp_path / "resumed")), timeout=200)[0]
    for branch in BRANCHES:
        names = set(wa[branch])
        assert any(k.startswith("vision_model.") for k in names) and any("vision_projection" in k for k in names)
        assert any(k.startswith("optimizer.") for k in names), "Adam moments must be compared too"
        for k in names:
            assert torch.equal(wa[branch][k], wb[branch][k]), f"{branch} {k}"

    for run in ("full", "resumed"):
        assert (tmp_path / run / "merged" / "metadata.json").is_file()
    table = json.loads((tmp_path / "resumed" / "eval.json").read_text())["table"]
    assert {"base", *BRANCHES, "merged"} <= set(table)
    assert set(table["merged"]) >= {"count", "shape_count", "video_motion"}
    assert table == json.loads((tmp_path / "full" / "eval.json").read_text())["table"]
    assert "| merged |" in out


def _launch(base: Path, run_dir: Path, nproc: int, *extra: str) -> int:
    return launch_cli([str(VLM), *_overrides(base, run_dir), *extra], run_dir, nproc)


@pytest.mark.slow  # three ranks on a 2-core machine: a few minutes
def test_disjoint_placement_equals_colocated(vlm_base, tmp_path):
    """Each branch on its own rank: media travel with the score requests between branches, and the
    run equals the colocated one step by step."""
    assert _launch(vlm_base, tmp_path / "colocated", 1, "rollout.prompts_per_step=6") == 0
    assert _launch(vlm_base, tmp_path / "disjoint", 3, "rollout.prompts_per_step=6", "parallel.placement=disjoint") == 0
    a, b = metrics(tmp_path / "colocated"), metrics(tmp_path / "disjoint")
    assert len(a) == len(b) == 2
    assert any("/cross/image/" in k for k in a[-1])  # the Phase II step scored image cross samples
    for x, y in zip(a, b):
        for k in (k for k in x if k.endswith(COMPARED)):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["step"], k)
