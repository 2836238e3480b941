"""Running one forward (and backward) pass at its configured precision (``precision.train``,
``.score``, ``.generate``; defaults and the reasons for them in ``config/precision.py``).

How a pass gets its format:

* **FP8** goes through Transformer Engine: Megatron-Core's ``TransformerBlock`` reads
  ``config.fp8`` at every forward and wraps the layers in TE's ``fp8_autocast`` with the recipe
  named by ``config.fp8_recipe`` (delayed, tensorwise = current scaling, blockwise, mxfp8). A pass
  therefore sets ``config.fp8`` to the format for an FP8 pass and to ``None`` otherwise, for its
  duration: FP8 is enabled per pass, never globally.
* **bf16 on fp32 weights** runs under ``torch.autocast`` (the CPU tests use this to run a scoring
  pass in bf16 next to fp32 training); bf16 weights run bf16 as they are (Megatron's
  ``Float16Module``); ``fp32`` needs fp32 weights (``config.validate`` refuses the rest).
* **No scaling state changes outside training.** With delayed scaling, every FP8 forward pushes
  its amax into each TE module's history and updates the scales at the end of the autocast. A
  scoring or generation pass in FP8 must not do that (a teacher's answer would change the
  teacher's next training step): the FP8 state of every module that keeps one (TE modules,
  through PyTorch's extra-state protocol ``get_extra_state`` / ``set_extra_state``) is copied
  before such a pass and put back after it. bf16 passes never touch FP8 state (TE updates it
  only inside an FP8 autocast).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch

from copd_megatron.config.precision import pass_format
from copd_megatron.config.schema import PrecisionConfig


def _configs(chunks: list) -> list:
    """The distinct TransformerConfig objects of the chunks (usually one shared object)."""
    out: dict[int, object] = {}
    for c in chunks:
        m = c
        while hasattr(m, "module"):
            m = m.module
        cfg = getattr(m, "config", None)
        if cfg is not None:
            out[id(cfg)] = cfg
    return list(out.values())


def _has_extra_state(m: torch.nn.Module) -> bool:
    return type(m).get_extra_state is not torch.nn.Module.get_extra_state


def snapshot_fp8_state(chunks: list) -> list[tuple[torch.nn.Module, object]]:
    """``(module, copy of its extra state)`` for every module that keeps one (TE's FP8 metadata)."""
    out = []
    for c in chunks:
        for m in c.modules():
            if _has_extra_state(m):
                out.append((m, copy.deepcopy(m.get_extra_state())))
    return out


def restore_fp8_state(snapshot: list[tuple[torch.nn.Module, object]]) -> None:
    for m, state in snapshot:
        m.set_extra_state(state)


def _device_type(chunks: list) -> str:
    for c in chunks:
        for p in c.parameters():
            return p.device.type
    return "cpu"


@contextlib.contextmanager
def precision_pass(chunks: list, precision: PrecisionConfig | None, name: str) -> Iterator[str | None]:
    """Run the body as pass ``name`` (``train`` / ``score`` / ``generate``) of the model ``chunks``;
    yields the pass's format. ``precision=None``: no change (a provider that declares none)."""
    if precision is None:
        yield None
        return
    fmt = pass_format(precision, name)
    configs = _configs(chunks)
    saved = [(c, c.fp8) for c in configs]
    frozen = snapshot_fp8_state(chunks) if fmt == "fp8" and name != "train" else None
    for c in configs:
        c.fp8 = precision.fp8 if fmt == "fp8" else None  # Megatron reads it at every forward
    cast = fmt == "bf16" and precision.params_dtype == "fp32"
    autocast = torch.autocast(_device_type(chunks), dtype=torch.bfloat16) if cast else contextlib.nullcontext()
    try:
        with autocast:
            yield fmt
    finally:
        for c, value in saved:
            c.fp8 = value
        if frozen is not None:
            restore_fp8_state(frozen)
