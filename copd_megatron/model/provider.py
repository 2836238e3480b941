"""Model providers: how a branch's model is built and run, behind one small interface.

Everything above the model (rollout engine, scoring, the policy update, checkpoints) talks to a
provider, never to a concrete Megatron model class:

    chunks = provider.build_chunks(groups)                  # this rank's (virtual-)pipeline chunks
    out = provider.forward(chunk, micro_batch, inference_context=ctx, with_labels=False)

``forward`` returns vocab-parallel logits ``[b, s, V/tp]`` on the last pipeline stage (per-token
cross-entropy ``[b, s]`` with ``with_labels``), hidden states ``[s, b, h]`` on the others. The
provider computes positions itself from the micro-batch (plain 1-D positions for GPT, 3-D mRoPE
ids for vision-language models) and reads the batch fields it declares (``fields``: e.g. the
pixel values of each row), so code written for token tensors never sees pixel tensors.

``GPTProvider`` is the text model (Llama / Qwen families); vision-language providers register
themselves under their ``model.arch`` name (``llava``: ``model/vlm.py``). A provider may name
vocabulary ids the sampler must never produce (``never_sample``: image placeholders).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from copd_megatron.config.layout import padded_vocab_size
from copd_megatron.data.batch import MicroBatch
from copd_megatron.distributed.device import place_module


class ModelProvider(Protocol):
    fields: tuple[str, ...]  # ragged/row batch fields the model reads (e.g. "pixel_values")

    def build_chunks(self, groups) -> list:
        """This rank's unwrapped model chunks (one per virtual pipeline stage)."""
        ...

    def forward(self, chunk, mb: MicroBatch, *, inference_context=None, with_labels: bool = False):
        """Run one micro-batch through one chunk (see module doc)."""
        ...


PROVIDERS: dict[str, Callable[..., ModelProvider]] = {}


def register_provider(arch: str):
    def deco(factory):
        PROVIDERS[arch] = factory
        return factory

    return deco


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def stage_flags(groups, vp_stage: int | None, vpp: int | None) -> tuple[bool, bool]:
    """(pre_process, post_process) of a chunk: first/last stage of the whole (virtual) pipeline."""
    first_vp = vp_stage is None or vp_stage == 0
    last_vp = vp_stage is None or vp_stage == (vpp or 1) - 1
    return groups.is_first_stage and first_vp, groups.is_last_stage and last_vp


def positions(mb: MicroBatch) -> torch.Tensor:
    """1-D positions ``[b, s]``: the micro-batch's own, or ``offset .. offset+s`` (KV-cached decoding)."""
    if mb.position_ids is not None:
        return mb.position_ids
    b, s = mb.tokens.shape
    return torch.arange(mb.offset, mb.offset + s, device=mb.tokens.device).unsqueeze(0).expand(b, -1)


@register_provider("gpt")
class GPTProvider:
    """Megatron-Core ``GPTModel`` with RoPE (Llama-3, Qwen2/2.5, Qwen3 dense)."""

    fields: tuple[str, ...] = ()

    def __init__(self, model_cfg, parallel, precision, tcfg=None) -> None:
        from copd_megatron.model.build import transformer_config

        self.model_cfg, self.parallel, self.precision = model_cfg, parallel, precision
        self.tcfg = tcfg or transformer_config(model_cfg, parallel, precision)

    def build_chunks(self, groups) -> list:
        from megatron.core.models.gpt import GPTModel

        from copd_megatron.model.specs import gpt_layer_spec

        m, p = self.model_cfg, self.parallel
        spec = gpt_layer_spec(m, fp8=self.precision.fp8)
        vocab = padded_vocab_size(m.vocab_size, m.make_vocab_size_divisible_by, p.tp)
        chunks = []
        for vp_stage in range(p.vpp or 1):
            vp = vp_stage if p.vpp else None
            pre, post = stage_flags(groups, vp, p.vpp)
            chunks.append(GPTModel(
                config=self.tcfg, transformer_layer_spec=spec, vocab_size=vocab, max_sequence_length=m.seq_length,
                pre_process=pre, post_process=post, share_embeddings_and_output_weights=m.tie_embeddings,
                position_embedding_type="rope", rotary_percent=m.rotary_percent, rotary_base=int(m.rotary_base),
                rope_scaling=m.rope_scaling, rope_scaling_factor=m.rope_scaling_factor,
                pg_collection=groups.pg_collection, vp_stage=vp,
            ))  # fmt: skip
        return [place_module(c) for c in chunks]  # a few weights (torch norms) are born on the host

    def forward(self, chunk, mb: MicroBatch, *, inference_context=None, with_labels: bool = False):
        return gpt_forward(chunk, mb, inference_context=inference_context, with_labels=with_labels)


def gpt_forward(chunk, mb: MicroBatch, *, inference_context=None, with_labels: bool = False):
    """``GPTModel.forward`` on a micro-batch (causal attention, no attention mask tensor)."""
    labels = mb.labels if with_labels else None
    return chunk(mb.tokens, positions(mb), None, labels=labels, inference_context=inference_context)


def forward_of(provider) -> Callable:
    """The forward function of ``provider`` (plain GPT when there is none)."""
    return provider.forward if provider is not None else gpt_forward


def make_provider(model_cfg, parallel, precision, tcfg=None) -> ModelProvider:
    """The provider of ``model_cfg`` (text models: ``gpt``)."""
    from copd_megatron.model import vlm  # noqa: F401 - registers "llava"

    arch = model_cfg.arch
    if arch not in PROVIDERS:
        raise KeyError(f"model.arch {arch!r} has no provider; available: {sorted(PROVIDERS)}")
    return PROVIDERS[arch](model_cfg, parallel, precision, tcfg)
