"""Fake CUDA on a machine without a GPU: run the project's code paths with every device tensor on
``cuda:0`` (no data), and fail on any tensor created on the wrong device.

Why: under the CPU compatibility layer every ``device='cuda'`` becomes CPU, so code that forgets to
place a tensor passes every CPU test and then fails on its first GPU run (NCCL rejects CPU tensors,
CUDA kernels reject CPU operands). This tier runs *without* that routing, in one process:

* **Fake device tensors.** Tensors created on a CUDA device (a factory with ``device=cuda``,
  ``.to('cuda')``, ``.cuda()``, and everything computed from them) are PyTorch ``FakeTensor``\\ s:
  shapes, dtypes and devices, no storage, no kernels. An operation that mixes one with a CPU tensor
  (other than a 0-dim scalar, which CUDA accepts too) raises ``FakeTensorDeviceMismatchError`` —
  exactly where a real GPU would raise.
* **Real host code.** Host tensors stay real, so the project's host control flow runs for real
  (trimming micro-batches, prompt lengths, verifiers, metric dictionaries). The device → host
  boundary (``.cpu()``, ``.to('cpu')``, ``.item()``, ``.tolist()``, ``bool()``, ``int()``,
  ``float()`` of a fake tensor) yields **zeros** of the right shape and dtype: generation then
  runs to ``max_new_tokens`` (no sequence is ever "done"), responses decode to pad ids, rewards are
  whatever the verifier says about them. The tier checks placement, never numbers.
* **Collectives.** A single-process world of any size on PyTorch's ``fake`` process-group backend
  (collectives return immediately), so TP/DP code paths run their collectives in one process;
  :func:`collective_device_check` makes every tensor handed to a ``torch.distributed`` collective
  prove it is on the runtime device (NCCL's rule).
* **CUDA runtime queries** (current device, RNG states, streams, events, memory statistics) are
  answered by the compatibility layer's stubs (:func:`cpu_compat.stub_cuda_runtime`); its device
  routing is never installed. The tier therefore runs in a fresh process of its own
  (:func:`run_isolated`), never in a process where the compatibility layer is active.

What PyTorch's FakeTensorMode does with this project's code (measured with torch 2.14.1 and
megatron-core 0.19.2 on a machine without a GPU), and how the tier is built around it:

* Megatron's ``GPTModel`` (local spec, TP=2 over the fake backend) builds with ``device=cuda`` and
  runs forward, KV-cached inference included, once the CUDA runtime queries are stubbed. Its RNG
  tracker compares CPU RNG states with ``.item()``: that works here because only device tensors are
  fake, never the host's.
* ``torch.multinomial`` and ``torch.searchsorted`` (the sampler) run: their output shapes do not
  depend on values. ``.item()``, ``bool()``, ``.tolist()`` raise ``DataDependentOutputException`` and
  ``nonzero()`` raises ``DynamicOutputShapeException`` on a fake tensor: hence the zeros at the
  device → host boundary, and the project keeps its data-dependent decisions (trimming, prompt
  lengths) on host data.
* ``Module._apply`` (``.cuda()``, ``.to()``, ``.bfloat16()``, so ``Float16Module`` and Megatron's DDP
  wrapping) cannot swap fake parameters (``swap_tensors`` refuses tensors with weak references): the
  tier runs the model chunks unwrapped. Megatron's gloo side groups crash on the fake store: the
  tier builds Megatron's groups without them.
* A factory called with ``device='cuda'`` outside a FakeTensorMode initialises CUDA and fails, and so
  does any call whose result is CUDA-typed: the tier's function mode runs those inside the fake mode.

What it cannot check: numerical results (there are none), kernels (no CUDA code runs), backward
passes and optimizer steps (FakeTensor autograd through Megatron's custom functions is not
exercised here), pipeline parallelism (point-to-point transfers between stages of one process),
object collectives' contents (the fake backend transfers nothing: a non-source rank would
unpickle garbage, so scenarios keep rank 0 as the source), and anything a GPU-only library (TE,
vLLM) does. Those are the GPU tier's job (``tests/gpu``, ``tools/gpu_check.sh``).
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import pickle
import queue as queue_mod
import traceback
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

CUDA = torch.device("cuda", 0)

# Device → host conversions: on a fake tensor they return zeros (see module doc).
_HOST_METHODS = {"cpu", "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"}
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "reduce", "send", "recv", "isend", "irecv", "all_to_all_single",
                "gather", "scatter")  # fmt: skip
_OBJECT_COLLECTIVES = ("broadcast_object_list", "all_gather_object", "gather_object", "scatter_object_list")


class WrongDeviceError(RuntimeError):
    """A tensor handed to a collective is not on the runtime device."""


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _cuda_like(device: Any) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # an int device is a CUDA ordinal
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _target_device(args: tuple, kwargs: dict) -> Any:
    """The device argument of ``Tensor.to(...)`` (positional device/str/tensor, or ``device=``)."""
    if "device" in kwargs:
        return kwargs["device"]
    for a in args[1:]:
        if isinstance(a, (str, torch.device)) or (isinstance(a, int) and not isinstance(a, bool)):
            return a
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class _FakeCudaFunctions(TorchFunctionMode):
    """Routes CUDA-device creation into a FakeTensorMode; device → host conversions yield zeros."""

    def __init__(self, fake_mode) -> None:
        super().__init__()
        self.fake_mode = fake_mode

    def _host(self, t: torch.Tensor, dtype=None) -> torch.Tensor:
        return torch.zeros(t.shape, dtype=dtype or t.dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        this = args[0] if args else None
        if name in _HOST_METHODS and _is_fake(this):
            host = self._host(this)
            return host if name == "cpu" else getattr(host, name)()
        if func is torch.Tensor.to and isinstance(this, torch.Tensor):
            target = _target_device(args, kwargs)
            dtype = kwargs.get("dtype") or next((a for a in args[1:] if isinstance(a, torch.dtype)), None)
            if _is_fake(this) and target is not None and torch.device(target).type == "cpu":
                return self._host(this, dtype)
            if _cuda_like(target):  # inside the fake mode: PyTorch would otherwise initialise CUDA
                src = this if _is_fake(this) else self.fake_mode.from_tensor(this)
                with self.fake_mode:
                    return func(src, *args[1:], **kwargs)
        if func is torch.Tensor.cuda and isinstance(this, torch.Tensor) and not _is_fake(this):
            with self.fake_mode:
                return self.fake_mode.from_tensor(this).to(CUDA)
        # Creation on a CUDA device, or any call on a fake tensor, runs inside the fake mode (outside
        # it, PyTorch's Python bindings would try to initialise CUDA for a CUDA-typed result).
        if _cuda_like(kwargs.get("device")) or any(_is_fake(a) for a in tree_leaves((args, kwargs))):
            with self.fake_mode:
                return func(*args, **kwargs)
        return func(*args, **kwargs)


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _tensors(x)


def _caller() -> str:
    """``file:line`` of the innermost frame outside this module and torch (who called the collective)."""
    for f in reversed(traceback.extract_stack()):
        if f.filename != __file__ and "/torch/" not in f.filename and "functools" not in f.filename:
            return f"{f.filename}:{f.lineno}"
    return "?"


class CollectiveLog:
    """What :func:`collective_device_check` saw: ``(name, shape, device)`` per checked tensor."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, str]] = []


@contextlib.contextmanager
def collective_device_check(device: torch.device) -> Iterator[CollectiveLog]:
    """Every tensor handed to a ``torch.distributed`` collective must be on ``device``, else
    :class:`WrongDeviceError` (naming the collective, the tensor and the caller's line). Object
    collectives (which pickle into byte tensors on a device of their own choosing) are exempt."""
    log, saved, inside_object = CollectiveLog(), {}, [0]

    def checked(name, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not inside_object[0]:
                for t in [*_tensors(args), *_tensors(list(kwargs.values()))]:
                    log.calls.append((name, tuple(t.shape), str(t.device)))
                    if t.device != device:
                        raise WrongDeviceError(f"{name}: tensor {tuple(t.shape)} {t.dtype} is on {t.device}, the "
                                               f"runtime device is {device} (called at {_caller()})")  # fmt: skip
            return fn(*args, **kwargs)

        return wrapper

    def exempt(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            inside_object[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                inside_object[0] -= 1

        return wrapper

    for name in _COLLECTIVES + _OBJECT_COLLECTIVES:
        if hasattr(dist, name):
            saved[name] = getattr(dist, name)
            setattr(dist, name, exempt(saved[name]) if name in _OBJECT_COLLECTIVES else checked(name, saved[name]))
    try:
        yield log
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


@contextlib.contextmanager
def fake_cuda_world(tp: int = 1, dp: int = 1, seed: int = 1234) -> Iterator[CollectiveLog]:
    """A one-process world of ``tp·dp`` fake ranks with Megatron's groups built, the runtime device
    ``cuda:0``, CUDA creation routed to fake tensors and collectives checked (see module doc).
    Meant for a dedicated process (:func:`run_isolated`): the CUDA-runtime stubs stay installed."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from copd_megatron.distributed import cpu_compat
    from copd_megatron.distributed.device import set_runtime_device
    from copd_megatron.distributed.init import set_seed

    if cpu_compat.is_active():
        raise RuntimeError("the fake-CUDA tier cannot run where the CPU compatibility layer routes CUDA to CPU")
    cpu_compat.stub_cuda_runtime()
    torch.cuda.get_device_capability = lambda *a, **k: (9, 0)  # NCCL broadcast asks (Hopper)
    world = tp * dp
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    from megatron.core import parallel_state

    # No gloo side groups: gloo cannot run on the fake store (Megatron makes them for CPU offload paths).
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, create_gloo_process_groups=False)
    set_seed(seed)
    old = set_runtime_device(CUDA)
    try:
        with _FakeCudaFunctions(FakeTensorMode(allow_non_fake_inputs=True)), collective_device_check(CUDA) as log:
            yield log
    finally:
        set_runtime_device(old)
        from copd_megatron.distributed.init import destroy_distributed

        destroy_distributed()


def _isolated_child(fn, args, out_q) -> None:
    try:
        torch.set_num_threads(1)
        out_q.put(("ok", pickle.dumps(fn(*args))))
    except BaseException:  # noqa: BLE001 - the parent reports it
        out_q.put(("error", traceback.format_exc()))


def run_isolated(fn: Callable, *args, timeout: float = 300.0) -> Any:
    """``fn(*args)`` in a fresh spawned process (no compatibility layer), with a hard timeout."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_isolated_child, args=(fn, args, q))
    p.start()
    try:
        status, payload = q.get(timeout=timeout)
    except queue_mod.Empty:
        p.kill()
        p.join()
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} did not finish in {timeout:.0f} s") from None
    p.join(30)
    if status != "ok":
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed in its process:\n{payload}")
    return pickle.loads(payload)
