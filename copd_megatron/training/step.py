"""One optimizer step of one branch through Megatron's pipeline schedule.

The step is delegated to ``get_forward_backward_func()`` (no pipelining, 1F1B, or interleaved
1F1B for virtual stages). Our ``forward_step`` returns ``(output, loss_fn)``, so loss code
never sees pipelining: on the last stage it receives this micro-batch's model output and
returns ``(loss_sum, num_tokens, metrics)``. With ``calculate_per_token_loss`` Megatron then
divides every gradient by the number of loss tokens summed over micro-batches and data-parallel
ranks: the token-level mean of the whole global batch, whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from copd_megatron.model.build import BranchModel
from copd_megatron.utils.faults import maybe_die


@dataclass
class MicroBatch:
    """A micro-batch of token sequences on one data-parallel rank. Shapes ``[b, s]``."""

    tokens: torch.Tensor  # [b, s] int64 input ids
    position_ids: torch.Tensor  # [b, s] int64 positions (0..s-1 unless packed)
    labels: torch.Tensor  # [b, s] int64 next-token targets (tokens shifted left by one)
    loss_mask: torch.Tensor  # [b, s] float, 1 where the token's loss counts (responses), else 0
    extra: dict = field(default_factory=dict)  # per-token tensors a loss needs (advantages, old log-probs)
    inputs: dict = field(default_factory=dict)  # extra model inputs, passed as keyword arguments (e.g. vision)

    @staticmethod
    def from_tokens(tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> "MicroBatch":
        """Language-model micro-batch from ``[b, s+1]`` ids: inputs ``[:, :-1]``, labels ``[:, 1:]``."""
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        b, s = inputs.shape
        mask = torch.ones(b, s) if loss_mask is None else loss_mask[:, 1:].float().contiguous()
        pos = torch.arange(s).unsqueeze(0).expand(b, -1).contiguous()
        return MicroBatch(inputs, pos, labels, mask)


# loss_fn(model_output, micro_batch) -> (loss_sum, num_tokens, metrics); model_output is what
# GPTModel.forward returned on the last stage: per-token CE [b, s] when labels were given,
# vocab-parallel logits [b, s, V/tp] otherwise. Every metric is a [sum, count] tensor; the
# step reports sum/count over the global batch ("loss" must be among them).
LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, torch.Tensor, dict]]


def lm_loss(per_token_ce: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Masked next-token cross-entropy: sum over loss tokens and their count."""
    mask = mb.loss_mask.to(per_token_ce.device)
    loss_sum = (per_token_ce.float() * mask).sum()
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss": torch.stack([loss_sum.detach(), num_tokens.float()])}


@dataclass
class StepResult:
    """What one optimizer step reports (identical on every rank)."""

    loss: float  # token-level mean loss over the global batch
    grad_norm: float  # global gradient norm before clipping
    lr: float  # learning rate used by this step
    num_tokens: int  # loss tokens in the global batch
    skipped: bool  # True when the optimizer skipped the update (fp16 overflow)
    metrics: dict = field(default_factory=dict)  # other losses' metrics, global means (clip fraction, ...)


def _forward_step(loss_fn: LossFn, with_labels: bool):
    def forward_step(data_iterator: Iterable[MicroBatch], model):
        mb = next(data_iterator)
        out = model(mb.tokens, mb.position_ids, None, labels=mb.labels if with_labels else None, **mb.inputs)
        return out, lambda output: loss_fn(output, mb)

    return forward_step


def reduce_metrics(reduced: list[dict]) -> dict[str, tuple[float, float]]:
    """Every metric is a ``[sum, count]`` pair per micro-batch: sum them over micro-batches and
    data-parallel ranks, share the totals from the last pipeline stage (the only one with a
    loss), and return ``{name: (sum, count)}`` on every rank."""
    from megatron.core import parallel_state as ps

    keys = sorted(reduced[0]) if reduced else []
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        box = [keys]
        dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                                   group=ps.get_pipeline_model_parallel_group())  # fmt: skip
        keys = box[0]
    total = torch.zeros(len(keys), 2, dtype=torch.float64)
    for r in reduced:
        for i, k in enumerate(keys):
            total[i] += r[k].detach().double().cpu().reshape(2)
    if dist.is_initialized() and keys:
        # Sum over data-parallel replicas (each saw different sequences).
        dist.all_reduce(total, group=ps.get_data_parallel_group())
        # Only the last pipeline stage computed a loss; the other stages receive it.
        dist.broadcast(total, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    return {k: (float(total[i, 0]), float(total[i, 1])) for i, k in enumerate(keys)}


def train_step(
    branch: BranchModel,
    microbatches: list[MicroBatch],
    loss_fn: LossFn = lm_loss,
    *,
    with_labels: bool = True,
    loss_key: str = "loss",
    step_index: int = -1,
) -> StepResult:
    """Forward/backward every micro-batch, then one optimizer and LR-scheduler step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not microbatches:
        raise ValueError("train_step needs at least one micro-batch")
    for chunk in branch.chunks:
        chunk.zero_grad_buffer()
    branch.optimizer.zero_grad()
    b, s = microbatches[0].tokens.shape
    # Interleaved 1F1B walks every micro-batch once per virtual stage: one iterator each.
    vpp = len(branch.chunks)
    data = [iter(microbatches) for _ in range(vpp)] if vpp > 1 else iter(microbatches)
    reduced = get_forward_backward_func()(
        forward_step_func=_forward_step(loss_fn, with_labels),
        data_iterator=data,
        model=branch.chunks,
        num_microbatches=len(microbatches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=False,
    )
    maybe_die("train", step_index)
    ok, grad_norm, _ = branch.optimizer.step()
    lr = branch.optimizer.param_groups[0]["lr"]
    if ok:
        branch.scheduler.step(increment=1)
    totals = reduce_metrics(reduced)
    loss_sum, tokens = totals.pop(loss_key)
    metrics = {k: v[0] / max(v[1], 1e-12) for k, v in totals.items()}
    return StepResult(loss_sum / max(tokens, 1.0), float(grad_norm or 0.0), float(lr), int(tokens), not ok, metrics)
