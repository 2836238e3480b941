"""Layer specs: the ONLY module that decides between Transformer Engine and local layers.

Transformer Engine (fused kernels, FP8) is used when ``model.transformer_impl`` is ``auto``
and TE is importable on a CUDA machine, or when it is asked for explicitly (``validate``
has already refused that on a machine without it). Otherwise Megatron-Core's local
(pure PyTorch) spec is used: that is the CPU path the test-suite runs. The choice is logged.

The vision tower of a vision-language model follows the same choice: Megatron's ViT layer
spec (TE or local), its pre-norm (TE's ``TENorm``, or Megatron's ``WrappedTorchNorm``: the
``torch.nn.LayerNorm`` that ``CLIPViTModel`` falls back to without TE does not accept the
``config`` argument it is built with), and the projector's MLP linears.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from copd_megatron.config.schema import ModelConfig

logger = logging.getLogger(__name__)


def use_transformer_engine(model: ModelConfig) -> bool:
    if model.transformer_impl == "local":
        return False
    if model.transformer_impl == "transformer_engine":
        return True
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def gpt_layer_spec(model: ModelConfig, *, fp8: str | None = None):
    """The Megatron ``ModuleSpec`` of one transformer layer for ``model``."""
    from megatron.core.models.gpt import gpt_layer_specs

    if use_transformer_engine(model):
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=model.num_moe_experts, qk_layernorm=model.qk_layernorm, fp8=fp8
        )
        impl = "transformer_engine"
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(
            num_experts=model.num_moe_experts, qk_layernorm=model.qk_layernorm, normalization=model.normalization
        )
        impl = "local"
    logger.info("layer spec: %s (transformer_impl=%s, cuda=%s)", impl, model.transformer_impl, torch.cuda.is_available())
    return spec


def vit_layer_spec(model: ModelConfig):
    """The Megatron ``ModuleSpec`` of one ViT layer (non-causal attention, LayerNorm, biases)."""
    from megatron.core.models.vision import vit_layer_specs

    if use_transformer_engine(model):
        return vit_layer_specs.get_vit_layer_with_transformer_engine_spec()
    return vit_layer_specs.get_vit_layer_with_local_spec()


def vision_norm(model: ModelConfig):
    """The LayerNorm class of the ViT's ``ln_pre`` (built with ``config=`` by CLIPViTModel)."""
    if use_transformer_engine(model):
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    return WrappedTorchNorm


def projector_spec(model: ModelConfig):
    """``MLPSubmodules`` of the vision projector: column- then row-parallel linears."""
    from megatron.core.transformer.mlp import MLPSubmodules

    if use_transformer_engine(model):
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear

        return MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear)
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
