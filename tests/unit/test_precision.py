"""Precision per pass: defaults, the FP8 switch per pass, FP8 state frozen outside training, shape rules
and the config errors (one line, exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from copd_megatron.config import ConfigError, config_from_dict, validate
from copd_megatron.config.precision import pass_format, token_pad_multiple
from copd_megatron.config.schema import ParallelConfig, PrecisionConfig
from copd_megatron.model.precision import precision_pass

ROOT = Path(__file__).resolve().parents[2]


def test_pass_defaults_keep_scoring_out_of_fp8() -> None:
    fp8 = PrecisionConfig(params_dtype="bf16", fp8="e4m3")
    assert [pass_format(fp8, p) for p in ("train", "score", "generate")] == ["fp8", "bf16", "bf16"]
    plain = PrecisionConfig(params_dtype="fp32")
    assert [pass_format(plain, p) for p in ("train", "score", "generate")] == ["fp32", "fp32", "fp32"]
    assert pass_format(PrecisionConfig(params_dtype="fp32", score="bf16"), "score") == "bf16"


def test_pad_multiple_is_16_under_fp8_and_tp_under_sequence_parallel() -> None:
    par = ParallelConfig(tp=4, sequence_parallel=True)
    assert token_pad_multiple(PrecisionConfig(), ParallelConfig()) == 1
    assert token_pad_multiple(PrecisionConfig(fp8="hybrid"), ParallelConfig()) == 16
    assert token_pad_multiple(PrecisionConfig(), par) == 4
    assert token_pad_multiple(PrecisionConfig(fp8="e4m3"), ParallelConfig(tp=3, sequence_parallel=True)) == 48


class _FP8Like(torch.nn.Module):
    """Stands in for a TE module: FP8 scaling state kept through the extra-state protocol, updated by
    every forward that runs while ``config.fp8`` is set (as TE's amax history is), and the config's
    ``fp8`` value seen by each forward recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(fp8="e4m3")
        self.lin = torch.nn.Linear(4, 4)
        self.amax_history = torch.zeros(3)
        self.seen: list = []

    def forward(self, x):
        self.seen.append(self.config.fp8)
        if self.config.fp8:
            self.amax_history = torch.roll(self.amax_history, 1)
            self.amax_history[0] = x.abs().max()
        return self.lin(x)

    def get_extra_state(self):
        return {"amax_history": self.amax_history}

    def set_extra_state(self, state) -> None:
        self.amax_history = state["amax_history"].clone()


def test_fp8_is_switched_per_pass_and_scoring_never_moves_the_scaling_state() -> None:
    m, x = _FP8Like(), torch.randn(2, 4)
    fp8 = PrecisionConfig(params_dtype="bf16", fp8="e4m3", score="fp8", generate="bf16")
    with precision_pass([m], fp8, "train"):
        m(x)
    trained = m.amax_history.clone()
    assert m.seen == ["e4m3"] and trained[0] > 0  # the training pass updates the state (positive control)
    with precision_pass([m], fp8, "score"):  # an FP8 scoring pass: runs FP8, the state is put back
        m(3 * x)
    with precision_pass([m], fp8, "generate"):  # a bf16 pass: FP8 off for its duration
        m(5 * x)
    assert m.seen == ["e4m3", "e4m3", None]
    assert torch.equal(m.amax_history, trained) and m.config.fp8 == "e4m3"


def test_bf16_pass_on_fp32_weights_autocasts_and_restores() -> None:
    m = _FP8Like()
    with precision_pass([m], PrecisionConfig(params_dtype="fp32", score="bf16"), "score") as fmt:
        assert fmt == "bf16" and m.lin(torch.randn(2, 4)).dtype == torch.bfloat16
    assert m.lin(torch.randn(2, 4)).dtype == torch.float32


def _cfg(**sections):
    return config_from_dict({"schedule": {"mode": "smoke"}, **sections})


@pytest.mark.parametrize(
    "sections, te, expected",
    [
        ({"parallel": {"tp": 2, "sequence_parallel": True}}, False,
         "parallel.sequence_parallel: true needs the Transformer Engine layer spec"),
        ({"parallel": {"tp": 2, "sequence_parallel": True}, "model": {"transformer_impl": "local"}}, True,
         "parallel.sequence_parallel: true needs the Transformer Engine layer spec"),
        ({"parallel": {"tp": 4, "sequence_parallel": True}, "model": {"seq_length": 250, "num_attention_heads": 4,
          "num_query_groups": 4}}, True, "model.seq_length: 250 must be a multiple of 4"),
        ({"precision": {"fp8": "e4m3"}, "model": {"seq_length": 100}}, True, "model.seq_length: 100 must be a multiple of 16"),
        ({"precision": {"fp8": "e4m3"}, "model": {"hidden_size": 72, "num_attention_heads": 4}}, True,
         "model.hidden_size: FP8 GEMMs need every matrix dimension divisible by 16"),
        ({"precision": {"fp8": "e4m3"}, "model": {"transformer_impl": "local"}}, True,
         "precision.fp8: FP8 passes need the Transformer Engine layer spec"),
        ({"precision": {"score": "fp8"}}, True, "precision.score: 'fp8' needs precision.fp8"),
        ({"precision": {"fp8": "e4m3", "generate": "fp8"}}, True, "precision.generate: 'fp8' is not supported by the Megatron"),
        ({"precision": {"train": "fp32", "params_dtype": "bf16"}}, True, "precision.train: 'fp32' needs fp32 weights"),
        ({"precision": {"fp8": "e4m3", "fp8_recipe": "mxfp8"}}, True, "precision.fp8_recipe: 'mxfp8' needs a Blackwell"),
    ],
)  # fmt: skip
def test_precision_and_shape_rules_are_config_errors(monkeypatch, sections, te, expected) -> None:
    v = sys.modules["copd_megatron.config.validate"]  # the package re-exports a function of that name

    monkeypatch.setattr(v, "_have", lambda module: te)  # as if Transformer Engine were importable (or not)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))  # an H100
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        validate(_cfg(**sections), world_size=sections.get("parallel", {}).get("tp", 1), cuda_available=True)


def test_fp8_on_hopper_with_te_spec_is_accepted(monkeypatch) -> None:
    v = sys.modules["copd_megatron.config.validate"]  # the package re-exports a function of that name

    monkeypatch.setattr(v, "_have", lambda module: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    cfg = _cfg(precision={"fp8": "hybrid", "fp8_recipe": "blockwise"}, parallel={"tp": 2, "sequence_parallel": True},
               model={"ffn_hidden_size": 192})
    assert validate(cfg, world_size=2, cuda_available=True).tp == 2


def test_sequence_parallel_on_the_local_spec_is_one_line_and_exit_2() -> None:
    cmd = [sys.executable, "-m", "copd_megatron.cli", "configs/smoke_cpu.yaml", "parallel.tp=2",
           "parallel.sequence_parallel=true", "--check"]  # fmt: skip
    env = {"WORLD_SIZE": "2", "RANK": "0", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("copd-train: error: parallel.sequence_parallel: true needs the Transformer Engine")
