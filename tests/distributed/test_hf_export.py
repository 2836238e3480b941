"""Live HF export from TP/PP shards: every layout yields exactly the TP=1 model's HF tensors."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from copd_megatron.testing import run_distributed

MODEL = {"num_layers": 4, "hidden_size": 128, "ffn_hidden_size": 256, "num_attention_heads": 4,
         "num_query_groups": 2, "vocab_size": 500, "seq_length": 128}  # fmt: skip


def _build(tp: int, pp: int, extra: dict):
    from copd_megatron.config import config_from_dict, validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": {**MODEL, **extra},
                            "parallel": {"tp": tp, "pp": pp}, "precision": {"params_dtype": "fp32"}})  # fmt: skip
    init_model_parallel(validate(cfg, dist.get_world_size()))
    set_seed(3)
    return cfg, build_model_chunks(cfg.model, cfg.parallel, cfg.precision)


def _groups():
    from megatron.core import parallel_state as ps

    return SimpleNamespace(tp=ps.get_tensor_model_parallel_group(), pp=ps.get_pipeline_model_parallel_group(),
                           mp=ps.get_model_parallel_group())  # fmt: skip


def _reference(ckpt: str, extra: dict) -> dict:
    """TP=1 model saved for the other layouts; its HF tensors through the offline mapping."""
    from copd_megatron.checkpoint.dist_ckpt import save_model
    from copd_megatron.checkpoint.hf import mcore_to_hf
    from copd_megatron.checkpoint.hf_export import export_hf_weights

    cfg, chunks = _build(1, 1, extra)
    save_model(chunks, ckpt)
    offline = mcore_to_hf(dict(chunks[0].state_dict()), cfg.model)
    live = dict(export_hf_weights(chunks, cfg.model, _groups()))
    return {"offline": offline, "live": live, "order": list(live)}


def _layouts(ckpt: str, extra: dict) -> list:
    from copd_megatron.checkpoint.dist_ckpt import load_model
    from copd_megatron.checkpoint.hf_export import export_hf_weights

    out = []
    for tp, pp in [(2, 1), (1, 2)]:
        cfg, chunks = _build(tp, pp, extra)
        load_model(chunks, ckpt)
        out.append((tp, pp, list(export_hf_weights(chunks, cfg.model, _groups()))))
    return out


def test_export_from_tp2_and_pp2_shards_equals_the_tp1_model(tmp_path):
    for i, extra in enumerate([{}, {"tie_embeddings": True, "qk_layernorm": True}]):
        ckpt = str(tmp_path / f"w{i}")
        ref = run_distributed(_reference, 1, args=(ckpt, extra), timeout=120)[0]
        offline, live = ref["offline"], ref["live"]
        assert list(live) == list(offline), "the live export yields the HF tensors in the mapping's order"
        for name, t in offline.items():
            assert torch.equal(live[name], t), name
        assert ("lm_head.weight" in live) == (not extra.get("tie_embeddings"))
        assert live["model.embed_tokens.weight"].shape[0] == 500, "vocabulary padding is trimmed"
        for rank_results in zip(*run_distributed(_layouts, 2, args=(ckpt, extra), timeout=240), strict=True):
            for rank, (tp, pp, tensors) in enumerate(rank_results):
                assert [n for n, _ in tensors] == ref["order"], f"tp={tp} pp={pp} rank={rank}: names or order differ"
                for name, t in tensors:
                    # Exact: gathering shards and re-ordering the fused gate/up moves bytes, no arithmetic.
                    assert torch.equal(t, offline[name]), f"tp={tp} pp={pp} rank={rank}: {name} differs from TP=1"
