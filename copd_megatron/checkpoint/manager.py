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

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from copd_megatron.checkpoint.dist_ckpt import META_FILE, check_shapes, prepare_writer, verify_files, write_meta
from copd_megatron.config.schema import ConfigError
from copd_megatron.distributed.device import any_rank
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


def _groups(branch):
    """The branch's process groups (Megatron's global ones for a branch built without them)."""
    from copd_megatron.distributed.groups import shared_groups

    g = getattr(branch, "groups", None)
    return g if g is not None else shared_groups()


def _layout(branch) -> list[int]:
    """(tp, pp, ranks) of the branch: what decides whether per-rank RNG states can be restored."""
    g = _groups(branch)
    return [g.tp_size, g.pp_size, len(g.ranks) or (dist.get_world_size() if dist.is_initialized() else 1)]


def _branch_sharded_state(branch, is_loading: bool, with_rng: bool = True) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    g = _groups(branch)
    # Replicas are counted over the branch's own data-parallel group (a slice of the world when
    # branches are disjoint): its rank 0 writes the replicated shards.
    meta = {"dp_cp_group": g.dp_cp}
    models = [_unwrapped(c) for c in branch.chunks]
    model_sd = models[0].sharded_state_dict(metadata=meta) if len(models) == 1 else {
        f"model{i}": m.sharded_state_dict(metadata=meta) for i, m in enumerate(models)
    }  # fmt: skip
    flat_model_sd = model_sd if len(models) == 1 else {k: v for sd in model_sd.values() for k, v in sd.items()}
    state = {
        "model": model_sd,
        "optimizer": branch.optimizer.sharded_state_dict(flat_model_sd, is_loading=is_loading, metadata=_OPTIM_META),
        "scheduler": branch.scheduler.state_dict(),  # plain values: saved once as common state
    }
    if with_rng:  # one object per rank of the branch: only meaningful at an identical layout
        ranks = g.ranks or list(range(dist.get_world_size() if dist.is_initialized() else 1))
        state["rng"] = ShardedObject("rng_state", _rng_state(), (len(ranks),), (ranks.index(_rank()),), replica_id=0)
    return state


def _rng_state() -> dict:
    """The CPU generator and Megatron's named model-parallel RNG streams (dropout in TP regions)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"cpu": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available() and not _cpu_compat_active():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(state["cpu"])
    if "tracker" in state:
        get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available() and not _cpu_compat_active():
        torch.cuda.set_rng_state(state["cuda"])


def _cpu_compat_active() -> bool:
    from copd_megatron.distributed import cpu_compat

    return cpu_compat.is_active()


def _dp_group(groups):
    """The group over which a branch's shards are replicated (data parallel, with context
    parallel), or None when there is no replication to spread."""
    if groups is None or not dist.is_initialized() or dist.get_world_size(groups.dp_cp) == 1:
        return None
    return groups.dp_cp


def _save_strategy(fully_parallel: bool, groups=None):
    """torch_dist; with ``fully_parallel`` the replicated shards' writes are spread over the DP
    ranks (a greedy balance computed from metadata only: no tensor data moves)."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper

    strategy = get_default_save_sharded_strategy("torch_dist")
    group = _dp_group(groups) if fully_parallel else None
    # A new wrapper per save (no cached distribution): branches may differ, and a cache keyed
    # on an old state-dict structure would assign shards wrongly.
    return FullyParallelSaveStrategyWrapper(strategy, group) if group is not None else strategy


def _load_strategy(ckpt_dir: Path, fully_parallel: bool, groups=None):
    """Megatron's default loader for the directory; with ``fully_parallel`` each DP rank reads a
    part of the replicated shards and they are exchanged over the DP group."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    strategy = get_default_load_sharded_strategy(str(ckpt_dir))
    group = _dp_group(groups) if fully_parallel else None
    return FullyParallelLoadStrategyWrapper(strategy, group) if group is not None else strategy


def save_branch(
    branch, ckpt_dir: Path, model_cfg=None, params_dtype: str | None = None, async_save: bool = False,
    fully_parallel: bool = True, common_state: dict | None = None, state: dict | None = None,
):  # fmt: skip
    """Save one branch (collective over the world). Returns a megatron AsyncRequest when ``async_save``.

    ``branch=None``: this rank does not hold the branch (disjoint placement) and takes part with no
    shards; ``common_state`` (the non-tensor part of the branch's state: optimizer param groups,
    LR scheduler, shared by its ranks) keeps the common part identical on every rank, so rank 0
    writes it whichever branch it holds. ``state``: the branch's sharded state if already built."""
    from megatron.core import dist_checkpointing

    prepare_writer()  # Megatron's writer helpers exit if this process is killed
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if branch is None:
        state, strategy = common_state, _save_strategy(False)
    else:
        state = state if state is not None else _branch_sharded_state(branch, is_loading=False)
        strategy = _save_strategy(fully_parallel, _groups(branch))
    req = dist_checkpointing.save(state, str(ckpt_dir), sharded_strategy=strategy, async_sharded_save=async_save,
                                  async_strategy="mcore")  # fmt: skip
    if branch is not None and _rank() == (_groups(branch).ranks or [0])[0]:  # the branch's first rank
        tp, pp, ranks = _layout(branch)
        write_meta(ckpt_dir, model_cfg, params_dtype, {"tp": tp, "pp": pp, "world": ranks}, writer=True)
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
    """Load model weights, optimizer state, LR scheduler (and RNG at the same layout) in place.
    Collective over the branch's own ranks only (reads are per rank; the integrity check gathers
    over the branch)."""
    from megatron.core import dist_checkpointing

    g = _groups(branch)
    saved = (yaml.safe_load((ckpt_dir / META_FILE).read_text()) or {}).get("layout") or {}
    same_layout = [saved.get("tp"), saved.get("pp"), saved.get("world")] == _layout(branch)
    models = [_unwrapped(c) for c in branch.chunks]
    for i, m in enumerate(models):  # shapes first: nothing is loaded from a mismatched checkpoint
        check_shapes(m.sharded_state_dict() if len(models) == 1 else {f"model{i}": m.sharded_state_dict()}, ckpt_dir)
    _materialise_optimizer_state(branch.optimizer)
    _tolerate_missing_step(branch.optimizer)
    state = dist_checkpointing.load(_branch_sharded_state(branch, True, with_rng=same_layout), str(ckpt_dir),
                                    sharded_strategy=_load_strategy(ckpt_dir, fully_parallel, g),
                                    process_group=g.world)  # fmt: skip
    if len(models) == 1:
        models[0].load_state_dict(state["model"], strict=True)
    else:
        for i, m in enumerate(models):
            m.load_state_dict(state["model"][f"model{i}"], strict=True)
    branch.optimizer.load_state_dict(state["optimizer"])
    _unshare_step_tensors(branch.optimizer)
    branch.scheduler.load_state_dict(state["scheduler"])
    if same_layout:
        _set_rng_state(state["rng"])


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def children_block(signals=PREEMPTION_SIGNALS):
    """Processes started inside this block never receive ``signals``; this process still does.

    Slurm delivers a job-step signal (``--signal``, ``scancel --signal``, the time limit's
    SIGTERM) to *every* process of the step, not only to the ranks. Megatron's checkpoint writer
    talks to a helper process (a ``multiprocessing`` manager started with ``spawn``, which resets
    handled signals to their default action: terminate); killed by the preemption signal, it
    breaks the very save that signal asks for. The signal mask survives ``fork`` and ``exec``, so
    a helper started while the main thread blocks the signals keeps them blocked for life (pending,
    never acted on; SIGKILL still ends it). This process loses nothing: the mask is per thread,
    so the kernel hands the signal to another thread, or holds it until the block ends, and
    Python runs the handler in the main thread either way.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        # CPython starts its resource tracker on the first spawn and unblocks SIGINT/SIGTERM in
        # the calling thread afterwards: start it now (it inherits the block), then block again.
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def start_checkpoint_helpers() -> None:
    """Start Megatron's checkpoint-writer helper now, deaf to the preemption signals (see
    :func:`children_block`) and bound to this process's life (``prepare_writer``: it is SIGKILLed
    when this process dies); later saves reuse it."""
    from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue

    with children_block():
        prepare_writer()
        get_write_results_queue()


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (what Slurm sends before a time limit); checked between steps.

    Also starts the checkpoint-writer helper with those signals blocked, so that the save they
    trigger can complete when Slurm signals every process of the job step."""

    def __init__(self, signals=PREEMPTION_SIGNALS) -> None:
        self.received: int | None = None
        for sig in signals:
            signal.signal(sig, self._handler)
        start_checkpoint_helpers()

    def _handler(self, signum, frame) -> None:
        self.received = signum

    def should_stop(self) -> bool:
        """True on every rank if any rank received a signal (all ranks must save together)."""
        return any_rank(self.received is not None)  # a MAX over the world, on the runtime device


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
    def save(self, iteration: int, branches: dict, run_state: dict, model_cfg=None, params_dtype=None,
             owners: dict[str, list[int]] | None = None) -> None:  # fmt: skip
        """Collective over the world. The checkpoint becomes visible (``latest``) only once complete
        everywhere. ``branches``: every branch of the run; ``None`` for one this rank does not hold
        (disjoint placement), whose ``owners`` (global ranks) then share its scheduler state."""
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
        requests = []
        for name, b in branches.items():
            state = _branch_sharded_state(b, is_loading=False) if b is not None else None
            common = None
            if owners is not None and dist.is_initialized():
                from megatron.core.dist_checkpointing.utils import extract_sharded_base

                # The non-tensor part (optimizer param groups, scheduler) from the branch's first rank
                # to every rank: rank 0 writes it whichever branch it holds.
                box = [extract_sharded_base(state)[1] if b is not None else None]
                dist.broadcast_object_list(box, src=owners[name][0])
                common = box[0]
            requests.append(save_branch(b, it_dir / name, model_cfg, params_dtype, self.async_save,
                                        self.fully_parallel_save, common_state=common, state=state))  # fmt: skip
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
        return resolve_iteration_dir(load_dir)

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
            if branch is not None:  # a branch this rank holds (its own ranks load it together)
                load_branch(branch, it_dir / name, self.fully_parallel_load)
        self._resumed_from = it_dir.resolve()
        logger.info("resumed from %s (iteration %d)", it_dir, run_state["iteration"])
        return run_state


def resolve_iteration_dir(load_dir: str | Path) -> Path:
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
