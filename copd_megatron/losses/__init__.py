"""The loss library: everything works on vocab-parallel logits and takes its ``tp_group``.

    vocab_parallel  token log-probs, entropy, global top-k, distributed log-softmax
    grpo            group advantages, clipped surrogate (DAPO), reference-KL estimators, aggregation
    opd             OPD advantage, full-vocab reverse/forward KL and JSD(β), top-k KL, overlap metrics
"""

from copd_megatron.losses.grpo import aggregate, group_advantages, policy_loss, ref_kl
from copd_megatron.losses.opd import (
    opd_advantage,
    symmetric_kl,
    topk_kl,
    topk_overlap,
    vocab_divergence,
)
from copd_megatron.losses.vocab_parallel import (
    entropy_from_logits,
    gather_at,
    global_topk,
    log_softmax,
    token_logprobs,
)

__all__ = [
    "aggregate", "entropy_from_logits", "gather_at", "global_topk", "group_advantages", "log_softmax",
    "opd_advantage", "policy_loss", "ref_kl", "symmetric_kl", "token_logprobs", "topk_kl", "topk_overlap",
    "vocab_divergence",
]  # fmt: skip
