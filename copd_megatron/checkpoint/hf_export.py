"""Live export: Hugging Face tensors, one at a time, from a branch's Megatron shards in memory.

This is what a rollout engine with its own copy of the weights (vLLM) is fed after every
update of its branch. Nothing is written to disk and no second full model is built: each HF
tensor is assembled, yielded, and dropped before the next one.

For every full Megatron tensor the mapping in :func:`copd_megatron.checkpoint.hf.mcore_to_hf_iter`
asks for (one decoder layer after another, in HF order), the owner assembles it:

* **PP**: the pipeline stage whose chunk holds the parameter. Decoder layers are found by their
  global ``layer_number`` (so virtual pipeline chunks and uneven stages work); the embedding
  lives on the first stage, the final norm and output layer on the last. A table of
  ``name → stage`` is built once per export with one ``all_gather_object`` on the pipeline group.
* **TP**: the owner stage's tensor-parallel ranks all-gather their shards along the parameter's
  ``partition_dim`` (column-parallel: rows, row-parallel: columns). Megatron's fused QKV keeps
  whole query groups on each TP rank, so concatenating the shards gives the full grouped layout;
  the SwiGLU ``linear_fc1`` is ``[gate_r; up_r]`` *per shard*, so its gathered shards are
  re-ordered into ``[gate_0 … gate_{tp-1}; up_0 … up_{tp-1}]`` before the gate/up split.
  Replicated tensors (norms) are taken from the local rank.
* The owner stage then broadcasts the full tensor over the pipeline group, so **every rank of
  the model-parallel group yields the same full tensors** (as Megatron-Bridge's export does);
  the caller decides which rank uses them. Every rank must iterate the export to the end, in
  lockstep: each tensor is a collective.

Padding of the vocabulary is trimmed and QKV / gate-up are split by the pure mapping in
``checkpoint/hf.py``, which is shared with ``copd-convert``. With Megatron's distributed
optimizer and ``overlap_param_gather``, parameters are only refreshed at the next forward:
export after the optimizer's parameter all-gather has finished (the default, without overlap).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from copd_megatron.checkpoint.hf import local_name, mcore_shapes, mcore_to_hf_iter
from copd_megatron.config.schema import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def local_parameters(chunks: list) -> dict[str, torch.nn.Parameter]:
    """This rank's parameters under their *global* local-spec names (``decoder.layers.<global i>``)."""
    out: dict[str, torch.nn.Parameter] = {}
    for chunk in chunks:
        model = _unwrap(chunk)
        offsets = {}
        if getattr(model, "decoder", None) is not None:
            for i, layer in enumerate(model.decoder.layers):
                offsets[i] = layer.layer_number - 1  # Megatron numbers layers globally, from 1
        for name, param in model.named_parameters():
            name = local_name(name)
            match = _LAYER.match(name)
            if match:
                name = f"decoder.layers.{offsets[int(match[1])]}.{match[2]}"
            out[name] = param
    return out


def _size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _gather_tp(param: torch.nn.Parameter, name: str, tp_group) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter (all-gather on ``tp_group``); replicated ones as is."""
    tp = _size(tp_group)
    local = param.detach()
    if tp == 1 or not getattr(param, "tensor_model_parallel", False):
        return local.clone()
    dim = param.partition_dim
    shards = [torch.empty_like(local) for _ in range(tp)]
    dist.all_gather(shards, local.contiguous(), group=tp_group)  # every TP rank holds one slice
    if name.endswith("mlp.linear_fc1.weight"):
        # Each shard is [gate_r; up_r]; the full tensor is [all gates; all ups].
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(shards, dim=dim)


def _owners(params: dict[str, torch.nn.Parameter], names: list[str], pp_group) -> dict[str, int]:
    """``name → pipeline rank`` holding it (the lowest one if several do, e.g. tied embeddings)."""
    mine = [n for n in names if n in params]
    if _size(pp_group) == 1:
        missing = sorted(set(names) - set(mine))
        if missing:
            raise RuntimeError(f"export: parameter {missing[0]} is not in the model chunks")
        return {n: 0 for n in names}
    table: list[Any] = [None] * _size(pp_group)
    dist.all_gather_object(table, mine, group=pp_group)  # one exchange of names per export
    owners: dict[str, int] = {}
    for stage, held in enumerate(table):
        for n in held:
            owners.setdefault(n, stage)
    missing = sorted(set(names) - set(owners))
    if missing:
        raise RuntimeError(f"export: no pipeline stage holds parameter {missing[0]}")
    return owners


def export_hf_weights(chunks: list, m: ModelConfig, groups: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(HF name, full tensor)`` for the whole model from this rank's live shards.

    ``chunks``: the branch's (DDP-wrapped) model chunks on this rank; ``groups``: an object with
    ``tp`` and ``pp`` process groups (None = not distributed). Collective over the model-parallel
    group: every rank of it must exhaust the iterator. Tensors are in the parameters' dtype."""
    tp_group, pp_group = getattr(groups, "tp", None), getattr(groups, "pp", None)
    params = local_parameters(chunks)
    shapes = mcore_shapes(m)
    names = [n for n in shapes if not (m.tie_embeddings and n == "output_layer.weight")]
    owners = _owners(params, names, pp_group)
    dtype = next(iter(params.values())).dtype
    pp_rank = dist.get_rank(pp_group) if _size(pp_group) > 1 else 0

    def get(name: str) -> torch.Tensor:
        if owners[name] == pp_rank:
            full = _gather_tp(params[name], name, tp_group)
            if tuple(full.shape) != shapes[name]:
                raise RuntimeError(f"export: {name} gathered to {tuple(full.shape)}, the config implies {shapes[name]}")
        else:
            full = torch.empty(shapes[name], dtype=dtype)
        if _size(pp_group) > 1:
            # The owning stage sends the full tensor to every other stage of this pipeline.
            dist.broadcast(full, src=dist.get_global_rank(pp_group, owners[name]), group=pp_group)
        return full

    yield from mcore_to_hf_iter(get, m)


def export_hf_tensors(chunks: list, groups: Any, provider: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """:func:`export_hf_weights` for a branch built by a model provider (its ``model_cfg``)."""
    model_cfg = getattr(provider, "model_cfg", None)
    if model_cfg is None:
        raise NotImplementedError(f"HF export of a {type(provider).__name__} model is not supported (GPT only)")
    yield from export_hf_weights(chunks, model_cfg, groups)
