"""Small communication helpers shared by the loss library's callers.

Pipeline parallelism: logits exist only on the last pipeline stage, so losses, log-probs,
top-k ids and metrics are computed there; other stages that need them (the trainer on every
rank, the next rollout's old log-probs) receive them with :func:`broadcast_from_last_stage`.
Only small per-token results travel, never logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _receive_device(kind: str) -> torch.device:
    if kind == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(kind)


def broadcast_from_last_stage(value: Any, pp_group) -> Any:
    """Return the last pipeline stage's ``value`` on every stage of ``pp_group``.

    ``value`` (only read on the last stage; pass ``None`` elsewhere) is a tensor, a dict of
    tensors, or any picklable object. Tensors go through ``dist.broadcast`` after one small
    object broadcast of their names/shapes/dtypes, so receivers need not know them in advance.
    ``pp_group=None`` or a group of one: ``value`` is returned as is. Every stage must call this.
    """
    if pp_group is None or not dist.is_initialized() or dist.get_world_size(pp_group) == 1:
        return value
    last = dist.get_world_size(pp_group) - 1  # Megatron orders a pipeline group by stage
    src = dist.get_global_rank(pp_group, last)
    is_src = dist.get_rank(pp_group) == last
    single = isinstance(value, torch.Tensor)
    tensors = {"": value} if single else value if _is_tensor_dict(value) else None
    # One object broadcast: either the whole (non-tensor) value, or the tensors' layout.
    if tensors is not None:
        header = ("tensors", single, [(k, tuple(t.shape), t.dtype, t.device.type) for k, t in tensors.items()])
    else:
        header = ("object", value)
    box = [header if is_src else None]
    dist.broadcast_object_list(box, src=src, group=pp_group)
    if box[0][0] == "object":
        return box[0][1]
    _, single, layout = box[0]
    out = {}
    for name, shape, dtype, kind in layout:
        t = tensors[name].contiguous() if is_src else torch.empty(shape, dtype=dtype, device=_receive_device(kind))
        dist.broadcast(t, src=src, group=pp_group)  # tensors in layout order on every stage
        out[name] = t
    return out[""] if single else out
