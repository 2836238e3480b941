"""The vision-language model (Megatron-Core LLaVAModel, ``model/vlm.py``) at every layout.

A TP=1 reference initialises the VLM, saves it, and on a batch whose micro-batches carry
images, 2-frame videos and text-only rows computes logits, takes one optimizer step (Adam with
eps=1 so the update follows the gradient's magnitude; clipping active) and computes logits
again. TP=2, PP=2 and DP=2 load the same weights and must reproduce the loss, gradient norm
and both logits to ~1e-5: a wrong gradient anywhere, ViT and projector included, moves the
post-step logits. The same worlds check the rollout engine: KV-cached greedy decoding with
images equals recomputing the whole sequence at every step, including prompts whose images
are reached only after the prefill, and TP=2 / PP=2 decode TP=1's tokens.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from copd_megatron.testing import run_distributed

TOL = dict(rtol=1e-5, atol=1e-5)
IMG, VID, VOCAB, T = 7, 8, 500, 16  # placeholder ids; tokens per 32x32 image in 8x8 patches


def _config(tp: int, pp: int, freeze_vision: bool = False):
    from copd_megatron.config import config_from_dict

    return config_from_dict({
        "seed": 7,
        "model": {"preset": "tiny", "arch": "llava", "vocab_size": VOCAB, "seq_length": 64,
                  "vision": {"preset": "tiny", "image_token_id": IMG, "video_token_id": VID,
                             "freeze_vision": freeze_vision}},
        "parallel": {"tp": tp, "pp": pp, "micro_batch_size": 2, "use_distributed_optimizer": True},
        "precision": {"params_dtype": "fp32"},
        "optimizer": {"name": "adam", "lr": 2.0, "adam_eps": 1.0, "clip_grad": 1.0, "weight_decay": 0.0},
        "schedule": {"mode": "smoke"},
    })  # fmt: skip


def _row(g: torch.Generator, layout: list, length: int) -> tuple[list[int], torch.Tensor | None]:
    """Token ids of ``layout`` (ints: text tokens, 'i': an image, 'v2': a 2-frame video) padded
    with random text to ``length``, and the row's pixels in placeholder order."""
    ids, frames = [], 0
    for part in layout:
        if part == "i":
            ids, frames = ids + [IMG] * T, frames + 1
        elif part == "v2":
            ids, frames = ids + [VID] * 2 * T, frames + 2
        else:
            ids += torch.randint(10, VOCAB, (part,), generator=g).tolist()
    ids += torch.randint(10, VOCAB, (length - len(ids),), generator=g).tolist()
    return ids, (torch.randn(frames, 3, 32, 32, generator=g) if frames else None)


def _global_batch():
    g = torch.Generator().manual_seed(0)
    layouts = [[3, "i"], ["i", "i"], [], [5], ["v2", 2], [], [1, "i", 2, "v2"], [30, "i"]]
    rows = [_row(g, lay, 57) for lay in layouts]
    tokens = torch.tensor([r[0] for r in rows])
    mask = (torch.rand(tokens.shape, generator=g) > 0.2).float()
    mask[torch.isin(tokens, torch.tensor([IMG, VID]))] = 0.0  # placeholders are never targets
    return tokens, mask, [r[1] for r in rows]


def _micro_batch(tokens, mask, pixels):
    from copd_megatron.data.batch import MicroBatch
    from copd_megatron.model.vlm import media_field

    mb = MicroBatch.from_tokens(tokens, mask)
    mb.fields["media"] = media_field(pixels)
    return mb


def _logits(branch, mb) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from copd_megatron.training.forward import forward_collect

    return forward_collect(branch, [mb], lambda lg, _: {"x": gather_from_tensor_model_parallel_region(lg)})["x"]


def _build(tp: int, pp: int, ckpt: str, save: bool, freeze_vision: bool = False):
    from copd_megatron.checkpoint.dist_ckpt import load_model, save_model
    from copd_megatron.config import validate
    from copd_megatron.distributed.groups import shared_groups
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import wrap_and_optimize
    from copd_megatron.model.provider import make_provider

    cfg = _config(tp, pp, freeze_vision)
    layout = validate(cfg, dist.get_world_size())
    init_model_parallel(layout)
    set_seed(cfg.seed)
    provider, groups = make_provider(cfg.model, cfg.parallel, cfg.precision), shared_groups()
    chunks = provider.build_chunks(groups)
    (save_model if save else load_model)(chunks, ckpt)
    branch = wrap_and_optimize(chunks, provider.tcfg, cfg.parallel, cfg.precision, cfg.optimizer, 1, groups, provider)
    return cfg, layout, chunks, branch


def _decode(cfg, branch) -> dict:
    """Greedy decoding of ragged image prompts, with and (at TP=1) without the KV cache."""
    from copd_megatron.rollout.megatron_engine import MegatronEngine
    from copd_megatron.rollout.types import GenerationRequest, SamplingParams

    g = torch.Generator().manual_seed(1)
    prompts = [_row(g, lay, n) for lay, n in [([2, "i"], 19), ([], 1), ([3, "v2"], 36), (["i", "i"], 34)]]
    reqs = [GenerationRequest(ids, 10 + i, {} if px is None else {"pixels": px}) for i, (ids, px) in enumerate(prompts)]
    greedy = SamplingParams(max_new_tokens=6, greedy=True)

    def engine(kv: bool = True):
        return MegatronEngine(branch.chunks[0], VOCAB, pad_id=0, use_kv_cache=kv, provider=branch.provider,
                              groups=branch.groups)  # fmt: skip

    out = {}
    for kv in (True, False) if dist.get_world_size() == 1 else (True,):
        out[f"kv={kv}"] = engine(kv).generate(reqs, greedy)
        # The prefill (shortest prompt 19) covers a whole image of prompt 0 and part of prompt 2's video.
        out[f"long kv={kv}"] = engine(kv).generate([reqs[0], reqs[2], reqs[3]], greedy)
    out["hot"] = engine().generate(reqs * 2, SamplingParams(max_new_tokens=8, temperature=5.0))
    if dist.get_world_size() == 1:  # (raised on the first stage only: other stages would wait for it)
        with pytest.raises(ValueError, match=r"row 1: 16 image placeholder tokens \(after 0\) but its images give 0"):
            engine().generate([reqs[0], GenerationRequest(reqs[0].prompt_ids, 1, {})], greedy)
    return out


def _run(tp: int, pp: int, ckpt: str, save: bool) -> dict:
    from megatron.core import parallel_state as ps

    from copd_megatron.training.step import train_step

    cfg, layout, chunks, branch = _build(tp, pp, ckpt, save)
    out = {"decode": _decode(cfg, branch)}
    tokens, mask, pixels = _global_batch()
    per_dp = tokens.shape[0] // layout.dp
    lo = ps.get_data_parallel_rank() * per_dp
    mbs = [_micro_batch(tokens[i : i + 2], mask[i : i + 2], pixels[i : i + 2]) for i in range(lo, lo + per_dp, 2)]
    probe = _micro_batch(tokens[[0, 4, 6]], None, [pixels[0], pixels[4], pixels[6]])
    out["before"] = _logits(branch, probe)
    vit = list(chunks[0].vision_model.parameters()) if chunks[0].pre_process else []  # first stage only
    before = [p.detach().clone() for p in vit]
    step = train_step(branch, mbs)
    out["after"] = _logits(branch, probe)
    out["vit_moved"] = max([(p - q).abs().max().item() for p, q in zip(vit, before)], default=None)
    out.update(loss=step.loss, grad_norm=step.grad_norm, tokens=step.num_tokens)
    return out


def _worker(layouts: list[tuple[int, int]], ckpt: str, save: bool) -> list[dict]:
    return [_run(tp, pp, ckpt, save) for tp, pp in layouts]


def _frozen(ckpt: str) -> dict:
    """With the vision tower frozen, one step changes the projector and LM but not the ViT."""
    from copd_megatron.training.step import train_step

    _, _, chunks, branch = _build(1, 1, ckpt, save=False, freeze_vision=True)
    vit = {k: p.detach().clone() for k, p in chunks[0].vision_model.named_parameters()}
    proj = {k: p.detach().clone() for k, p in chunks[0].vision_projection.named_parameters()}
    tokens, mask, pixels = _global_batch()
    train_step(branch, [_micro_batch(tokens[i : i + 2], mask[i : i + 2], pixels[i : i + 2]) for i in (0, 6)])
    return {
        "vit_trainable": sum(p.requires_grad for p in chunks[0].vision_model.parameters()),
        "vit_moved": max((p - vit[k]).abs().max().item() for k, p in chunks[0].vision_model.named_parameters()),
        "proj_moved": max((p - proj[k]).abs().max().item() for k, p in chunks[0].vision_projection.named_parameters()),
    }


def _check_decode(ref: dict, got: dict, name: str) -> None:
    for key in ("kv=True", "long kv=True"):
        assert torch.equal(got[key].tokens, ref[key].tokens), f"{name}: {key} tokens differ from TP=1"
        torch.testing.assert_close(got[key].logprobs, ref[key].logprobs, rtol=1e-4, atol=1e-4)


def test_vlm_layouts_and_kv_decoding_match_tp1(tmp_path):
    ckpt = str(tmp_path / "init")
    ref = run_distributed(_worker, 1, args=([(1, 1)], ckpt, True), timeout=300)[0][0]
    assert ref["grad_norm"] > 1.0, "clipping must be active for the test to cover it"
    assert (ref["after"] - ref["before"]).abs().max() > 1e-2, "the update must move the logits"
    assert ref["vit_moved"] > 1e-3, "the vision tower must receive gradients"
    dec = ref["decode"]
    for key in ("kv", "long kv"):  # KV-cached decoding with images == full recomputation
        assert torch.equal(dec[f"{key}=True"].tokens, dec[f"{key}=False"].tokens), key
        torch.testing.assert_close(dec[f"{key}=True"].logprobs, dec[f"{key}=False"].logprobs, **TOL)
    hot = dec["hot"]
    assert not torch.isin(hot.tokens[hot.response_mask.bool()], torch.tensor([IMG, VID])).any()
    assert int(hot.tokens[hot.response_mask.bool()].max()) < VOCAB

    layouts = [(2, 1), (1, 2), (1, 1)]  # TP=2, PP=2, DP=2
    results = run_distributed(_worker, 2, args=(layouts, ckpt, False), timeout=400)
    for i, (tp, pp) in enumerate(layouts):
        name = f"tp={tp} pp={pp}"
        for rank_results in results:
            run = rank_results[i]
            assert run["tokens"] == ref["tokens"], name
            assert run["loss"] == pytest.approx(ref["loss"], rel=1e-5), name
            assert run["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-5), name
            torch.testing.assert_close(run["before"], ref["before"], **TOL, msg=f"{name}: logits before the step")
            torch.testing.assert_close(run["after"], ref["after"], **TOL, msg=f"{name}: logits after the step")
            _check_decode(dec, run["decode"], name)

    frozen = run_distributed(_frozen, 1, args=(ckpt,), timeout=200)[0]
    assert frozen["vit_trainable"] == 0 and frozen["vit_moved"] == 0.0
    assert frozen["proj_moved"] > 1e-3
