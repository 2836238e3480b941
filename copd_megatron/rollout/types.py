"""Typed rollout data: requests and sampling parameters in, a padded batch of sequences out."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to sample completions (the same temperature must divide the trainer's logits)."""

    max_new_tokens: int = 64  # response budget per sequence
    temperature: float = 1.0  # logits are divided by this before softmax
    top_p: float = 1.0  # nucleus threshold (1.0 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    greedy: bool = False  # argmax instead of sampling (temperature/top-p/top-k ignored)
    stop_token_ids: tuple[int, ...] = ()  # generation of one of these ends a sequence (kept in the response)
    stop_strings: tuple[str, ...] = ()  # decoded response containing one of these ends a sequence
    seed: int = 0  # default seed of requests that carry none (see GenerationRequest.seed)


@dataclass
class GenerationRequest:
    """One prompt to complete.

    ``seed`` makes the request's samples a function of (seed, its own tokens) only: the same
    request gives the same completion whatever else is in the batch, on whichever data-parallel
    rank, before or after a resume. ``None`` derives one from ``SamplingParams.seed`` and the
    request's index in the batch."""

    prompt_ids: list[int]
    seed: int | None = None
    media: dict = field(default_factory=dict)  # multimodal inputs of this prompt (engine/provider specific)


def as_requests(prompts, params: SamplingParams) -> list[GenerationRequest]:
    """Requests from token lists (or requests, passed through), seeds filled in from ``params``."""
    out = []
    for i, p in enumerate(prompts):
        r = p if isinstance(p, GenerationRequest) else GenerationRequest(list(p))
        if r.seed is None:
            r = GenerationRequest(r.prompt_ids, params.seed * 1_000_003 + i, r.media)
        out.append(r)
    return out


@dataclass
class RolloutBatch:
    """``n`` sequences, prompt then response, right-padded. Position ``t`` holds token ``t``."""

    tokens: torch.Tensor  # [n, L] int64 ids; pad_id after the response
    prompt_lens: torch.Tensor  # [n] int64 prompt lengths
    response_lens: torch.Tensor  # [n] int64 generated tokens (stop token included)
    logprobs: torch.Tensor  # [n, L] float32 SAMPLER log-prob of tokens[:, t] at response positions, else 0
    response_mask: torch.Tensor  # [n, L] float32, 1 on response tokens
    finished: torch.Tensor  # [n] bool: ended by a stop token/string (False: hit max_new_tokens)
    meta: dict = field(default_factory=dict)  # timings and counts (tokens/s, steps)
    weight_version: int = 0  # the engine's weight version when it sampled (see RolloutEngine)
    media: list[dict] = field(default_factory=list)  # per row: the request's multimodal inputs

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    def response_ids(self, i: int) -> list[int]:
        p, r = int(self.prompt_lens[i]), int(self.response_lens[i])
        return self.tokens[i, p : p + r].tolist()
