"""The rollout-engine interface and a registry of implementations by name.

``megatron``: generation with the trainer's own Megatron model and a KV cache (CPU and GPU,
any TP/PP; no weight sync needed). ``vllm``: a separate engine on GPU, fed with the
trainer's weights after each update (the only module that imports vLLM is ``vllm_engine``).
Log-probs returned by any engine are for monitoring only: the trainer recomputes them.
"""

from __future__ import annotations

from typing import Callable, Protocol

from copd_megatron.rollout.types import RolloutBatch, SamplingParams


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        """Sample one completion per prompt (repeat a prompt G times for a group)."""
        ...


ENGINES: dict[str, Callable[..., RolloutEngine]] = {}


def register_engine(name: str):
    def deco(factory):
        ENGINES[name] = factory
        return factory

    return deco


def get_engine(name: str) -> Callable[..., RolloutEngine]:
    if name not in ENGINES:
        raise KeyError(f"rollout engine {name!r} is not registered; available: {sorted(ENGINES)}")
    return ENGINES[name]
