"""Typed rollout data: sampling parameters in, a padded batch of sequences out."""

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
    seed: int = 0  # sampling RNG seed (identical on every rank of a model-parallel group)


@dataclass
class RolloutBatch:
    """``n`` sequences, prompt then response, right-padded. Position ``t`` holds token ``t``."""

    tokens: torch.Tensor  # [n, L] int64 ids; pad_id after the response
    prompt_lens: torch.Tensor  # [n] int64 prompt lengths
    response_lens: torch.Tensor  # [n] int64 generated tokens (stop token included)
    logprobs: torch.Tensor  # [n, L] float32 sampler log-prob of tokens[:, t] at response positions, else 0
    response_mask: torch.Tensor  # [n, L] float32, 1 on response tokens
    finished: torch.Tensor  # [n] bool: ended by a stop token/string (False: hit max_new_tokens)
    meta: dict = field(default_factory=dict)  # timings and counts (tokens/s, steps)

    @property
    def num_sequences(self) -> int:
        return self.tokens.shape[0]

    def response_ids(self, i: int) -> list[int]:
        p, r = int(self.prompt_lens[i]), int(self.response_lens[i])
        return self.tokens[i, p : p + r].tolist()
