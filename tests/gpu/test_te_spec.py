"""GPU + Transformer Engine: a converted base in the TE spec (keys, logits vs the local spec, and back),
and an FP8 training run against bf16 with FP8 scoring that leaves the scaling state alone.

Stated tolerances: TE vs local logits (bf16 weights, same base) within 0.05 absolute; after 40 steps
on the counting corpus the FP8 run's loss within 0.15 nats of the bf16 run's, both at least 1 nat
below their start.
"""

from __future__ import annotations

import pytest
import torch

from copd_megatron.testing import run_distributed
from tests.gpu.conftest import NEEDS_TE

pytestmark = [pytest.mark.gpu, NEEDS_TE]


def _build(m, impl: str, precision: dict):
    import dataclasses

    from copd_megatron.config import ParallelConfig, PrecisionConfig
    from copd_megatron.model.build import build_model_chunks

    return build_model_chunks(dataclasses.replace(m, transformer_impl=impl), ParallelConfig(), PrecisionConfig(**precision))


def _te_round_trip(root: str) -> dict:
    import transformers

    from copd_megatron.checkpoint.convert_cli import main
    from copd_megatron.checkpoint.dist_ckpt import load_model, read_meta, save_model
    from copd_megatron.checkpoint.spec_keys import checkpoint_tensor_keys, sharded_tensor_keys
    from copd_megatron.config import ParallelConfig
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.distributed.init import init_model_parallel, set_seed

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=500, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128))  # fmt: skip
    hf.save_pretrained(f"{root}/hf")
    assert main(["hf-to-mcore", "--hf-dir", f"{root}/hf", "--out", f"{root}/base"]) == 0
    m, _ = read_meta(f"{root}/base")
    init_model_parallel(resolve_layout(ParallelConfig(), m, 1))
    set_seed(0)
    local, te = _build(m, "local", {"params_dtype": "bf16"}), _build(m, "transformer_engine", {"params_dtype": "bf16"})
    keys_equal = sharded_tensor_keys(te) == checkpoint_tensor_keys(f"{root}/base")
    load_model(local, f"{root}/base")
    load_model(te, f"{root}/base")
    tokens = torch.randint(0, 500, (2, 32), device="cuda")
    pos = torch.arange(32, device="cuda")[None].expand(2, -1)
    with torch.no_grad():
        diff = float((local[0](tokens, pos, None).float() - te[0](tokens, pos, None).float()).abs().max())
    save_model(te, f"{root}/from_te", m, "bf16")  # and back: a TE checkpoint into the local spec
    back = _build(m, "local", {"params_dtype": "bf16"})
    load_model(back, f"{root}/from_te")
    same = all(torch.equal(a, b) for a, b in zip(local[0].state_dict().values(), back[0].state_dict().values())
               if torch.is_tensor(a))  # fmt: skip
    return {"keys_equal": keys_equal, "logit_diff": diff, "back_equal": same}


def test_converted_base_loads_into_te_spec_and_back(tmp_path, record) -> None:
    r = run_distributed(_te_round_trip, 1, args=(str(tmp_path),), timeout=300)[0]
    record("te_spec", "max |logit diff| TE vs local spec, bf16", r["logit_diff"])
    record("te_spec", "TE sharded keys == converted checkpoint keys", r["keys_equal"])
    assert r["keys_equal"] and r["back_equal"] and r["logit_diff"] < 0.05


def _train(fp8: str | None) -> dict:
    import time

    from copd_megatron.config import config_from_dict
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.data.batch import MicroBatch
    from copd_megatron.distributed.device import runtime_device
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.model.build import build_branch
    from copd_megatron.model.precision import snapshot_fp8_state
    from copd_megatron.trainer import counting_batch
    from copd_megatron.training.forward import forward_collect
    from copd_megatron.training.step import train_step

    cfg = config_from_dict({"schedule": {"mode": "smoke"}, "model": {"transformer_impl": "transformer_engine",
                            "hidden_size": 128, "ffn_hidden_size": 256, "vocab_size": 512, "seq_length": 64},
                            "precision": {"params_dtype": "bf16", "fp8": fp8, "score": "fp8" if fp8 else None},
                            "optimizer": {"lr": 3e-3}})  # fmt: skip
    init_model_parallel(resolve_layout(cfg.parallel, cfg.model, 1))
    set_seed(1)
    branch = build_branch(cfg.model, cfg.parallel, cfg.precision, cfg.optimizer, 40)
    losses, t0 = [], time.perf_counter()
    for step in range(1, 41):
        tokens = counting_batch(step, 1, 16, 32, 512)
        losses.append(train_step(branch, [MicroBatch.from_tokens(t).to(runtime_device()) for t in tokens.split(8)]).loss)
    seconds = time.perf_counter() - t0
    frozen = None
    if fp8:  # an FP8 scoring pass must leave every TE module's FP8 state as training left it
        before = [(m, s) for m, s in snapshot_fp8_state(branch.chunks)]
        mbs = [MicroBatch.from_tokens(counting_batch(99, 1, 8, 32, 512)).to(runtime_device())]
        forward_collect(branch, mbs, lambda logits, mb: {"s": logits.float().sum(-1)})
        after = snapshot_fp8_state(branch.chunks)
        frozen = all(_same(a[1], b[1]) for a, b in zip(before, after))
    return {"losses": losses, "seconds": seconds, "frozen": frozen}


def _same(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return torch.equal(a.cpu(), b.cpu())
    if hasattr(a, "getvalue") and hasattr(b, "getvalue"):
        return a.getvalue() == b.getvalue()
    return a == b


def test_fp8_training_tracks_bf16_and_scoring_keeps_fp8_state(record) -> None:
    bf16 = run_distributed(_train, 1, args=(None,), timeout=300)[0]
    fp8 = run_distributed(_train, 1, args=("hybrid",), timeout=300)[0]
    record("fp8", "final loss, bf16 / FP8 (hybrid, delayed)", f"{bf16['losses'][-1]:.4f} / {fp8['losses'][-1]:.4f}", "nats")
    record("fp8", "40 steps, bf16 / FP8", f"{bf16['seconds']:.2f} / {fp8['seconds']:.2f}", "s", "tiny model: launch-bound")
    record("fp8", "FP8 scoring pass left the FP8 scaling state unchanged", fp8["frozen"])
    assert fp8["frozen"] is True
    for run in (bf16, fp8):
        assert run["losses"][-1] < run["losses"][0] - 1.0
    assert abs(fp8["losses"][-1] - bf16["losses"][-1]) < 0.15
