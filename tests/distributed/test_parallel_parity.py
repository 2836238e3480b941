"""The same tiny model gives the same logits, loss, gradient norm and update at every layout.

A TP=1 reference run initialises the model, saves it with dist_checkpointing, computes logits,
takes one optimizer step (the update is proportional to the clipped gradient, so a wrong
gradient shows up in the post-step logits; clipping is active: the gradient norm is > 1) and
computes logits again. Every other layout loads the same weights and must reproduce all of it
to ~1e-5: TP=2, PP=2 and DP=2 in one 2-rank world, TP=2×PP=2 (and TP=2×DP=2) in a 4-rank
world. Once with SGD, once with Adam and the distributed optimizer.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from copd_megatron.testing import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)


def _config(tp: int, pp: int, optimizer: str):
    from copd_megatron.config import config_from_dict

    return config_from_dict(
        {
            "seed": 7,
            # The Adam run also covers the Qwen-style options: tied embeddings (synchronised
            # between the first and last pipeline stage), QK-norm and QKV bias.
            "model": {"preset": "tiny", "num_layers": 4, "vocab_size": 500, "tie_embeddings": optimizer == "adam",
                      "qk_layernorm": optimizer == "adam", "add_qkv_bias": optimizer == "adam"},
            # SGD runs without, Adam with the distributed optimizer (it supports Adam only).
            "parallel": {"tp": tp, "pp": pp, "micro_batch_size": 2, "use_distributed_optimizer": optimizer == "adam"},
            "precision": {"params_dtype": "fp32"},
            # Adam's first update is ~lr*sign(g), blind to gradient magnitudes; eps=1 >> |g| makes
            # it ~lr*g/eps, so a wrong gradient changes the post-step logits in both runs.
            "optimizer": {"name": optimizer, "lr": 0.5 if optimizer == "sgd" else 5.0, "adam_eps": 1.0,
                          "clip_grad": 1.0, "weight_decay": 0.0},
            "schedule": {"mode": "smoke"},
        }
    )  # fmt: skip


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 500, (8, 17), generator=g)
    mask = (torch.rand(8, 17, generator=g) > 0.3).float()  # masked tokens must not count
    return tokens, mask


def _logits(branch, mb) -> torch.Tensor | None:
    """Full-vocabulary logits of ``mb`` (gathered over TP), on every rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from copd_megatron.training.forward import forward_collect

    return forward_collect(branch, [mb], lambda logits, _mb: {"logits": gather_from_tensor_model_parallel_region(logits)})["logits"]


def _run(tp: int, pp: int, ckpt_dir: str, save: bool, optimizer: str, save_after: str | None = None) -> dict:
    from megatron.core import parallel_state as ps

    from copd_megatron.checkpoint.dist_ckpt import load_model, save_model
    from copd_megatron.config import validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks, transformer_config, wrap_and_optimize
    from copd_megatron.training.step import MicroBatch, train_step

    cfg = _config(tp, pp, optimizer)
    layout = validate(cfg, dist.get_world_size())
    init_model_parallel(layout)
    set_seed(cfg.seed)
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.precision)
    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, tcfg)
    (save_model if save else load_model)(chunks, ckpt_dir)
    branch = wrap_and_optimize(chunks, tcfg, cfg.parallel, cfg.precision, cfg.optimizer, total_steps=1)

    tokens, mask = _global_batch()
    # This data-parallel rank's share of the global batch, in micro-batches of 2 sequences.
    per_dp = tokens.shape[0] // layout.dp
    lo = ps.get_data_parallel_rank() * per_dp
    mbs = [
        MicroBatch.from_tokens(tokens[i : i + 2], mask[i : i + 2])
        for i in range(lo, lo + per_dp, cfg.parallel.micro_batch_size)
    ]
    probe = MicroBatch.from_tokens(tokens[:2])
    before = _logits(branch, probe)
    step = train_step(branch, mbs)
    after = _logits(branch, probe)
    if save_after:  # the updated weights, saved at this layout, for a reload at TP=1
        save_model([c.module for c in branch.chunks], save_after)
    return {"loss": step.loss, "grad_norm": step.grad_norm, "tokens": step.num_tokens, "before": before, "after": after}


def _worker(layouts: list[tuple[int, int]], ckpt_dir: str, save: bool, optimizer: str, save_after=None) -> list[dict]:
    return [_run(tp, pp, ckpt_dir, save, optimizer, save_after if i == 0 else None) for i, (tp, pp) in enumerate(layouts)]


def _reload_logits(optimizer: str, ckpt_dir: str) -> torch.Tensor:
    """Weights saved at TP=2×PP=2, loaded at TP=1: the logits of the probe batch."""
    from copd_megatron.checkpoint.dist_ckpt import load_model
    from copd_megatron.config import validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks, transformer_config, wrap_and_optimize
    from copd_megatron.training.step import MicroBatch

    cfg = _config(1, 1, optimizer)
    init_model_parallel(validate(cfg, 1))
    set_seed(cfg.seed)
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.precision)
    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, tcfg)
    load_model(chunks, ckpt_dir)
    branch = wrap_and_optimize(chunks, tcfg, cfg.parallel, cfg.precision, cfg.optimizer, total_steps=1)
    return _logits(branch, MicroBatch.from_tokens(_global_batch()[0][:2]))


def _check(ref: dict, results_per_rank: list[list[dict]], layouts: list[tuple[int, int]]) -> None:
    for i, (tp, pp) in enumerate(layouts):
        runs = [rank_results[i] for rank_results in results_per_rank]
        name = f"tp={tp} pp={pp} world={len(runs)}"
        for run in runs:  # every rank reports the same step statistics
            assert run["tokens"] == ref["tokens"], name
            assert run["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
            assert run["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), name
        for run in runs:  # every rank holds the logits (shared from the last stage)
            torch.testing.assert_close(run["before"], ref["before"], **TOL, msg=f"{name}: logits before the step")
            torch.testing.assert_close(run["after"], ref["after"], **TOL, msg=f"{name}: logits after the step")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_layouts_match_tp1_reference(tmp_path, optimizer):
    ckpt = str(tmp_path / "init")
    (ref,) = run_distributed(_worker, 1, args=([(1, 1)], ckpt, True, optimizer), timeout=240)[0:1]
    ref = ref[0]
    assert ref["grad_norm"] > 1.0, "clipping must be active for the test to cover it"
    # The update must move the logits well beyond the tolerance, or the test could not fail.
    assert (ref["after"] - ref["before"]).abs().max() > 1e-2

    two = [(2, 1), (1, 2), (1, 1)]  # TP=2, PP=2, DP=2
    _check(ref, run_distributed(_worker, 2, args=(two, ckpt, False, optimizer), timeout=300), two)
    four = [(2, 2), (2, 1)] if optimizer == "adam" else [(2, 2)]  # TP=2×PP=2 (+ TP=2×DP=2)
    saved = str(tmp_path / "after_tp2pp2")
    _check(ref, run_distributed(_worker, 4, args=(four, ckpt, False, optimizer, saved), timeout=300), four)
    if optimizer == "adam":  # save at TP=2×PP=2, load at TP=1: the same logits
        reloaded = run_distributed(_reload_logits, 1, args=(optimizer, saved), timeout=120)[0]
        torch.testing.assert_close(reloaded, ref["after"], **TOL)
