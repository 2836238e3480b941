"""Checkpoint keys across layer specs: why a local-spec checkpoint loads into the Transformer Engine
spec and back.

The two specs differ in one place: TE fuses the pre-attention and pre-MLP norms into the next linear
layer (``TELayerNormColumnParallelLinear``: ``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``), where the local spec has separate norm modules
(``input_layernorm``, ``pre_mlp_layernorm``). Megatron-Core declares the correspondence itself, in
the local spec's ``sharded_state_dict_keys_map``, and applies it when it builds a local model's
sharded state dict: a local-spec checkpoint is written under the TE names. So the torch_dist keys
of a checkpoint are the same for both specs, ``copd-convert`` (which builds the local spec) writes
what a TE model reads, and a TE model's checkpoint loads into the local spec.

:func:`megatron_norm_key_map` reads that table from Megatron (no Transformer Engine needed); the
tests check the converter's own table against it and a converted checkpoint's keys against a built
model's sharded state dict (``tests/distributed/test_spec_keys.py`` on CPU; on a GPU with TE,
``tests/gpu/test_te_spec.py`` builds the TE spec itself, loads the converted base into it, compares
logits with the local spec and saves it back).
"""

from __future__ import annotations

from pathlib import Path

from copd_megatron.config.schema import ModelConfig


def megatron_norm_key_map(model: ModelConfig) -> dict[str, str]:
    """``{local per-layer name: TE per-layer name}`` of the fused norms, from Megatron's local spec
    (``weight``, and ``bias`` for LayerNorm)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(qk_layernorm=model.qk_layernorm, normalization=model.normalization)
    table = spec.submodules.sharded_state_dict_keys_map  # local prefix → TE prefix
    params = ("weight", "bias") if model.normalization == "LayerNorm" else ("weight",)
    return {f"{local}{p}": f"{te}{p}" for local, te in table.items() for p in params}


def sharded_tensor_keys(chunks: list) -> set[str]:
    """Keys of every ShardedTensor in the chunks' sharded state dicts (what a checkpoint must hold)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    keys: set[str] = set()
    for c in chunks:
        m = c
        while hasattr(m, "module"):
            m = m.module
        sd = m.sharded_state_dict()
        apply_factories(sd)  # e.g. SwiGLU's fused fc1 is a factory of its gate and up halves
        stack = [sd]
        while stack:
            node = stack.pop()
            for v in node.values() if isinstance(node, dict) else node if isinstance(node, list) else []:
                if isinstance(v, (dict, list)):
                    stack.append(v)
                elif isinstance(v, ShardedTensor):
                    keys.add(v.key)
    return keys


def checkpoint_tensor_keys(ckpt_dir: str | Path) -> set[str]:
    """Tensor keys of a torch_dist checkpoint directory (read from its metadata)."""
    from megatron.core import dist_checkpointing

    return set(dist_checkpointing.load_tensors_metadata(str(ckpt_dir)))
