"""Precision per pass, and the token-dimension padding FP8 and sequence parallelism need. Pure.

A branch runs four kinds of forward pass: the training step, recomputing its own old log-probs,
answering a student's score request as a teacher, and generating rollouts. Each gets its own
numeric format (``precision.train``, ``precision.score`` — old log-probs and teacher scores —
and ``precision.generate``), because they tolerate noise differently:

* the training GEMMs tolerate FP8 (the optimizer keeps fp32 master weights, and the per-tensor
  scaling is what FP8 training recipes are built for);
* the OPD advantage ``β·(log π_T − log π_S)`` is a *difference of two different models'* log-probs:
  FP8 quantisation noise is independent in the two and does not cancel, so it lands directly in
  the advantage. The same holds for the PPO ratio against recomputed old log-probs. Scoring is
  therefore bf16 by default even when training runs FP8;
* generation only has to sample; its log-probs are monitored, never trained on.

Defaults (``null``): ``train`` is ``fp8`` when ``precision.fp8`` names a format, else the weights'
dtype; ``score`` and ``generate`` are the weights' dtype (bf16 for bf16 weights). A pass can only
run at the weights' precision or lower: ``fp32`` needs fp32 weights; ``bf16`` with fp32 weights
runs under autocast.

Shapes. FP8 GEMMs (Transformer Engine) need both dimensions of every operand divisible by 16, and
sequence parallelism splits the token dimension over the TP ranks: micro-batches are padded to a
multiple of :func:`token_pad_multiple` (masked positions, never in a loss).
"""

from __future__ import annotations

import math

from copd_megatron.config.schema import ParallelConfig, PrecisionConfig

PASSES = ("train", "score", "generate")
FP8_MULTIPLE = 16


def pass_format(precision: PrecisionConfig, name: str) -> str:
    """``bf16`` / ``fp8`` / ``fp32`` (or ``fp16`` for fp16 weights) of pass ``name`` after defaults."""
    if name not in PASSES:
        raise ValueError(f"unknown pass {name!r}; expected one of {PASSES}")
    explicit = getattr(precision, name)
    if explicit is not None:
        return explicit
    if name == "train" and precision.fp8 is not None:
        return "fp8"
    return precision.params_dtype


def uses_fp8(precision: PrecisionConfig) -> bool:
    """True when any pass runs FP8 GEMMs."""
    return any(pass_format(precision, p) == "fp8" for p in PASSES)


def token_pad_multiple(precision: PrecisionConfig, parallel: ParallelConfig) -> int:
    """Micro-batch token lengths are rounded up to a multiple of this: 16 under FP8, TP under
    sequence parallelism, their least common multiple under both, else 1."""
    m = FP8_MULTIPLE if uses_fp8(precision) else 1
    if parallel.sequence_parallel:
        m = math.lcm(m, parallel.tp)
    return m
