"""Release an inactive branch's device memory and bring it back, bit for bit.

Colocated branches take turns on the same devices; what a branch does not need while another one
works can live in host memory:

* weights (``memory.offload_weights``): the parameters' storage (the DDP parameter buffer, or each
  parameter's own) is copied to host memory and resized to zero on the device (every parameter
  view stays a valid tensor object and becomes usable again when the storage is restored);
  gradient buffers are simply freed (they are zeroed before every update anyway);
* optimizer state (``memory.offload_optimizer``): fp32 master weights and Adam moments, with the
  optimizer's ``offload_to_cpu`` / ``restore_from_cpu``.

On a CPU-only machine host and device are the same memory, so nothing is saved there; the tests
check that a run with offloading is identical to one without.
"""

from __future__ import annotations

import torch


def _buffers(chunk):
    return list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", []))


class WeightOffloader:
    """Move one branch's DDP-wrapped chunks' parameters to host memory and back, bit for bit.

    Parameters that live in a DDP buffer (``param_data``: the distributed optimizer's layout) are
    moved as one tensor; others each on their own. The host copy is always a real copy (pinned on
    GPU), so this is also correct where host and device are the same memory."""

    def __init__(self, chunks: list) -> None:
        self.chunks = chunks
        self.resident = True
        self._host: list[tuple[torch.Tensor, torch.Tensor]] = []  # (device tensor, host copy of its storage)
        self._grads: list[tuple[torch.Tensor, int]] = []  # (gradient buffer, its storage size)

    def _tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        params, grads, seen = [], [], set()
        for chunk in self.chunks:
            for buf in _buffers(chunk):
                if getattr(buf, "grad_data", None) is not None:
                    grads.append(buf.grad_data)
                owned = [buf.param_data] if getattr(buf, "param_data", None) is not None else list(getattr(buf, "params", []))
                for t in owned:
                    key = t.untyped_storage().data_ptr()
                    if key not in seen:  # tied weights share one storage
                        seen.add(key)
                        params.append(t)
        # A gradient buffer that shares its storage with parameters (Megatron's shared-buffer modes)
        # travels with them and must not be zeroed on the way back.
        grads = [g for g in grads if g.untyped_storage().data_ptr() not in seen]
        return params, grads

    @torch.no_grad()
    def offload(self) -> None:
        if not self.resident:
            return
        params, grads = self._tensors()
        for t in params:
            st = t.untyped_storage()
            host = torch.empty(st.size(), dtype=torch.uint8, pin_memory=t.is_cuda)
            host.untyped_storage().copy_(st)
            self._host.append((t, host))
            st.resize_(0)
        for g in grads:  # zeroed before every update: nothing to keep
            self._grads.append((g, g.untyped_storage().size()))
            g.untyped_storage().resize_(0)
        self.resident = False

    @torch.no_grad()
    def onload(self) -> None:
        if self.resident:
            return
        for t, host in self._host:
            st = t.untyped_storage()
            st.resize_(host.numel())
            st.copy_(host.untyped_storage())
        for g, size in self._grads:
            g.untyped_storage().resize_(size)
            g.zero_()
        self._host.clear()
        self._grads.clear()
        self.resident = True


class OptimizerOffloader:
    """The optimizer's state to host memory while the branch is inactive."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def offload(self) -> None:
        self.optimizer.offload_to_cpu()

    def onload(self) -> None:
        self.optimizer.restore_from_cpu()
