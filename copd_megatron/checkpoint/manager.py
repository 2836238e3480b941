"""Checkpoints that never lose work: per-branch model + optimizer + LR schedule, atomic pointers.

Layout of ``save_dir``::

    iter_0000040/
        text/      torch_dist: model weights, optimizer state (Adam moments), LR scheduler, RNG
        image/     ...
        run_state.json   cycle, phase, step per branch, data positions, config hash
        COMPLETE         written after every rank finished every branch
    latest             "iter_0000040": written last, atomically (tmp file + rename)

A directory without ``COMPLETE`` is never loaded, and ``latest`` only ever names complete
ones, so a job killed in the middle of a (possibly asynchronous) save resumes from the
previous checkpoint. Optimizer state uses the distributed optimizer's ``fully_reshardable``
format (gathered per data-parallel group into one tensor per parameter on save, sliced per
rank on load), so model *and* optimizer state reshard: resume at another TP, PP or DP layout
is supported (virtual pipeline chunks must match). RNG states are restored only when the layout is unchanged; the RL loop
derives its sampling seeds from (seed, branch, step), so results do not depend on them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from copd_megatron.checkpoint.dist_ckpt import META_FILE, check_shapes, prepare_writer, verify_files, write_meta
from copd_megatron.config.schema import ConfigError
from copd_megatron.utils.faults import maybe_die

logger = logging.getLogger(__name__)
_ITER = re.compile(r"^iter_(\d{7})$")
_OPTIM_META = {"distrib_optim_sharding_type": "fully_reshardable"}


def _unwrapped(chunk):
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _layout() -> list[int]:
    from megatron.core import parallel_state as ps

    world = dist.get_world_size() if dist.is_initialized() else 1
    return [ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(), world]


def _branch_sharded_state(branch, is_loading: bool, with_rng: bool = True) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    models = [_unwrapped(c) for c in branch.chunks]
    model_sd = models[0].sharded_state_dict() if len(models) == 1 else {
        f"model{i}": m.sharded_state_dict() for i, m in enumerate(models)
    }  # fmt: skip
    flat_model_sd = model_sd if len(models) == 1 else {k: v for sd in model_sd.values() for k, v in sd.items()}
    state = {
        "model": model_sd,
        "optimizer": branch.optimizer.sharded_state_dict(flat_model_sd, is_loading=is_loading, metadata=_OPTIM_META),
        "scheduler": branch.scheduler.state_dict(),  # plain values: saved once as common state
    }
    if with_rng:  # one object per global rank: only meaningful at an identical layout
        world = _layout()[2]
        state["rng"] = ShardedObject("rng_state", {"cpu": torch.get_rng_state()}, (world,), (_rank(),), replica_id=0)
    return state


def _dp_group():
    """The group over which a branch's shards are replicated (data parallel, with context
    parallel), or None when there is no replication to spread."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or ps.get_data_parallel_world_size(with_context_parallel=True) == 1:
        return None
    return ps.get_data_parallel_group(with_context_parallel=True)


def _save_strategy(fully_parallel: bool):
    """torch_dist; with ``fully_parallel`` the replicated shards' writes are spread over the DP
    ranks (a greedy balance computed from metadata only: no tensor data moves)."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    strategy = get_default_save_sharded_strategy("torch_dist")
    group = _dp_group() if fully_parallel else None
    # A new wrapper per save (no cached distribution): branches may differ, and a cache keyed
    # on an old state-dict structure would assign shards wrongly.
    return FullyParallelSaveStrategyWrapper(strategy, group) if group is not None else strategy


def _load_strategy(ckpt_dir: Path, fully_parallel: bool):
    """Megatron's default loader for the directory; with ``fully_parallel`` each DP rank reads a
    part of the replicated shards and they are exchanged over the DP group."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    strategy = get_default_load_sharded_strategy(str(ckpt_dir))
    group = _dp_group() if fully_parallel else None
    return FullyParallelLoadStrategyWrapper(strategy, group) if group is not None else strategy


def save_branch(
    branch, ckpt_dir: Path, model_cfg=None, params_dtype: str | None = None, async_save: bool = False,
    fully_parallel: bool = True,
):  # fmt: skip
    """Save one branch (collective). Returns a megatron AsyncRequest when ``async_save``."""
    from megatron.core import dist_checkpointing

    prepare_writer()  # Megatron's writer helpers exit if this process is killed
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    req = dist_checkpointing.save(
        _branch_sharded_state(branch, is_loading=False), str(ckpt_dir), sharded_strategy=_save_strategy(fully_parallel),
        async_sharded_save=async_save, async_strategy="mcore",
    )  # fmt: skip
    tp, pp, world = _layout()
    write_meta(ckpt_dir, model_cfg, params_dtype, {"tp": tp, "pp": pp, "world": world})
    return req


def _materialise_optimizer_state(optimizer) -> None:
    """A fresh torch Adam has no state until its first step, and Megatron's loaders expect one
    to fill in place: take a zero-gradient dummy step (the loaded checkpoint overwrites it)."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        if inner is None or len(inner.state) > 0:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)


def _tolerate_missing_step(optimizer) -> None:
    """Megatron 0.19 restores torch Adam's per-parameter ``step`` tensor from the param groups,
    then copies every state tensor from the loaded per-parameter dict, which has no ``step``
    (KeyError). Apex/TE optimizers keep step in the param groups and never hit this. Mark it
    absent (None is skipped) for our distributed optimizers."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        fn = getattr(sub, "_set_main_param_and_optimizer_states", None)
        if fn is None or getattr(fn, "_copd_patched", False):
            continue

        def patched(model_param, tensors, _orig=fn):
            return _orig(model_param, tensors if "step" in tensors else {**tensors, "step": None})

        patched._copd_patched = True
        sub._set_main_param_and_optimizer_states = patched


def _unshare_step_tensors(optimizer) -> None:
    """Megatron's loader gives every parameter the *same* ``step`` tensor; torch Adam increments
    each parameter's step in place, so a shared one would advance once per parameter per
    update and corrupt the bias correction. Give each parameter its own copy."""
    for sub in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(sub, "optimizer", None)
        for st in getattr(inner, "state", {}).values():
            if isinstance(st.get("step"), torch.Tensor):
                st["step"] = st["step"].clone()


def load_branch(branch, ckpt_dir: Path, fully_parallel: bool = False) -> None:
    """Load model weights, optimizer state, LR scheduler (and RNG at the same layout) in place."""
    from megatron.core import dist_checkpointing

    saved = (yaml.safe_load((ckpt_dir / META_FILE).read_text()) or {}).get("layout") or {}
    same_layout = [saved.get("tp"), saved.get("pp"), saved.get("world")] == _layout()
    models = [_unwrapped(c) for c in branch.chunks]
    for i, m in enumerate(models):  # shapes first: nothing is loaded from a mismatched checkpoint
        check_shapes(m.sharded_state_dict() if len(models) == 1 else {f"model{i}": m.sharded_state_dict()}, ckpt_dir)
    _materialise_optimizer_state(branch.optimizer)
    _tolerate_missing_step(branch.optimizer)
    state = dist_checkpointing.load(_branch_sharded_state(branch, True, with_rng=same_layout), str(ckpt_dir),
                                    sharded_strategy=_load_strategy(ckpt_dir, fully_parallel))  # fmt: skip
    if len(models) == 1:
        models[0].load_state_dict(state["model"], strict=True)
    else:
        for i, m in enumerate(models):
            m.load_state_dict(state["model"][f"model{i}"], strict=True)
    branch.optimizer.load_state_dict(state["optimizer"])
    _unshare_step_tensors(branch.optimizer)
    branch.scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        torch.set_rng_state(state["rng"]["cpu"])


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (what Slurm sends before a time limit); checked between steps."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank if any rank received a signal (all ranks must save together)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


class CheckpointManager:
    """Save / resume all branches of a run, with retention and atomic ``latest`` pointers."""

    def __init__(
        self, save_dir: str | Path, keep_last: int = 2, keep_every: int = 0, async_save: bool = False, *,
        fully_parallel_save: bool = True, fully_parallel_load: bool = False,
    ) -> None:  # fmt: skip
        self.save_dir = Path(save_dir)
        self.keep_last, self.keep_every, self.async_save = keep_last, keep_every, async_save
        self.fully_parallel_save, self.fully_parallel_load = fully_parallel_save, fully_parallel_load
        self._queue = None
        self._resumed_from: Path | None = None  # the iteration directory load() read
        self._last_saved: int | None = None
        if async_save:
            from megatron.core.dist_checkpointing.strategies.async_utils import (
                AsyncCallsQueue,
            )

            self._queue = AsyncCallsQueue()

    # -- saving -------------------------------------------------------------------------------
    def save(self, iteration: int, branches: dict, run_state: dict, model_cfg=None, params_dtype=None) -> None:
        """Collective. The checkpoint becomes visible (``latest``) only once complete everywhere."""
        self.wait()  # at most one save in flight: never two writers on the same files
        it_dir = self.save_dir / f"iter_{iteration:07d}"
        if iteration == self._last_saved or (self._resumed_from is not None and it_dir.resolve() == self._resumed_from):
            # Nothing was trained since: this iteration is on disk, complete. Rewriting it would
            # delete the checkpoint `latest` names (the one this run resumed from) first.
            logger.info("checkpoint %s is already saved", it_dir)
            return
        self._last_saved = iteration
        if _rank() == 0 and it_dir.exists():
            shutil.rmtree(it_dir)  # a stale, incomplete attempt at the same iteration
        if dist.is_initialized():
            dist.barrier()
        requests = [save_branch(b, it_dir / name, model_cfg, params_dtype, self.async_save, self.fully_parallel_save)
                    for name, b in branches.items()]  # fmt: skip
        # Snapshot now: with async saves the caller's run state moves on before finalize runs.
        snapshot = json.dumps({**run_state, "iteration": iteration}, indent=1)

        def finalize() -> None:
            maybe_die("save", iteration)
            if _rank() == 0:
                (it_dir / "run_state.json").write_text(snapshot)
                (it_dir / "COMPLETE").write_text("ok\n")
                _atomic_write(self.save_dir / "latest", it_dir.name)
                self._retain()

        if not self.async_save:
            if dist.is_initialized():
                dist.barrier()  # every rank wrote every shard
            finalize()
            if dist.is_initialized():
                dist.barrier()
            return
        # Async: the last request's finalisers run after all ranks finished writing all branches.
        for req in requests[:-1]:
            self._queue.schedule_async_request(req)
        requests[-1].add_finalize_fn(finalize)
        self._queue.schedule_async_request(requests[-1])
        maybe_die("save_started", iteration)  # tests: die while the background writer runs

    def poll(self) -> None:
        """Finish async saves that are done (collective; call between steps)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Block until in-flight async saves are complete (collective)."""
        if self._queue is not None:
            self._queue.maybe_finalize_async_calls(blocking=True)

    def _retain(self) -> None:
        """Keep the newest ``keep_last`` and every ``keep_every``-th iteration; never ``latest``."""
        done = sorted(int(m.group(1)) for p in self.save_dir.iterdir() if (m := _ITER.match(p.name)))
        latest = (self.save_dir / "latest").read_text().strip()
        keep = set(done[-self.keep_last :]) if self.keep_last > 0 else set(done)
        keep |= {i for i in done if self.keep_every and i % self.keep_every == 0}
        for i in done:
            name = f"iter_{i:07d}"
            if i not in keep and name != latest:
                shutil.rmtree(self.save_dir / name, ignore_errors=True)

    # -- loading ------------------------------------------------------------------------------
    def resolve(self, load_dir: str | Path) -> Path:
        """The complete iteration directory to resume from: ``load_dir`` itself or its ``latest``."""
        return resolve_load_dir(load_dir)

    def read_run_state(self, load_dir: str | Path) -> dict:
        """The run state of the checkpoint ``load`` would resume (reads one small file)."""
        return json.loads((self.resolve(load_dir) / "run_state.json").read_text())

    def load(self, load_dir: str | Path, branches: dict) -> dict:
        """Check every branch's files first, then load them all; returns the run state."""
        it_dir = self.resolve(load_dir)
        for name in branches:
            missing = [f for f in ("metadata.json", META_FILE) if not (it_dir / name / f).is_file()]
            if missing:
                raise ConfigError(f"checkpoint {it_dir}: branch {name!r} is missing {', '.join(missing)}")
            verify_files(it_dir / name)
        run_state = json.loads((it_dir / "run_state.json").read_text())
        for name, branch in branches.items():
            load_branch(branch, it_dir / name, self.fully_parallel_load)
        self._resumed_from = it_dir.resolve()
        logger.info("resumed from %s (iteration %d)", it_dir, run_state["iteration"])
        return run_state


def resolve_load_dir(load_dir: str | Path) -> Path:
    """The complete iteration directory ``checkpoint.load_dir`` names (itself, or its save
    directory's ``latest``), or a one-line error saying what the path is instead."""
    path = Path(load_dir)
    if not path.exists():
        raise ConfigError(f"checkpoint.load_dir: {path} does not exist")
    if not path.is_dir():
        raise ConfigError(f"checkpoint.load_dir: {path} is a file; expected a save directory or an iter_* directory")
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
        if not path.is_dir():
            raise ConfigError(f"checkpoint.load_dir: {path}, named by {path.parent / 'latest'}, does not exist")
    if (path / "COMPLETE").is_file():
        return path
    if (path / "metadata.json").is_file():
        raise ConfigError(f"checkpoint.load_dir: {path} holds one model's weights, not a run to resume; to start from "
                          "them set checkpoint.base instead")  # fmt: skip
    if _ITER.match(path.name) or (path / "run_state.json").exists():
        raise ConfigError(f"checkpoint.load_dir: {path} is incomplete (no COMPLETE marker); the save never finished, "
                          f"resume from an earlier iteration or from {path.parent}")  # fmt: skip
    raise ConfigError(f"checkpoint.load_dir: {path} is not a checkpoint; expected a save directory with a 'latest' "
                      "file (e.g. runs/x/checkpoints) or one of its iter_NNNNNNN directories")  # fmt: skip


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
