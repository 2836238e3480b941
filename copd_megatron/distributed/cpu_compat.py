"""Let Megatron-Core's real code run on CPU under gloo. Activated only when CUDA is absent.

Megatron-Core assumes a GPU: tensors are created with ``device='cuda'`` or
``torch.cuda.current_device()``, RNG states are CUDA generator states, overlap uses CUDA
streams/events, and grad clipping / the distributed optimizer assert
``param.type() == 'torch.cuda.FloatTensor'``. This module patches exactly that, and
nothing numerical, so that tensor, pipeline and data parallel code paths are tested on
CPU-only CI with several processes:

* device routing: ``torch.cuda.current_device()`` answers 0 and every tensor factory,
  ``Tensor.cuda()`` and ``Tensor.to()`` map a CUDA device (``'cuda'``, ``'cuda:N'``, an int,
  ``torch.device('cuda')``) to CPU;
* RNG: the "CUDA" generator is aliased to the CPU default generator, so Megatron's
  ``CudaRNGStatesTracker.fork()`` really switches RNG streams (per-TP-rank init and dropout);
* streams, events, synchronize, memory statistics and NVTX ranges are no-ops;
* ``Tensor.type()`` with no argument answers the CUDA type name for CPU tensors
  (the only thing clip_grads and the distributed optimizer check).

It is imported only by :func:`activate` callers on CPU machines; the GPU path never imports it.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import torch

_ACTIVE = False

# Factories whose ``device=`` keyword Megatron sets to a CUDA device.
_FACTORIES = (
    "empty", "zeros", "ones", "full", "tensor", "arange", "rand", "randn", "randint",
    "randperm", "empty_like", "zeros_like", "ones_like", "full_like", "rand_like",
    "randn_like", "as_tensor", "linspace", "eye", "empty_strided", "tril_indices",
    "triu_indices",
)  # fmt: skip

_CUDA_TYPE = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def is_active() -> bool:
    return _ACTIVE


def _to_cpu_device(device):
    """Map any CUDA device spelling to CPU; leave everything else alone."""
    if device is None:
        return None
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _route_device_kwarg(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("pin_memory", None)  # pinning needs a CUDA context
        return fn(*args, **kwargs)

    return wrapper


def _patch_tensor_methods() -> None:
    orig_to, orig_type = torch.Tensor.to, torch.Tensor.type

    def to(self, *args, **kwargs):
        if not kwargs and len(args) == 1 and isinstance(args[0], torch.dtype):
            return orig_to(self, args[0])  # the common dtype cast: no device to route
        args = tuple(_to_cpu_device(a) if isinstance(a, (str, torch.device)) else a for a in args)
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        kwargs.pop("non_blocking", None)
        return orig_to(self, *args, **kwargs)

    def cuda(self, device=None, non_blocking=False, memory_format=torch.preserve_format):
        return self

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and self.device.type == "cpu":
            return _CUDA_TYPE.get(self.dtype, orig_type(self))
        return orig_type(self, dtype, non_blocking, **kwargs)

    torch.Tensor.to = to
    torch.Tensor.cuda = cuda
    torch.Tensor.type = type_
    torch.nn.Module.cuda = lambda self, device=None: self
    torch.Tensor.pin_memory = lambda self, *a, **k: self


class _NoOpStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, *args, **kwargs):
        return _NoOpEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _NoOpEvent(_NoOpStream):
    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def elapsed_time(self, other):
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpEvent
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.device = lambda *a, **k: contextlib.nullcontext()
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda *a, **k: 0)
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    # RNG: the "CUDA" generator is the CPU default generator (see module docstring).
    get_state = lambda device=None: torch.get_rng_state()  # noqa: E731
    set_state = lambda new_state, device=None: torch.set_rng_state(new_state)  # noqa: E731
    cuda.get_rng_state = cuda.random.get_rng_state = get_state
    cuda.set_rng_state = cuda.random.set_rng_state = set_state
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: seed the CPU generator
    # directly, and let manual_seed_all be a no-op, or the two would recurse.
    cuda.manual_seed = cuda.random.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = cuda.random.manual_seed_all = lambda seed: None


class _DropAliasedRngWarning(logging.Filter):
    """fork() warns when the CPU RNG moved inside a CUDA-RNG context; with the alias it always does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron() -> None:
    """Megatron helpers that reach CUDA generators directly instead of through torch.cuda."""
    from megatron.core.tensor_parallel import random as mrandom

    logging.getLogger(mrandom.__name__).addFilter(_DropAliasedRngWarning())
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()


def stub_cuda_runtime() -> None:
    """Only the CUDA *runtime* answers (current device, RNG states, streams, events, memory
    statistics), without routing any tensor to CPU. The fake-CUDA test tier uses this: tensors it
    creates on ``cuda`` stay (fake) CUDA tensors, so a misplaced CPU tensor is still an error."""
    _patch_torch_cuda()
    _patch_megatron()


def activate() -> None:
    """Install the patches (idempotent). Refuses to run where CUDA is available."""
    global _ACTIVE
    if _ACTIVE:
        return
    if torch.cuda.is_available():
        raise RuntimeError("cpu_compat must not be activated on a machine with CUDA")
    for name in _FACTORIES:
        setattr(torch, name, _route_device_kwarg(getattr(torch, name)))
    _patch_tensor_methods()
    stub_cuda_runtime()
    _ACTIVE = True
