"""Cross-section checks of a :class:`Config` against a world size. No side effects.

Runs before any process group is created, on every rank (each computes the same answer),
so a bad launch fails in a second with one line instead of hanging a cluster allocation.
"""

from __future__ import annotations

import importlib.util

from copd_megatron.config.layout import Layout, resolve_layout
from copd_megatron.config.schema import Config, ConfigError


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def validate(cfg: Config, world_size: int, *, cuda_available: bool | None = None) -> Layout:
    """Return the branch layout, or raise :class:`ConfigError` naming the key to fix."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    layout = resolve_layout(cfg.parallel, cfg.model, world_size)

    te_ok = cuda_available and _have("transformer_engine")
    if cfg.precision.fp8 is not None and not te_ok:
        raise ConfigError(
            f"precision.fp8: {cfg.precision.fp8!r} needs Transformer Engine on a CUDA machine; "
            "install the [gpu] extra or set precision.fp8=null"
        )
    if cfg.model.transformer_impl == "transformer_engine" and not te_ok:
        raise ConfigError(
            "model.transformer_impl: 'transformer_engine' needs Transformer Engine on a CUDA machine; "
            "use 'auto' or 'local'"
        )
    if cfg.parallel.backend == "nccl" and not cuda_available:
        raise ConfigError("parallel.backend: 'nccl' needs CUDA; use 'auto' or 'gloo' on this machine")
    if cfg.rollout.engine == "vllm":  # accepted by the schema so configs can name it; refused, never ignored
        raise ConfigError("rollout.engine: 'vllm' is not available in this version; use 'megatron'")
    if cfg.optimizer.name != "adam" and cfg.parallel.use_distributed_optimizer:
        raise ConfigError(
            f"optimizer.name: {cfg.optimizer.name!r} is not supported by Megatron's distributed optimizer; "
            "use 'adam' or set parallel.use_distributed_optimizer=false"
        )
    if cfg.schedule.mode != "smoke" and cfg.rollout.prompts_per_step % layout.dp:
        raise ConfigError(
            f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} is not divisible by the data-parallel size "
            f"{layout.dp}; every data-parallel rank needs the same number of prompts"
        )
    if cfg.rollout.engine == "megatron" and cfg.parallel.vpp is not None and cfg.schedule.mode != "smoke":
        raise ConfigError("parallel.vpp: the Megatron rollout engine does not support virtual pipeline stages; set null")
    _validate_branches(cfg)
    if cfg.model.vision is not None:
        _validate_vision(cfg)
    return layout


def _validate_branches(cfg: Config) -> None:
    names = [b.name for b in cfg.branches]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"branches: duplicate branch names {dupes}; every branch needs a unique name")
    sched = cfg.schedule
    if sched.mode in ("copd", "static_opd", "mopd") and len(cfg.branches) < 2:
        raise ConfigError(f"branches: schedule.mode {sched.mode!r} needs at least 2 branches, got {len(names)}")
    if sched.topology == "hub":
        if sched.hub not in names:
            raise ConfigError(f"schedule.hub: {sched.hub!r} is not a branch; expected one of {names}")
    if sched.topology == "edges":
        if not sched.edges:
            raise ConfigError("schedule.edges: topology 'edges' needs at least one [a, b] pair")
        for i, edge in enumerate(sched.edges):
            if len(edge) != 2 or edge[0] == edge[1] or any(n not in names for n in edge):
                raise ConfigError(
                    f"schedule.edges.{i}: {edge!r} must be a pair of two different branch names from {names}"
                )
    if sched.mode == "static_opd":
        for key in ("static_teacher", "static_student"):
            if getattr(sched, key) not in names:
                raise ConfigError(f"schedule.{key}: {getattr(sched, key)!r} is not a branch; expected one of {names}")
        if sched.static_teacher == sched.static_student:
            raise ConfigError("schedule.static_student: must differ from schedule.static_teacher")
    if sched.mode != "smoke":
        for i, b in enumerate(cfg.branches):
            if b.data is None or b.verifier is None:
                raise ConfigError(f"branches.{i}: branch {b.name!r} needs 'data' and 'verifier'")
        if cfg.tokenizer is None:
            raise ConfigError("tokenizer: RL recipes need a tokenizer (a .model file or a tokenizer directory)")


def _validate_vision(cfg: Config) -> None:
    """A Qwen-VL tower: TP shards its heads, MLP and mergers; the DeepStack taps feed language
    layers that must sit on the first pipeline chunk, next to the tower."""
    v, par = cfg.model.vision, cfg.parallel
    merged = v.hidden_size * v.spatial_merge_size**2
    for key, size in (("num_attention_heads", v.num_attention_heads), ("ffn_hidden_size", v.ffn_hidden_size),
                      ("hidden_size", merged)):  # fmt: skip
        if size % par.tp:
            what = f"the merger width {merged} (= hidden_size * spatial_merge_size**2)" if key == "hidden_size" else size
            raise ConfigError(f"parallel.tp: {par.tp} does not divide model.vision.{key} ({what})")
    first_chunk = cfg.model.num_layers // (par.pp * (par.vpp or 1))
    if len(v.deepstack_layers) > first_chunk:
        raise ConfigError(
            f"parallel.pp: the first pipeline chunk holds {first_chunk} language layers but "
            f"model.vision.deepstack_layers feeds the first {len(v.deepstack_layers)}; use a smaller pp (or vpp)"
        )
    if par.cp > 1:
        raise ConfigError("parallel.cp: context parallelism is not supported with model.vision yet; set cp=1")
    if par.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel: not supported with model.vision yet; set it to false")
