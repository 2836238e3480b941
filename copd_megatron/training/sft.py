"""Supervised fine-tuning batches: prompt + target, loss on the target tokens only.

Used to make the demo's base policy (``tools/make_base.py``): a tiny Llama-style model
trained briefly on the synthetic task families so that it solves some, not all, prompts
(the paper keeps only prompts the base sometimes solves; RLVR needs non-zero variance).
"""

from __future__ import annotations

import torch

from copd_megatron.data.tokenizer import encode_prompt
from copd_megatron.distributed.device import runtime_device
from copd_megatron.training.step import MicroBatch


def encode_pair(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of ``bos + prompt + target + eos`` and a mask that is 1 on target + eos."""
    p = encode_prompt(tokenizer, prompt)
    t = tokenizer.encode(target) + [tokenizer.eos_id]
    return p + t, [0] * len(p) + [1] * len(t)


def sft_microbatches(tokenizer, pairs: list[tuple[str, str]], micro_batch_size: int, pad_id: int) -> list[MicroBatch]:
    """Right-padded micro-batches of a fixed length (pipeline stages need equal shapes), on the
    runtime device."""
    encoded = [encode_pair(tokenizer, p, t) for p, t in pairs]
    length = max(len(ids) for ids, _ in encoded)
    tokens = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(encoded), length)
    for i, (ids, m) in enumerate(encoded):
        tokens[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    return [
        MicroBatch.from_tokens(tokens[i : i + micro_batch_size], mask[i : i + micro_batch_size]).to(runtime_device())
        for i in range(0, len(encoded), micro_batch_size)
    ]
