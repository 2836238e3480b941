"""The rollout-engine protocol, its lifecycle, and the registry engines are built from.

An engine samples completions for a branch. Its lifecycle inside one training step:

    wake()                                   restore memory released by sleep()
    generate(requests, params)               sample; RolloutBatch.logprobs = the sampler's log-probs
    sleep()                                  release memory while the trainer scores and updates
    update_weights(named_tensors, version)   after the branch's update: the "sync" phase

``weight_version`` counts the updates the engine has seen; the trainer asserts it equals the
branch's own update count before generating, so a rollout is never sampled from stale weights.

Implementations (built only through :func:`build_engine` from ``rollout.engine``):

* ``megatron``: generation with the trainer's own Megatron model chunks and a KV cache (CPU and
  GPU, any TP/PP). It shares the trainer's parameters, so ``update_weights`` only records the
  version and ``sleep``/``wake`` release nothing.
* ``vllm``: a separate engine fed with the trainer's weights (HF names, streamed per tensor from
  the TP/PP shards) after each update; ``copd_megatron/rollout/vllm_engine.py`` is the only
  module that imports vLLM.

The sampler's log-probs travel in the batch beside the trainer's recomputed ones, so an engine
that differs numerically from the trainer can be measured and corrected (importance sampling).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from copd_megatron.rollout.types import GenerationRequest, RolloutBatch, SamplingParams


class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, requests: Sequence[GenerationRequest], params: SamplingParams) -> RolloutBatch:
        """One completion per request (repeat a prompt G times, with G seeds, for a group)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new weights (Hugging Face names, full tensors) and set ``weight_version``."""
        ...

    def sleep(self) -> None:
        """Release memory (KV cache, weights) while the trainer runs; ``wake`` restores it."""
        ...

    def wake(self) -> None: ...


@dataclass
class EngineContext:
    """Everything an engine factory may use to build an engine for one branch on this rank."""

    model_cfg: Any  # config.schema.ModelConfig
    rollout_cfg: Any  # config.schema.RolloutConfig
    chunks: list  # the trainer's (DDP-wrapped) model chunks of this branch on this rank
    provider: Any  # model.provider.ModelProvider: builds and runs the chunks (forward, positions)
    tokenizer: Any  # pad_id, eos_id, decode; tokenizer files for engines that need them
    groups: Any  # distributed.groups.BranchGroups of the branch (tp, pp, dp, mp)
    export_weights: Callable[[], Iterator[tuple[str, torch.Tensor]]] | None = None  # HF-named full tensors
    workdir: Path | None = None  # scratch space for this engine


ENGINES: dict[str, Callable[[EngineContext], RolloutEngine]] = {}


def register_engine(name: str):
    """Decorator: ``@register_engine("vllm") def factory(ctx: EngineContext) -> RolloutEngine``."""

    def deco(factory):
        ENGINES[name] = factory
        return factory

    return deco


def _load_builtin() -> None:
    # Importing a module registers its engine. vLLM is imported only when asked for.
    from copd_megatron.rollout import megatron_engine  # noqa: F401


def build_engine(name: str, ctx: EngineContext) -> RolloutEngine:
    """The engine ``name`` for one branch (``rollout.engine``)."""
    _load_builtin()
    if name == "vllm" and name not in ENGINES:
        try:
            from copd_megatron.rollout import vllm_engine  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"rollout.engine 'vllm' could not be loaded ({e})") from None
    if name not in ENGINES:
        raise KeyError(f"rollout engine {name!r} is not registered; available: {sorted(ENGINES)}")
    return ENGINES[name](ctx)
