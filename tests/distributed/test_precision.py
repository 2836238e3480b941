"""Precision per pass on a real (CPU) model: the dtype that reaches the loss in each pass, scoring that
leaves the model exactly as it was, micro-batches padded to a multiple without changing any result,
and the sequence-parallel decoding path (padded, no KV cache) equal to KV-cached decoding."""

from __future__ import annotations

import pytest
import torch

from copd_megatron.testing import run_distributed

VOCAB = 96


def _branch(precision: dict):
    from copd_megatron.config import config_from_dict
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.model.build import build_branch

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": {"vocab_size": VOCAB}, "precision": precision,
                            "optimizer": {"lr": 1e-2}})  # fmt: skip
    init_model_parallel(resolve_layout(cfg.parallel, cfg.model, 1))
    set_seed(7)
    return cfg, build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, 10)


def _batch():
    from copd_megatron.data.batch import TARGET, Batch

    g = torch.Generator().manual_seed(3)
    b = Batch(torch.randint(3, VOCAB, (3, 11), generator=g))
    mask = torch.zeros(3, 10)
    mask[0, 3:6], mask[1, 3:9], mask[2, 2:4] = 1, 1, 1
    return b.set("loss_mask", mask, TARGET)


def _state(branch) -> dict:
    return {k: v.detach().clone() for c in branch.chunks for k, v in c.state_dict().items() if torch.is_tensor(v)}


def _dtype_of(logits) -> str:
    """The compute dtype behind ``logits``: Megatron's Float16Module hands bf16 results to the loss
    upcast to fp32, and such logits are bf16 values (each equal to its own bf16 rounding), which fp32
    compute would not give."""
    bf16_values = torch.equal(logits.float(), logits.bfloat16().float())
    return "torch.bfloat16" if logits.dtype == torch.bfloat16 or bf16_values else str(logits.dtype)


def _passes() -> dict:
    from copd_megatron.data.batch import MicroBatch
    from copd_megatron.training.forward import forward_collect
    from copd_megatron.training.step import lm_loss, train_step
    from copd_megatron.training.worker import WorkerSettings, score_batch

    out = {}
    for name, precision in {"fp32": {"params_dtype": "fp32"},
                            "fp32_score_bf16": {"params_dtype": "fp32", "score": "bf16"},
                            "fp32_train_bf16": {"params_dtype": "fp32", "train": "bf16"},
                            "bf16": {"params_dtype": "bf16"}}.items():  # fmt: skip
        cfg, br = _branch(precision)
        seen = {}
        mbs = _batch().micro_batches(3)
        forward_collect(br, mbs, lambda logits, mb, seen=seen: seen.setdefault("score", _dtype_of(logits)) and {})

        def loss(logits, mb, seen=seen):  # LM cross-entropy from the logits (TP=1), recording what reaches it
            seen.setdefault("train", _dtype_of(logits))
            ce = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), mb.labels.flatten(), reduction="none")
            return lm_loss(ce.view_as(mb.labels), mb)

        s = WorkerSettings(vocab_size=VOCAB, temperature=0.9, micro_batch_size=2, max_new_tokens=8, loss=cfg.loss,
                           opd=cfg.opd)  # fmt: skip
        before, rng = _state(br), torch.get_rng_state()
        training = [c.training for c in br.chunks]
        scored = score_batch(br, _batch(), s, logprobs=True, topk=3)
        unchanged = all(torch.equal(before[k], v) for k, v in _state(br).items())
        same_rng = torch.equal(rng, torch.get_rng_state())
        mode_kept = training == [c.training for c in br.chunks] and br.config.fp8 is None
        mask = _batch()["loss_mask"]
        on = mask.bool()  # results count at response positions only (beyond a row's trim: zeros)
        padded = score_batch(br, _batch(), s.__class__(**{**s.__dict__, "pad_multiple": 16}), logprobs=True, topk=3)
        train_step(br, [MicroBatch.from_tokens(_batch().tokens)], lambda lg, mb: loss(lg, mb), with_labels=False)
        changed = any(not torch.equal(before[k], v) for k, v in _state(br).items())
        out[name] = {"score": seen["score"], "train": seen["train"], "unchanged": unchanged,
                     "same_rng": same_rng, "mode_kept": mode_kept, "train_changes": changed,
                     "pad_diff": float(((scored["logprobs"] - padded["logprobs"]) * mask).abs().max()),
                     "pad_topk_equal": torch.equal(scored["topk_ids"][on], padded["topk_ids"][on])}  # fmt: skip
    return out


def _all() -> dict:
    """Both checks in one spawned world (a world's start-up costs seconds on 2 cores)."""
    return {"passes": _passes(), "decode": _decode_paths()}


@pytest.fixture(scope="module")
def results() -> dict:
    return run_distributed(_all, 1, timeout=500)[0]


def test_each_pass_runs_in_its_dtype_and_scoring_changes_nothing(results) -> None:
    res = results["passes"]
    # The pass's compute dtype reaches the loss (bf16 weights: bf16 values, upcast by Float16Module).
    assert res["fp32"]["score"] == res["fp32"]["train"] == "torch.float32"
    assert res["fp32_score_bf16"]["score"] == "torch.bfloat16" and res["fp32_score_bf16"]["train"] == "torch.float32"
    assert res["fp32_train_bf16"]["score"] == "torch.float32" and res["fp32_train_bf16"]["train"] == "torch.bfloat16"
    assert res["bf16"]["score"] == res["bf16"]["train"] == "torch.bfloat16"
    for name, r in res.items():
        assert r["unchanged"] and r["same_rng"] and r["mode_kept"], (name, r)
        assert r["train_changes"], name  # the comparison can fail: an update does change the state
        # Padding the token dimension (FP8: multiples of 16) changes no score of a response position.
        assert r["pad_diff"] <= 1e-4 and r["pad_topk_equal"], (name, r)


def _decode_paths() -> dict:
    from copd_megatron.rollout.megatron_engine import MegatronEngine
    from copd_megatron.rollout.types import GenerationRequest, SamplingParams

    _, br = _branch({"params_dtype": "fp32"})
    reqs = [GenerationRequest([5, 6, 7, 8, 9], 1), GenerationRequest([10, 11], 2), GenerationRequest([12, 13, 14], 3)]
    outs = {}
    for name, kv, pad in (("kv_cache", True, 1), ("recompute_padded_to_4", False, 4)):
        eng = MegatronEngine(br.chunks[0], VOCAB, 0, provider=br.provider, groups=br.groups, use_kv_cache=kv)
        orig = eng._forward_last
        eng._forward_last = lambda t, off, ctx, media, _pad=1, padded=None, orig=orig, pad=pad: orig(t, off, ctx, media, pad, padded)
        if pad > 1:  # sequence parallelism's path: the prompts are never left-padded
            eng._can_left_pad = lambda media, sp: False
        outs[name] = eng.generate(reqs, SamplingParams(max_new_tokens=6, temperature=0.8, seed=0))
    a, b = outs["kv_cache"], outs["recompute_padded_to_4"]
    return {"tokens": torch.equal(a.tokens, b.tokens), "lp": float((a.logprobs - b.logprobs).abs().max())}


def test_padded_recompute_decoding_equals_kv_cache_decoding(results) -> None:
    """The sequence-parallel decode path (no KV cache, input padded to a multiple of TP, ragged prompts
    fed one position per step) samples the same tokens as KV-cached decoding of the left-padded batch
    (here at TP=1 with a pad multiple of 4: the local spec has no SP)."""
    res = results["decode"]
    assert res["tokens"] and res["lp"] < 1e-5, res
