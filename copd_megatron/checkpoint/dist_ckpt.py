"""Model weights through ``megatron.core.dist_checkpointing`` (torch_dist format).

A checkpoint written at one TP/PP layout loads at any other: every rank saves and loads
only its shards, described by the model's ``sharded_state_dict()``. This module holds the
model-weight path used by training and tests; run state, optimizer state, atomic ``latest``
pointers and retention build on it (see the checkpoint issue).

Scripts that save must guard their entry point with ``if __name__ == "__main__"``: the async
writer starts a multiprocessing manager.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from copd_megatron.config.schema import ConfigError, ModelConfig

META_FILE = "copd_meta.yaml"  # our addition to a torch_dist directory: the model section and dtype


def _sharded_state_dict(chunks: list) -> dict:
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    # Virtual pipeline chunks are saved under model0, model1, ... (Megatron-LM's convention).
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def save_model(
    chunks: list, ckpt_dir: str | Path, model: ModelConfig | None = None, params_dtype: str | None = None
) -> None:
    """Save unwrapped ``GPTModel`` chunks (all ranks call this collectively). With ``model``,
    the architecture is recorded next to the shards so tools can rebuild it at any layout."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(_sharded_state_dict(chunks), str(ckpt_dir))
    if model is not None:
        write_meta(ckpt_dir, model, params_dtype)
        if dist.is_initialized():
            dist.barrier()  # rank 0 wrote the meta file: every rank may read the checkpoint from here on


def write_meta(ckpt_dir: str | Path, model: ModelConfig | None, params_dtype: str | None, layout: dict | None = None,
               *, writer: bool | None = None) -> None:  # fmt: skip
    """Record the architecture (and the saving layout) next to the shards; rank 0 writes unless
    ``writer`` says whether this rank does."""
    import torch.distributed as dist

    if writer is None:
        writer = not dist.is_initialized() or dist.get_rank() == 0
    if not writer:
        return
    meta = {"model": dataclasses.asdict(model) if model is not None else None, "params_dtype": params_dtype,
            "layout": layout}  # fmt: skip
    Path(ckpt_dir, META_FILE).write_text(yaml.safe_dump(meta, sort_keys=False))


def read_meta(ckpt_dir: str | Path) -> tuple[ModelConfig, str]:
    """The architecture and dtype recorded by :func:`save_model` (one-line error if absent)."""
    from copd_megatron.config.load import config_from_dict

    path = Path(ckpt_dir, META_FILE)
    if not Path(ckpt_dir, "metadata.json").is_file():
        raise ConfigError(f"{ckpt_dir}: not a torch_dist checkpoint (metadata.json is missing)")
    if not path.is_file():
        raise ConfigError(f"{ckpt_dir}: {META_FILE} is missing; pass the model config explicitly")
    meta = yaml.safe_load(path.read_text())
    cfg = config_from_dict({"model": meta["model"], "schedule": {"mode": "smoke"}}, source=str(path))
    return cfg.model, meta.get("params_dtype") or "fp32"


def verify_files(ckpt_dir: str | Path):
    """Refuse a torch_dist directory whose shard files are missing or shorter than its
    ``.metadata`` says (a copy cut short, a deleted file), naming the file, before anything is
    read: otherwise the load fails halfway with a traceback, or reads garbage. Metadata only;
    returns the torch DCP ``Metadata`` it read (for :func:`read_chunks`)."""
    d = Path(ckpt_dir)
    if not (d / "metadata.json").is_file():
        raise ConfigError(f"{d}: not a torch_dist checkpoint (metadata.json is missing)")
    if not (d / ".metadata").is_file():
        raise ConfigError(f"{d}: .metadata is missing (the save never finished, or the copy is incomplete)")
    try:
        metadata = FileSystemReader(str(d)).read_metadata()
    except Exception as e:  # noqa: BLE001 (any unpickling failure means the same thing to the user)
        raise ConfigError(f"{d}: .metadata is unreadable ({type(e).__name__}); the checkpoint is corrupt") from None
    need: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():  # the furthest byte each shard file must hold
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(need.items()):
        f = d / name
        if not f.is_file():
            raise ConfigError(f"{d}: shard file {name} is missing (listed in .metadata)")
        if f.stat().st_size < size:
            raise ConfigError(f"{d}: shard file {name} is truncated ({f.stat().st_size} bytes, .metadata needs {size})")
    return metadata


def check_shapes(sharded_state_dict: dict, ckpt_dir: str | Path) -> None:
    """Refuse a checkpoint whose tensors have other global shapes than the model's (a reshard
    of mismatched shapes can otherwise load partially without an error)."""
    import copy

    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    saved = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    wanted = copy.copy(sharded_state_dict)
    apply_factories(wanted)
    stack = [wanted]
    while stack:
        node = stack.pop()
        items = node.values() if isinstance(node, dict) else node if isinstance(node, list) else []
        for v in items:
            if isinstance(v, (dict, list)):
                stack.append(v)
            elif isinstance(v, ShardedTensor) and v.key not in saved:
                raise ConfigError(
                    f"{ckpt_dir}: tensor {v.key!r} is not in the checkpoint (another architecture, or a checkpoint "
                    "of the other layer spec: set model.transformer_impl to the one it was saved with)"
                )
            elif isinstance(v, ShardedTensor):
                if tuple(saved[v.key].global_shape) != tuple(v.global_shape):
                    raise ConfigError(
                        f"{ckpt_dir}: tensor {v.key!r} has shape {tuple(saved[v.key].global_shape)} in the checkpoint "
                        f"but {tuple(v.global_shape)} in the model (different architecture or vocabulary padding)"
                    )


def load_weights(sharded_state_dict: dict, ckpt_dir: str | Path, process_group=None) -> dict:
    """The model tensors of ``sharded_state_dict`` from any checkpoint the project writes (a model,
    a merged model, a converted base, or a trainer branch checkpoint whose optimizer, scheduler and
    RNG state are ignored), at any layout. Collective over ``process_group`` (default: the world)."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(sharded_state_dict, str(ckpt_dir), process_group=process_group)
    # The checkpoint's common (non-tensor) state comes back merged at the top level: keep the model's keys.
    return {k: v for k, v in loaded.items() if k in sharded_state_dict}


def load_model(chunks: list, ckpt_dir: str | Path, process_group=None) -> None:
    """Load weights saved at any layout into this rank's chunks (collective, strict)."""
    verify_files(ckpt_dir)
    check_shapes(_sharded_state_dict(chunks), ckpt_dir)
    state = load_weights(_sharded_state_dict(chunks), ckpt_dir, process_group)
    if len(chunks) == 1:
        chunks[0].load_state_dict(state, strict=True)
    else:
        for i, c in enumerate(chunks):
            c.load_state_dict(state[f"model{i}"], strict=True)


def read_chunks(ckpt_dir: str | Path, metadata, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
    """Fill each destination tensor with a chunk of a saved global tensor, in one process.

    ``requests[key] = (offsets, dest)``: ``dest`` receives ``global[key][offsets : offsets +
    dest.shape]`` (e.g. layer ``i`` of a stacked ``[L, ...]`` tensor: offsets ``(i, 0, ...)``,
    ``dest`` of shape ``(1, ...)``). Only the stored shards that overlap are read, whatever
    layout saved them. ``metadata`` is the directory's DCP metadata (:func:`verify_files`), so
    repeated calls do not read ``.metadata`` again. This is torch DCP underneath torch_dist;
    Megatron's own ``load`` cannot request a partial tensor in a world of one (every fragment
    of its regular grid is local).
    """
    from torch.distributed.checkpoint import load as dcp_load

    dcp_load({}, storage_reader=_KnownMetadataReader(ckpt_dir, metadata), planner=_ChunkPlanner(requests), no_dist=True)


class _KnownMetadataReader(FileSystemReader):
    """A FileSystemReader that is handed the directory's metadata instead of reading it again."""

    def __init__(self, ckpt_dir: str | Path, metadata) -> None:
        super().__init__(str(ckpt_dir))
        self._known = metadata

    def read_metadata(self):
        return self._known


class _ChunkPlanner(LoadPlanner):
    """Read items for exactly the requested chunks; tensors land in the callers' buffers."""

    def __init__(self, requests: dict) -> None:
        self.requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, (offsets, dest) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list) -> list:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError(f"unexpected non-tensor read of {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item):
        view = self.requests[read_item.dest_index.fqn][1]
        # dest_offsets are relative to the requested chunk, i.e. to the destination buffer.
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            view = view.narrow(dim, start, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor returned a view of the destination: the data is already there
