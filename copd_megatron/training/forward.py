"""Forward-only passes through Megatron's pipeline schedule that *collect* per-token results.

Recomputing old log-probs, scoring a student's rollouts with a teacher, measuring the top-k
overlap between two branches: each runs the model without gradients over micro-batches and
applies a function to the vocab-parallel logits ``[b, s, V/tp]`` on the last pipeline stage.
The results (small per-token tensors, never logits) are concatenated over micro-batches and
broadcast from the last stage so every rank of the pipeline holds them.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from copd_megatron.distributed.comm import broadcast_from_last_stage
from copd_megatron.training.step import MicroBatch

# fn(logits [b, s, V/tp], micro_batch) -> dict of tensors with leading dim b
CollectFn = Callable[[torch.Tensor, MicroBatch], dict[str, torch.Tensor]]


def forward_collect(
    chunks: list, microbatches: list[MicroBatch], fn: CollectFn, broadcast: bool = True
) -> dict[str, torch.Tensor]:
    """Run ``fn`` on every micro-batch's logits; return results concatenated along dim 0 on all
    ranks (``broadcast=False``: on the last pipeline stage only, e.g. for logits themselves)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator, model):
        mb = next(data_iterator)
        out = model(mb.tokens, mb.position_ids, None, **mb.inputs)

        def collect(logits):
            return torch.zeros(()), torch.tensor(1, dtype=torch.int), fn(logits, mb)

        return out, collect

    vpp = len(chunks)
    data = [iter(microbatches) for _ in range(vpp)] if vpp > 1 else iter(microbatches)
    was_training = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            outputs = get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=data, model=chunks,
                num_microbatches=len(microbatches), seq_length=microbatches[0].tokens.shape[1],
                micro_batch_size=microbatches[0].tokens.shape[0], forward_only=True,
            )  # fmt: skip
    finally:
        for c, t in zip(chunks, was_training):
            c.train(t)
    merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]} if outputs else {}
    if broadcast and dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        merged = broadcast_from_last_stage(merged, ps.get_pipeline_model_parallel_group())
    return merged

