"""Single-branch RLVR: the update moves probability the way the advantages say, at TP=1 and TP=2;
and (slow) GRPO raises the mean reward of a synthetic family from a base."""

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


def _direction(tp: int) -> list[list[float]]:
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.data.batch import TARGET, Batch
    from copd_megatron.model.build import build_branch
    from copd_megatron.training.policy import policy_update
    from copd_megatron.training.worker import WorkerSettings, score_batch

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": {"preset": "tiny"}, "parallel": {"tp": tp},
                            "precision": {"params_dtype": "fp32"}, "optimizer": {"lr": 1e-3, "weight_decay": 0.0}})  # fmt: skip
    init_model_parallel(validate(cfg, dist.get_world_size()))
    set_seed(0)
    branch = build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, 10)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 500, (4, 12), generator=g)
    mask = torch.zeros(4, 11)
    mask[:, 5:] = 1  # the "response": only these targets are trained
    adv = torch.tensor([1.0, -1.0, 2.0, -0.5])[:, None] * mask
    settings = WorkerSettings(vocab_size=500, temperature=1.0, micro_batch_size=2, max_new_tokens=10, loss=cfg.loss,
                              opd=cfg.opd)  # fmt: skip
    seq_logp = []
    for _ in range(3):
        batch = Batch(tokens).set("loss_mask", mask, TARGET).set("advantages", adv, TARGET)
        old = score_batch(branch, batch, settings)["logprobs"]
        seq_logp.append((old * mask).sum(-1).tolist())
        batch.set("old_logprobs", old, TARGET)
        policy_update(branch, batch, cfg.loss, cfg.opd, micro_batch_size=2, temperature=1.0, vocab_size=500, max_len=10)
    return seq_logp


def test_policy_update_follows_the_advantages_at_tp1_and_tp2():
    for tp in (1, 2):
        logp = torch.tensor(run_distributed(_direction, tp, args=(tp,), timeout=120)[0])
        delta = logp[-1] - logp[0]
        assert delta[0] > 0 and delta[2] > 0, f"tp={tp}: positive advantages must gain probability"
        assert delta[1] < 0 and delta[3] < 0, f"tp={tp}: negative advantages must lose probability"
        assert delta[2] > delta[0], f"tp={tp}: a larger advantage moves more"


@pytest.mark.slow
def test_grpo_raises_mean_reward_on_a_synthetic_family(tmp_path):
    base = tmp_path / "base"
    subprocess.run([sys.executable, "tools/make_base.py", "--out", str(base), "--families", "count", "sort",
                    "--difficulty", "4", "--steps", "400", "--model", "model.num_layers=4", "model.hidden_size=128",
                    "model.ffn_hidden_size=352"], cwd=ROOT, check=True, capture_output=True, timeout=600)  # fmt: skip
    run = tmp_path / "grpo"
    subprocess.run([sys.executable, "-m", "copd_megatron.cli", "configs/count_sort_cpu.yaml", f"run_dir={run}",
                    f"tokenizer={base / 'tokenizer.model'}", f"checkpoint.base={base / 'checkpoint'}",
                    "schedule.mode=expert", "schedule.cycles=1", "schedule.s_rl=40", "schedule.s_opd=0",
                    "optimizer.lr=5e-4"],
                   cwd=ROOT, check=True, capture_output=True, timeout=900)  # fmt: skip
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # Both branches' rewards averaged: one branch's 10-step means carry ±0.03 of sampling noise.
    # The demo's lr (5e-5) moves too little in 40 steps to separate from that noise (+0.006 at
    # seed 1; +0.001 to +0.045 over seeds 1-4), so the test uses 5e-4 (+0.036 to +0.099 over seeds 1-4).
    rewards = [(r["branch/sort/native/reward"] + r["branch/count/native/reward"]) / 2 for r in rows]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 0.03, f"mean reward {first:.3f} over the first 10 steps, {last:.3f} over the last 10"
