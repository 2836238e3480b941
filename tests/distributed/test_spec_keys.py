"""A base converted by copd-convert carries the keys of the Transformer Engine spec (fused norms), so
it loads into the TE spec and a TE checkpoint loads back into the local spec; checked on CPU against
Megatron's own mapping table (Transformer Engine cannot be imported here; ``tests/gpu/test_te_spec.py``
builds the TE spec itself on a GPU)."""

from __future__ import annotations

import pytest
import torch

from copd_megatron.testing import run_distributed

transformers = pytest.importorskip("transformers", reason="needs transformers (pip install .[hf])")


def _keys(root: str) -> dict:
    from copd_megatron.checkpoint.convert_cli import main
    from copd_megatron.checkpoint.dist_ckpt import read_meta
    from copd_megatron.checkpoint.hf import TE_TO_LOCAL
    from copd_megatron.checkpoint.spec_keys import checkpoint_tensor_keys, megatron_norm_key_map, sharded_tensor_keys
    from copd_megatron.config import ParallelConfig, PrecisionConfig
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64))  # fmt: skip
    hf.save_pretrained(f"{root}/hf")
    assert main(["hf-to-mcore", "--hf-dir", f"{root}/hf", "--out", f"{root}/mcore"]) == 0
    m, _ = read_meta(f"{root}/mcore")
    init_model_parallel(resolve_layout(ParallelConfig(), m, 1))
    set_seed(0)
    chunks = build_model_chunks(m, ParallelConfig(), PrecisionConfig(params_dtype="fp32"))  # the local spec here
    local_names = {k for c in chunks for k in c.state_dict() if not k.endswith("_extra_state")}
    return {"ckpt": checkpoint_tensor_keys(f"{root}/mcore"), "model": sharded_tensor_keys(chunks),
            "local_names": local_names, "megatron_map": megatron_norm_key_map(m), "ours": dict(TE_TO_LOCAL)}  # fmt: skip


def test_converted_base_has_the_te_spec_keys(tmp_path) -> None:
    r = run_distributed(_keys, 1, args=(str(tmp_path),), timeout=300)[0]
    # The converter's table is the inverse of Megatron's own local → TE table.
    assert r["megatron_map"] == {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
                                 "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}  # fmt: skip
    assert {v: k for k, v in r["ours"].items()} == r["megatron_map"]
    # What a model expects (its sharded state dict) is exactly what the converted base holds ...
    assert r["ckpt"] == r["model"]
    # ... and those are the TE spec's names: Megatron's table applied to the local module names, layers stacked.
    expected = set()
    for name in r["local_names"]:
        if name.startswith("decoder.layers."):
            rest = name.split(".", 3)[3]  # drop "decoder.layers.<i>."
            name = "decoder.layers." + r["megatron_map"].get(rest, rest)
        expected.add(name)
    assert r["ckpt"] == expected
    assert not any("input_layernorm" in k or "pre_mlp_layernorm" in k for k in r["ckpt"])
