"""``copd-merge``: merge K branch checkpoints shard by shard with dist_checkpointing.

    copd-merge --inputs runs/x/ckpt/text runs/x/ckpt/image --out runs/x/merged
    copd-merge --inputs A B C --base BASE --method ties --density 0.2 --out M
    torchrun --nproc-per-node 8 -m copd_megatron.checkpoint.merge_cli --tp 8 --inputs ... --out M

Every rank builds the model at the *target* layout (``--tp``/``--pp``, world = tp·pp, or a
multiple: extra data-parallel ranks only repeat the work), loads only its shard of every
input (dist_checkpointing reshards from whatever layout they were saved at), merges it with
``checkpoint/merge.py`` and saves its shard of the result. No process ever holds a full
model, so a 70B merge needs the memory of (K + 2) shards per rank. TIES's per-tensor
magnitude threshold is found by bisection with all-reduced counts over the tensor-parallel
group, and DARE's drop mask hashes global element indices, so the result does not depend on
the layout. Inputs with a different architecture or tensor shapes are refused before
anything is loaded.

Inputs and ``--base`` may be any checkpoint the project writes (a trainer branch checkpoint,
whose optimizer state is ignored, a merge, a base, an import from Hugging Face), at any
layout. ``--out`` is written into a hidden sibling and renamed into place when complete; an
existing non-empty ``--out`` is replaced only with ``--force``, and never when it is (or
contains, or lies inside) one of the inputs.
"""

from __future__ import annotations

import logging
import sys

import torch

from copd_megatron.checkpoint.merge import (
    METHODS,
    NEEDS_BASE,
    global_index,
    merge_tensor,
)
from copd_megatron.utils.outputs import check_output
from copd_megatron.utils.progress import Progress
from copd_megatron.config.schema import ConfigError
from copd_megatron.utils.cli import OneLineParser, launcher_env_problem, report_error

logger = logging.getLogger("copd-merge")


def _parser() -> OneLineParser:
    p = OneLineParser(prog="copd-merge", description="Merge branch checkpoints (torch_dist, any TP/PP layout) "
                      "shard by shard into one checkpoint.")  # fmt: skip
    p.add_argument("--inputs", nargs="+", required=True,
                   help="checkpoint directories: trainer branches (runs/x/checkpoints/iter_N/<branch>), merges, bases")
    p.add_argument("--out", required=True, help="output checkpoint directory (new or empty; see --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out (never one of the inputs)")
    p.add_argument("--method", default="average", choices=METHODS)
    p.add_argument("--weights", type=float, nargs="+", help="one weight per input (default uniform)")
    p.add_argument("--base", help="shared base checkpoint (task_arithmetic, ties, dare, dare_ties)")
    p.add_argument("--lam", type=float, default=1.0, help="scale of the merged task vector")
    p.add_argument("--density", type=float, default=0.2, help="TIES: fraction of each task vector kept")
    p.add_argument("--drop-p", type=float, default=0.9, help="DARE: drop probability")
    p.add_argument("--seed", type=int, default=0, help="DARE: mask seed")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size of the merge (and of the output)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the merge (and of the output)")
    return p


# Model fields that do not change the weights' meaning (training-time settings).
_NOT_ARCHITECTURE = {"preset", "hidden_dropout", "attention_dropout", "init_method_std"}


def _model_tensors(ckpt_dir: str) -> dict:
    """Global metadata of the model tensors (a trainer checkpoint's optimizer state left out)."""
    from megatron.core import dist_checkpointing

    from copd_megatron.checkpoint.dist_ckpt import TRAINER_STATE_PREFIXES

    meta = dist_checkpointing.load_tensors_metadata(ckpt_dir)
    return {k: v for k, v in meta.items() if not k.startswith(TRAINER_STATE_PREFIXES)}


def check_compatible(dirs: list[str], flags: list[str] | None = None) -> None:
    """Readable checkpoints with the same architecture and identical model tensor keys and
    global shapes, or a one-line error naming the flag (``--inputs`` / ``--base``)."""
    from copd_megatron.checkpoint.dist_ckpt import check_weights_dir, read_meta

    for d, flag in zip(dirs, flags or ["--inputs"] * len(dirs)):
        check_weights_dir(d, flag)
    ref_model, _ = read_meta(dirs[0])
    ref_meta = _model_tensors(dirs[0])
    for d in dirs[1:]:
        model, _ = read_meta(d)
        for field, value in vars(ref_model).items():
            if field not in _NOT_ARCHITECTURE and getattr(model, field) != value:
                raise ConfigError(
                    f"{d}: architecture differs from {dirs[0]}: model.{field} is {getattr(model, field)!r}, not {value!r}"
                )
        meta = _model_tensors(d)
        if set(meta) != set(ref_meta):
            extra = sorted(set(meta) ^ set(ref_meta))[0]
            raise ConfigError(f"{d}: tensor {extra!r} is present in only one of {d} and {dirs[0]}")
        for key, ten in meta.items():
            if tuple(ten.global_shape) != tuple(ref_meta[key].global_shape):
                raise ConfigError(
                    f"{d}: tensor {key!r} has shape {tuple(ten.global_shape)}, {dirs[0]} has {tuple(ref_meta[key].global_shape)}"
                )


def _leaves(tree, path=()):
    """(path, leaf) pairs of a nested dict/list in a fixed order."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k], path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, path + (i,))
    else:
        yield path, tree


def _set(tree, path, value):
    for p in path[:-1]:
        tree = tree[p]
    tree[path[-1]] = value


def _load_shards(chunk, ckpt_dir: str) -> dict:
    """This rank's shards of ``ckpt_dir`` at the model's layout, factories left split (cloned)."""
    from megatron.core.dist_checkpointing.mapping import apply_factories

    from copd_megatron.checkpoint.dist_ckpt import load_weights

    sd = chunk.sharded_state_dict()
    apply_factories(sd)
    loaded = load_weights(sd, ckpt_dir)  # the one weights path: any checkpoint kind, any layout
    for path, leaf in list(_leaves(loaded)):
        if isinstance(leaf, torch.Tensor):
            _set(loaded, path, leaf.detach().clone())  # loads may alias the model's parameters
    return loaded


def _is_whole(sh) -> bool:
    """True when this rank holds the whole tensor (replicated), False when it is TP-sharded."""
    n = sh.prepend_axis_num
    return tuple(sh.local_shape[n:]) == tuple(sh.global_shape[n:])


def _shard_threshold(tau: torch.Tensor, density: float, whole: bool) -> float:
    """|τ| value keeping the top ``density`` of the full tensor, found over TP shards by bisection."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from copd_megatron.distributed.device import runtime_device

    group = None if whole else ps.get_tensor_model_parallel_group()
    a = tau.abs().flatten().double()

    def reduce(t: torch.Tensor, op) -> torch.Tensor:
        if group is not None:
            t = t.to(runtime_device())  # collectives on the runtime device (NCCL takes CUDA tensors only)
            dist.all_reduce(t, op=op, group=group)  # shards of one tensor live on the TP group
        return t

    numel = reduce(torch.tensor([float(a.numel())]), dist.ReduceOp.SUM)
    k = max(1, int(round(density * float(numel))))
    lo, hi = 0.0, float(reduce(a.max().reshape(1).clone(), dist.ReduceOp.MAX))
    for _ in range(60):  # the largest t with count(|τ| >= t) >= k is the k-th largest |τ|
        mid = (lo + hi) / 2
        count = reduce(torch.tensor([float((a >= mid).sum())]), dist.ReduceOp.SUM)
        lo, hi = (mid, hi) if float(count) >= k else (lo, mid)
    # Snap to the exact k-th value: the largest |τ| that is <= lo, over all shards.
    below = a[a <= lo]
    snap = reduce((below.max() if below.numel() else torch.tensor(0.0, dtype=torch.float64)).reshape(1).clone(),
                  dist.ReduceOp.MAX)  # fmt: skip
    return float(snap)


def merge_chunk(chunk, args) -> dict:
    """Merged state dict of this rank's chunk, ready for ``load_state_dict``."""
    from megatron.core.dist_checkpointing.mapping import (
        ShardedTensor,
        ShardedTensorFactory,
        apply_factories,
        apply_factory_merges,
    )

    template = chunk.sharded_state_dict()
    factories = {k: v for k, v in template.items() if isinstance(v, ShardedTensorFactory)}
    apply_factories(template)  # metadata (keys, global offsets) of every shard
    inputs = [_load_shards(chunk, d) for d in args.inputs]
    base = _load_shards(chunk, args.base) if args.base else None
    merged = inputs[0]
    leaves = [(path, sh) for path, sh in _leaves(template) if isinstance(sh, ShardedTensor)]
    # Non-tensor state (e.g. _extra_state) is taken from the first input.
    progress = Progress(f"merge ({args.method})", len(leaves), logger, unit="tensors", enabled=_rank() == 0)
    for path, sh in leaves:
        xs = [_get(t, path) for t in inputs]
        b = _get(base, path) if base is not None else None
        local = (1,) * sh.prepend_axis_num + tuple(xs[0].shape)
        index = global_index(local, sh.global_offset, sh.global_shape).view(xs[0].shape)
        thresholds = None
        if args.method == "ties":
            thresholds = [_shard_threshold(x.float() - b.float(), args.density, _is_whole(sh)) for x in xs]
        out = merge_tensor(
            xs, args.method, base=b, weights=args.weights, lam=args.lam, density=args.density, drop_p=args.drop_p,
            seed=args.seed, key=sh.key, index=index, ties_thresholds=thresholds,
        )  # fmt: skip
        _set(merged, path, out)
        progress.update(note=sh.key)
    return apply_factory_merges(merged, factories)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def run_merge(args) -> None:
    """Collective: every rank merges and saves its shard (process groups must exist)."""
    from copd_megatron.checkpoint.dist_ckpt import read_meta, save_model
    from copd_megatron.config.schema import ParallelConfig, PrecisionConfig
    from copd_megatron.model.build import build_model_chunks

    model_cfg, dtype = read_meta(args.inputs[0])
    parallel = ParallelConfig(tp=args.tp, pp=args.pp)
    (chunk,) = build_model_chunks(model_cfg, parallel, PrecisionConfig(params_dtype=dtype))
    chunk.load_state_dict(merge_chunk(chunk, args), strict=True)
    save_model([chunk], args.out, model=model_cfg, params_dtype=dtype)


def validate_args(args) -> None:
    if len(args.inputs) < 2:
        raise ConfigError("--inputs: need at least 2 checkpoints to merge")
    if args.method not in NEEDS_BASE and args.base:
        raise ConfigError(f"--base: --method {args.method} does not use a base; drop --base or pick one of "
                          f"{sorted(NEEDS_BASE)}")  # fmt: skip
    if args.method in NEEDS_BASE and not args.base:
        raise ConfigError(f"--method {args.method}: needs --base (the checkpoint the branches started from)")
    if args.weights is not None and len(args.weights) != len(args.inputs):
        raise ConfigError(f"--weights: {len(args.weights)} weights for {len(args.inputs)} inputs")
    if not 0 < args.density <= 1:
        raise ConfigError(f"--density: {args.density} must be in (0, 1]")
    if not 0 <= args.drop_p < 1:
        raise ConfigError(f"--drop-p: {args.drop_p} must be in [0, 1)")
    if args.tp < 1 or args.pp < 1:
        raise ConfigError(f"--tp/--pp: {args.tp}/{args.pp}; expected positive integers")
    sources = args.inputs + ([args.base] if args.base else [])
    check_output(args.out, sources, force=args.force)
    check_compatible(sources, ["--inputs"] * len(args.inputs) + ["--base"] * bool(args.base))


def main(argv: list[str] | None = None) -> int:
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.distributed.init import (
        destroy_distributed,
        init_distributed,
        init_model_parallel,
        read_dist_env,
        set_seed,
    )
    from copd_megatron.utils.logging import setup_logging

    args = _parser().parse_args(argv)
    problem = launcher_env_problem()
    if problem:
        return report_error("copd-merge", problem, 0)
    env = read_dist_env()
    setup_logging("INFO", env.rank)
    try:
        validate_args(args)
        from copd_megatron.checkpoint.dist_ckpt import read_meta
        from copd_megatron.config.schema import ParallelConfig

        layout = resolve_layout(ParallelConfig(tp=args.tp, pp=args.pp), read_meta(args.inputs[0])[0], env.world_size)
    except ConfigError as e:
        return report_error("copd-merge", e, env.rank)
    import torch.distributed as dist

    owns_group = not dist.is_initialized()  # called from Python inside a running job: leave it up
    from copd_megatron.distributed.rendezvous import RendezvousError

    try:
        init_distributed(env)
    except RendezvousError as e:  # peers that never arrive: one line, not a traceback
        return report_error("copd-merge", e, env.rank)
    try:
        init_model_parallel(layout)
        set_seed(args.seed)  # Megatron's RNG tracker must exist to build; the weights are then loaded
        run_merge(args)
    except ConfigError as e:  # found while loading (every rank sees the same files)
        return report_error("copd-merge", e, env.rank)
    finally:
        if owns_group:
            destroy_distributed()
    if env.rank == 0:
        print(f"merged {len(args.inputs)} checkpoints ({args.method}) into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
