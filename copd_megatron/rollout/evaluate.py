"""Held-out evaluation: pass@1 (greedy) and mean@n (sampled) per domain with the verifiers.

Prompts are split over the data-parallel ranks of the evaluating model (rank r takes every dp-th
prompt) and the correct counts are summed over that group, so every rank returns the same
numbers. "pass@1" is the accuracy of the greedy completion; "mean@n" the average accuracy of n
sampled completions per prompt (the paper's AIME numbers are mean@16-style averages). Sampled
completions are seeded per (seed, domain, prompt, sample): the same numbers at any layout.
"""

from __future__ import annotations

import torch.distributed as dist

from copd_megatron.data.media import prompt_inputs
from copd_megatron.data.tokenizer import encode_prompt
from copd_megatron.distributed.device import all_reduce_values
from copd_megatron.rollout.types import GenerationRequest, SamplingParams
from copd_megatron.utils.seeds import derived_seed


def _stop_params(tokenizer, max_new_tokens: int, stop: list[str], **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_id,),
                          stop_strings=tuple(stop), **kw)  # fmt: skip


def completions(engine, tokenizer, samples: list, params: SamplingParams, encode, seeds: list[int] | None = None) -> list[str]:
    """Decoded completions (stop token removed) of ``samples`` in order."""
    if not samples:
        return []
    seeds = seeds or [0] * len(samples)
    requests = []
    for s, seed in zip(samples, seeds):
        ids, media = _inputs(tokenizer, s, encode)
        requests.append(GenerationRequest(ids, seed, media))
    batch = engine.generate(requests, params)
    out = []
    for i in range(len(samples)):
        ids = batch.response_ids(i)
        if ids and ids[-1] == tokenizer.eos_id:
            ids = ids[:-1]
        out.append(tokenizer.decode(ids))
    return out


def _inputs(tokenizer, sample, encode) -> tuple[list[int], dict]:
    """(prompt ids, media) of a request: samples with images expand their placeholders (data/media.py)."""
    if getattr(sample, "vision", None) is not None:
        ids, media = prompt_inputs(tokenizer, sample)
        return ids, media
    return encode(tokenizer, sample.prompt), {}


def _dp(groups) -> tuple[int, int, object]:
    if groups is not None:
        return groups.dp_size, groups.dp_rank, groups.dp
    if not dist.is_initialized():
        return 1, 0, None
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(), ps.get_data_parallel_group()


def evaluate(
    engine, tokenizer, eval_sets: dict[str, tuple[list, object]], *, max_new_tokens: int, stop: list[str],
    samples: int = 1, temperature: float = 1.0, seed: int = 0, encode=None, groups=None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """``eval_sets``: domain → (samples, verifier). Returns domain → {pass@1, mean@n, n}.
    ``groups``: the evaluating model's branch groups (default: Megatron's global data parallel)."""
    encode = encode or encode_prompt
    dp, rank, dp_group = _dp(groups)
    results = {}
    for domain, (items, verifier) in eval_sets.items():
        idx = list(range(rank, len(items), dp))
        mine = [items[i] for i in idx]
        greedy = completions(engine, tokenizer, mine, _stop_params(tokenizer, max_new_tokens, stop, greedy=True), encode)
        counts = [float(sum(verifier(c, s) for c, s in zip(greedy, mine))), 0.0, float(len(mine))]
        if samples > 1:
            rep = [s for s in mine for _ in range(samples)]
            seeds = [derived_seed(seed, "eval", domain, i, k) for i in idx for k in range(samples)]
            params = _stop_params(tokenizer, max_new_tokens, stop, temperature=temperature)
            sampled = completions(engine, tokenizer, rep, params, encode, seeds)
            counts[1] = float(sum(verifier(c, s) for c, s in zip(sampled, rep)))
        if dp_group is not None and dp > 1:
            counts = all_reduce_values(counts, dp_group)  # every DP rank scored different prompts
        n = max(float(counts[2]), 1.0)
        results[domain] = {"pass@1": float(counts[0]) / n, "n": int(counts[2])}
        if samples > 1:
            results[domain][f"mean@{samples}"] = float(counts[1]) / (n * samples)
    return results
