"""One optimizer step of one branch through Megatron's pipeline schedule.

The step is delegated to ``get_forward_backward_func()`` (no pipelining, 1F1B, or interleaved
1F1B for virtual stages) on the branch's own process groups (``pg_collection``). Our
``forward_step`` runs the branch's model provider and returns ``(output, loss_fn)``, so loss code
never sees pipelining: on the last stage it receives this micro-batch's model output and returns
``(loss_sum, num_tokens, metrics)``. With ``calculate_per_token_loss`` Megatron then divides every
gradient by the number of loss tokens summed over micro-batches and data-parallel ranks: the
token-level mean of the whole global batch, whatever the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from copd_megatron.data.batch import MicroBatch
from copd_megatron.distributed.device import runtime_device
from copd_megatron.model.build import BranchModel
from copd_megatron.model.precision import precision_pass
from copd_megatron.model.provider import forward_of
from copd_megatron.utils.faults import maybe_die

__all__ = ["LossFn", "MicroBatch", "StepResult", "lm_loss", "reduce_metrics", "run_schedule", "train_step"]

# loss_fn(model_output, micro_batch) -> (loss_sum, num_tokens, metrics); model_output is what the
# provider's forward returned on the last stage: per-token CE [b, s] when labels were given,
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
    """What one optimizer step reports (identical on every rank of the branch)."""

    loss: float  # token-level mean loss over the global batch
    grad_norm: float  # global gradient norm before clipping
    lr: float  # learning rate used by this step
    num_tokens: int  # loss tokens in the global batch
    skipped: bool  # True when the optimizer skipped the update (fp16 overflow)
    metrics: dict = field(default_factory=dict)  # other losses' metrics, global means (clip fraction, ...)


def run_schedule(branch: BranchModel, microbatches: list[MicroBatch], forward_step, *, forward_only: bool):
    """Megatron's schedule for the branch's layout on its own process groups."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator

    groups = branch.groups
    b, s = microbatches[0].tokens.shape
    # Interleaved 1F1B walks every micro-batch once per virtual stage: one iterator each.
    vpp = len(branch.chunks)
    data = [iter(microbatches) for _ in range(vpp)] if vpp > 1 else iter(microbatches)
    kw = {}
    if groups is not None:
        kw["pg_collection"] = groups.pg_collection
        if groups.pp_size > 1:
            kw["p2p_communicator"] = P2PCommunicator(pp_group=groups.pp, config=branch.config)
    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=data, model=branch.chunks, num_microbatches=len(microbatches),
        seq_length=s, micro_batch_size=b, forward_only=forward_only, **kw,
    )  # fmt: skip


def _forward_step(branch: BranchModel, loss_fn: LossFn, with_labels: bool):
    forward = forward_of(branch.provider)

    def forward_step(data_iterator: Iterable[MicroBatch], model):
        mb = next(data_iterator)
        out = forward(model, mb, with_labels=with_labels)
        return out, lambda output: loss_fn(output, mb)

    return forward_step


def reduce_metrics(reduced: list[dict], groups=None) -> dict[str, tuple[float, float]]:
    """Every metric is a ``[sum, count]`` pair per micro-batch: sum them over micro-batches and
    data-parallel ranks, share the totals from the last pipeline stage (the only one with a
    loss), and return ``{name: (sum, count)}`` on every rank of the branch."""
    from copd_megatron.distributed.groups import shared_groups

    g = groups or (shared_groups() if dist.is_initialized() else None)
    keys = sorted(reduced[0]) if reduced else []
    if g is not None and g.pp_size > 1:
        box = [keys]
        dist.broadcast_object_list(box, src=g.pp_global(g.pp_size - 1), group=g.pp)
        keys = box[0]
    # Summed on the device, reduced there, and copied to the host once (one sync per step).
    total = torch.zeros(len(keys), 2, dtype=torch.float64, device=runtime_device())
    for r in reduced:
        for i, k in enumerate(keys):
            total[i] += r[k].detach().double().reshape(2).to(total.device)
    if g is not None and keys:
        # Sum over data-parallel replicas (each saw different sequences).
        if g.dp_size > 1:
            dist.all_reduce(total, group=g.dp)
        # Only the last pipeline stage computed a loss; the other stages receive it.
        if g.pp_size > 1:
            dist.broadcast(total, src=g.pp_global(g.pp_size - 1), group=g.pp)
    host = total.tolist()
    return {k: (float(host[i][0]), float(host[i][1])) for i, k in enumerate(keys)}


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
    if not microbatches:
        raise ValueError("train_step needs at least one micro-batch")
    for chunk in branch.chunks:
        chunk.zero_grad_buffer()
    branch.optimizer.zero_grad()
    with precision_pass(branch.chunks, getattr(branch.provider, "precision", None), "train"):
        reduced = run_schedule(branch, microbatches, _forward_step(branch, loss_fn, with_labels), forward_only=False)
    maybe_die("train", step_index)
    ok, grad_norm, _ = branch.optimizer.step()
    lr = branch.optimizer.param_groups[0]["lr"]
    if ok:
        branch.scheduler.step(increment=1)
    totals = reduce_metrics(reduced, branch.groups)
    loss_sum, tokens = totals.pop(loss_key)
    metrics = {k: v[0] / max(v[1], 1e-12) for k, v in totals.items()}
    return StepResult(loss_sum / max(tokens, 1.0), float(grad_norm or 0.0), float(lr), int(tokens), not ok, metrics)
