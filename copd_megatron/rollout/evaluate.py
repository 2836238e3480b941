"""Held-out evaluation: pass@1 (greedy) and mean@n (sampled) per domain with the verifiers.

Prompts are split over data-parallel ranks (rank r takes every dp-th prompt) and the
correct counts are summed over the data-parallel group, so every rank returns the same
numbers. "pass@1" is the accuracy of the greedy completion; "mean@n" the average accuracy
of n sampled completions per prompt (the paper's AIME numbers are mean@16-style averages).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from copd_megatron.data.tokenizer import encode_prompt
from copd_megatron.rollout.types import SamplingParams


def _stop_params(tokenizer, max_new_tokens: int, stop: list[str], **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, stop_token_ids=(tokenizer.eos_id,),
                          stop_strings=tuple(stop), **kw)  # fmt: skip


def completions(engine, tokenizer, samples: list, params: SamplingParams, encode) -> list[str]:
    """Decoded completions (stop token removed) of ``samples`` in order."""
    if not samples:
        return []
    if hasattr(engine, "prepare"):  # an engine with media (vlm_engine): ids with placeholders + pixels
        ids, media = engine.prepare(tokenizer, samples)
        batch = engine.generate(ids, params, media)
    else:
        batch = engine.generate([encode(tokenizer, s.prompt) for s in samples], params)
    out = []
    for i in range(len(samples)):
        ids = batch.response_ids(i)
        if ids and ids[-1] == tokenizer.eos_id:
            ids = ids[:-1]
        out.append(tokenizer.decode(ids))
    return out


def evaluate(
    engine, tokenizer, eval_sets: dict[str, tuple[list, object]], *, max_new_tokens: int, stop: list[str],
    samples: int = 1, temperature: float = 1.0, seed: int = 0, encode=None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """``eval_sets``: domain → (samples, verifier). Returns domain → {pass@1, mean@n, n}."""
    from megatron.core import parallel_state as ps

    encode = encode or encode_prompt
    dp = ps.get_data_parallel_world_size() if dist.is_initialized() else 1
    rank = ps.get_data_parallel_rank() if dist.is_initialized() else 0
    results = {}
    for domain, (items, verifier) in eval_sets.items():
        mine = items[rank::dp]
        greedy = completions(engine, tokenizer, mine, _stop_params(tokenizer, max_new_tokens, stop, greedy=True), encode)
        counts = torch.tensor([sum(verifier(c, s) for c, s in zip(greedy, mine)), 0.0, float(len(mine))],
                              dtype=torch.float64)  # fmt: skip
        if samples > 1:
            rep = [s for s in mine for _ in range(samples)]
            params = _stop_params(tokenizer, max_new_tokens, stop, temperature=temperature, seed=seed + rank)
            sampled = completions(engine, tokenizer, rep, params, encode)
            counts[1] = sum(verifier(c, s) for c, s in zip(sampled, rep))
        if dist.is_initialized() and dp > 1:
            dist.all_reduce(counts, group=ps.get_data_parallel_group())  # every DP rank scored different prompts
        n = max(float(counts[2]), 1.0)
        results[domain] = {"pass@1": float(counts[0]) / n, "n": int(counts[2])}
        if samples > 1:
            results[domain][f"mean@{samples}"] = float(counts[1]) / (n * samples)
    return results
