"""The Qwen-VL language model: Megatron-Core's ``GPTModel`` with multimodal RoPE and DeepStack.

It is the Qwen3 (QK-norm, GQA) or Qwen2 (QKV bias) decoder of ``model/build.py`` with two
changes:

* **mRoPE.** ``position_embedding_type="mrope"`` makes ``GPTModel`` call its rotary module
  with ids ``[3, B, S]``; the module is replaced by :class:`MRopeEmbedding`, which knows both
  frequency layouts (Megatron-Core's ``MultimodalRotaryEmbedding`` only has the chunked one,
  which would silently scramble Qwen3-VL's interleaved layout). Angles are computed in fp32
  and cast to the activation dtype by Megatron's rotate-half, as transformers does. The
  fused TE RoPE kernel is disabled (it refuses per-token angles for batches > 1).
* **DeepStack** (Qwen3-VL). After decoder layer j (both residual adds), for j < k, the
  features of ViT tap j are added at the visual positions. They travel through
  ``TransformerBlock`` as the ``context`` argument (unused by a decoder without
  cross-attention, and passed through activation recomputation): a dense ``[s, b, k, h]``
  tensor that is zero at text positions, so adding it leaves text hidden states bit-identical.
  The taps must sit on the first pipeline stage (checked by ``config.validate``).
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from copd_megatron.config.schema import ModelConfig
from copd_megatron.model.qwen_vl.rope import inverse_frequencies, mrope_angles, mrope_axes


class DeepstackTransformerLayer(TransformerLayer):
    """A decoder layer that adds ``context[:, :, j]`` to its output, j = its global 0-based index."""

    def forward(self, *args, **kwargs):
        features = kwargs.pop("context", None)
        hidden, _ = super().forward(*args, context=None, **kwargs)
        j = self.layer_number - 1
        if features is not None and j < features.shape[2]:
            hidden = hidden + features[:, :, j]
        return hidden, features


class MRopeEmbedding(torch.nn.Module):
    """Drop-in for ``GPTModel.rotary_pos_emb`` under ``position_embedding_type="mrope"``:
    ids ``[3, B, S]`` → angles ``[S, B, 1, head_dim]``. No buffers (so a bf16 cast of the model
    never touches the frequencies)."""

    def __init__(self, head_dim: int, base: float, mrope_section: list[int], interleaved: bool) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.axes = mrope_axes(mrope_section, interleaved)

    def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None) -> torch.Tensor:
        inv_freq = inverse_frequencies(self.head_dim, self.base, device=position_ids.device)
        return mrope_angles(position_ids, inv_freq, self.axes)


def language_layer_spec(model: ModelConfig, fp8: str | None):
    from copd_megatron.model.specs import gpt_layer_spec

    return dataclasses.replace(gpt_layer_spec(model, fp8=fp8), module=DeepstackTransformerLayer)


def configure_language(config, model: ModelConfig) -> None:
    """Adjust the language model's ``TransformerConfig`` (built by ``model.build``) for mRoPE."""
    config.mrope_section = list(model.vision.mrope_section)
    config.apply_rope_fusion = False


def build_language_model(model: ModelConfig, config, vocab: int, fp8: str | None, *, pre_process: bool,
                         post_process: bool, vp_stage: int | None, pg_collection):  # fmt: skip
    """``GPTModel`` with the DeepStack layer spec and :class:`MRopeEmbedding`."""
    from megatron.core.models.gpt import GPTModel

    lm = GPTModel(
        config=config, transformer_layer_spec=language_layer_spec(model, fp8), vocab_size=vocab,
        max_sequence_length=model.seq_length, pre_process=pre_process, post_process=post_process,
        share_embeddings_and_output_weights=model.tie_embeddings, position_embedding_type="mrope",
        rotary_base=int(model.rotary_base), scatter_embedding_sequence_parallel=False,
        pg_collection=pg_collection, vp_stage=vp_stage,
    )  # fmt: skip
    head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
    interleaved = model.arch == "qwen3_vl"
    lm.rotary_pos_emb = MRopeEmbedding(head_dim, model.rotary_base, model.vision.mrope_section, interleaved)
    return lm
