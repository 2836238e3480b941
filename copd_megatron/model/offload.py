"""Release an inactive branch's device memory and bring it back, bit for bit.

Colocated branches take turns on the same devices; what a branch does not need while another one
works can live in host memory:

* weights (``memory.offload_weights``): the DDP parameter buffers are copied to host memory and
  their device storage is resized to zero (every parameter view stays a valid tensor object and
  becomes usable again when the storage is restored, as Megatron's own RL offload does);
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


def _loose_params(chunk, buffer) -> list[torch.Tensor]:
    """Parameters of a buffer that keeps no contiguous param_data (each has its own storage)."""
    return list(getattr(buffer, "params", []))


class WeightOffloader:
    """Move one branch's DDP-wrapped chunks' parameters to host memory and back."""

    def __init__(self, chunks: list) -> None:
        self.chunks = chunks
        self.resident = True
        self._host: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, host bytes of its storage)

    @torch.no_grad()
    def offload(self) -> None:
        if not self.resident:
            return
        seen: set[int] = set()
        for chunk in self.chunks:
            for buf in _buffers(chunk):
                if getattr(buf, "param_data", None) is not None:  # parameters are views of one buffer
                    buf.offload_to_cpu(move_params=True, move_grads=True)
                    continue
                buf.offload_to_cpu(move_params=False, move_grads=True)
                for p in _loose_params(chunk, buf):
                    st = p.untyped_storage()
                    if st.size() == 0 or st.data_ptr() in seen:  # tied weights share one storage
                        continue
                    seen.add(st.data_ptr())
                    host = torch.empty(st.size(), dtype=torch.uint8)
                    host.untyped_storage().copy_(st)
                    self._host.append((p, host))
                    st.resize_(0)
        self.resident = False

    @torch.no_grad()
    def onload(self) -> None:
        if self.resident:
            return
        for chunk in self.chunks:
            for buf in _buffers(chunk):
                move_params = getattr(buf, "param_data", None) is not None
                buf.reload_from_cpu(move_params=move_params, move_grads=True)
        for p, host in self._host:
            st = p.untyped_storage()
            st.resize_(host.numel())
            st.copy_(host.untyped_storage())
        self._host.clear()
        self.resident = True


class OptimizerOffloader:
    """The optimizer's state to host memory while the branch is inactive."""

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def offload(self) -> None:
        self.optimizer.offload_to_cpu()

    def onload(self) -> None:
        self.optimizer.restore_from_cpu()
