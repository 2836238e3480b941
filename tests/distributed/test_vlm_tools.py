"""Vision-language checkpoints through the tools: ``tools/make_base.py --vision`` builds a base
(tokenizer with reserved ``<image>`` / ``<video>`` ids, ViT + projector + language model SFT'd on
text, image and video families), ``copd-merge`` averages every tensor (the vision tower and the
projector too) at TP=2 from TP=1 inputs, and ``copd-eval`` scores image, video and text sets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from copd_megatron.testing import run_distributed

ROOT = Path(__file__).resolve().parents[2]


def _load(path: str, tp: int):
    """The VLM of checkpoint ``path`` built and loaded at TP=``tp`` (this world)."""
    from copd_megatron.checkpoint.dist_ckpt import load_model, read_meta
    from copd_megatron.config import ParallelConfig, PrecisionConfig
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks

    model_cfg, _ = read_meta(path)
    init_model_parallel(resolve_layout(ParallelConfig(tp=tp), model_cfg, dist.get_world_size()))
    set_seed(0)
    chunks = build_model_chunks(model_cfg, ParallelConfig(tp=tp), PrecisionConfig(params_dtype="fp32"))
    load_model(chunks, path)
    return chunks[0], model_cfg


def _make_branch(base: str, branch: str) -> dict:
    """A branch = base + seeded noise on every parameter, saved at TP=1; both as full tensors."""
    from copd_megatron.checkpoint.dist_ckpt import save_model

    model, model_cfg = _load(base, 1)
    a = {k: p.detach().clone() for k, p in model.named_parameters()}
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_model([model], branch, model_cfg, "fp32")
    return {"a": a, "b": {k: p.detach().clone() for k, p in model.named_parameters()}}


def _merge(base: str, branch: str, merged: str) -> dict:
    """copd-merge at TP=2 (inside this 2-rank world), then the result loaded whole (TP=1, DP=2)."""
    from copd_megatron.checkpoint.merge_cli import main as merge_main

    assert merge_main(["--inputs", base, branch, "--out", merged, "--tp", "2"]) == 0
    dist.barrier()  # rank 0 writes copd_meta.yaml after the collective save
    model, _ = _load(merged, 1)
    return {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.mark.slow  # ~1-3 minutes: make_base, two worlds and copd-eval as subprocesses
def test_vlm_base_merge_and_eval(tmp_path):
    base = tmp_path / "base"
    cmd = [sys.executable, "tools/make_base.py", "--out", str(base), "--vision", "tiny", "--families", "count",
           "shape_count", "video_motion", "--steps", "3", "--batch", "6", "--eval-prompts", "2"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((base / "base.json").read_text())
    assert set(summary["pass@1"]) == {"count", "shape_count", "video_motion"}
    vision = summary["model"]["vision"]
    assert (vision["image_token_id"], vision["video_token_id"]) == (4, 5)  # right after pad/unk/bos/eos
    bad = subprocess.run([sys.executable, "tools/make_base.py", "--out", str(tmp_path / "x"), "--families",
                          "shape_count"], capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().endswith("add --vision tiny for a vision-language base")

    ckpt, branch, merged = str(base / "checkpoint"), str(tmp_path / "branch"), str(tmp_path / "merged")
    full = run_distributed(_make_branch, 1, args=(ckpt, branch), timeout=200)[0]
    shards = run_distributed(_merge, 2, args=(ckpt, branch, merged), timeout=300)
    names = set(full["a"])
    assert any(n.startswith("vision_model.") for n in names) and any(n.startswith("vision_projection.") for n in names)
    assert set(shards[0]) == names
    for name in names:
        want = (full["a"][name] + full["b"][name]) / 2
        torch.testing.assert_close(shards[0][name], want, rtol=1e-6, atol=1e-6, msg=name)

    r = subprocess.run(
        [sys.executable, "-m", "copd_megatron.eval_cli", "--checkpoint", merged, "--tokenizer",
         str(base / "tokenizer.model"), "--set", "img=synthetic:shape_count:2", "--set", "vid=synthetic:video_motion:2",
         "--set", "txt=synthetic:count:2", "--limit", "4", "--out", str(tmp_path / "eval.json")],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert {k: v["n"] for k, v in results.items()} == {"img": 4, "vid": 4, "txt": 4}
    assert "| img | 4 |" in r.stdout


def test_eval_refuses_a_visual_set_for_a_text_checkpoint():
    from copd_megatron.config import ConfigError
    from copd_megatron.eval_cli import parse_sets

    with pytest.raises(ConfigError, match="family 'shape_count' has images; the checkpoint has no model.vision"):
        parse_sets(["img=synthetic:shape_count:2"], 4, 0, vision=None)
