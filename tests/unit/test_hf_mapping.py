"""HF ⇄ Megatron mapping without a process group: QKV / gate-up layout, vocabulary padding,
config translation both ways, refusals, the safetensors shard writer and CLI errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from copd_megatron.checkpoint.hf import (
    TE_TO_LOCAL,
    dims,
    fuse_qkv,
    hf_config_from_model,
    hf_shapes,
    hf_to_mcore,
    mcore_to_hf,
    model_fields_from_hf,
    split_qkv,
)
from copd_megatron.config.load import config_from_dict
from copd_megatron.config.schema import ConfigError, ModelConfig


def _model(**fields) -> ModelConfig:
    base = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4, num_query_groups=2,
                vocab_size=100, make_vocab_size_divisible_by=64)  # fmt: skip
    return config_from_dict({"model": {**base, **fields}, "schedule": {"mode": "smoke"}}).model


FAMILIES = {
    "llama": {},
    "qwen2": {"add_qkv_bias": True, "tie_embeddings": True},
    "qwen3": {"qk_layernorm": True, "kv_channels": 16},
}


def _random_hf(m: ModelConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g) for name, shape in hf_shapes(m).items()}


def _hf_config(arch: str, **extra) -> dict:
    cfg = {"architectures": [arch], "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 4096, "rope_theta": 1000000.0, "hidden_act": "silu"}  # fmt: skip
    return {**cfg, **extra}


def test_qkv_rows_are_grouped_by_kv_head() -> None:
    # H=4 query heads, G=2 groups, head dim 1: row labels make the interleaving visible.
    m = _model(hidden_size=4, kv_channels=1, ffn_hidden_size=8)
    q, k, v = torch.tensor([[0.0], [1], [2], [3]]), torch.tensor([[10.0], [11]]), torch.tensor([[20.0], [21]])
    fused = fuse_qkv(q, k, v, dims(m))
    assert fused.flatten().tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    for a, b in zip(split_qkv(fused, dims(m)), (q, k, v), strict=True):
        assert torch.equal(a, b)
    # Megatron's own split: view as [G, (H/G + 2)·d], split [H/G·d, d, d] (attention.py).
    per_group = fused.reshape(2, 4)
    assert per_group[:, :2].flatten().tolist() == [0, 1, 2, 3] and per_group[:, 2].tolist() == [10, 11]


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_round_trip_is_exact(family: str) -> None:
    m = _model(**FAMILIES[family])
    hf = _random_hf(m)
    mc = hf_to_mcore(hf, m)
    emb = mc["embedding.word_embeddings.weight"]
    assert emb.shape == (128, 32) and torch.equal(emb[:100], hf["model.embed_tokens.weight"])
    assert not emb[100:].any()  # padding rows are zero
    assert ("output_layer.weight" in mc) == (not m.tie_embeddings)
    fc1 = mc["decoder.layers.1.mlp.linear_fc1.weight"]
    assert torch.equal(fc1[:48], hf["model.layers.1.mlp.gate_proj.weight"])  # SwiGLU: gate first
    back = mcore_to_hf(mc, m)
    assert set(back) == set(hf)
    for name, t in hf.items():
        assert torch.equal(back[name], t), name
    # Transformer Engine's fused-norm names are read the same way.
    te = {next((k.replace(v, t) for t, v in TE_TO_LOCAL.items() if k.endswith(v)), k): x for k, x in mc.items()}
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert all(torch.equal(mcore_to_hf(te, m)[n], t) for n, t in hf.items())


def test_wrong_shape_or_missing_tensor_is_a_one_line_error() -> None:
    m = _model()
    hf = _random_hf(m)
    hf["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, 32)
    with pytest.raises(ConfigError, match=r"k_proj.weight has shape \(3, 32\)"):
        hf_to_mcore(hf, m)
    del hf["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ConfigError, match="k_proj.weight is missing"):
        hf_to_mcore(hf, m)
    mc = hf_to_mcore(_random_hf(m), m)
    mc["embedding.word_embeddings.weight"] = mc["embedding.word_embeddings.weight"][:50]
    with pytest.raises(ConfigError, match="fewer than vocab_size=100"):
        mcore_to_hf(mc, m)


@pytest.mark.parametrize(
    "arch, extra, expect",
    [
        ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192, "rope_theta": 500000.0}},
         {"rope_scaling": True, "rope_scaling_factor": 32.0, "rotary_base": 500000.0}),
        ("Qwen2ForCausalLM", {"tie_word_embeddings": True}, {"add_qkv_bias": True, "tie_embeddings": True}),
        ("Qwen3ForCausalLM", {"head_dim": 32}, {"qk_layernorm": True, "kv_channels": 32, "num_query_groups": 2}),
        ("Qwen3ForCausalLM", {"head_dim": 16}, {"kv_channels": None}),  # = hidden/heads: left implicit
    ],
)  # fmt: skip
def test_config_maps_both_ways(arch: str, extra: dict, expect: dict) -> None:
    hf = _hf_config(arch, **extra)
    fields = model_fields_from_hf(hf)
    assert {k: fields[k] for k in expect} == expect
    m = config_from_dict({"model": fields, "schedule": {"mode": "smoke"}}).model
    back = hf_config_from_model(m)  # no template: 4.x-style rope keys, which 5.x reads too
    assert back["architectures"] == [arch] and model_fields_from_hf(back) == fields
    kept = hf_config_from_model(m, template={**hf, "bos_token_id": 7})
    assert kept["bos_token_id"] == 7 and model_fields_from_hf(kept) == fields
    transformers = pytest.importorskip("transformers")
    loaded = transformers.CONFIG_MAPPING[back["model_type"]].from_dict(back)
    assert loaded.head_dim == dims(m).head_dim and loaded.rope_parameters["rope_theta"] == m.rotary_base


@pytest.mark.parametrize(
    "change, field",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "architectures"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"attention_bias": True}, "attention_bias"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0}}, "low_freq_factor"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ],
)
def test_unsupported_hf_features_are_refused_by_name(change: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        model_fields_from_hf(_hf_config("LlamaForCausalLM", **change))


def test_export_refuses_what_hf_cannot_express_and_wrong_templates() -> None:
    with pytest.raises(ConfigError, match="add_bias_linear"):
        hf_config_from_model(_model(add_bias_linear=True))
    with pytest.raises(ConfigError, match="qk_layernorm"):
        hf_config_from_model(_model(qk_layernorm=True), arch="LlamaForCausalLM")
    with pytest.raises(ConfigError, match="template config.json: hidden_size is 64"):
        hf_config_from_model(_model(), template=_hf_config("LlamaForCausalLM"))


def test_shard_writer_splits_indexes_and_saves_views(tmp_path: Path) -> None:
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    from copd_megatron.checkpoint.convert import ShardedSafetensorsWriter

    base = torch.arange(300.0).reshape(3, 100)
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=500, dtype=torch.float32)  # 400 B a row
    for i, row in enumerate(base):  # views sharing one storage: each must be saved on its own
        writer.add(f"row{i}", row)
    files = writer.close()
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["row2"] == files[2].name and index["metadata"]["total_size"] == 1200
    assert torch.equal(load_file(str(files[1]))["row1"], base[1])
    one = ShardedSafetensorsWriter(tmp_path / "one", 10**6, torch.bfloat16)
    (tmp_path / "one").mkdir()
    one.add("x", base)
    assert [f.name for f in one.close()] == ["model.safetensors"]


def test_cli_user_errors_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from copd_megatron.checkpoint.convert_cli import main, parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("100") == 100
    hf_dir, out, empty, full = tmp_path / "hf", tmp_path / "out", tmp_path / "empty", tmp_path / "full"
    cases = [
        (["hf-to-mcore", "--hf-dir", str(tmp_path / "none"), "--out", str(out)], "directory not found"),
        (["hf-to-mcore", "--hf-dir", str(empty), "--out", str(out)], "config.json is missing"),
        (["mcore-to-hf", "--mcore-dir", str(empty), "--out", str(out)], "(no metadata.json)"),
        (["hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(out), "--backend", "bridge"], "not installed"),
        (["hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(out)], "GPT2LMHeadModel"),
        (["hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(full)], "not empty"),
        # Never over the source, even with --force: the same directory, one inside it, one around it.
        (["hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(hf_dir), "--force"], "is the input"),
        (["hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(hf_dir / "x"), "--force"], "is inside the input"),
        (["hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(tmp_path), "--force"], "contains the input"),
        (["mcore-to-hf", "--mcore-dir", str(empty), "--out", str(out), "--max-shard-size", "lots"], "5GB"),
    ]
    hf_dir.mkdir()
    empty.mkdir()
    full.mkdir()
    (full / "keep.txt").write_text("x")
    (hf_dir / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert (full / "keep.txt").read_text() == "x" and not out.exists()  # nothing written, nothing lost


def test_bridge_backend_is_called_as_megatron_bridge_documents(tmp_path: Path, monkeypatch, capsys) -> None:
    """Megatron-Bridge needs the GPU stack and is not installed here: a stand-in module records
    the calls (``AutoBridge.import_ckpt(hf_model_id, megatron_path)``,
    ``AutoBridge.from_hf_pretrained(path).export_ckpt(megatron_path, hf_path)``)."""
    import sys
    import types

    from copd_megatron.checkpoint.convert_cli import main

    calls = []

    class AutoBridge:
        @classmethod
        def import_ckpt(cls, hf_model_id, megatron_path):
            calls.append(("import_ckpt", hf_model_id, megatron_path))

        @classmethod
        def from_hf_pretrained(cls, path):
            calls.append(("from_hf_pretrained", path))
            return cls()

        def export_ckpt(self, megatron_path, hf_path):
            calls.append(("export_ckpt", megatron_path, hf_path))

    bridge = types.ModuleType("megatron.bridge")
    bridge.AutoBridge = AutoBridge
    monkeypatch.setitem(sys.modules, "megatron.bridge", bridge)
    gpt2, mcore = tmp_path / "gpt2", tmp_path / "bridge_ckpt"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (mcore / "iter_0000000").mkdir(parents=True)  # Bridge's own layout: no copd_meta.yaml
    # auto: an architecture the built-in mappings do not know goes to Bridge when it is installed
    assert main(["hf-to-mcore", "--hf-dir", str(gpt2), "--out", str(tmp_path / "a")]) == 0
    assert main(["mcore-to-hf", "--mcore-dir", str(mcore), "--tokenizer-dir", str(gpt2), "--out", str(tmp_path / "b")]) == 0
    # Bridge writes into the staging sibling, which is renamed to --out once it returns.
    assert calls == [("import_ckpt", str(gpt2), str(tmp_path / ".a.partial")), ("from_hf_pretrained", str(gpt2)),
                     ("export_ckpt", str(mcore), str(tmp_path / ".b.partial"))]  # fmt: skip
    assert (tmp_path / "a").is_dir() and (tmp_path / "b").is_dir() and not (tmp_path / ".a.partial").exists()
    assert "Megatron-Bridge" in capsys.readouterr().out
    # Bridge's export needs the HF family directory: one line, no traceback
    assert main(["mcore-to-hf", "--mcore-dir", str(mcore), "--out", str(tmp_path / "c"), "--backend", "bridge"]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer-dir" in err and err.count("\n") == 1
    # auto keeps our own families on the built-in converter even when Bridge is installed
    from copd_megatron.checkpoint.convert_cli import _backend, _parser

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps(_hf_config("LlamaForCausalLM")))
    assert _backend(_parser().parse_args(["hf-to-mcore", "--hf-dir", str(llama), "--out", str(tmp_path / "d")])) == "builtin"
