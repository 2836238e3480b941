"""Behaviour metrics between branches (paper Eq. overlap): top-k overlap and symmetric KL.

Measured on the *student's* own rollouts (its state-visitation distribution): the teacher's
vocab-parallel logits are computed first and kept on the last pipeline stage, then the
student's pass compares them token by token (never gathering the vocabulary).
"""

from __future__ import annotations

import torch

from copd_megatron.losses import symmetric_kl, topk_overlap
from copd_megatron.training.forward import forward_collect
from copd_megatron.training.policy import microbatches, pad_to


def pair_behaviour(student_chunks, teacher_chunks, tokens: torch.Tensor, mask: torch.Tensor, *, k: int,
                   vocab_size: int, micro_batch_size: int) -> dict[str, float]:  # fmt: skip
    """Mean top-k overlap and symmetric KL over response tokens, identical on every rank."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_group()
    mbs = microbatches(tokens, mask, micro_batch_size)
    width = tokens.shape[1] - 1
    teacher = forward_collect(teacher_chunks, mbs, lambda logits, mb: {"logits": pad_to(logits.float(), width)},
                              broadcast=False)  # fmt: skip
    offsets = iter(range(0, len(mbs) * micro_batch_size, micro_batch_size))

    def compare(logits, mb):
        i = next(offsets)
        t = teacher["logits"][i : i + logits.shape[0], : logits.shape[1]]
        ov, _ = topk_overlap(logits, t, mb.loss_mask, k, tp_group=tp, vocab_size=vocab_size)
        kl, _ = symmetric_kl(logits, t, mb.loss_mask, tp_group=tp, vocab_size=vocab_size)
        m = mb.loss_mask
        return {"sums": torch.stack([(ov * m).sum(), (kl * m).sum(), m.sum()]).unsqueeze(0)}

    sums = forward_collect(student_chunks, mbs, compare)["sums"].sum(0).double()
    n = float(sums[2])
    totals = torch.tensor([float(sums[0]), float(sums[1]), n], dtype=torch.float64)
    if torch.distributed.is_initialized() and ps.get_data_parallel_world_size() > 1:
        torch.distributed.all_reduce(totals, group=ps.get_data_parallel_group())
    return {"overlap": float(totals[0] / max(totals[2], 1)), "sym_kl": float(totals[1] / max(totals[2], 1))}
