"""copd-convert: small random HF Llama / Qwen2 / Qwen3 models → Megatron (TP=1 and TP=2 logits
equal transformers') → back to HF (every tensor identical), including an export of a checkpoint
saved at TP=2."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

from copd_megatron.testing import run_distributed

transformers = pytest.importorskip("transformers", reason="HF conversion tests need `transformers` (pip install transformers)")
pytest.importorskip("safetensors", reason="HF conversion tests need `safetensors`")

VOCAB = 500  # padded to 512 inside Megatron: the padding must be trimmed on export
TOKENS = torch.tensor([[1, 7, 42, 99, 3, 250, 499, 12, 8, 64]])


def _hf_model(arch: str):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, rope_theta=10000.0)  # fmt: skip
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        return transformers.Qwen2ForCausalLM(cfg)
    cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=False)
    return transformers.Qwen3ForCausalLM(cfg)


def _megatron_logits(ckpt: str, tp: int, resave: str | None = None) -> torch.Tensor:
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from copd_megatron.checkpoint.dist_ckpt import load_model, read_meta, save_model
    from copd_megatron.config import ParallelConfig, PrecisionConfig
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_model_chunks

    model_cfg, _ = read_meta(ckpt)
    init_model_parallel(resolve_layout(ParallelConfig(tp=tp), model_cfg, dist.get_world_size()))
    set_seed(0)
    (model,) = build_model_chunks(model_cfg, ParallelConfig(tp=tp), PrecisionConfig(params_dtype="fp32"))
    load_model([model], ckpt)
    if resave:
        save_model([model], resave, model_cfg, "fp32")
    with torch.no_grad():
        logits = model(TOKENS, torch.arange(TOKENS.shape[1])[None], None)
    return gather_from_tensor_model_parallel_region(logits)


def _convert(args: list[str]) -> int:
    from copd_megatron.checkpoint.convert import main

    return main(args)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_hf_roundtrip_and_logits(arch, tmp_path):
    torch.manual_seed(0)
    hf = _hf_model(arch).float().eval()
    hf_dir, mc_dir, tp2_dir, back = (tmp_path / n for n in ("hf", "mcore", "mcore_tp2", "back"))
    hf.save_pretrained(hf_dir, safe_serialization=True)
    with torch.no_grad():
        ref = hf(TOKENS).logits
    assert run_distributed(_convert, 1, args=(["hf-to-mcore", "--hf-dir", str(hf_dir), "--out", str(mc_dir)],),
                           timeout=180)[0] == 0  # fmt: skip
    tp1 = run_distributed(_megatron_logits, 1, args=(str(mc_dir), 1), timeout=180)[0]
    tp2 = run_distributed(_megatron_logits, 2, args=(str(mc_dir), 2, str(tp2_dir)), timeout=180)[0]
    for got in (tp1, tp2):
        assert got.shape[-1] == 512 and torch.isfinite(got).all()
        torch.testing.assert_close(got[..., :VOCAB], ref, rtol=1e-5, atol=1e-5)
    # Export the checkpoint written at TP=2 and compare every tensor with the original model.
    arch_name = type(hf).__name__
    assert run_distributed(_convert, 1, args=(["mcore-to-hf", "--mcore-dir", str(tp2_dir), "--arch", arch_name,
                                               "--out", str(back)],), timeout=180)[0] == 0  # fmt: skip
    from safetensors.torch import load_file

    exported = load_file(str(back / "model.safetensors"))
    original = {k: v for k, v in hf.state_dict().items() if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(exported) == set(original)
    for k, v in original.items():
        assert torch.equal(exported[k], v), k
    reloaded = type(hf).from_pretrained(back).float().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(TOKENS).logits, ref, rtol=0, atol=0)


def test_unsupported_architecture_and_missing_files(tmp_path, capsys):
    from copd_megatron.checkpoint.convert import main

    assert main(["hf-to-mcore", "--hf-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    assert "directory not found" in capsys.readouterr().err
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    assert run_distributed(_convert, 1, args=(["hf-to-mcore", "--hf-dir", str(tmp_path / "gpt2"), "--out",
                                               str(tmp_path / "o")],), timeout=120)[0] == 2  # fmt: skip
