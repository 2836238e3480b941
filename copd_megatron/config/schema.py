"""The configuration schema: typed dataclasses, one per section, a docstring under every field.

YAML files in ``configs/`` are instances of :class:`Config`; ``config.load`` reads them
strictly (unknown keys and wrong types are errors) and applies dotted ``key=value`` overrides.
Checks that involve one field live in ``__post_init__``; checks that involve several
sections or the world size live in ``config.validate`` and run before any process group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from copd_megatron.utils.errors import ConfigError  # noqa: F401 (re-exported: the config error type)


def _require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class VisionConfig:
    """The vision side of a LLaVA-style vision-language model (Megatron-Core's ``LLaVAModel``):
    a CLIP ViT encodes each image (and each sampled video frame) into one token per patch, a
    projector maps those to the language model's width, and the embeddings replace the image /
    video placeholder tokens of the prompt (one placeholder per patch, expanded by the data path).
    ``preset`` fills every field first; fields given next to it override it."""

    preset: Optional[str] = None
    """Name of a vision preset (``tiny``: CPU tests and demo; ``clip-vit-l-14-336``: OpenAI CLIP ViT-L/14 at 336 px)."""
    num_layers: int = 2
    """ViT transformer layers (the whole tower lives on the first pipeline stage)."""
    hidden_size: int = 64
    """ViT width."""
    ffn_hidden_size: int = 128
    """ViT MLP inner width; divisible by ``parallel.tp``."""
    num_attention_heads: int = 4
    """ViT attention heads; divisible by ``parallel.tp``."""
    kv_channels: Optional[int] = None
    """ViT head dimension (null = hidden_size / num_attention_heads)."""
    image_height: int = 32
    """Height in pixels every image and video frame is resized to; a multiple of ``patch_size``."""
    image_width: int = 32
    """Width in pixels every image and video frame is resized to; a multiple of ``patch_size``."""
    patch_size: int = 8
    """Side of a square patch: an image becomes (height/patch)·(width/patch) tokens."""
    class_token: bool = True
    """Prepend a learned class token inside the ViT (CLIP); it is dropped before the language model."""
    norm_epsilon: float = 1e-5
    """Epsilon of the ViT's LayerNorms."""
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    """ViT MLP activation (OpenAI CLIP uses ``quick_gelu``)."""
    projector: Literal["mlp", "affine"] = "mlp"
    """Vision-to-language projector: a 2-layer GELU MLP (LLaVA-1.5) or one linear layer."""
    projector_ffn_hidden_size: Optional[int] = None
    """Inner width of the ``mlp`` projector (null = the language model's hidden size); divisible by ``parallel.tp``."""
    freeze_vision: bool = False
    """Keep the ViT fixed (no gradients, no optimizer state); the projector and language model still train."""
    freeze_projector: bool = False
    """Keep the projector fixed as well."""
    image_token_id: Optional[int] = None
    """Vocabulary id of an image placeholder (e.g. ``<image>`` in the tiny tokenizer, ``<|image_pad|>`` = 151655
    in Qwen's); required. The data path writes it once per image patch; it is never sampled."""
    video_token_id: Optional[int] = None
    """Vocabulary id of a video-frame placeholder (null = ``image_token_id``); never sampled."""
    image_mean: list[float] = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    """Per-channel (RGB) mean subtracted after scaling pixels to [0, 1] (CLIP's by default)."""
    image_std: list[float] = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    """Per-channel (RGB) standard deviation divided out after the mean (CLIP's by default)."""
    video_fps: Optional[float] = 1.0
    """Frames per second sampled from a video whose row gives its ``fps`` (null = keep every frame)."""
    max_frames: int = 8
    """Most frames one video may contribute after sampling; more is a data error naming the row."""
    max_images: int = 8
    """Most images one row may carry; more is a data error naming the row."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "image_height",
                     "image_width", "patch_size", "max_frames", "max_images"):  # fmt: skip
            _require(getattr(self, name) > 0, f"model.vision.{name}", f"must be > 0, got {getattr(self, name)}")
        for name in ("image_height", "image_width"):
            _require(
                getattr(self, name) % self.patch_size == 0,
                f"model.vision.{name}",
                f"{getattr(self, name)} is not a multiple of model.vision.patch_size={self.patch_size}",
            )
        _require(
            self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
            "model.vision.hidden_size",
            f"{self.hidden_size} is not divisible by model.vision.num_attention_heads={self.num_attention_heads}; "
            "set model.vision.kv_channels explicitly",
        )
        for name in ("image_mean", "image_std"):
            _require(len(getattr(self, name)) == 3, f"model.vision.{name}", f"expected 3 values (R, G, B), "
                     f"got {getattr(self, name)}")  # fmt: skip
        _require(all(s > 0 for s in self.image_std), "model.vision.image_std", f"must be > 0, got {self.image_std}")
        _require(self.image_token_id is not None, "model.vision.image_token_id",
                 "is required: the vocabulary id that marks image patches in the token stream")  # fmt: skip
        for name in ("image_token_id", "video_token_id"):
            value = getattr(self, name)
            _require(value is None or value >= 0, f"model.vision.{name}", f"must be >= 0, got {value}")
        _require(self.video_fps is None or self.video_fps > 0, "model.vision.video_fps",
                 f"must be > 0 or null, got {self.video_fps}")  # fmt: skip

    @property
    def tokens_per_image(self) -> int:
        """Placeholder tokens of one image or video frame: one per patch."""
        return (self.image_height // self.patch_size) * (self.image_width // self.patch_size)

    @property
    def video_id(self) -> int:
        """The placeholder id of video frames."""
        return self.image_token_id if self.video_token_id is None else self.video_token_id


@dataclass
class ModelConfig:
    """A Llama-style decoder (RMSNorm, SwiGLU, RoPE, GQA). ``preset`` fills every field
    first; fields given explicitly next to it override the preset (see ``model/presets.py``)."""

    preset: Optional[str] = None
    """Name of a shape preset (``tiny``, ``llama3-8b``, ``qwen2.5-7b``, ``qwen3-8b``, ...)."""
    arch: Literal["gpt", "llava"] = "gpt"
    """Model architecture, i.e. which model provider builds and runs it (``gpt``: Megatron's GPTModel,
    the Llama / Qwen text families; ``llava``: Megatron's LLaVAModel, this language model plus the
    vision tower of ``model.vision``)."""
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
    """Vision tower and projector of ``arch: llava`` (null = a text-only model). Every branch is then
    the same vision-language model: a text branch is this model on prompts without images."""

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
        _require((self.arch == "llava") == (self.vision is not None), "model.arch",
                 f"{self.arch!r} " + ("needs a model.vision section" if self.arch == "llava" else
                                      "has no vision tower; set model.arch: llava to use model.vision"))  # fmt: skip
        if self.vision is not None:
            for name in ("image_token_id", "video_token_id"):
                value = getattr(self.vision, name)
                _require(value is None or value < self.vocab_size, f"model.vision.{name}",
                         f"{value} is not a vocabulary id (model.vocab_size={self.vocab_size})")  # fmt: skip


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
    placement: Literal["colocated", "disjoint"] = "colocated"
    """Where branches live. ``colocated``: every rank holds its shard of every branch (branches take
    turns; full-vocabulary OPD losses possible). ``disjoint``: the data-parallel ranks are split into
    one slice per branch (dp must be a multiple of the number of branches); branches generate, score
    and update concurrently, and only token ids, masks, per-token log-probs and top-k ids/values
    travel between them. tp/pp/cp describe ONE branch in both cases."""
    rendezvous_timeout_s: float = 600.0
    """Seconds the ranks wait for each other at start-up (at the master address and port) before
    giving up with one line naming what was missing and the likely cause."""

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp", "ep", "micro_batch_size"):
            _require(getattr(self, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.rendezvous_timeout_s > 0, "parallel.rendezvous_timeout_s",
                 f"must be > 0 seconds, got {self.rendezvous_timeout_s}")  # fmt: skip
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
    """Numeric formats, per pass (see ``config/precision.py``). FP8 goes through Transformer Engine
    and needs a CUDA machine."""

    params_dtype: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Dtype of the model weights and activations (the optimizer keeps fp32 master weights)."""
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    """FP8 format of the passes that run FP8 (null = FP8 off everywhere): ``e4m3`` everywhere, or
    ``hybrid`` (e4m3 forward, e5m2 gradients). Needs the Transformer Engine layer spec."""
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    """Transformer Engine scaling recipe of FP8 passes: ``delayed`` (amax history), ``tensorwise``
    (current per-tensor scaling), ``blockwise`` (Hopper and later), ``mxfp8`` (Blackwell only)."""
    train: Optional[Literal["bf16", "fp8", "fp32"]] = None
    """GEMM precision of the training step (null = ``fp8`` when ``precision.fp8`` is set, else the
    weights' dtype)."""
    score: Optional[Literal["bf16", "fp8", "fp32"]] = None
    """Precision of old-log-prob recomputation and of teacher scoring (null = the weights' dtype,
    bf16 for bf16 weights, also under FP8 training: the OPD advantage is a difference of two
    models' log-probs, where FP8 noise does not cancel). Scoring never updates FP8 scaling state."""
    generate: Optional[Literal["bf16", "fp8", "fp32"]] = None
    """Precision of rollout generation with the Megatron engine (null = the weights' dtype)."""
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
    beta: Optional[float] = None
    """β_k: weight of this branch's OPD signal β·(log π_teacher − log π_student) (null = ``opd.beta``;
    0 = no distillation: its Phase II is plain GRPO, it still teaches its peers)."""
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
    """Optimizer steps of ``mode: smoke`` (the RL recipes run ``cycles·(s_rl + s_opd)`` steps)."""
    topology: Literal["full", "hub", "edges"] = "full"
    """Who teaches whom: all pairs, hub ↔ every spoke, or the explicit ``edges`` list."""
    hub: Optional[str] = None
    """The hub branch when ``topology: hub``."""
    edges: list[list[str]] = field(default_factory=list)
    """Explicit undirected teacher pairs [[a, b], ...] when ``topology: edges``."""
    native_fraction: float = 0.5
    """Share of a Phase II batch that is native GRPO samples (the rest are cross samples)."""
    overlap_k: int = 10
    """k of the top-k overlap health metric."""
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

    def __post_init__(self) -> None:
        for name in ("cycles", "s_rl", "s_opd", "train_steps"):
            _require(getattr(self, name) >= 0, f"schedule.{name}", f"must be >= 0, got {getattr(self, name)}")
        _require(self.overlap_k >= 1, "schedule.overlap_k", f"must be >= 1, got {self.overlap_k}")
        _require(
            0.0 <= self.native_fraction <= 1.0,
            "schedule.native_fraction",
            f"must be in [0, 1], got {self.native_fraction}",
        )


@dataclass
class VLLMConfig:
    """The vLLM rollout engine (``rollout.engine: vllm``). One engine per model-parallel group,
    on its first rank; every update of a branch streams the new weights into it."""

    share_across_branches: bool = False
    """One engine for all branches of this rank, whose weights are swapped in (one full load)
    whenever another branch generates; false: one engine per branch (K× the memory, no swaps)."""
    tensor_parallel_size: int = 1
    """vLLM's own tensor parallelism (its workers; independent of ``parallel.tp``)."""
    gpu_memory_utilization: float = 0.4
    """GPU: fraction of *total* GPU memory vLLM may take (weights + KV cache); colocated with
    the trainer, leave room for it."""
    kv_cache_gb: float = 1.0
    """CPU: KV-cache size in GiB (vLLM's ``kv_cache_memory_bytes``; on GPU only if > 0 and
    ``gpu_memory_utilization`` is 0)."""
    max_num_seqs: int = 256
    """Sequences vLLM schedules at once."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile (always eager on CPU; false on GPU is faster after warm-up)."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (the G samples of a prompt); it is reset after
    every weight update."""
    sleep_level: int = 1
    """GPU: ``sleep()`` level while the trainer trains (1: offload weights to CPU, drop the KV
    cache; 2: drop both, weights come back by the next sync; 0: never sleep). CPU: sleep is a
    no-op (vLLM has no sleep mode there)."""
    sync_bucket_mb: int = 256
    """Weights are streamed to the engine in buckets of about this many MiB."""

    def __post_init__(self) -> None:
        _require(self.tensor_parallel_size >= 1, "rollout.vllm.tensor_parallel_size",
                 f"must be >= 1, got {self.tensor_parallel_size}")  # fmt: skip
        _require(0 <= self.gpu_memory_utilization <= 1, "rollout.vllm.gpu_memory_utilization",
                 f"must be in [0, 1], got {self.gpu_memory_utilization}")  # fmt: skip
        _require(self.kv_cache_gb >= 0, "rollout.vllm.kv_cache_gb", f"must be >= 0, got {self.kv_cache_gb}")
        _require(self.max_num_seqs >= 1, "rollout.vllm.max_num_seqs", f"must be >= 1, got {self.max_num_seqs}")
        _require(self.sleep_level in (0, 1, 2), "rollout.vllm.sleep_level", f"must be 0, 1 or 2, got {self.sleep_level}")
        _require(self.sync_bucket_mb >= 1, "rollout.vllm.sync_bucket_mb", f"must be >= 1, got {self.sync_bucket_mb}")


@dataclass
class OPDConfig:
    """The Phase II distillation signal (paper §4) on cross samples (student rollouts of a peer's prompts)."""

    loss: Literal["sampled", "reverse_kl", "forward_kl", "jsd", "topk_kl"] = "sampled"
    """``sampled``: the paper's per-token advantage β·(log π_T − log π_S) of the sampled token, fed to
    the clipped surrogate. Beyond the paper: β·D(student ‖ teacher) added per token, over the full
    vocabulary (``reverse_kl``, ``forward_kl``, ``jsd``: colocated placement only) or the teacher's
    top-k (``topk_kl``: works across placements, k ids and values per token travel)."""
    beta: float = 1.0
    """Default β of branches that do not set ``branches[i].beta``."""
    jsd_beta: float = 0.5
    """β of ``loss: jsd`` (0 = forward KL, 1 = reverse KL)."""
    topk: int = 16
    """k of ``loss: topk_kl``."""

    def __post_init__(self) -> None:
        _require(self.beta >= 0, "opd.beta", f"must be >= 0, got {self.beta}")
        _require(0.0 <= self.jsd_beta <= 1.0, "opd.jsd_beta", f"must be in [0, 1], got {self.jsd_beta}")
        _require(self.topk >= 1, "opd.topk", f"must be >= 1, got {self.topk}")


@dataclass
class MergeConfig:
    """How the final branches become one model (the trainer and ``copd-merge`` share this code)."""

    method: Literal["average", "task_arithmetic", "ties", "dare", "dare_ties", "none"] = "average"
    """CoPD's default is the uniform average; task_arithmetic/ties/dare/dare_ties need ``checkpoint.base``."""
    weights: Optional[list[float]] = None
    """One weight per merged branch (null = uniform)."""
    lam: float = 1.0
    """λ: scale of the merged task vector (task_arithmetic, ties, dare, dare_ties)."""
    density: float = 0.2
    """TIES: fraction of each task vector kept (by magnitude over the whole tensor)."""
    drop_p: float = 0.9
    """DARE: drop probability of each task-vector entry (survivors rescaled by 1/(1 − p))."""
    seed: Optional[int] = None
    """DARE mask seed (null = the run's ``seed``)."""

    def __post_init__(self) -> None:
        _require(0 < self.density <= 1, "merge.density", f"must be in (0, 1], got {self.density}")
        _require(0 <= self.drop_p < 1, "merge.drop_p", f"must be in [0, 1), got {self.drop_p}")


@dataclass
class MemoryConfig:
    """Keeping K branches on one set of devices (colocated placement): what inactive branches release."""

    offload_optimizer: bool = False
    """Move an inactive branch's optimizer state (fp32 master weights, Adam moments) to host memory
    while other branches train; restored for its update."""
    offload_weights: bool = False
    """Keep an inactive branch's model weights in host memory (swapped in for its generate, score
    and update phases): K branches then cost about one resident model plus host memory."""


@dataclass
class RolloutConfig:
    """Sampling G completions per prompt."""

    engine: Literal["megatron", "vllm"] = "megatron"
    """Rollout engine: Megatron-native (CPU and GPU, KV cache, shares the trainer's weights) or
    vLLM (CPU build or GPU; a copy of the weights synced after every update; see ``rollout.vllm``)."""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """Settings of the vLLM engine (ignored by the Megatron engine)."""
    parity_prompts: int = 4
    """Start-up parity check: rollouts of this many fixed prompts are scored by the trainer and the
    engine's sampled-token log-probs compared with the trainer's (0 = skip)."""
    parity_warn: float = 0.02
    """Warn when the parity check's mean |log π_engine − log π_trainer| per token exceeds this."""
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
        _require(self.prompts_per_step >= 1, "rollout.prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        _require(self.max_new_tokens >= 1, "rollout.max_new_tokens",
                 f"must be >= 1, got {self.max_new_tokens} (no response could ever earn a reward)")  # fmt: skip
        _require(self.top_k >= 0, "rollout.top_k", f"must be >= 0 (0 = off), got {self.top_k}")
        _require(self.temperature > 0, "rollout.temperature", f"must be > 0, got {self.temperature}")
        _require(0 < self.top_p <= 1, "rollout.top_p", f"must be in (0, 1], got {self.top_p}")
        _require(self.parity_prompts >= 0, "rollout.parity_prompts", f"must be >= 0, got {self.parity_prompts}")
        _require(self.parity_warn > 0, "rollout.parity_warn", f"must be > 0, got {self.parity_warn}")


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
    rollout_is: Literal["none", "tis", "mis"] = "none"
    """Correction of the rollout/trainer mismatch (the engine samples from π_rollout, the trainer
    recomputes π_old): every token's loss is multiplied by an importance weight
    w = π_old/π_rollout (detached). ``tis``: truncated, min(w, rollout_is_cap); ``mis``: masked,
    w inside [rollout_is_low, rollout_is_cap] and 0 outside (IcePop); ``none``: w = 1."""
    rollout_is_level: Literal["token", "sequence", "geometric"] = "token"
    """Ratio per token, per sequence (product over its response tokens), or the sequence's
    geometric mean per token; sequence-level weights apply to every token of the sequence."""
    rollout_is_cap: float = 2.0
    """Upper bound C of the weight (TIS clamp; MIS mask above it)."""
    rollout_is_low: float = 0.5
    """Lower bound of ``mis`` (tokens/sequences with a weight below it are masked)."""

    def __post_init__(self) -> None:
        _require(0 <= self.eps_low < 1, "loss.eps_low", f"must be in [0, 1), got {self.eps_low}")
        _require(self.eps_high >= 0, "loss.eps_high", f"must be >= 0, got {self.eps_high}")
        _require(self.ref_kl_coef >= 0, "loss.ref_kl_coef", f"must be >= 0, got {self.ref_kl_coef}")
        _require(self.rollout_is_cap >= 1, "loss.rollout_is_cap", f"must be >= 1, got {self.rollout_is_cap}")
        _require(0 <= self.rollout_is_low <= 1, "loss.rollout_is_low", f"must be in [0, 1], got {self.rollout_is_low}")


@dataclass
class CheckpointConfig:
    """Distributed checkpoints, one directory per branch per iteration."""

    save_dir: Optional[str] = None
    """Where to save (null = inside ``run_dir``)."""
    load_dir: Optional[str] = "auto"
    """Where the run starts from. ``auto``: the newest complete checkpoint in this run's own save
    directory if there is one, else a fresh start (a requeued or restarted job continues with the
    same command line). ``null``: always fresh. A path: a save directory (its ``latest``) or one
    ``iter_*`` directory, e.g. another run's; it must exist and be complete."""
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

    def __post_init__(self) -> None:
        for name in ("save_interval", "keep_last", "keep_every"):
            _require(getattr(self, name) >= 0, f"checkpoint.{name}", f"must be >= 0, got {getattr(self, name)}")


@dataclass
class LoggingConfig:
    """Where and how often metrics go."""

    log_interval: int = 1
    """Print one line every N steps."""
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Logging level of rank 0 (other ranks log warnings only)."""
    tensorboard: bool = False
    """Also write TensorBoard events to ``<run_dir>/tensorboard`` (``pip install -e ".[tensorboard]"``)."""

    def __post_init__(self) -> None:
        _require(self.log_interval >= 1, "logging.log_interval", f"must be >= 1, got {self.log_interval}")


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
    """Seed of synthetic held-out sets: fixed across run seeds so every run sees the same test
    (``copd-eval --heldout-seed`` defaults to the same value)."""

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", f"must be >= 0 (0 = at cycle ends), got {self.every}")
        for name in ("prompts_per_domain", "samples", "overlap_prompts"):
            _require(getattr(self, name) >= 1, f"eval.{name}", f"must be >= 1, got {getattr(self, name)}")
        _require(self.temperature > 0, "eval.temperature", f"must be > 0, got {self.temperature}")


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
    opd: OPDConfig = field(default_factory=OPDConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
