"""The runtime device, and the one place that turns host values into collective tensors.

Every process has one device that holds the model, the rollout engine's buffers, the micro-batches
and every tensor handed to a collective: ``cuda:LOCAL_RANK`` on a GPU machine, ``cpu`` under the
CPU compatibility layer. :func:`~copd_megatron.distributed.init.init_distributed` sets it; code asks
:func:`runtime_device` instead of writing ``"cuda"`` or relying on a default.

Where data lives (and why):

* **device**: model weights, KV cache and token buffers of generation, micro-batches (moved once, by
  ``Batch.micro_batches(device=...)``), logits, losses and metric sums — everything a kernel touches;
* **host**: the batch of declared fields between phases (rollout bookkeeping, verifier rewards,
  trimming decisions, metrics as Python floats). Host control flow on host data never waits for the
  GPU; the few device → host copies are at phase boundaries (a finished rollout, a score's per-token
  results, one metric vector per step).

Collectives: NCCL accepts only CUDA tensors and gloo is happiest with CPU ones. Every collective of
the project therefore takes its tensors on the runtime device (that is the rule a test checks, see
``copd_megatron.testing.fake_cuda``), and values that start on the host (counts, flags, metric
dictionaries) go through :func:`all_reduce_values`, which builds the tensor on the runtime device,
reduces it and returns Python numbers.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

_DEVICE: torch.device | None = None


def default_device() -> torch.device:
    """``cuda:<current device>`` when CUDA is usable, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def runtime_device() -> torch.device:
    """This process's device (set by ``init_distributed``; before that, :func:`default_device`)."""
    return _DEVICE if _DEVICE is not None else default_device()


def set_runtime_device(device: torch.device | str | None) -> torch.device | None:
    """Set (or, with ``None``, forget) the runtime device; returns the previous setting."""
    global _DEVICE
    old, _DEVICE = _DEVICE, (torch.device(device) if device is not None else None)
    return old


def on_device(t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """``t`` on ``device`` (default: the runtime device); no copy when it is already there."""
    device = device or runtime_device()
    return t if t.device == device else t.to(device)


def all_reduce_values(values: Sequence[float], group=None, op=None, dtype: torch.dtype = torch.float64) -> list[float]:
    """Reduce host numbers over ``group`` (sum by default) through a tensor on the runtime device.

    One collective and one device → host copy for the whole vector, whatever its length. Without
    an initialised process group (or with a group of one) the values come back unchanged."""
    vals = [float(v) for v in values]
    if not vals or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return vals
    t = torch.tensor(vals, dtype=dtype, device=runtime_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op is None else op, group=group)
    return t.tolist()


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank of ``group`` when ``flag`` is true on any of them."""
    return all_reduce_values([1.0 if flag else 0.0], group, dist.ReduceOp.MAX)[0] > 0


def place_module(module: torch.nn.Module, device: torch.device | None = None) -> torch.nn.Module:
    """Move every parameter and buffer of ``module`` that is not on ``device`` (default: the runtime
    device) there, in place; returns ``module``.

    Megatron-Core creates most weights on the current CUDA device, but not all (the local spec's
    ``torch.nn.RMSNorm`` weights are created on the host, and Megatron-LM's training script fixes
    that with ``model.cuda()`` after building). Unlike ``Module.to`` this keeps each parameter's
    Megatron attributes (``tensor_model_parallel``, ``shared``, ...) and tied parameters tied, and
    leaves parameters already on the device untouched (no copy on a GPU machine)."""
    device = device or runtime_device()
    moved: dict[int, torch.nn.Parameter] = {}
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is None or p.device == device:
                continue
            if id(p) not in moved:
                new = torch.nn.Parameter(p.detach().to(device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                moved[id(p)] = new
            m._parameters[name] = moved[id(p)]
        for name, b in list(m._buffers.items()):
            if b is not None and b.device != device:
                m._buffers[name] = b.to(device)
    return module
