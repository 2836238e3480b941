"""Build one branch's model (all its virtual-pipeline chunks, through its provider), DDP and optimizer.

The text model is Llama-style: RMSNorm, SwiGLU (fused gate/up ``linear_fc1``), RoPE, GQA (fused,
group-interleaved ``linear_qkv``), optional QKV bias (Qwen2), QK-norm (Qwen3), tied or untied
embeddings. The vocabulary is padded to a multiple of ``make_vocab_size_divisible_by``
independently of TP (``config.layout.padded_vocab_size``), which TP must divide, so every TP
rank owns an equal shard of the output layer's logits and checkpoints reshard across TP.

Two wiring details Megatron-LM's training loop normally does and we must do ourselves:
``config.finalize_model_grads_func`` (without it DDP never reduces gradients across data
parallel ranks) and ``broadcast_params()`` (without it DP replicas start different).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from copd_megatron.config.schema import (
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrecisionConfig,
)
from copd_megatron.model.specs import use_transformer_engine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def transformer_config(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig):
    """Translate our config sections into Megatron's ``TransformerConfig``."""
    from megatron.core.transformer import TransformerConfig

    dtype = DTYPES[precision.params_dtype]
    te = use_transformer_engine(model)
    swiglu = model.activation == "swiglu"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.norm_epsilon,
        gated_linear_unit=swiglu,
        activation_func=F.silu if swiglu else F.gelu,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        num_moe_experts=model.num_moe_experts,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        fp8=precision.fp8,
        fp8_recipe=precision.fp8_recipe,
        # Losses return (sum, num_tokens): gradients are normalised by the global token count
        # across micro-batches and data-parallel ranks (DAPO's token-level mean).
        calculate_per_token_loss=True,
        # Fused kernels need CUDA (and apex/TE); the CPU path uses the plain PyTorch ops.
        bias_activation_fusion=te and swiglu,
        bias_dropout_fusion=te,
        masked_softmax_fusion=te,
        persist_layer_norm=te,
        gradient_accumulation_fusion=te,
        apply_rope_fusion=te,
        use_cpu_initialization=False,
    )


def build_model_chunks(model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, config=None,
                       groups=None) -> list:  # fmt: skip
    """This rank's model chunks (one per virtual pipeline stage), not yet wrapped, built by the
    model's provider on ``groups`` (default: Megatron's global groups)."""
    from copd_megatron.distributed.groups import shared_groups
    from copd_megatron.model.provider import make_provider

    return make_provider(model, parallel, precision, config).build_chunks(groups or shared_groups())


@dataclass
class BranchModel:
    """One branch on this rank: its DDP-wrapped model chunks, optimizer and LR scheduler."""

    chunks: list  # DistributedDataParallel-wrapped model chunks, one per virtual stage
    optimizer: Any  # megatron.core.optimizer.MegatronOptimizer
    scheduler: Any  # megatron.core.optimizer_param_scheduler.OptimizerParamScheduler
    config: Any  # megatron.core.transformer.TransformerConfig
    groups: Any = None  # distributed.groups.BranchGroups the chunks were built on
    provider: Any = None  # model.provider.ModelProvider that builds and runs the chunks


def wrap_and_optimize(
    chunks: list, config, parallel: ParallelConfig, precision: PrecisionConfig, optim: OptimizerConfig, total_steps: int,
    groups=None, provider=None,
) -> BranchModel:  # fmt: skip
    """Wrap chunks in Megatron DDP, make replicas equal, and build optimizer + LR schedule, all on
    ``groups`` (the branch's process groups; default: Megatron's global ones)."""
    from copd_megatron.distributed.groups import shared_groups

    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    if precision.params_dtype != "fp32":
        chunks = [Float16Module(config, c) for c in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=precision.grad_reduce_in_fp32,
        overlap_grad_reduce=parallel.overlap_grad_reduce,
        overlap_param_gather=parallel.overlap_param_gather,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    groups = groups or shared_groups()
    pgc = groups.pg_collection
    wrapped = [
        DistributedDataParallel(config, ddp_config, c, disable_bucketing=i > 0, pg_collection=pgc)
        for i, c in enumerate(chunks)
    ]
    for w in wrapped:
        w.broadcast_params()  # DP replicas start from rank 0 of their DP group
    config.finalize_model_grads_func = finalize_model_grads
    dtype = DTYPES[precision.params_dtype]
    opt_config = MegatronOptimizerConfig(
        optimizer=optim.name,
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        sgd_momentum=optim.sgd_momentum,
        clip_grad=optim.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
    )
    # Explicit groups: a branch's data-parallel group may be a slice of the world (disjoint placement).
    optimizer = get_megatron_optimizer(opt_config, wrapped, use_gloo_process_groups=False, pg_collection=pgc)
    decay = {"constant": "constant", "cosine": "cosine", "linear": "linear"}[optim.lr_schedule]
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if optim.warmup_steps else optim.lr,
        max_lr=optim.lr,
        min_lr=optim.min_lr,
        lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=max(total_steps, optim.warmup_steps + 1),
        lr_decay_style=decay,
        start_wd=optim.weight_decay,
        end_wd=optim.weight_decay,
        wd_incr_steps=max(total_steps, 1),
        wd_incr_style="constant",
    )
    return BranchModel(wrapped, optimizer, scheduler, config, groups, provider)


def build_branch(
    model: ModelConfig, parallel: ParallelConfig, precision: PrecisionConfig, optim: OptimizerConfig, total_steps: int
) -> BranchModel:
    """Model chunks + DDP + optimizer + scheduler for one branch (process groups must exist)."""
    from copd_megatron.distributed.groups import shared_groups
    from copd_megatron.model.provider import make_provider

    provider = make_provider(model, parallel, precision)
    groups = shared_groups()
    chunks = provider.build_chunks(groups)
    return wrap_and_optimize(chunks, provider.tcfg, parallel, precision, optim, total_steps, groups, provider)


def count_parameters(chunks: list) -> int:
    """Parameters on this rank (a shard of the branch)."""
    return sum(p.numel() for c in chunks for p in c.parameters())
