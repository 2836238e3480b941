"""Qwen3-VL and Qwen2.5-VL: copd-convert → Megatron logits equal transformers', both ways.

Small random models built by transformers offline (Qwen3-VL: untied, head_dim ≠ hidden/heads,
DeepStack taps after ViT layers 0 and 2 of 4, a 4×4 position table interpolated; Qwen2.5-VL:
tied, QKV bias, 56-pixel windows with full attention in ViT layers 1 and 3), norms and biases
perturbed so that a mix-up shows. Inputs: images (two of different shapes), a video (Qwen3-VL:
one block per temporal slice with timestamps between; Qwen2.5-VL: one block), text only, and
a batch of two rows mixing images and videos.

* World of 1: ``copd-convert hf-to-mcore`` (the CLI), then TP=1 logits == transformers' (fp32,
  1e-5); KV-cached greedy decoding after an image prompt (Megatron's ``StaticInferenceContext``)
  == full recomputation at every step == transformers' ``generate``; the rollout engine's text
  decoding with and without KV cache agree; reference gradients.
* World of 2: TP=2 logits and gradients == TP=1; the checkpoint re-saved at TP=2; PP=2 (tower
  and DeepStack layers on stage 0) logits through Megatron's pipeline schedule == transformers';
  re-saved at PP=2; one SFT step of the trainer's path (DDP, distributed optimizer, TP=2) on a
  Qwen3-VL chunk computes transformers' cross-entropy.
* World of 1: ``copd-convert mcore-to-hf`` of the TP=2 and PP=2 checkpoints (with and without a
  template config): every tensor bit-identical to the original file, processor and chat-template
  files carried along, and transformers reloads it with identical logits.

Slow (``make test-all``): TP=2 × PP=2 on four ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from copd_megatron.testing import run_distributed

transformers = pytest.importorskip("transformers", reason="Qwen-VL conversion tests need transformers")
pytest.importorskip("safetensors", reason="HF conversion tests need safetensors")

IMG, VID, VS, VE = 1000, 1001, 1002, 1003
FAMILIES = ("qwen3_vl", "qwen2_5_vl")
CARRIED = {"chat_template.jinja": "{{ messages }}", "preprocessor_config.json": '{"patch_size": 16}'}


def _hf_model(family: str):
    torch.manual_seed({"qwen3_vl": 0, "qwen2_5_vl": 1}[family])
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    text = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                rms_norm_eps=1e-6, max_position_embeddings=4096)  # fmt: skip
    vision = dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=64)  # fmt: skip
    if family == "qwen3_vl":
        rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True}
        cfg = transformers.Qwen3VLConfig(
            text_config={**text, "num_hidden_layers": 4, "head_dim": 32, "rope_parameters": rope},
            vision_config={**vision, "patch_size": 16, "num_position_embeddings": 16, "deepstack_visual_indexes": [0, 2],
                           "hidden_act": "gelu_pytorch_tanh"}, tie_word_embeddings=False, **ids)  # fmt: skip
        model = transformers.Qwen3VLForConditionalGeneration(cfg)
    else:
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
        cfg = transformers.Qwen2_5_VLConfig(
            text_config={**text, "num_hidden_layers": 2, "rope_parameters": rope},
            vision_config={**vision, "patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1, 3],
                           "tokens_per_second": 2, "hidden_act": "silu"}, tie_word_embeddings=True, **ids)  # fmt: skip
        model = transformers.Qwen2_5_VLForConditionalGeneration(cfg)
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def _block(kind: int, n: int) -> list[int]:
    return [VS] + [kind] * n + [VE]


def _inputs(family: str) -> dict[str, dict]:
    """Named model inputs (HF keyword arguments without ``mm_token_type_ids``)."""
    g = torch.Generator().manual_seed(7)
    qwen3 = family == "qwen3_vl"
    feat = 3 * 2 * (16 if qwen3 else 14) ** 2
    images = torch.tensor([[1, 4, 6], [1, 6, 4]]) if qwen3 else torch.tensor([[1, 8, 12], [1, 4, 4]])
    video = torch.tensor([[2, 4, 4]]) if qwen3 else torch.tensor([[3, 4, 4]])
    per_image = (images.prod(-1) // 4).tolist()

    def pixels(grids):
        return torch.randn(int(grids.prod(-1).sum()), feat, generator=g)

    def video_tokens(grid):  # Qwen3-VL: a timestamp and one block per temporal slice; Qwen2.5-VL: one block
        t, h, w = grid.tolist()
        return sum(([50 + k] + _block(VID, h * w // 4) for k in range(t)), []) if qwen3 else _block(VID, t * h * w // 4)

    image_ids = [1, 2] + _block(IMG, per_image[0]) + [3] + _block(IMG, per_image[1]) + [4, 5]
    video_ids = [7] + video_tokens(video[0]) + [8, 9]
    row0 = [11] + _block(IMG, per_image[0]) + video_tokens(video[0]) + [12]
    row1 = video_tokens(video[0]) + [13] + _block(IMG, per_image[1]) + [14]
    width = max(len(row0), len(row1))
    row0, row1 = row0 + [15] * (width - len(row0)), row1 + [16] * (width - len(row1))
    two_videos = torch.cat([video, video])
    out = {
        "image": dict(input_ids=torch.tensor([image_ids]), pixel_values=pixels(images), image_grid_thw=images),
        "video": dict(input_ids=torch.tensor([video_ids]), pixel_values_videos=pixels(video), video_grid_thw=video),
        "text": dict(input_ids=torch.tensor([[5, 17, 300, 999, 12, 44, 1, 2]])),
        "mixed": dict(input_ids=torch.tensor([row0, row1]), pixel_values=pixels(images), image_grid_thw=images,
                      pixel_values_videos=pixels(two_videos), video_grid_thw=two_videos),
    }  # fmt: skip
    if not qwen3:
        out["video"]["second_per_grid_ts"] = torch.tensor([1.0])
        out["mixed"]["second_per_grid_ts"] = torch.tensor([0.5, 2.0])
    return out


def _hf_kwargs(inputs: dict) -> dict:
    ids = inputs["input_ids"]
    return {**inputs, "mm_token_type_ids": (ids == IMG).long() + 2 * (ids == VID).long()}


# ----------------------------------------------------------------------------- Megatron side


def _load(ckpt: str, tp: int = 1, pp: int = 1) -> list:
    from copd_megatron.checkpoint.dist_ckpt import load_model, read_meta
    from copd_megatron.config import ParallelConfig, PrecisionConfig
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks

    model_cfg, _ = read_meta(ckpt)
    parallel = ParallelConfig(tp=tp, pp=pp)
    init_model_parallel(resolve_layout(parallel, model_cfg, dist.get_world_size()))
    set_seed(0)
    chunks = build_model_chunks(model_cfg, parallel, PrecisionConfig(params_dtype="fp32"))  # the Qwen-VL builder
    load_model(chunks, ckpt)
    return chunks


def _logits(chunk, inputs: dict, grad: bool = False) -> torch.Tensor:
    """Full-vocabulary logits [b, s, V_pad] on every TP rank."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    kwargs = {k: v for k, v in inputs.items() if k != "input_ids"}
    with torch.set_grad_enabled(grad):
        return gather_from_tensor_model_parallel_region(chunk(inputs["input_ids"], **kwargs))


def _grads(chunk, inputs: dict) -> dict[str, torch.Tensor]:
    """Gradients of Σ logits·R (R fixed) for tensor-replicated and gathered tensor-sharded weights."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    chunk.zero_grad()
    logits = chunk(inputs["input_ids"], **{k: v for k, v in inputs.items() if k != "input_ids"})
    weights = torch.randn(logits.shape[:-1] + (logits.shape[-1] * ps.get_tensor_model_parallel_world_size(),),
                          generator=torch.Generator().manual_seed(3))  # fmt: skip
    local = weights.chunk(ps.get_tensor_model_parallel_world_size(), dim=-1)[ps.get_tensor_model_parallel_rank()]
    (logits * local).sum().backward()
    params = dict(chunk.named_parameters())
    names = ["vision_model.patch_embed.proj.weight", "vision_model.merger.norm.weight",
             "vision_model.decoder.layers.0.input_layernorm.weight", "language_model.decoder.layers.0.input_layernorm.weight"]  # fmt: skip
    out = {n: params[n].grad.clone() for n in names}
    qkv = "vision_model.decoder.layers.1.self_attention.linear_qkv.weight"  # sharded by whole heads
    out[qkv] = gather_from_tensor_model_parallel_region(params[qkv].grad.t().contiguous()).t()
    return out


def _decode(chunk, inputs: dict, steps: int) -> dict:
    """Greedy decoding after the prompt, KV-cached (one token per forward) and recomputed."""
    from megatron.core.inference.contexts import StaticInferenceContext

    vision = {k: v for k, v in inputs.items() if k != "input_ids"}
    seq = inputs["input_ids"]
    ctx = StaticInferenceContext(1, seq.shape[1] + steps)
    with torch.no_grad():
        cached = [chunk(seq, **vision, inference_context=ctx)[0, -1]]
        ctx.sequence_len_offset += seq.shape[1]
        recomputed = [cached[0]]
        for _ in range(steps):
            token = cached[-1].argmax()[None, None]
            seq = torch.cat([seq, token], dim=1)
            cached.append(chunk(token, inference_context=ctx)[0, -1])
            ctx.sequence_len_offset += 1
            recomputed.append(chunk(seq, **vision)[0, -1])
    # The provider's way: it computes the prompt's mRoPE ids itself and passes them at prefill.
    from copd_megatron.model.qwen_vl.rope import mrope_position_ids

    v = chunk.vision
    prompt = inputs["input_ids"]
    ids, _ = mrope_position_ids(prompt, image_grid_thw=inputs["image_grid_thw"], video_grid_thw=None,
                                image_token_id=v.image_token_id, video_token_id=v.video_token_id,
                                spatial_merge_size=v.spatial_merge_size, family=chunk.arch)  # fmt: skip
    ctx = StaticInferenceContext(1, seq.shape[1])
    with torch.no_grad():
        given = [chunk(prompt, position_ids=ids, **vision, inference_context=ctx)[0, -1]]
        ctx.sequence_len_offset += prompt.shape[1]
        for token in seq[0, prompt.shape[1] :]:
            given.append(chunk(token[None, None], inference_context=ctx)[0, -1])
            ctx.sequence_len_offset += 1
    return {"tokens": seq[0, prompt.shape[1] :], "cached": torch.stack(cached),
            "recomputed": torch.stack(recomputed), "given_ids": torch.stack(given)}  # fmt: skip


def _engine_text(chunk) -> tuple:
    """The rollout engine drives a Qwen-VL chunk like a GPTModel (text prompts, [b, s] positions)."""
    from copd_megatron.rollout.megatron_engine import MegatronEngine
    from copd_megatron.rollout.types import SamplingParams

    params = SamplingParams(max_new_tokens=4, greedy=True)
    prompts = [[5, 17, 300], [9, 8, 7, 6, 5]]
    with_kv = MegatronEngine(chunk, 1024, use_kv_cache=True).generate(prompts, params)
    no_kv = MegatronEngine(chunk, 1024, use_kv_cache=False).generate(prompts, params)
    return with_kv.tokens, no_kv.tokens, with_kv.logprobs, no_kv.logprobs


def _world_tp1(root: str, inputs: dict) -> dict:
    from copd_megatron.checkpoint.convert_cli import main

    out = {}
    for family in FAMILIES:
        mc = f"{root}/{family}/mcore"
        assert main(["hf-to-mcore", "--hf-dir", f"{root}/{family}/hf", "--out", mc]) == 0
        (chunk,) = _load(mc)
        chunk.eval()
        out[family] = {name: _logits(chunk, x) for name, x in inputs[family].items()}
        out[family]["grads"] = _grads(chunk, inputs[family]["mixed"])
        if family == "qwen3_vl":
            out[family]["decode"] = _decode(chunk, inputs[family]["image"], steps=4)
            out[family]["engine"] = _engine_text(chunk)
    return out


def _pipeline_logits(chunks: list, inputs: dict) -> torch.Tensor | None:
    """Logits through Megatron's (non-interleaved) pipeline schedule; None off the last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def step(data, model):
        x = next(data)
        logits = model(x["input_ids"], **{k: v for k, v in x.items() if k != "input_ids"})
        return logits, lambda out: (torch.zeros(()), torch.tensor(1, dtype=torch.int), {"logits": out})

    ids = inputs["input_ids"]
    with torch.no_grad():
        outs = get_forward_backward_func()(forward_step_func=step, data_iterator=iter([inputs]), model=chunks,
                                           num_microbatches=1, seq_length=ids.shape[1],
                                           micro_batch_size=ids.shape[0], forward_only=True)  # fmt: skip
    return outs[0]["logits"] if ps.is_pipeline_last_stage() else None


TEXT_BATCH = torch.tensor([[5, 17, 300, 999, 12, 44, 1, 2, 77], [8, 8, 9, 600, 601, 3, 2, 1, 0]])


def _sft_loss(ckpt: str) -> float:
    """One training step of the SFT path (DDP, distributed optimizer, no-pipelining schedule,
    ``labels`` → GPTModel's per-token loss); returns the loss it computed before updating."""
    from copd_megatron.config import OptimizerConfig, ParallelConfig, PrecisionConfig
    from copd_megatron.model.build import wrap_and_optimize
    from copd_megatron.training.step import MicroBatch, train_step

    chunks = _load(ckpt, tp=2)
    parallel = ParallelConfig(tp=2)
    branch = wrap_and_optimize(chunks, chunks[0].config, parallel, PrecisionConfig(params_dtype="fp32"),
                               OptimizerConfig(lr=1e-3), total_steps=1)  # fmt: skip
    return train_step(branch, [MicroBatch.from_tokens(TEXT_BATCH)]).loss


def _world_tp2_pp2(root: str, inputs: dict) -> dict:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from copd_megatron.checkpoint.dist_ckpt import read_meta, save_model

    out = {}
    for family in FAMILIES:
        mc = f"{root}/{family}/mcore"
        model_cfg, _ = read_meta(mc)
        (chunk,) = _load(mc, tp=2)
        chunk.eval()
        res = {name: _logits(chunk, x) for name, x in inputs[family].items()}
        res["grads"] = _grads(chunk, inputs[family]["mixed"])
        save_model([chunk], f"{root}/{family}/tp2", model_cfg, "fp32")
        chunks = _load(mc, pp=2)
        has_tower = hasattr(chunks[0], "vision_model")
        logits = _pipeline_logits(chunks, inputs[family]["mixed"])
        res["pp2"] = gather_from_tensor_model_parallel_region(logits) if logits is not None else None
        res["tower_on_rank"] = has_tower
        save_model(chunks, f"{root}/{family}/pp2", model_cfg, "fp32")
        if family == "qwen3_vl":
            res["sft_loss"] = _sft_loss(mc)
        out[family] = res
    return out


def _world_export(root: str) -> list[int]:
    from copd_megatron.checkpoint.convert_cli import main

    codes = []
    for family in FAMILIES:
        base = f"{root}/{family}"
        codes.append(main(["mcore-to-hf", "--mcore-dir", f"{base}/mcore", "--out", f"{base}/hf_base"]))
        codes.append(main(["mcore-to-hf", "--mcore-dir", f"{base}/tp2", "--out", f"{base}/hf_tp2",
                           "--tokenizer-dir", f"{base}/hf", "--max-shard-size", "100KB"]))  # fmt: skip
        codes.append(main(["mcore-to-hf", "--mcore-dir", f"{base}/pp2", "--out", f"{base}/hf_pp2"]))  # no template
    return codes


# ----------------------------------------------------------------------------- the test


def test_qwen_vl_convert_logits_kv_cache_and_export(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    models, inputs, refs = {}, {}, {}
    for family in FAMILIES:
        models[family] = _hf_model(family)
        models[family].save_pretrained(tmp_path / family / "hf")
        for name, text in CARRIED.items():
            (tmp_path / family / "hf" / name).write_text(text)
        inputs[family] = _inputs(family)
        with torch.no_grad():
            refs[family] = {n: models[family](**_hf_kwargs(x)).logits for n, x in inputs[family].items()}

    tp1 = run_distributed(_world_tp1, 1, args=(str(tmp_path), inputs), timeout=300)[0]
    tp2 = run_distributed(_world_tp2_pp2, 2, args=(str(tmp_path), inputs), timeout=300)
    codes = run_distributed(_world_export, 1, args=(str(tmp_path),), timeout=300)[0]
    assert codes == [0] * 6

    for family in FAMILIES:
        pp_last = tp2[1][family]
        assert tp2[0][family]["tower_on_rank"] and not pp_last["tower_on_rank"]  # the tower lives on stage 0
        for name, ref in refs[family].items():
            for what, got in (("tp1", tp1[family][name]), ("tp2", tp2[0][family][name])):
                assert got.shape[:2] == ref.shape[:2] and got.shape[-1] == 1024  # vocab 1024 needs no padding
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=f"{family} {name} {what}")
        torch.testing.assert_close(pp_last["pp2"], refs[family]["mixed"], rtol=1e-5, atol=1e-5, msg=f"{family} pp2")
        for name, grad in tp1[family]["grads"].items():
            assert grad.abs().sum() > 0, name
            scale = grad.abs().max().item()  # summation order differs across TP: compare against the largest entry
            torch.testing.assert_close(tp2[0][family]["grads"][name], grad, rtol=1e-4, atol=1e-5 * scale,
                                       msg=f"{family} {name}")  # fmt: skip

    # The trainer's SFT step on a VL chunk (TP=2, DDP, distributed optimizer) computes transformers' loss.
    with torch.no_grad():
        logits = models["qwen3_vl"](input_ids=TEXT_BATCH[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), TEXT_BATCH[:, 1:].reshape(-1))
    assert tp2[0]["qwen3_vl"]["sft_loss"] == pytest.approx(want.item(), rel=1e-5)

    # KV-cached decoding after an image prompt == recomputing the whole sequence == transformers' generate.
    decode = tp1["qwen3_vl"]["decode"]
    torch.testing.assert_close(decode["cached"], decode["recomputed"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode["given_ids"], decode["cached"], rtol=1e-5, atol=1e-5)
    prompt = _hf_kwargs(inputs["qwen3_vl"]["image"])
    with torch.no_grad():
        hf_tokens = models["qwen3_vl"].generate(**prompt, max_new_tokens=4, do_sample=False)[0, prompt["input_ids"].shape[1] :]
    assert decode["tokens"].tolist() == hf_tokens.tolist()
    kv_tokens, plain_tokens, kv_logprobs, plain_logprobs = tp1["qwen3_vl"]["engine"]
    assert torch.equal(kv_tokens, plain_tokens)
    torch.testing.assert_close(kv_logprobs, plain_logprobs, rtol=1e-5, atol=1e-5)

    for family in FAMILIES:
        original = load_file(str(tmp_path / family / "hf" / "model.safetensors"))
        for layout in ("base", "tp2", "pp2"):
            out = tmp_path / family / f"hf_{layout}"
            files = sorted(out.glob("*.safetensors"))
            assert (len(files) > 1) == (layout == "tp2")  # --max-shard-size 100KB: sharded with an index
            exported = {k: v for f in files for k, v in load_file(str(f)).items()}
            assert set(exported) == set(original), (family, layout, set(exported) ^ set(original))
            for name, t in original.items():
                assert torch.equal(exported[name], t), (family, layout, name)
            for name, text in CARRIED.items():  # carried by the import (base) or from --tokenizer-dir (tp2)
                carried = (out / name).is_file() and (out / name).read_text() == text
                assert carried == (layout != "pp2"), (family, layout, name)
            reloaded = type(models[family]).from_pretrained(out).float().eval()
            with torch.no_grad():  # the weights are bit-identical: one input with every modality is enough
                logits = reloaded(**_hf_kwargs(inputs[family]["mixed"])).logits
            torch.testing.assert_close(logits, refs[family]["mixed"], rtol=0, atol=0)


def _world_tp2_pp2_4ranks(root: str, inputs: dict) -> dict:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    out = {}
    for family in FAMILIES:
        chunks = _load(f"{root}/{family}/mcore", tp=2, pp=2)
        logits = _pipeline_logits(chunks, inputs[family]["mixed"])
        out[family] = gather_from_tensor_model_parallel_region(logits) if logits is not None else None
    return out


@pytest.mark.slow
def test_qwen_vl_tp2_pp2(tmp_path: Path) -> None:
    """TP=2 × PP=2 (four ranks): the tower TP-sharded on stage 0, logits equal transformers'."""
    models, inputs = {}, {}
    for family in FAMILIES:
        models[family] = _hf_model(family)
        models[family].save_pretrained(tmp_path / family / "hf")
        inputs[family] = _inputs(family)
    run_distributed(_import_all, 1, args=(str(tmp_path),), timeout=300)
    results = run_distributed(_world_tp2_pp2_4ranks, 4, args=(str(tmp_path), inputs), timeout=600)
    for family in FAMILIES:
        with torch.no_grad():
            ref = models[family](**_hf_kwargs(inputs[family]["mixed"])).logits
        last_stage = [r[family] for r in results if r[family] is not None]
        assert len(last_stage) == 2  # the two TP ranks of the last stage
        for got in last_stage:
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5, msg=family)


def _import_all(root: str) -> None:
    from copd_megatron.checkpoint.convert import import_hf

    for family in FAMILIES:
        import_hf(Path(root, family, "hf"), Path(root, family, "mcore"))
