"""The configuration schema: typed dataclasses, one per section, a docstring under every field.

YAML files in ``configs/`` are instances of :class:`Config`; ``config.load`` reads them
strictly (unknown keys and wrong types are errors) and applies dotted ``key=value`` overrides.
Checks that involve one field live in ``__post_init__``; checks that involve several
sections or the world size live in ``config.validate`` and run before any process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


class ConfigError(ValueError):
    """A user mistake in a config file or override: reported as one line, exit code 2."""


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class VisionConfig:
    """The vision tower of a Qwen-VL model and how its output enters the language model
    (``model.vision``; absent = a text-only model). Field names follow Megatron's; the HF
    ``vision_config`` / token-id fields they come from are named in each docstring."""

    family: Literal["qwen3_vl", "qwen2_5_vl"] = "qwen3_vl"
    """``qwen3_vl``: LayerNorm ViT, learned position table interpolated to each image, GELU(tanh)
    MLP, DeepStack taps, interleaved mRoPE. ``qwen2_5_vl``: RMSNorm ViT with window attention,
    SwiGLU MLP, no position table, no DeepStack, chunked mRoPE (HF ``model_type``)."""
    depth: int = 2
    """ViT layers (HF ``depth``)."""
    hidden_size: int = 32
    """ViT width (HF ``hidden_size``); the merger maps ``4·hidden_size`` to ``model.hidden_size``."""
    ffn_hidden_size: int = 64
    """ViT MLP inner width (HF ``intermediate_size``)."""
    num_attention_heads: int = 2
    """ViT attention heads (HF ``num_heads``); head dim = hidden_size / heads; divisible by ``parallel.tp``."""
    in_channels: int = 3
    """Image channels (HF ``in_channels``)."""
    patch_size: int = 16
    """Spatial patch side in pixels (HF ``patch_size``: Qwen3-VL 16, Qwen2.5-VL 14)."""
    temporal_patch_size: int = 2
    """Frames per patch (HF ``temporal_patch_size``; a still image is repeated to fill it)."""
    spatial_merge_size: int = 2
    """m: an m×m block of patches becomes one language-model token (HF ``spatial_merge_size``)."""
    rotary_base: float = 10000.0
    """θ of the ViT's 2-D rotary embedding (HF ``vision_config.rope_parameters.rope_theta``)."""
    num_position_embeddings: Optional[int] = None
    """qwen3_vl: rows of the learned position table, a square side² (HF ``num_position_embeddings``: 2304 = 48²)."""
    deepstack_layers: list[int] = field(default_factory=list)
    """qwen3_vl: ViT layers (0-based, increasing) whose outputs are merged and added to the hidden
    states of language-model layers 0, 1, ... at the visual positions (HF ``deepstack_visual_indexes``)."""
    window_size: Optional[int] = None
    """qwen2_5_vl: side of an attention window in pixels (HF ``window_size``: 112)."""
    full_attention_layers: list[int] = field(default_factory=list)
    """qwen2_5_vl: ViT layers that attend over a whole frame; the others attend within windows
    (HF ``fullatt_block_indexes``)."""
    tokens_per_second: Optional[float] = None
    """qwen2_5_vl: temporal mRoPE ids per second of video (HF ``tokens_per_second``: 2)."""
    mrope_section: list[int] = field(default_factory=list)
    """Rotary frequencies given to the temporal, height and width position ids of the language model;
    sums to head_dim / 2 (HF ``rope_parameters.mrope_section``: Qwen3-VL [24, 20, 20], Qwen2.5-VL [16, 24, 24])."""
    image_token_id: int = 151655
    """Placeholder token replaced by image features (``<|image_pad|>``)."""
    video_token_id: int = 151656
    """Placeholder token replaced by video features (``<|video_pad|>``)."""
    vision_start_token_id: int = 151652
    """``<|vision_start|>`` (kept for the HF config; positions are derived from the placeholders)."""
    vision_end_token_id: int = 151653
    """``<|vision_end|>`` (kept for the HF config)."""

    def __post_init__(self) -> None:
        for name in ("depth", "hidden_size", "ffn_hidden_size", "num_attention_heads", "in_channels", "patch_size",
                     "temporal_patch_size", "spatial_merge_size"):  # fmt: skip
            _require(getattr(self, name) > 0, f"model.vision.{name}", f"must be > 0, got {getattr(self, name)}")
        _require(self.hidden_size % self.num_attention_heads == 0, "model.vision.hidden_size",
                 f"{self.hidden_size} is not divisible by model.vision.num_attention_heads={self.num_attention_heads}")
        _require(len(self.mrope_section) == 3 and min(self.mrope_section) > 0, "model.vision.mrope_section",
                 f"expected three positive numbers [temporal, height, width], got {self.mrope_section}")  # fmt: skip
        qwen3 = self.family == "qwen3_vl"
        for name, only in (("num_position_embeddings", qwen3), ("deepstack_layers", qwen3), ("window_size", not qwen3),
                           ("full_attention_layers", not qwen3), ("tokens_per_second", not qwen3)):  # fmt: skip
            value = getattr(self, name)
            if not only and value:
                other = "qwen2_5_vl" if qwen3 else "qwen3_vl"
                raise ConfigError(f"model.vision.{name}: {value!r} is a {other} setting; remove it for {self.family}")
        if qwen3:
            side = int(round((self.num_position_embeddings or 0) ** 0.5))
            _require(self.num_position_embeddings is not None and side > 0 and side * side == self.num_position_embeddings,
                     "model.vision.num_position_embeddings",
                     f"qwen3_vl needs a square number (48*48 = 2304), got {self.num_position_embeddings}")  # fmt: skip
            _check_layer_list(self.deepstack_layers, self.depth, "model.vision.deepstack_layers")
        else:
            unit = self.patch_size * self.spatial_merge_size
            _require(self.window_size is not None and self.window_size >= unit, "model.vision.window_size",
                     f"qwen2_5_vl needs a window of at least patch_size*spatial_merge_size={unit} pixels, "
                     f"got {self.window_size}")  # fmt: skip
            _check_layer_list(self.full_attention_layers, self.depth, "model.vision.full_attention_layers")
            _require(self.tokens_per_second is not None and self.tokens_per_second > 0, "model.vision.tokens_per_second",
                     f"qwen2_5_vl needs a positive value, got {self.tokens_per_second}")


def _check_layer_list(layers: list[int], depth: int, key: str) -> None:
    _require(all(0 <= i < depth for i in layers), key, f"{layers} has an index outside the {depth} ViT layers [0, {depth})")
    _require(all(a < b for a, b in zip(layers, layers[1:])), key, f"{layers} must be strictly increasing")


@dataclass
class ModelConfig:
    """A Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA). ``preset`` fills every field
    first; fields given explicitly next to it override the preset (see ``model/presets.py``)."""

    preset: Optional[str] = None
    """Name of a shape preset (``tiny``, ``llama3-8b``, ``qwen2.5-7b``, ``qwen3-8b``, ...)."""
    num_layers: int = 2
    """Transformer layers; must be divisible by ``parallel.pp`` (× ``parallel.vpp``)."""
    hidden_size: int = 64
    """Model width."""
    ffn_hidden_size: int = 176
    """MLP inner width (per gate/up projection for SwiGLU)."""
    num_attention_heads: int = 4
    """Query heads; must be divisible by ``parallel.tp``."""
    num_query_groups: Optional[int] = 2
    """Key/value heads for GQA (null = multi-head attention); divisible by ``parallel.tp``."""
    kv_channels: Optional[int] = None
    """Head dimension (null = hidden_size / num_attention_heads; Qwen3 sets 128)."""
    vocab_size: int = 512
    """True tokenizer vocabulary; the model pads it (see ``make_vocab_size_divisible_by``)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (independent of TP, so checkpoints reshard); TP must divide it."""
    seq_length: int = 256
    """Maximum sequence length (prompt + response) used for RoPE and buffers."""
    rotary_base: float = 10000.0
    """RoPE theta (Llama-3: 500000, Qwen2.5/Qwen3: 1000000)."""
    rotary_percent: float = 1.0
    """Fraction of each head's dimensions that RoPE rotates."""
    rope_scaling: bool = False
    """Llama-3.1-style RoPE frequency scaling."""
    rope_scaling_factor: float = 8.0
    """Scale factor used when ``rope_scaling`` is on."""
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    """Normalisation layer type."""
    norm_epsilon: float = 1e-5
    """Epsilon of the normalisation layers."""
    activation: Literal["swiglu", "gelu"] = "swiglu"
    """MLP activation; ``swiglu`` uses a fused gate/up projection."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection only (Qwen2/2.5)."""
    add_bias_linear: bool = False
    """Bias on every linear layer (Llama and Qwen have none)."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3)."""
    tie_embeddings: bool = False
    """Share the input embedding and the output layer (small Llama-3.2 / Qwen models)."""
    init_method_std: float = 0.02
    """Std of the normal initialisation of weights."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP (RL post-training uses 0)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    num_moe_experts: Optional[int] = None
    """MoE experts per layer (null = dense). Needed for ``parallel.ep`` > 1."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: ``auto`` = Transformer Engine when importable on CUDA, else local."""
    vision: Optional[VisionConfig] = None
    """Vision tower of a vision-language model (Qwen3-VL, Qwen2.5-VL; see ``VisionConfig``); null = text only."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size", "seq_length"):
            _require(getattr(self, name) > 0, f"model.{name}", f"must be > 0, got {getattr(self, name)}")
        _require(
            self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
            "model.hidden_size",
            f"{self.hidden_size} is not divisible by model.num_attention_heads={self.num_attention_heads}; "
            "set model.kv_channels explicitly",
        )
        if self.num_query_groups is not None:
            _require(
                self.num_attention_heads % self.num_query_groups == 0,
                "model.num_query_groups",
                f"{self.num_query_groups} must divide model.num_attention_heads={self.num_attention_heads}",
            )
        if self.vision is not None:
            self._check_vision(self.vision)

    def _check_vision(self, v: VisionConfig) -> None:
        """What the language model must satisfy to take the tower's features and mRoPE ids."""
        head_dim = self.kv_channels or self.hidden_size // self.num_attention_heads
        _require(2 * sum(v.mrope_section) == head_dim, "model.vision.mrope_section",
                 f"{v.mrope_section} sums to {sum(v.mrope_section)}; it must be head_dim / 2 = {head_dim // 2}")
        _require(len(v.deepstack_layers) <= self.num_layers, "model.vision.deepstack_layers",
                 f"{len(v.deepstack_layers)} taps feed language layers 0..{len(v.deepstack_layers) - 1} but "
                 f"model.num_layers={self.num_layers}")  # fmt: skip
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            _require(0 <= getattr(v, name) < self.vocab_size, f"model.vision.{name}",
                     f"{getattr(v, name)} is not a token of the vocabulary [0, {self.vocab_size})")  # fmt: skip
        for name, want in (("normalization", "RMSNorm"), ("activation", "swiglu"), ("rotary_percent", 1.0),
                           ("rope_scaling", False), ("num_moe_experts", None)):  # fmt: skip
            _require(getattr(self, name) == want, f"model.{name}",
                     f"{getattr(self, name)!r} is not supported with model.vision (Qwen-VL language models use {want!r})")


@dataclass
class ParallelConfig:
    """How one branch is sharded. The data-parallel size is derived: world / (tp·pp·cp)."""

    tp: int = 1
    """Tensor parallel size: divides attention heads, query groups and the padded vocabulary."""
    pp: int = 1
    """Pipeline parallel size: divides ``model.num_layers``."""
    dp: Optional[int] = None
    """Data parallel size; null = derived from the world size. If set, it must match."""
    cp: int = 1
    """Context parallel size (accepted; the CPU path does not exercise it yet)."""
    ep: int = 1
    """Expert parallel size (MoE only; accepted, not exercised on CPU yet)."""
    vpp: Optional[int] = None
    """Virtual pipeline stages per rank (interleaved 1F1B); needs pp > 1."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism in the TP region (needs tp > 1)."""
    micro_batch_size: int = 1
    """Sequences per micro-batch on one data-parallel rank."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (ZeRO-1)."""
    overlap_grad_reduce: bool = False
    """Overlap the data-parallel gradient reduce-scatter with backward (GPU)."""
    overlap_param_gather: bool = False
    """Overlap the distributed optimizer's parameter all-gather with forward (GPU)."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """torch.distributed backend: ``auto`` = nccl with CUDA, gloo without."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "micro_batch_size"):
            _require(getattr(self, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.dp is None or self.dp >= 1, "parallel.dp", f"must be >= 1 or null, got {self.dp}")
        if self.vpp is not None:
            _require(self.vpp >= 1, "parallel.vpp", f"must be >= 1 or null, got {self.vpp}")
            _require(self.pp > 1, "parallel.vpp", f"virtual pipeline stages need parallel.pp > 1, got pp={self.pp}")
        _require(
            not self.sequence_parallel or self.tp > 1,
            "parallel.sequence_parallel",
            "needs parallel.tp > 1 (set it to false for tp=1)",
        )


@dataclass
class PrecisionConfig:
    """Numeric formats. FP8 goes through Transformer Engine and needs a CUDA machine."""

    params_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Dtype of the model weights and activations (the optimizer keeps fp32 master weights)."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 format for linear layers (null = off). Needs Transformer Engine."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """Transformer Engine FP8 scaling recipe."""
    grad_reduce_in_fp32: bool = True
    """Reduce gradients across data-parallel ranks in fp32."""


@dataclass
class OptimizerConfig:
    """One optimizer per branch (each branch owns its state and LR schedule)."""

    name: Literal["adam", "sgd"] = "adam"
    """Optimizer (Adam is AdamW with decoupled weight decay in Megatron)."""
    lr: float = 1e-6
    """Peak learning rate (the paper: constant 1e-6)."""
    min_lr: float = 0.0
    """Floor of the decaying schedules."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    sgd_momentum: float = 0.0
    """Momentum when ``name`` is ``sgd``."""
    clip_grad: float = 1.0
    """Global gradient-norm clip (0 = off)."""
    offload_inactive: bool = False
    """Move an inactive branch's optimizer state to CPU memory while other branches train."""

    def __post_init__(self) -> None:
        _require(self.lr >= 0, "optimizer.lr", f"must be >= 0, got {self.lr}")
        _require(self.clip_grad >= 0, "optimizer.clip_grad", f"must be >= 0, got {self.clip_grad}")
        _require(self.warmup_steps >= 0, "optimizer.warmup_steps", f"must be >= 0, got {self.warmup_steps}")


@dataclass
class BranchConfig:
    """One co-evolving branch: its capability data, verifier and OPD strength."""

    name: str = "branch"
    """Unique branch name (used in metrics as ``branch/<name>/...`` and checkpoint paths)."""
    data: Optional[str] = None
    """Prompt data: a JSONL/Parquet path, or ``synthetic:<family>`` for generated tasks."""
    verifier: Optional[str] = None
    """Registered verifier name scoring this branch's completions."""
    beta: float = 1.0
    """β_k: weight of the cross-branch OPD advantage β·(log π_teacher − log π_student)."""
    difficulty: int = 2
    """Difficulty knob of synthetic task families."""
    eval_data: Optional[str] = None
    """Held-out prompts of this branch's domain (JSONL); null = a fresh synthetic split."""


@dataclass
class ScheduleConfig:
    """The CoPD rhythm: N cycles of Phase I (S_RL GRPO steps) then Phase II (S_OPD mixed steps)."""

    mode: Literal["copd", "expert", "mixed", "static_opd", "mopd", "smoke"] = "copd"
    """Recipe: CoPD or one of the baselines run by the same trainer (``smoke`` = LM steps only)."""
    cycles: int = 1
    """N: number of Phase I + Phase II cycles."""
    s_rl: int = 3
    """S_RL: GRPO steps per branch in Phase I."""
    s_opd: int = 2
    """S_OPD: mixed native + cross-branch steps per branch in Phase II."""
    train_steps: int = 10
    """Optimizer steps for ``mode: smoke`` (and a cap for the others when > 0)."""
    topology: Literal["full", "hub", "edges"] = "full"
    """Who teaches whom: all pairs, hub ↔ every spoke, or the explicit ``edges`` list."""
    hub: Optional[str] = None
    """The hub branch when ``topology: hub``."""
    edges: list[list[str]] = field(default_factory=list)
    """Explicit undirected teacher pairs [[a, b], ...] when ``topology: edges``."""
    native_fraction: float = 0.5
    """Share of a Phase II batch that is native GRPO samples (the rest are cross samples)."""
    opd_loss: Literal["sampled", "reverse_kl", "forward_kl", "jsd", "topk_kl"] = "sampled"
    """OPD signal: the paper's sampled-token advantage, or a full-vocab / top-k divergence."""
    overlap_k: int = 10
    """k of the top-k overlap health metric."""
    jsd_beta: float = 0.5
    """β of ``opd_loss: jsd`` (0 = forward KL, 1 = reverse KL)."""
    opd_topk: int = 16
    """k of ``opd_loss: topk_kl``."""
    adaptive: bool = False
    """Adaptive rhythm (beyond the paper): end Phase I when overlap < floor, Phase II when > ceiling."""
    overlap_floor: float = 0.90
    """Adaptive rhythm: Phase I ends early when the pair overlap falls below this."""
    overlap_ceiling: float = 0.97
    """Adaptive rhythm: Phase II ends early when the pair overlap rises above this."""
    static_teacher: Optional[str] = None
    """``mode: static_opd``: the frozen expert that teaches (e.g. image for OPD V→T)."""
    static_student: Optional[str] = None
    """``mode: static_opd``: the expert that is distilled into and becomes the final model."""
    merge: Literal["average", "task_arithmetic", "ties", "dare", "dare_ties", "none"] = "average"
    """How branches become one model at the end (CoPD: uniform average)."""

    def __post_init__(self) -> None:
        for name in ("cycles", "s_rl", "s_opd", "train_steps", "overlap_k"):
            _require(getattr(self, name) >= 0, f"schedule.{name}", f"must be >= 0, got {getattr(self, name)}")
        _require(
            0.0 <= self.native_fraction <= 1.0,
            "schedule.native_fraction",
            f"must be in [0, 1], got {self.native_fraction}",
        )


@dataclass
class RolloutConfig:
    """Sampling G completions per prompt."""

    engine: Literal["megatron", "vllm"] = "megatron"
    """Rollout engine: Megatron-native (CPU and GPU, KV cache) or vLLM (GPU)."""
    group_size: int = 8
    """G: completions per prompt (the paper: 8)."""
    prompts_per_step: int = 8
    """Prompts per optimizer step per branch (the paper: 256)."""
    max_new_tokens: int = 64
    """Maximum response length."""
    temperature: float = 1.0
    """Sampling temperature (the same value divides the trainer's logits)."""
    top_p: float = 1.0
    """Nucleus sampling threshold."""
    top_k: int = 0
    """Top-k sampling (0 = off)."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (the EOS token always stops)."""

    def __post_init__(self) -> None:
        _require(self.group_size >= 1, "rollout.group_size", f"must be >= 1, got {self.group_size}")
        _require(self.temperature > 0, "rollout.temperature", f"must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass
class LossConfig:
    """The policy-gradient objective shared by GRPO and OPD tokens (paper §4, DAPO clip-higher)."""

    eps_low: float = 0.2
    """Lower clip of the ratio: clip(ρ, 1 − eps_low, 1 + eps_high)."""
    eps_high: float = 0.28
    """Upper clip (DAPO's clip-higher)."""
    aggregation: Literal["token_mean", "seq_mean", "drgrpo"] = "token_mean"
    """Token-level mean over the global batch (DAPO), mean of per-sequence means, or Dr.GRPO's
    sum / (sequences × max_new_tokens)."""
    advantage: Literal["grpo", "drgrpo"] = "grpo"
    """Group advantage: (r − mean)/(std + eps), or Dr.GRPO's r − mean."""
    ref_kl_coef: float = 0.0
    """Weight of a KL penalty to the base policy (the paper uses none)."""
    ref_kl_estimator: Literal["k1", "k3", "low_var_kl"] = "low_var_kl"
    """KL estimator of the reference penalty."""
    logprob_chunk_size: int = 0
    """Tokens per chunk of the fp32 log-prob computation (0 = all at once)."""

    def __post_init__(self) -> None:
        _require(0 <= self.eps_low < 1, "loss.eps_low", f"must be in [0, 1), got {self.eps_low}")
        _require(self.eps_high >= 0, "loss.eps_high", f"must be >= 0, got {self.eps_high}")
        _require(self.ref_kl_coef >= 0, "loss.ref_kl_coef", f"must be >= 0, got {self.ref_kl_coef}")


@dataclass
class CheckpointConfig:
    """Distributed checkpoints, one directory per branch per iteration."""

    save_dir: Optional[str] = None
    """Where to save (null = inside ``run_dir``)."""
    load_dir: Optional[str] = None
    """Resume from here: a save directory (its ``latest``) or one ``iter_*`` directory."""
    base: Optional[str] = None
    """torch_dist checkpoint every branch starts from (null = random init, tests only)."""
    save_interval: int = 0
    """Save every N steps (0 = only at the end)."""
    keep_last: int = 2
    """Retention: keep the last N checkpoints."""
    keep_every: int = 0
    """Retention: also keep every checkpoint whose iteration is a multiple of this (0 = off)."""
    async_save: bool = False
    """Write checkpoints in the background."""
    fully_parallel_save: bool = True
    """Spread the writing of data-parallel-replicated shards over the data-parallel ranks
    (Megatron's ``FullyParallelSaveStrategyWrapper``); off: data-parallel rank 0 writes them all."""
    fully_parallel_load: bool = False
    """Each data-parallel rank reads a part of the replicated shards and they are exchanged over
    the data-parallel group (``FullyParallelLoadStrategyWrapper``): less storage traffic on
    resume, more network traffic (Megatron-LM's default is off too)."""


@dataclass
class LoggingConfig:
    """Where and how often metrics go."""

    log_interval: int = 1
    """Print one line every N steps."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level of rank 0 (other ranks log warnings only)."""
    tensorboard: bool = False
    """Also write TensorBoard events when tensorboard is installed."""


@dataclass
class EvalConfig:
    """Held-out evaluation of every branch on every domain."""

    every: int = 0
    """Evaluate every N steps (0 = at the end of every cycle and of the run)."""
    prompts_per_domain: int = 64
    """Held-out prompts per domain."""
    samples: int = 1
    """n for mean@n (sampled); greedy pass@1 is always reported."""
    temperature: float = 1.0
    """Sampling temperature for mean@n."""
    overlap_prompts: int = 16
    """Student rollouts per connected pair used for top-k overlap / symmetric KL."""
    seed: int = 12345
    """Seed of synthetic held-out sets: fixed across run seeds so every run sees the same test."""


@dataclass
class Config:
    """A whole run."""

    name: str = "run"
    """Run name."""
    seed: int = 1234
    """Global seed: model init, data order and sampling derive from it."""
    run_dir: str = "runs/run"
    """Output directory: resolved config, metrics JSONL, checkpoints."""
    tokenizer: Optional[str] = None
    """SentencePiece .model file or a directory with Hugging Face tokenizer files."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    branches: list[BranchConfig] = field(default_factory=list)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
