"""Parallel layout arithmetic: pure functions, no process groups.

A branch is sharded over ``world = tp · pp · cp · dp`` ranks (Megatron's order
tp-cp-ep-dp-pp). Everything here runs before any process starts, so an impossible layout
is reported as a one-line :class:`ConfigError` instead of a hang or a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass

from copd_megatron.config.schema import ConfigError, ModelConfig, ParallelConfig


@dataclass(frozen=True)
class Layout:
    """Resolved parallel sizes of one branch."""

    world_size: int
    tp: int
    pp: int
    cp: int
    ep: int
    dp: int
    vpp: int | None

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int = 1) -> int:
    """Round the vocabulary up to a multiple of ``divisible_by`` (128 by default).

    Unlike Megatron-LM (a multiple of ``divisible_by · tp``) the padded size does not depend
    on TP, so a checkpoint saved at TP=1 has the same embedding shape as one at TP=8 and
    reshards without surprises; ``resolve_layout`` checks that TP divides it. Padded ids get
    −inf logits in the losses and the sampler. ``tp`` is accepted for call-site clarity only."""
    return ((vocab_size + divisible_by - 1) // divisible_by) * divisible_by


def resolve_layout(parallel: ParallelConfig, model: ModelConfig, world_size: int) -> Layout:
    """Check that ``parallel`` fits ``world_size`` and ``model``; return the resolved layout."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    heads, groups = model.num_attention_heads, model.num_query_groups or model.num_attention_heads
    if heads % parallel.tp:
        raise ConfigError(
            f"parallel.tp: {parallel.tp} does not divide model.num_attention_heads={heads}; "
            f"allowed tp values: {_divisors(heads)}"
        )
    if groups % parallel.tp:
        raise ConfigError(
            f"parallel.tp: {parallel.tp} does not divide model.num_query_groups={groups}; "
            f"allowed tp values: {_divisors(groups)}"
        )
    padded = padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by)
    if padded % parallel.tp:
        raise ConfigError(
            f"parallel.tp: {parallel.tp} does not divide the padded vocabulary {padded} "
            f"(model.vocab_size={model.vocab_size} rounded up to model.make_vocab_size_divisible_by="
            f"{model.make_vocab_size_divisible_by}); raise make_vocab_size_divisible_by to a multiple of tp"
        )
    if model.vision is not None:
        _check_vision(parallel, model)
    stages = parallel.pp * (parallel.vpp or 1)
    if model.num_layers % stages:
        what = "pp" if parallel.vpp is None else "pp*vpp"
        raise ConfigError(
            f"parallel.pp: model.num_layers={model.num_layers} is not divisible by {what}={stages}; "
            f"allowed values: {_divisors(model.num_layers)}"
        )
    mp = parallel.tp * parallel.pp * parallel.cp
    if world_size % mp != 0:
        raise ConfigError(
            f"parallel: world size {world_size} is not divisible by tp*pp*cp = {mp} "
            f"(tp={parallel.tp}, pp={parallel.pp}, cp={parallel.cp}); launch a multiple of {mp} ranks "
            "or change the sizes"
        )
    dp = world_size // mp
    if parallel.dp is not None and parallel.dp != dp:
        raise ConfigError(
            f"parallel.dp: {parallel.dp} does not match world size {world_size} / (tp*pp*cp={mp}) = {dp}; "
            "set parallel.dp=null to derive it"
        )
    if parallel.cp > 1 and model.seq_length % (2 * parallel.cp):
        raise ConfigError(
            f"parallel.cp: model.seq_length={model.seq_length} must be divisible by 2*cp={2 * parallel.cp}"
        )
    if parallel.ep > 1:
        if model.num_moe_experts is None:
            raise ConfigError("parallel.ep: expert parallelism needs a MoE model (set model.num_moe_experts)")
        if model.num_moe_experts % parallel.ep:
            raise ConfigError(
                f"parallel.ep: {parallel.ep} does not divide model.num_moe_experts={model.num_moe_experts}"
            )
        if (dp * parallel.cp) % parallel.ep:
            raise ConfigError(f"parallel.ep: {parallel.ep} does not divide dp*cp = {dp * parallel.cp}")
    return Layout(world_size, parallel.tp, parallel.pp, parallel.cp, parallel.ep, dp, parallel.vpp)


def _check_vision(parallel: ParallelConfig, model: ModelConfig) -> None:
    """TP shards the ViT's heads and MLP and the projector's MLP like the language model's.

    Megatron-Core's LLaVAModel needs Transformer Engine's attention for sequence and context
    parallelism, and our VLM forward does not shard the merged embeddings over the sequence:
    both are refused rather than silently run unsharded."""
    v, tp = model.vision, parallel.tp
    sizes = {
        "model.vision.num_attention_heads": v.num_attention_heads,
        "model.vision.ffn_hidden_size": v.ffn_hidden_size,
        "model.vision.projector_ffn_hidden_size": v.projector_ffn_hidden_size or model.hidden_size,
    }
    for key, size in sizes.items():
        if size % tp:
            raise ConfigError(f"parallel.tp: {tp} does not divide {key}={size}; allowed tp values: {_divisors(size)}")
    if parallel.sequence_parallel or parallel.cp > 1:
        key = "parallel.sequence_parallel" if parallel.sequence_parallel else "parallel.cp"
        raise ConfigError(f"{key}: sequence and context parallelism are not supported with model.vision yet; "
                          "set parallel.sequence_parallel=false and parallel.cp=1")  # fmt: skip
    if parallel.vpp is not None:
        raise ConfigError("parallel.vpp: virtual pipeline stages are not supported with model.vision yet; set null")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
