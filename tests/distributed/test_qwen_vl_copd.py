"""CoPD on a tiny Qwen3-VL base through the trainer's command line (the paper's 2-branch setting).

A tiny Qwen3-VL base (``tools/make_base.py --vision qwen3-vl-tiny``: Qwen ViT with a DeepStack tap,
a language model with interleaved mRoPE) is SFT-trained briefly on counting letters (text) and
counting coloured shapes (images) so RLVR has signal. ``copd-train`` then runs a text branch and an
image branch: two RLVR steps and one Phase II step of bidirectional OPD, evaluation and the merge.
Checked: the run's numbers (rewards, gradients, cross samples with images in both directions, the
engine/trainer log-prob gap), that the image branch's ViT weights moved away from the base while
both branches started from it, and that identical branches give an OPD log-ratio of exactly 0 on
cross samples that carry images (the teacher sees the student's images at the same positions).
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

CFG = ROOT / "tests" / "configs" / "copd_qwen_vl_tiny.yaml"


@pytest.fixture(scope="module")
def qwen_base(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen_vl_base")
    cmd = [sys.executable, "tools/make_base.py", "--out", str(out), "--vision", "qwen3-vl-tiny", "--families", "count",
           "shape_count", "--steps", "60", "--batch", "24", "--eval-prompts", "8"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    base = json.loads((out / "base.json").read_text())
    assert base["model"]["arch"] == "qwen3_vl" and base["model"]["vision"]["deepstack_layers"] == [0]
    return out


def _overrides(base: Path, run_dir: Path) -> list[str]:
    vocab = json.loads((base / "base.json").read_text())["vocab_size"]
    return [f"tokenizer={base / 'tokenizer.model'}", f"checkpoint.base={base / 'checkpoint'}",
            f"model.vocab_size={vocab}", f"run_dir={run_dir}"]  # fmt: skip


def _vision_weights(base: str, run_dir: str) -> dict:
    from megatron.core import dist_checkpointing

    ckpts = Path(run_dir) / "checkpoints"
    it = ckpts / (ckpts / "latest").read_text().strip()
    load = dist_checkpointing.load_plain_tensors
    out = {"base": load(str(Path(base) / "checkpoint"))}
    out.update({b: load(str(it / b)) for b in ("text", "image")})
    return {k: {n: t for n, t in v.items() if n.startswith("vision_model.") and isinstance(t, torch.Tensor)}
            for k, v in out.items()}  # fmt: skip


def test_copd_train_runs_a_qwen3_vl_text_and_image_branch_end_to_end(qwen_base, tmp_path):
    run_dir = tmp_path / "run"
    token = uuid.uuid4().hex
    env = {**os.environ, "COPD_TEST_SESSION": token, "OMP_NUM_THREADS": "1"}
    env.pop("COPD_FAULT", None)
    cmd = [sys.executable, "-m", "copd_megatron.cli", str(CFG), *_overrides(qwen_base, run_dir)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        reap(token)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    rl, opd = rows[:2], rows[2]
    for b in ("text", "image"):
        assert any(r[f"branch/{b}/grad_norm"] > 0 for r in rl), f"{b}: RLVR never had a non-degenerate group"
        assert max(r[f"branch/{b}/native/reward"] for r in rows) > 0
        # Engine (KV cache, media encoded once) vs trainer (whole rows): equal up to renormalising
        # over the vocabulary without the never-sampled placeholder ids, far from an O(1) mismatch.
        assert all(r[f"branch/{b}/rollout_logp_abs_diff"] < 0.05 for r in rows), b
    assert opd["branch/text/cross/image/rows"] > 0 and opd["branch/image/cross/text/rows"] > 0
    assert opd["branch/image/grad_norm"] > 0

    w = run_distributed(_vision_weights, 1, args=(str(qwen_base), str(run_dir)), timeout=200)[0]
    names = set(w["base"])
    assert any(n.startswith("vision_model.deepstack_mergers.") for n in names), sorted(names)[:8]
    assert names == set(w["image"]) == set(w["text"])
    assert any(not torch.equal(w["base"][n], w["image"][n]) for n in names), "the image branch's ViT did not train"

    assert (run_dir / "merged" / "metadata.json").is_file()
    table = json.loads((run_dir / "eval.json").read_text())["table"]
    assert {"base", "text", "image", "merged"} <= set(table)
    assert set(table["merged"]) == {"count", "shape_count"}
    assert "| merged |" in done.stdout


def _run(base: str, run_dir: str, overrides: list[str]):
    from copd_megatron.config import load_config

    return run_recipe_here(load_config(CFG, [*_overrides(Path(base), Path(run_dir)), *overrides]))


def test_identical_qwen3_vl_branches_give_zero_opd_advantage_on_image_cross_samples(qwen_base, tmp_path):
    run_dir = tmp_path / "same"
    overrides = ["schedule.s_rl=0", "schedule.s_opd=1", "optimizer.lr=0.0", "eval.prompts_per_domain=2"]
    run_distributed(_run, 1, args=(str(qwen_base), str(run_dir), overrides), timeout=400)
    (row,) = metrics(run_dir)
    for student, teacher in [("text", "image"), ("image", "text")]:
        assert row[f"branch/{student}/cross/{teacher}/rows"] > 0
        assert row[f"branch/{student}/cross/{teacher}/opd_logratio"] == 0.0, (student, teacher)
        assert row[f"pair/{student}->{teacher}/overlap"] == 1.0


def _engine_vs_trainer(base: str) -> dict:
    """Rollouts of image and text prompts (different lengths in one batch) with and without the KV
    cache, and the trainer's forward over the finished rows."""
    from copd_megatron.config import load_config, validate
    from copd_megatron.data.batch import RAGGED, Batch
    from copd_megatron.data.media import prompt_inputs, resolve_samples
    from copd_megatron.data.tokenizer import load_tokenizer
    from copd_megatron.distributed.groups import shared_groups
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.provider import forward_of, make_provider
    from copd_megatron.rewards.synthetic import generate
    from copd_megatron.rollout.megatron_engine import MegatronEngine
    from copd_megatron.rollout.types import GenerationRequest, SamplingParams

    cfg = load_config(CFG, _overrides(Path(base), Path(base) / "unused"))
    init_model_parallel(validate(cfg, 1))
    set_seed(3)
    provider = make_provider(cfg.model, cfg.parallel, cfg.precision)
    (chunk,) = provider.build_chunks(shared_groups())
    tok = load_tokenizer(Path(base) / "tokenizer.model")
    samples = resolve_samples(generate("shape_count", 3, 2, seed=5), cfg.model.vision, "shape_count")
    samples += generate("count", 2, 2, seed=5)
    inputs = [prompt_inputs(tok, s) for s in samples]
    requests = [GenerationRequest(list(ids), seed=k, media=m) for k, (ids, m) in enumerate(inputs)]
    params = SamplingParams(max_new_tokens=6, temperature=1.0)
    out = {}
    for cache in (True, False):
        engine = MegatronEngine(chunk, cfg.model.vocab_size, pad_id=tok.pad_id, use_kv_cache=cache, provider=provider,
                                groups=shared_groups())  # fmt: skip
        out[cache] = engine.generate(requests, params)
    r = out[True]
    batch = Batch(r.tokens).set("media", list(r.media), RAGGED)
    (mb,) = batch.micro_batches(len(requests), trim=False)
    with torch.no_grad():
        logits = forward_of(provider)(chunk, mb)[: len(requests), : r.tokens.shape[1] - 1, : cfg.model.vocab_size].float()
    logits[..., list(provider.never_sample)] = float("-inf")  # what the sampler drew from
    trainer = torch.log_softmax(logits, -1).gather(-1, r.tokens[:, 1:, None])[..., 0]
    return {"tokens": (out[True].tokens, out[False].tokens), "logprobs": (out[True].logprobs, out[False].logprobs),
            "trainer": trainer, "mask": r.response_mask[:, 1:].bool(), "lens": [len(i) for i, _ in inputs],
            "media": [bool(m) for _, m in inputs]}  # fmt: skip


def test_qwen3_vl_engine_kv_cache_equals_recomputation_and_the_trainer(qwen_base):
    r = run_distributed(_engine_vs_trainer, 1, args=(str(qwen_base),), timeout=300)[0]
    assert r["media"] == [True, True, True, False, False] and len(set(r["lens"])) > 1
    torch.testing.assert_close(r["tokens"][0], r["tokens"][1], rtol=0, atol=0)
    torch.testing.assert_close(r["logprobs"][0], r["logprobs"][1], rtol=0, atol=1e-5)
    m = r["mask"]
    torch.testing.assert_close(r["trainer"][m], r["logprobs"][0][:, 1:][m], rtol=0, atol=1e-5)


COMPARED = ("/loss", "/native/reward", "/grad_norm", "/opd_logratio", "/teacher_version", "/overlap", "/entropy")


def _launch(base: Path, run_dir: Path, nproc: int, *extra: str) -> int:
    return launch_cli([str(CFG), *_overrides(base, run_dir), *extra], run_dir, nproc)


@pytest.mark.slow  # two torchrun worlds on a 2-core machine: a few minutes
def test_qwen3_vl_disjoint_placement_equals_colocated(qwen_base, tmp_path):
    """Each branch on its own rank: Qwen media dicts (patches, grids, timestamps) travel with the score
    requests between branches, and the run equals the colocated one step by step."""
    assert _launch(qwen_base, tmp_path / "colocated", 1) == 0
    assert _launch(qwen_base, tmp_path / "disjoint", 2, "parallel.placement=disjoint") == 0
    a, b = metrics(tmp_path / "colocated"), metrics(tmp_path / "disjoint")
    assert len(a) == len(b) == 3
    assert any("/cross/image/" in k for k in a[-1])  # the Phase II step scored image cross samples
    for x, y in zip(a, b):
        for k in (k for k in x if k.endswith(COMPARED)):
            assert y[k] == pytest.approx(x[k], rel=1e-5, abs=1e-6), (x["step"], k)


@pytest.mark.slow  # its own base (about a minute) and run
def test_qwen2_5_vl_text_and_video_branch_end_to_end(tmp_path):
    """Qwen2.5-VL (window attention, chunked mRoPE with temporal ids per second) with a video branch:
    the engine and the trainer agree on video rollouts, and OPD trains the video branch on the text
    branch's rollouts."""
    base = tmp_path / "base"
    cmd = [sys.executable, "tools/make_base.py", "--out", str(base), "--vision", "qwen2.5-vl-tiny", "--families",
           "count", "video_motion", "--steps", "60", "--batch", "24", "--eval-prompts", "4"]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    video = ["model.arch=qwen2_5_vl", "model.vision.preset=qwen2.5-vl-tiny", "branches.1.name=video",
             "branches.1.data=synthetic:video_motion", "branches.1.verifier=synthetic_video_motion"]  # fmt: skip
    assert _launch(base, tmp_path / "run", 1, *video) == 0, (tmp_path / "run.log").read_text()[-3000:]
    rows = metrics(tmp_path / "run")
    assert len(rows) == 3 and all(r["branch/video/rollout_logp_abs_diff"] < 0.02 for r in rows)
    assert rows[-1]["branch/video/cross/text/rows"] > 0 and rows[-1]["branch/video/grad_norm"] > 0
    assert (tmp_path / "run" / "merged" / "metadata.json").is_file()
