"""A branch worker: one branch's model, optimizer, rollout engine and data streams on its groups.

The algorithm talks to workers, never to another branch's model chunks. A worker's verbs:

    generate(requests, params)        rollouts from the branch's engine (sampler log-probs included)
    score(batch, logprobs, topk, full_logits)
                                      a forward pass over the branch's *current* weights: per-token
                                      log-probs at the sampling temperature, the global top-k ids and
                                      values, or the vocab-parallel logits (last stage only)
    update(batch)                     one optimizer step of the policy loss; weight_version += 1
    sync_weights()                    hand the new weights to the engine (the "sync" phase)
    export_weights()                  HF-named full tensors gathered from the TP/PP shards
    state_dict() / load_state_dict()  data streams and weight version (model and optimizer state go
                                      through the checkpoint manager)

``weight_version`` counts the branch's updates. Every score and rollout is stamped with it, which
is how the live-teacher invariant is checked: at step s (counted from 0) every branch has made s
updates, so a teacher must answer with version s — its weights after its update of step s−1 —
never s+1 (the future) and never older.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from copd_megatron.data.batch import Batch, pad_to_width
from copd_megatron.distributed.comm import broadcast_from_last_stage
from copd_megatron.distributed.device import runtime_device
from copd_megatron.losses import global_topk, token_logprobs
from copd_megatron.model.build import BranchModel
from copd_megatron.model.offload import OptimizerOffloader, WeightOffloader
from copd_megatron.rollout.types import RolloutBatch, SamplingParams
from copd_megatron.training.forward import forward_collect
from copd_megatron.training.policy import policy_update
from copd_megatron.training.step import StepResult


@dataclass
class WorkerSettings:
    """The slice of the run config a worker needs (never the whole config)."""

    vocab_size: int
    temperature: float  # sampling temperature: scores and updates divide logits by it too
    micro_batch_size: int
    max_new_tokens: int
    loss: object  # config.schema.LossConfig
    opd: object  # config.schema.OPDConfig
    offload_weights: bool = False
    offload_optimizer: bool = False
    logprob_chunk_size: int = 0
    pad_multiple: int = 1  # micro-batch token lengths are multiples of this (FP8: 16; sequence parallel: tp)


@dataclass
class BranchWorker:
    name: str
    model: BranchModel
    engine: object  # rollout.engine.RolloutEngine
    settings: WorkerSettings
    streams: dict = field(default_factory=dict)  # "native/<domain>" and "cross/<teacher>" → PromptStream
    weight_version: int = 0

    def __post_init__(self) -> None:
        self._weights = WeightOffloader(self.model.chunks) if self.settings.offload_weights else None
        self._optim = OptimizerOffloader(self.model.optimizer) if self.settings.offload_optimizer else None

    @property
    def groups(self):
        return self.model.groups

    # -- memory -------------------------------------------------------------------------------
    def activate(self, optimizer: bool = False) -> None:
        """Bring the branch's weights (and, for an update, its optimizer state) onto the device."""
        if self._weights is not None:
            self._weights.onload()
        if optimizer and self._optim is not None:
            self._optim.onload()

    def deactivate(self) -> None:
        """Release what the offload settings allow while other branches work."""
        if self._optim is not None:
            self._optim.offload()
        if self._weights is not None:
            self._weights.offload()

    # -- verbs --------------------------------------------------------------------------------
    def generate(self, requests, params: SamplingParams) -> RolloutBatch:
        if self.engine.weight_version != self.weight_version:
            raise RuntimeError(f"branch {self.name}: engine weights are version {self.engine.weight_version}, the "
                               f"branch is at {self.weight_version}: weights were not synced after an update")  # fmt: skip
        self.engine.wake()
        try:
            out = self.engine.generate(requests, params)
        finally:
            self.engine.sleep()
        out.weight_version = self.weight_version
        return out

    def score(self, batch: Batch, *, logprobs: bool = True, topk: int = 0, full_logits: bool = False) -> dict:
        """Per-token results ``[n, L-1, ...]`` of the current weights on ``batch`` (no gradient, no state
        change), stamped with ``weight_version``; see :func:`score_batch`."""
        res = score_batch(self.model, batch, self.settings, logprobs=logprobs, topk=topk, full_logits=full_logits)
        res["weight_version"] = self.weight_version
        return res

    def update(self, batch: Batch, step_index: int = -1) -> StepResult:
        s = self.settings
        result = policy_update(self.model, batch, s.loss, s.opd, micro_batch_size=s.micro_batch_size,
                               temperature=s.temperature, vocab_size=s.vocab_size, max_len=s.max_new_tokens,
                               step_index=step_index, pad_multiple=s.pad_multiple)  # fmt: skip
        self.weight_version += 1
        return result

    def sync_weights(self) -> None:
        """The engine gets the weights of version ``weight_version`` (lazily: an engine that shares
        the trainer's module never iterates the export)."""
        self.engine.update_weights(self.export_weights(), self.weight_version)

    def export_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full Hugging Face tensors, one at a time, gathered from this branch's TP/PP shards."""
        from copd_megatron.checkpoint.hf_export import export_hf_tensors

        yield from export_hf_tensors(self.model.chunks, self.model.groups, self.model.provider)

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"weight_version": self.weight_version, "streams": {k: s.state_dict() for k, s in self.streams.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.weight_version = int(state["weight_version"])
        if self.weight_version > self.engine.weight_version:
            # The engine was built before the checkpoint was loaded: an engine with its own copy of
            # the weights (vLLM) must receive the resumed ones (the Megatron engine records the version).
            self.activate()
            self.sync_weights()
            self.deactivate()
        for k, st in state["streams"].items():
            self.streams[k].load_state_dict(st)


def score_batch(model: BranchModel, batch: Batch, s: WorkerSettings, *, logprobs: bool = True, topk: int = 0,
                full_logits: bool = False) -> dict:  # fmt: skip
    """One forward pass of ``model`` over ``batch``: ``logprobs`` [n, L-1] of the next tokens at the
    sampling temperature, ``topk_ids``/``topk_vals`` [n, L-1, k] (global ids, logits / T), and
    ``logits`` (full_logits): a per-row list of ``[len, V/tp]`` on the last pipeline stage only.
    The batch may live on the host: micro-batches go to the device, the small per-token results
    come back to the host (like the batch they join); logits stay on the device."""
    g = model.groups
    n, width = len(batch), batch.width - 1
    tp_group = g.tp if g is not None else None

    def fn(logits, mb):
        out = {}
        if logprobs:
            lp = token_logprobs(logits, mb.labels, tp_group=tp_group, vocab_size=s.vocab_size, temperature=s.temperature,
                                chunk_size=s.logprob_chunk_size or None)  # fmt: skip
            out["logprobs"] = pad_to_width(lp.float(), width)
        if topk:
            vals, ids = global_topk(logits, topk, tp_group=tp_group, vocab_size=s.vocab_size, temperature=s.temperature)
            out["topk_vals"], out["topk_ids"] = pad_to_width(vals, width), pad_to_width(ids, width)
        if full_logits:
            out["logits"] = pad_to_width(logits.float(), width)
        return out

    trim = g is None or g.pp_size == 1  # pipeline stages exchange fixed shapes
    mbs = batch.micro_batches(s.micro_batch_size, trim=trim, pad_multiple=s.pad_multiple, device=runtime_device())
    res = forward_collect(model, mbs, fn, broadcast=False)
    res = {k: v[:n] for k, v in res.items()}
    logits = res.pop("logits", None)
    if g is not None and g.pp_size > 1:  # small per-token results to every stage; logits stay
        res = broadcast_from_last_stage(res if g.is_last_stage else None, g.pp)
    res = {k: v.cpu() for k, v in res.items()}  # one copy per result, to join the host batch
    if full_logits:
        mask = batch.get("loss_mask")
        res["logits"] = [None] * n if logits is None else [_trim_row(logits[i], mask, i) for i in range(n)]
    return res


def _trim_row(row: torch.Tensor, mask: torch.Tensor | None, i: int) -> torch.Tensor:
    """A row's logits up to its last masked position (saves memory on short responses)."""
    if mask is None:
        return row
    nz = mask[i].nonzero()
    return row[: int(nz[-1]) + 1] if nz.numel() else row[:1]
