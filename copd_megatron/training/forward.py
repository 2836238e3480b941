"""Forward-only passes through Megatron's pipeline schedule that *collect* per-token results.

Recomputing old log-probs, scoring a student's rollouts with a teacher, taking a model's top-k:
each runs the model without gradients over micro-batches and applies a function to the
vocab-parallel logits ``[b, s, V/tp]`` on the last pipeline stage. The results (small per-token
tensors, never logits unless asked) are concatenated over micro-batches and broadcast from the
last stage so every rank of the branch's pipeline holds them.
"""

from __future__ import annotations

from typing import Callable

import torch

from copd_megatron.data.batch import MicroBatch
from copd_megatron.distributed.comm import broadcast_from_last_stage
from copd_megatron.model.build import BranchModel
from copd_megatron.model.precision import precision_pass
from copd_megatron.model.provider import forward_of
from copd_megatron.training.step import run_schedule

# fn(logits [b, s, V/tp], micro_batch) -> dict of tensors with leading dim b
CollectFn = Callable[[torch.Tensor, MicroBatch], dict[str, torch.Tensor]]


def forward_collect(
    branch: BranchModel, microbatches: list[MicroBatch], fn: CollectFn, broadcast: bool = True
) -> dict[str, torch.Tensor]:
    """Run ``fn`` on every micro-batch's logits; return results concatenated along dim 0 on all
    ranks of the pipeline (``broadcast=False``: on the last stage only, e.g. for logits themselves).
    Scoring never changes the model: no gradients, dropout off, training mode restored after, and the
    pass runs at ``precision.score`` without touching FP8 scaling state (``model/precision.py``)."""
    forward = forward_of(branch.provider)

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = forward(model, mb)

        def collect(logits):
            return (torch.zeros((), device=logits.device), torch.ones((), dtype=torch.int, device=logits.device),
                    fn(logits, mb))  # fmt: skip

        return out, collect

    was_training = [c.training for c in branch.chunks]
    for c in branch.chunks:
        c.eval()
    try:
        with torch.no_grad(), precision_pass(branch.chunks, getattr(branch.provider, "precision", None), "score"):
            outputs = run_schedule(branch, microbatches, forward_step, forward_only=True)
    finally:
        for c, t in zip(branch.chunks, was_training):
            c.train(t)
    merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]} if outputs else {}
    g = branch.groups
    if broadcast and g is not None and g.pp_size > 1:
        merged = broadcast_from_last_stage(merged, g.pp)
    return merged
