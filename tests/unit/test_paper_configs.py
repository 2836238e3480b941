"""The paper's Qwen3-VL-4B recipes (``configs/paper/``): the paper's settings, a layout check at their
stated world size through the real CLI, and a per-GPU memory estimate under an H100's 80 GB."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from copd_megatron.cli import train_main
from copd_megatron.config import load_config, validate

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"qwen3_vl_4b_text_image.yaml": ("text", "image"), "qwen3_vl_4b_hub.yaml": ("text", "image", "video")}
WORLD = 64


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_paper_recipe_has_the_papers_settings(name):
    cfg = load_config(ROOT / "configs" / "paper" / name)
    assert cfg.model.preset == "qwen3-vl-4b" and cfg.model.arch == "qwen3_vl" and cfg.model.vision.deepstack_layers
    assert tuple(b.name for b in cfg.branches) == RECIPES[name]
    assert (cfg.optimizer.lr, cfg.optimizer.lr_schedule) == (1e-6, "constant")
    assert (cfg.rollout.prompts_per_step, cfg.rollout.group_size) == (256, 8)
    assert (cfg.loss.eps_low, cfg.loss.eps_high, cfg.loss.ref_kl_coef) == (0.2, 0.28, 0.0)
    assert cfg.schedule.mode == "copd" and cfg.schedule.s_rl / cfg.schedule.s_opd == 1.5
    assert cfg.merge.method == "average" and cfg.merge.weights is None
    if len(RECIPES[name]) == 3:
        assert (cfg.schedule.topology, cfg.schedule.hub) == ("hub", "text")
    validate(cfg, WORLD, cuda_available=True)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_check_layout_at_the_recipes_world_size_prints_a_memory_estimate_that_fits(name, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", str(WORLD))
    monkeypatch.setenv("RANK", "0")
    assert train_main([str(ROOT / "configs" / "paper" / name), "--check-layout"]) == 0
    out = capsys.readouterr().out
    assert f"ok for world size {WORLD} (tp=2 pp=1 cp=1 ep=1 dp=32 vpp=None)" in out
    assert "4.02B parameters + a 24-layer ViT (415.35M): 4.44B" in out  # the released 4,437,815,808
    totals = {m[0]: float(m[1]) for m in re.findall(r"^\| (generate|score|update) \|.*\| ([\d.]+) \| [^|]+ \|$", out, re.M)}
    assert set(totals) == {"generate", "score", "update"}, out
    assert all(0 < t < 72 for t in totals.values()), totals  # 80 GB less ~10% for what the estimate leaves out
    # The largest term by hand: 8 prompts x 8 rollouts per rank, 8192 tokens, K and V of 36 layers,
    # 8 KV groups / tp=2, head dim 128, bf16: 64 * 8192 * 2 * 36 * 4 * 128 * 2 bytes = 36.0 GiB.
    assert "| 36.0 | " in next(line for line in out.splitlines() if line.startswith("| generate |"))
