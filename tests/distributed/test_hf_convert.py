"""copd-convert end to end against transformers, for small random Llama / Qwen2 / Qwen3 models.

* Llama (GQA, untied, Llama-3 RoPE scaling, θ = 500000), Qwen2 (QKV bias, tied embeddings),
  Qwen3 (QK-norm, head_dim ≠ hidden/heads); vocabulary 500, padded to 512 inside Megatron.
* HF → Megatron with the CLI, then Megatron's logits at TP=1 and at TP=2 (the same torch_dist
  checkpoint, resharded on load) equal transformers' to 1e-5, padded columns excluded.
* The checkpoint is re-saved from a TP=2 world and from a PP=2 world (tied embeddings then
  live on two stages), and for Llama also as a trainer branch checkpoint (with optimizer and
  scheduler state), and exported back: every HF tensor is bit-identical to the original
  model's, padding trimmed, and the exported directory reloads in transformers with
  identical logits.

Three spawned worlds for all families together (start-up costs seconds on 2 cores).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from copd_megatron.testing import run_distributed

transformers = pytest.importorskip("transformers", reason="HF conversion tests need transformers (pip install .[hf])")
pytest.importorskip("safetensors", reason="HF conversion tests need safetensors (pip install safetensors)")

VOCAB, PADDED = 500, 512
TOKENS = torch.tensor([[1, 7, 42, 99, 3, 250, 499, 12, 8, 64]])
ARCHS = ("llama", "qwen2", "qwen3")
SAVED = {"llama": ("tp2", "pp2", "branch"), "qwen2": ("tp2", "pp2"), "qwen3": ("tp2", "pp2")}  # re-saved layouts


def _hf_model(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)  # fmt: skip
    torch.manual_seed({"llama": 0, "qwen2": 1, "qwen3": 2}[arch])
    if arch == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_theta": 500000.0}  # fmt: skip
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, rope_parameters=rope))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, tie_word_embeddings=True))
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common, head_dim=32))
    # Random init leaves norms at 1 and biases at 0: perturb them so a mix-up would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def _logits(chunk) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        logits = chunk(TOKENS, torch.arange(TOKENS.shape[1])[None], None)
    return gather_from_tensor_model_parallel_region(logits)  # [1, T, V_pad] on every TP rank


def _build_and_load(ckpt: str, tp: int, pp: int):
    from copd_megatron.checkpoint.dist_ckpt import load_model, read_meta
    from copd_megatron.config import ParallelConfig, PrecisionConfig
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks

    model_cfg, _ = read_meta(ckpt)
    parallel = ParallelConfig(tp=tp, pp=pp)
    init_model_parallel(resolve_layout(parallel, model_cfg, dist.get_world_size()))
    set_seed(0)
    chunks = build_model_chunks(model_cfg, parallel, PrecisionConfig(params_dtype="fp32"))
    load_model(chunks, ckpt)
    return model_cfg, chunks


def _import_and_tp1_logits(root: str) -> dict:
    """World of 1: HF → Megatron with the CLI, then TP=1 logits of the checkpoint."""
    from copd_megatron.checkpoint.convert_cli import main

    out = {}
    for arch in ARCHS:
        mc = f"{root}/{arch}/mcore"
        assert main(["hf-to-mcore", "--hf-dir", f"{root}/{arch}/hf", "--out", mc]) == 0
        _, (chunk,) = _build_and_load(mc, tp=1, pp=1)
        out[arch] = _logits(chunk)
    return out


def _save_as_branch(chunks: list, model_cfg, path: str) -> None:
    """What the trainer writes: weights plus optimizer, scheduler and RNG state."""
    from copd_megatron.checkpoint.manager import save_branch
    from copd_megatron.config import OptimizerConfig, ParallelConfig, PrecisionConfig
    from copd_megatron.model.build import wrap_and_optimize

    # Not the distributed optimizer: its state_dict() needs a step taken first.
    parallel, precision = ParallelConfig(tp=2, use_distributed_optimizer=False), PrecisionConfig(params_dtype="fp32")
    branch = wrap_and_optimize(chunks, chunks[0].config, parallel, precision, OptimizerConfig(), total_steps=1)
    save_branch(branch, Path(path), model_cfg, "fp32")


def _reshard(root: str) -> dict:
    """World of 2: TP=2 logits; re-save at TP=2 (Llama: also as a branch) and at PP=2."""
    from copd_megatron.checkpoint.dist_ckpt import save_model

    out = {}
    for arch in ARCHS:
        mc = f"{root}/{arch}/mcore"
        model_cfg, chunks = _build_and_load(mc, tp=2, pp=1)
        out[arch] = _logits(chunks[0])
        save_model(chunks, f"{root}/{arch}/tp2", model_cfg, "fp32")
        if "branch" in SAVED[arch]:
            _save_as_branch(chunks, model_cfg, f"{root}/{arch}/branch")
        model_cfg, chunks = _build_and_load(mc, tp=1, pp=2)
        save_model(chunks, f"{root}/{arch}/pp2", model_cfg, "fp32")
    return out if dist.get_rank() == 0 else {}


def _export(root: str) -> list[int]:
    """World of 1: export the TP=2 and PP=2 checkpoints (config.json rebuilt without a template)."""
    from copd_megatron.checkpoint.convert_cli import main

    codes = []
    for arch in ARCHS:
        for layout in SAVED[arch]:
            args = ["mcore-to-hf", "--mcore-dir", f"{root}/{arch}/{layout}", "--out", f"{root}/{arch}/hf_{layout}"]
            # tp2: the source config.json as template; pp2: config.json rebuilt from ours, small
            # shards; branch: template and tokenizer files from --tokenizer-dir.
            extra = {"tp2": ["--hf-config", f"{root}/{arch}/hf/config.json"], "pp2": ["--max-shard-size", "40KB"],
                     "branch": ["--tokenizer-dir", f"{root}/{arch}/hf"]}[layout]  # fmt: skip
            codes.append(main(args + extra))
    return codes, _streaming_and_refusals(root)


def _streaming_and_refusals(root: str) -> dict:
    """Export reads one layer at a time; a config that does not match the checkpoint is refused."""
    import dataclasses

    from copd_megatron.checkpoint.convert import TorchDistReader, export_hf
    from copd_megatron.checkpoint.dist_ckpt import read_meta
    from copd_megatron.checkpoint.hf import mcore_to_hf_iter
    from copd_megatron.config.schema import ConfigError

    ckpt = Path(root, "llama", "pp2")  # saved by two pipeline stages: every read spans files
    m, _ = read_meta(ckpt)
    reader = TorchDistReader(ckpt, m)
    # Megatron saves the local spec's norms under the TE spec's fused names, stacked over layers:
    # what a Transformer Engine model (model.transformer_impl: te) reads and writes natively.
    assert reader.where["decoder.layers.1.input_layernorm.weight"][:2] == (
        "decoder.layers.self_attention.linear_qkv.layer_norm_weight", 1)
    assert reader.where["decoder.layers.0.pre_mlp_layernorm.weight"][0] == "decoder.layers.mlp.linear_fc1.layer_norm_weight"
    names = [name for name, _ in mcore_to_hf_iter(reader.get, m)]
    reads = list(reader.reads)
    # The reference sizes come from the original HF file, not from the mapping under test: a
    # layer has the same parameters either way (fused QKV = q + k + v, fc1 = gate + up).
    from safetensors.torch import load_file

    original = load_file(str(Path(root, "llama", "hf", "model.safetensors")))
    layer_bytes = sum(t.numel() * 4 for k, t in original.items() if k.startswith("model.layers.0."))
    errors = {}
    bad = {"layers": dataclasses.replace(m, num_layers=3), "qk_norm": dataclasses.replace(m, qk_layernorm=True)}
    for what, cfg in bad.items():
        try:
            TorchDistReader(ckpt, cfg)
        except ConfigError as e:
            errors[what] = str(e)
    try:  # Qwen3's QK-norm tensors exported with a config that lacks them
        TorchDistReader(Path(root, "qwen3", "pp2"), dataclasses.replace(read_meta(Path(root, "qwen3", "pp2"))[0],
                                                                     qk_layernorm=False))  # fmt: skip
    except ConfigError as e:
        errors["unexplained"] = str(e)
    total = sum(t.numel() * 4 for t in original.values())
    _save_unstacked_local_names(reader, m, Path(root, "llama", "unstacked"))
    export_hf(Path(root, "llama", "unstacked"), Path(root, "llama", "hf_unstacked"))
    return {"reads": reads, "layer_bytes": layer_bytes, "total": total, "n_hf": len(names),
            "layers": m.num_layers, "errors": errors}  # fmt: skip


def _save_unstacked_local_names(reader, m, out: Path) -> None:
    """The other torch_dist key forms the reader accepts: one key per layer
    (``decoder.layers.<i>.<name>``) and the local spec's own norm names."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from copd_megatron.checkpoint.dist_ckpt import write_meta

    state = {name: ShardedTensor.from_rank_offsets(name, reader.get(name).clone(), replica_id=0) for name in reader.where}
    out.mkdir()
    dist_checkpointing.save(state, str(out))
    write_meta(out, m, "fp32")


def test_hf_megatron_round_trip_and_logits(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    models, refs = {}, {}
    for arch in ARCHS:
        models[arch] = _hf_model(arch)
        models[arch].save_pretrained(tmp_path / arch / "hf")
        (tmp_path / arch / "hf" / "tokenizer_config.json").write_text("{}")  # copied by the branch export
        with torch.no_grad():
            refs[arch] = models[arch](TOKENS).logits
    tp1 = run_distributed(_import_and_tp1_logits, 1, args=(str(tmp_path),), timeout=240)[0]
    tp2 = run_distributed(_reshard, 2, args=(str(tmp_path),), timeout=240)[0]
    codes, stream = run_distributed(_export, 1, args=(str(tmp_path),), timeout=240)[0]
    assert codes == [0] * 7
    # Streaming: one read per decoder layer (each ≤ one layer's bytes) plus embedding, final
    # norm and output layer (untied Llama), never the whole model.
    emb_bytes = 4 * PADDED * 64
    assert len(stream["reads"]) == stream["layers"] + 3
    assert max(stream["reads"]) <= max(stream["layer_bytes"], emb_bytes) < stream["total"] / 2
    assert sorted(stream["reads"])[-3] == stream["layer_bytes"]  # the two layers' reads are whole layers
    assert "has shape (2," in stream["errors"]["layers"] and "implies (3," in stream["errors"]["layers"]
    assert "q_layernorm.weight' is not in the checkpoint" in stream["errors"]["qk_norm"]
    assert "does not explain" in stream["errors"]["unexplained"] and "_layernorm.weight" in stream["errors"]["unexplained"]

    for arch in ARCHS:
        for got in (tp1[arch], tp2[arch]):
            assert got.shape == (1, TOKENS.shape[1], PADDED)
            torch.testing.assert_close(got[..., :VOCAB], refs[arch], rtol=1e-5, atol=1e-5, msg=arch)
        # Exactly what save_pretrained wrote: tied models store no lm_head.weight.
        original = load_file(str(tmp_path / arch / "hf" / "model.safetensors"))
        for layout in SAVED[arch] + (("unstacked",) if arch == "llama" else ()):
            out = tmp_path / arch / f"hf_{layout}"
            files = sorted(out.glob("*.safetensors"))
            assert (len(files) > 1) == (layout == "pp2") == (out / "model.safetensors.index.json").is_file()
            exported = {k: v for f in files for k, v in load_file(str(f)).items()}
            assert set(exported) == set(original), (arch, layout)
            for name, t in original.items():
                assert torch.equal(exported[name], t), (arch, layout, name)
            assert (out / "tokenizer_config.json").is_file() == (layout == "branch")
            reloaded = type(models[arch]).from_pretrained(out).float().eval()
            with torch.no_grad():
                torch.testing.assert_close(reloaded(TOKENS).logits, refs[arch], rtol=0, atol=0)
