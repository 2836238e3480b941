"""The glue between the losses and the loop, checked against hand-computed references.

* One policy update at temperature T != 1, unequal response lengths, stale old log-probs (ratios
  outside both clip bounds, which are asymmetric) and per-sequence aggregation: the loss the
  trainer reports equals the clipped surrogate written out in plain PyTorch on the same weights.
* One Phase II step at the phase level: the native/cross split follows ``schedule.native_fraction``,
  cross advantages are β·(log π_teacher − log π_student) with the branch's own β (scored here
  independently by each branch), and cross rollouts are sampled by the student (the sampler's
  log-probs are the student's, not the teacher's).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from copd_megatron.testing import run_distributed
from tests.distributed.conftest import tiny_config

VOCAB, T = 500, 0.7


def _update_vs_hand() -> tuple[float, float]:
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.data.batch import TARGET, Batch
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_branch
    from copd_megatron.training.policy import policy_update

    cfg = config_from_dict({
        "schedule": {"mode": "smoke"}, "model": {"preset": "tiny", "vocab_size": VOCAB}, "precision": {"params_dtype": "fp32"},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0}, "loss": {"aggregation": "seq_mean", "eps_low": 0.1, "eps_high": 0.3},
    })  # fmt: skip
    init_model_parallel(validate(cfg, 1))
    set_seed(0)
    branch = build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, 10)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (4, 14), generator=g)
    mask = torch.zeros(4, 13)
    for row, end in enumerate((12, 8, 13, 6)):  # unequal response lengths from position 5
        mask[row, 5:end] = 1
    adv = torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) * mask
    model = branch.chunks[0].module
    with torch.no_grad():
        pos = torch.arange(13)[None].expand(4, -1)
        logits = model(tokens[:, :-1], pos, None).float()[..., :VOCAB]
        logp = F.log_softmax(logits / T, -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
    # Stale old log-probs: ratios e^0.25 = 1.28 (inside 1 + 0.3, outside 1 + 0.1) and e^-0.35 = 0.70 (below 0.9).
    shift = torch.tensor([[-0.25], [0.35], [-0.25], [0.35]])
    old = (logp + shift) * mask
    ratio = torch.exp(torch.where(mask > 0, logp - old, torch.zeros(())))
    per_token = -torch.minimum(ratio * adv, ratio.clamp(0.9, 1.3) * adv) * mask
    expected = float((per_token.sum(-1) / mask.sum(-1)).mean())  # seq_mean: mean of per-sequence means
    batch = Batch(tokens).set("loss_mask", mask, TARGET).set("advantages", adv, TARGET).set("old_logprobs", old, TARGET)
    res = policy_update(branch, batch, cfg.loss, cfg.opd, micro_batch_size=2, temperature=T, vocab_size=VOCAB, max_len=8)
    return res.loss, expected


def test_policy_update_matches_the_surrogate_written_by_hand():
    ours, hand = run_distributed(_update_vs_hand, 1, timeout=180)[0]
    assert abs(ours - hand) < 1e-5 * max(1.0, abs(hand)), f"trainer loss {ours} != hand-computed {hand}"


def _phase_two_step(base: str, run_dir: str) -> dict:
    from copd_megatron.config import validate
    from copd_megatron.copd.recipes import stages
    from copd_megatron.copd.runtime import build_run
    from copd_megatron.copd.step import StepState, generate_phase, score_phase, sync_phase, update_phase
    from copd_megatron.data.tokenizer import load_tokenizer
    from copd_megatron.distributed.init import init_model_parallel, set_seed

    cfg = tiny_config(Path(base), Path(run_dir), "schedule.native_fraction=0.25", "branches.0.beta=0.5",
                      "rollout.prompts_per_step=8", "optimizer.lr=5e-2")  # fmt: skip
    init_model_parallel(validate(cfg, 1))
    set_seed(cfg.seed)
    tok = load_tokenizer(cfg.tokenizer)
    stage = stages(cfg)[0]
    run = build_run(cfg, tok, 2)
    versions = {"count": 0, "sort": 0}
    plans = iter(stage.rhythm)
    st = StepState(stage, next(plans))  # Phase I: a large step so that the branches differ afterwards
    generate_phase(run.env, st, cfg.schedule.native_fraction)
    score_phase(run.env, st, [], False, versions)
    update_phase(run.env, st, 1)
    sync_phase(run.env, st)
    versions = {"count": 1, "sort": 1}
    st = StepState(stage, next(plans))  # Phase II
    generate_phase(run.env, st, cfg.schedule.native_fraction)
    score_phase(run.env, st, [], False, versions)
    native, cross = st.rollouts["count"]
    assert native.teacher is None and cross.teacher == "sort"
    rows = cross.as_batch()
    mask = rows["loss_mask"]
    student = run.workers["count"].score(rows)["logprobs"]
    teacher = run.workers["sort"].score(rows)["logprobs"]
    adv = st.batches["count"]["advantages"][len(native.samples) :, : mask.shape[1]]
    return {"native_rows": len(native.samples), "cross_rows": len(cross.samples), "mask": mask, "adv": adv,
            "student": student, "teacher": teacher, "sampler": cross.batch.logprobs[:, 1:]}  # fmt: skip


def test_phase_two_batch_follows_the_config_and_is_on_policy(base, tmp_path):
    r = run_distributed(_phase_two_step, 1, args=(str(base), str(tmp_path / "run")), timeout=300)[0]
    G = 4
    assert r["native_rows"] == round(0.25 * 8) * G and r["cross_rows"] == (8 - 2) * G  # native_fraction 0.25
    m = r["mask"]
    torch.testing.assert_close(r["adv"], 0.5 * (r["teacher"] - r["student"]) * m, rtol=1e-5, atol=1e-6)  # β = 0.5
    assert (r["teacher"] - r["student"]).abs().mul(m).max() > 1e-3, "the branches must differ for this test to bite"
    # The student sampled the cross rollouts: the sampler's log-probs are the student's ...
    torch.testing.assert_close(r["sampler"] * m, r["student"] * m, rtol=1e-4, atol=1e-4)
    # ... and not the teacher's.
    assert (r["sampler"] * m - r["teacher"] * m).abs().max() > 1e-3
