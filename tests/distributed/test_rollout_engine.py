"""Megatron-native rollout engine: KV cache == full recompute, TP=2 and PP=2 == TP=1."""

from __future__ import annotations

import torch
import torch.distributed as dist

from copd_megatron.rollout.types import SamplingParams
from copd_megatron.testing import run_distributed

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13]]  # ragged on purpose
VOCAB = 500  # padded to 512 by the model: ids 500..511 must never be sampled


def _engine(tp: int, pp: int, ckpt: str, save: bool, kv: bool = True):
    from copd_megatron.checkpoint.dist_ckpt import load_model, save_model
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks
    from copd_megatron.rollout.megatron_engine import MegatronEngine

    cfg = config_from_dict({
        "schedule": {"mode": "smoke"}, "model": {"preset": "tiny", "vocab_size": VOCAB, "num_layers": 4},
        "parallel": {"tp": tp, "pp": pp}, "precision": {"params_dtype": "fp32"},
    })  # fmt: skip
    init_model_parallel(validate(cfg, dist.get_world_size()))
    set_seed(11)
    (model,) = build_model_chunks(cfg.model, cfg.parallel, cfg.precision)
    (save_model if save else load_model)([model], ckpt)
    return model, lambda use_kv: MegatronEngine(model, VOCAB, pad_id=0, use_kv_cache=use_kv)


def _reference(ckpt: str) -> dict:
    _, make = _engine(1, 1, ckpt, save=True)
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    hot = SamplingParams(max_new_tokens=16, temperature=3.0, seed=5)
    with_kv = make(True).generate(PROMPTS, greedy)
    no_kv = make(False).generate(PROMPTS, greedy)
    sampled = make(True).generate(PROMPTS * 4, hot)
    top1 = make(True).generate(PROMPTS, SamplingParams(max_new_tokens=8, top_k=1, seed=9))
    first = int(with_kv.tokens[0, 3])
    stopped = make(True).generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, greedy=True, stop_token_ids=(first,)))
    alone = [make(True).generate([p], greedy) for p in PROMPTS]  # no padding anywhere: the reference
    # The tiny preset has 2 query heads per KV group: the engine's grouped attention vs Megatron's
    # own DotProductAttention (which expands the cached keys and values per head), in the prefill
    # and in the decode steps (whose one-function layer uses the grouped attention too).
    import copd_megatron.rollout.megatron_engine as engine_module

    grouped, one_function = engine_module._grouped_query_attention, engine_module._decode_layers
    engine_module._grouped_query_attention = lambda model, overrides: None
    engine_module._decode_layers = lambda model, overrides, cos_sin: None
    try:
        megatron_attention = make(True).generate(PROMPTS, greedy)
    finally:
        engine_module._grouped_query_attention, engine_module._decode_layers = grouped, one_function
    return {"kv": with_kv, "no_kv": no_kv, "sampled": sampled, "top1": top1, "stopped": stopped, "alone": alone,
            "megatron_attention": megatron_attention}


def _layouts(ckpt: str) -> list:
    out = []
    for tp, pp in [(2, 1), (1, 2)]:
        _, make = _engine(tp, pp, ckpt, save=False)
        greedy = make(True).generate(PROMPTS, SamplingParams(max_new_tokens=8, greedy=True))
        sampled = make(True).generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=1.5, seed=3))
        out.append((tp, pp, greedy, sampled))
    return out


def test_kv_cache_tp_and_pp_match_tp1(tmp_path):
    ckpt = str(tmp_path / "w")
    ref = run_distributed(_reference, 1, args=(ckpt,), timeout=180)[0]
    kv, no_kv = ref["kv"], ref["no_kv"]
    # KV-cached greedy decoding equals recomputing the whole sequence at every step.
    assert torch.equal(kv.tokens, no_kv.tokens)
    torch.testing.assert_close(kv.logprobs, no_kv.logprobs, rtol=1e-5, atol=1e-5)
    assert kv.response_lens.tolist() == [8, 8, 8, 8]
    assert torch.equal(kv.tokens, ref["megatron_attention"].tokens)
    torch.testing.assert_close(kv.logprobs, ref["megatron_attention"].logprobs, rtol=1e-5, atol=1e-5)
    # Ragged prompts are prefilled together, left-padded with the padding masked and per-row
    # positions: each row decodes as it does alone in a batch of one.
    for i, one in enumerate(ref["alone"]):
        assert torch.equal(kv.tokens[i, : one.tokens.shape[1]], one.tokens[0]), f"prompt {i}: batched != alone"
        torch.testing.assert_close(kv.logprobs[i, : one.tokens.shape[1]], one.logprobs[0], rtol=1e-5, atol=1e-5)
    # Prompts are kept, responses start right after them, the mask covers exactly the responses.
    for i, p in enumerate(PROMPTS):
        assert kv.tokens[i, : len(p)].tolist() == p
        assert kv.response_mask[i].nonzero().flatten().tolist() == list(range(len(p), len(p) + 8))
    # Top-k = 1 sampling is greedy decoding; padded vocabulary ids are never produced.
    assert torch.equal(ref["top1"].tokens, kv.tokens)
    hot = ref["sampled"]
    assert int(hot.tokens[hot.response_mask.bool()].max()) < VOCAB
    # A stop token ends the sequence and is kept as its last response token.
    st = ref["stopped"]
    assert st.response_lens.tolist() == [1] and bool(st.finished[0]) and int(st.tokens[0, 3]) == int(kv.tokens[0, 3])

    results = run_distributed(_layouts, 2, args=(ckpt,), timeout=240)
    for layout_idx in range(2):
        per_rank = [r[layout_idx] for r in results]
        for tp, pp, greedy, sampled in per_rank:
            assert torch.equal(greedy.tokens, kv.tokens), f"tp={tp} pp={pp}: greedy tokens differ from TP=1"
            torch.testing.assert_close(greedy.logprobs, kv.logprobs, rtol=1e-4, atol=1e-4)
        # Every rank of the model-parallel group ends up with the very same samples.
        assert torch.equal(per_rank[0][3].tokens, per_rank[1][3].tokens)


def test_engine_rope_is_megatrons_rope_bit_for_bit() -> None:
    """The engine rotates new keys and queries with cosines and sines computed once per step; the
    values are those of Megatron's own unfused RoPE, bit for bit (full and partial rotary dims)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

    from copd_megatron.rollout.megatron_engine import _rotate_half_rope

    g = torch.Generator().manual_seed(0)
    for rot in (64, 32):  # rotary_percent 1 and 0.5 of a 64-channel head
        t = torch.randn(5, 3, 4, 64, generator=g)
        freqs = torch.randn(5, 3, 1, rot, generator=g) * 10  # per-row angles, as left padding makes them
        ours = _rotate_half_rope(t, torch.cos(freqs), torch.sin(freqs))
        assert torch.equal(ours, _apply_rotary_pos_emb_bshd(t, freqs)), rot


# Layer shapes the engine's one-function decode step must reproduce exactly: grouped-query
# attention with RMSNorm and SwiGLU (the tiny preset), multi-head attention with LayerNorm, GELU and
# biases everywhere, and QK-norm (Qwen3) in bf16.
DECODE_VARIANTS = {
    "gqa_rmsnorm_swiglu": ({}, "fp32"),
    "mha_layernorm_gelu_bias": ({"num_query_groups": 4, "normalization": "LayerNorm", "activation": "gelu",
                                 "add_bias_linear": True, "add_qkv_bias": True}, "fp32"),  # fmt: skip
    "qk_layernorm_bf16": ({"qk_layernorm": True}, "bf16"),
}


def _decode_step_vs_megatron(shape: dict, dtype: str) -> dict:
    import copd_megatron.rollout.megatron_engine as engine_module
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks
    from copd_megatron.rollout.megatron_engine import MegatronEngine

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "precision": {"params_dtype": dtype},
                            "model": {"preset": "tiny", "vocab_size": VOCAB, "num_layers": 3, **shape}})  # fmt: skip
    init_model_parallel(validate(cfg, dist.get_world_size()))
    set_seed(4)
    (model,) = build_model_chunks(cfg.model, cfg.parallel, cfg.precision)
    engine = MegatronEngine(model, VOCAB, pad_id=0)
    calls = []
    one_function = engine_module._decode_layer

    def counted(*args, **kwargs):
        calls.append(1)
        return one_function(*args, **kwargs)

    greedy = SamplingParams(max_new_tokens=10, greedy=True)
    hot = SamplingParams(max_new_tokens=10, temperature=2.0, seed=1)
    engine_module._decode_layer = counted
    try:
        fast = [engine.generate(PROMPTS, greedy), engine.generate(PROMPTS, hot)]
    finally:
        engine_module._decode_layer = one_function
    installer = engine_module._decode_layers
    engine_module._decode_layers = lambda model, overrides, cos_sin: None  # Megatron's own layer forward
    try:
        megatron = [engine.generate(PROMPTS, greedy), engine.generate(PROMPTS, hot)]
    finally:
        engine_module._decode_layers = installer
    return {"fast": fast, "megatron": megatron, "calls": len(calls), "layers": cfg.model.num_layers}


def test_one_function_decode_step_is_megatrons_layer_bit_for_bit() -> None:
    """Each decode step of a layer runs as one function over the layer's own weights (no module
    calls); it computes what Megatron's TransformerLayer computes, bit for bit, for every layer shape
    it is installed on. The count proves it ran (every layer, every decode step)."""
    for name, (shape, dtype) in DECODE_VARIANTS.items():
        out = run_distributed(_decode_step_vs_megatron, 1, args=(shape, dtype), timeout=180)[0]
        # 2 generates x 9 decode steps (the 10th token needs none) x every layer
        assert out["calls"] == 2 * 9 * out["layers"], f"{name}: the one-function decode step ran {out['calls']} times"
        for fast, megatron in zip(out["fast"], out["megatron"], strict=True):
            assert torch.equal(fast.tokens, megatron.tokens), f"{name}: tokens differ from Megatron's layer"
            assert torch.equal(fast.logprobs, megatron.logprobs), f"{name}: log-probs differ from Megatron's layer"
