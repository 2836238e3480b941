"""The loss library: everything works on vocab-parallel logits ``[..., V/tp]`` and takes its
``tp_group`` explicitly (``None`` = no tensor parallelism); nothing reads Megatron globals.

    vocab_parallel  token log-probs, entropy (chunked fp32), global top-k, gather at global ids,
                    distributed log-softmax
    grpo            group advantages, clipped surrogate (DAPO), reference-KL estimators, aggregation
    mismatch        rollout/trainer mismatch: importance weights (TIS / masked IS), metrics
    opd             OPD advantage, full-vocab reverse/forward KL, JSD(β) and symmetric KL (chunked),
                    top-k KL, top-k overlap, masked mean

Under pipeline parallelism these run on the last stage; share their (small, per-token)
results with :func:`copd_megatron.distributed.comm.broadcast_from_last_stage`.
"""

from copd_megatron.losses.grpo import aggregate, group_advantages, policy_loss, ref_kl
from copd_megatron.losses.mismatch import mismatch_metrics, rollout_is_weights
from copd_megatron.losses.opd import (
    ids_overlap,
    masked_mean,
    opd_advantage,
    symmetric_kl,
    topk_kl,
    topk_kl_from,
    topk_overlap,
    vocab_divergence,
)
from copd_megatron.losses.vocab_parallel import (
    entropy_from_logits,
    gather_at,
    global_topk,
    log_softmax,
    token_logprobs,
    vocab_range,
)

__all__ = [
    "aggregate", "entropy_from_logits", "gather_at", "global_topk", "group_advantages", "ids_overlap", "log_softmax",
    "masked_mean", "mismatch_metrics", "opd_advantage", "policy_loss", "ref_kl", "rollout_is_weights", "symmetric_kl",
    "token_logprobs", "topk_kl",
    "topk_kl_from", "topk_overlap", "vocab_divergence", "vocab_range",
]  # fmt: skip
