"""Small communication helpers: broadcasting nested results along a pipeline or any group.

Pipeline parallelism: logits exist only on the last pipeline stage, so losses, log-probs,
top-k ids and metrics are computed there; other stages that need them (the trainer on every
rank, the next rollout's old log-probs) receive them with :func:`broadcast_from_last_stage`.
Only small per-token results travel, never logits. :func:`broadcast_tree` sends any nested
dict/list of tensors and plain values from one member of a group to the others (branches on
different ranks exchange rollouts and teacher scores with it). Tensors travel through the runtime
device (NCCL takes CUDA tensors only) and arrive on the device kind they left from.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from copd_megatron.distributed.device import runtime_device


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _send(t: torch.Tensor, src: int, group) -> torch.Tensor:
    """Broadcast one tensor through the runtime device (NCCL takes CUDA tensors only); every member
    gets it back on the device kind the source had it on (a host tensor stays a host tensor)."""
    dev = runtime_device()
    moved = t.to(dev) if t.device != dev else t
    dist.broadcast(moved, src=src, group=group)
    return t


def _empty(shape, dtype) -> torch.Tensor:
    """A receive buffer on the runtime device (moved to the source's device kind by :func:`_back`)."""
    return torch.empty(shape, dtype=dtype, device=runtime_device())


def _back(t: torch.Tensor, kind: str) -> torch.Tensor:
    return t if t.device.type == kind else t.to(runtime_device() if kind != "cpu" else "cpu")


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
    for name, shape, dtype, kind in layout:  # tensors in layout order on every stage
        if is_src:
            out[name] = _send(tensors[name].contiguous(), src, pp_group)
        else:
            t = _empty(shape, dtype)
            dist.broadcast(t, src=src, group=pp_group)
            out[name] = _back(t, kind)
    return out[""] if single else out


def _flatten(tree: Any, tensors: list) -> Any:
    """The tree with each tensor replaced by a placeholder; tensors appended to ``tensors``."""
    if isinstance(tree, torch.Tensor):
        tensors.append(tree)
        return ("__tensor__", len(tensors) - 1, tuple(tree.shape), tree.dtype, tree.device.type)
    if isinstance(tree, dict):
        return {k: _flatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        out = [_flatten(v, tensors) for v in tree]
        return out if isinstance(tree, list) else tuple(out)
    return tree


def _unflatten(skeleton: Any, tensors: list) -> Any:
    if isinstance(skeleton, tuple) and len(skeleton) == 5 and skeleton[0] == "__tensor__":
        return tensors[skeleton[1]]
    if isinstance(skeleton, dict):
        return {k: _unflatten(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [_unflatten(v, tensors) for v in skeleton]
    if isinstance(skeleton, tuple):
        return tuple(_unflatten(v, tensors) for v in skeleton)
    return skeleton


def broadcast_tree(tree: Any, src: int, group) -> Any:
    """``tree`` of global rank ``src`` on every member of ``group`` (every member must call this;
    only ``src``'s argument is read). One object broadcast carries the structure and the tensors'
    shapes/dtypes; each tensor then goes through ``dist.broadcast`` on the runtime device and arrives
    on the device kind the source had it on."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tree
    is_src = dist.get_rank() == src
    tensors: list = []
    box = [_flatten(tree, tensors) if is_src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    skeleton = box[0]
    specs: list = []
    _collect_specs(skeleton, specs)
    received = []
    for i, (shape, dtype, kind) in enumerate(specs):
        if is_src:
            received.append(_send(tensors[i].contiguous(), src, group))
        else:
            t = _empty(shape, dtype)
            dist.broadcast(t, src=src, group=group)
            received.append(_back(t, kind))
    return _unflatten(skeleton, received)


def _collect_specs(skeleton: Any, specs: list) -> None:
    """(shape, dtype, device type) of every tensor placeholder, in placeholder-index order."""
    found: list = []

    def walk(node):
        if isinstance(node, tuple) and len(node) == 5 and node[0] == "__tensor__":
            found.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            for v in node:
                walk(v)

    walk(skeleton)
    for node in sorted(found, key=lambda n: n[1]):
        specs.append((node[2], node[3], node[4]))
