"""Model weights through ``megatron.core.dist_checkpointing`` (torch_dist format).

A checkpoint written at one TP/PP layout loads at any other: every rank saves and loads
only its shards, described by the model's ``sharded_state_dict()``.

One loading path for model weights (:func:`load_weights`) serves every reader: the trainer's
``checkpoint.base``, ``copd-eval``, ``copd-merge`` (and its ``--base``). It reads exactly the
tensors the model asks for, so it takes every kind of checkpoint the project writes: a base
(``tools/make_base.py``), a merge, an import from Hugging Face (``copd-convert``) and a
trainer branch checkpoint, whose optimizer state, LR scheduler and RNG (saved next to the
weights, see ``checkpoint/manager.py``) are ignored. :func:`check_weights_dir` turns a wrong
path into one line naming the flag or key (a trainer save or iteration directory instead of
one branch, a missing or truncated file) before anything is read.

Saves are staged: :func:`save_model` writes into a hidden sibling and renames it into place
when complete (``utils/outputs.py``), so a killed save never leaves a half-written directory
under the final name. Scripts that save must guard their entry point with
``if __name__ == "__main__"``: the writer starts a multiprocessing manager, which
:func:`prepare_writer` makes exit with the saving process.
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
from copd_megatron.utils.outputs import staged_dir
from copd_megatron.utils.procs import die_with_parent, helpers_die_with_this_process

META_FILE = "copd_meta.yaml"  # our addition to a torch_dist directory: the model section and dtype
# Tensors a trainer branch checkpoint holds besides the model's (see checkpoint/manager.py).
TRAINER_STATE_PREFIXES = ("optimizer.", "rng_state")
_writer_manager = None  # the multiprocessing manager of Megatron's writer, started by prepare_writer


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
    from megatron.core import dist_checkpointing

    prepare_writer()
    # Whatever was at ckpt_dir is replaced only once this is complete; the staging ends with a
    # barrier, so every rank sees the final directory (and rank 0's meta file) afterwards.
    with staged_dir(ckpt_dir) as stage:
        dist_checkpointing.save(_sharded_state_dict(chunks), str(stage))
        if model is not None:
            write_meta(stage, model, params_dtype)


def prepare_writer() -> None:
    """Call before saving: Megatron's writer helpers (a forked writer per async save, and the
    manager process of its write-results queue, started on the first save) exit when this
    process dies, instead of living on as orphans after a SIGKILL (``utils/procs.py``)."""
    global _writer_manager
    helpers_die_with_this_process()
    if _writer_manager is not None:
        return
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if getattr(filesystem_async, "_results_queue", "absent") is not None:
        return  # already created (by Megatron), or a Megatron version without this queue
    import os
    from multiprocessing.managers import SyncManager

    import torch.multiprocessing as mp

    # What Megatron's get_write_results_queue() would start (a spawned manager), plus an
    # initializer that ties the manager's life to ours; Megatron then reuses this queue.
    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = manager.Queue()
    _writer_manager = manager


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
        raise ConfigError(f"{ckpt_dir} {_not_a_checkpoint(Path(ckpt_dir))}")
    if not path.is_file():
        raise ConfigError(f"{ckpt_dir}: {META_FILE} is missing (not written by copd_megatron); "
                          "pass the model config explicitly where the tool allows it")  # fmt: skip
    try:
        meta = yaml.safe_load(path.read_text())
        model = meta["model"]
    except (yaml.YAMLError, TypeError, KeyError, UnicodeDecodeError):
        raise ConfigError(f"{path}: unreadable; expected the 'model' section written with the checkpoint") from None
    cfg = config_from_dict({"model": model, "schedule": {"mode": "smoke"}}, source=str(path))
    return cfg.model, meta.get("params_dtype") or "fp32"


def _not_a_checkpoint(d: Path) -> str:
    """Why ``d`` (a directory without metadata.json) is not one checkpoint, and what to pass instead."""
    if (d / "latest").is_file():
        it = (d / "latest").read_text().strip()
        branches = sorted(p.name for p in (d / it).iterdir() if (p / "metadata.json").is_file()) if (d / it).is_dir() else []
        example = f"{d / it / branches[0]}" if branches else f"{d / it}/<branch>"
        return f"is a trainer save directory, not one checkpoint; pass one branch of an iteration, e.g. {example}"
    branches = sorted(p.name for p in d.iterdir() if (p / "metadata.json").is_file()) if d.is_dir() else []
    if branches:
        return ("is a trainer iteration directory, not one checkpoint; pass one of its branches: "
                + ", ".join(str(d / b) for b in branches))  # fmt: skip
    return "is not a torch_dist checkpoint (no metadata.json)"


def check_weights_dir(path: str | Path, what: str) -> Path:
    """``path`` as a directory of model weights every tool can read, or a :class:`ConfigError`
    naming ``what`` (the flag or config key): missing, a file, a trainer save or iteration
    directory instead of one branch, no ``copd_meta.yaml``, missing or truncated shard files."""
    d = Path(path)
    if not d.exists():
        raise ConfigError(f"{what}: {d} does not exist")
    if not d.is_dir():
        raise ConfigError(f"{what}: {d} is a file; expected a torch_dist checkpoint directory")
    if not (d / "metadata.json").is_file():
        raise ConfigError(f"{what}: {d} {_not_a_checkpoint(d)}")
    try:
        verify_files(d)
        read_meta(d)
    except ConfigError as e:
        raise ConfigError(f"{what}: {e}") from None
    return d


def verify_files(ckpt_dir: str | Path):
    """Refuse a torch_dist directory whose shard files are missing or shorter than its
    ``.metadata`` says (a copy cut short, a deleted file), naming the file, before anything is
    read: otherwise the load fails halfway with a traceback, or reads garbage. Metadata only;
    returns the torch DCP ``Metadata`` it read (for :func:`read_chunks`)."""
    d = Path(ckpt_dir)
    if not (d / "metadata.json").is_file():
        raise ConfigError(f"{d} {_not_a_checkpoint(d)}")
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
    """This rank's part of the model tensors described by ``sharded_state_dict``, from a
    checkpoint of any kind saved at any layout (collective over ``process_group``, default the
    world). Files and global shapes are checked first; the result holds exactly the requested keys:
    whatever else the checkpoint stores (a trainer's optimizer, scheduler and RNG state) is neither
    read nor returned."""
    from megatron.core import dist_checkpointing

    verify_files(ckpt_dir)
    check_shapes(sharded_state_dict, ckpt_dir)
    wanted = _key_tree(sharded_state_dict)  # before load, which may transform the dict in place
    loaded = dist_checkpointing.load(sharded_state_dict, str(ckpt_dir), process_group=process_group)
    # dist_checkpointing merges the checkpoint's whole common (non-tensor) state into the
    # result; a trainer checkpoint's holds "optimizer" and "scheduler". Keep what was asked for.
    return _restrict(loaded, wanted)


def _key_tree(tree):
    if isinstance(tree, dict):
        return {k: _key_tree(v) for k, v in tree.items()}
    return None


def _restrict(loaded: dict, wanted: dict) -> dict:
    return {k: _restrict(loaded[k], sub) if isinstance(sub, dict) else loaded[k] for k, sub in wanted.items()}


def load_model(chunks: list, ckpt_dir: str | Path, process_group=None) -> None:
    """Load weights saved at any layout, by any tool or the trainer, into this rank's chunks
    (collective over ``process_group``, strict: every parameter must come from the checkpoint)."""
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
