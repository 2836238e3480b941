"""Megatron-native rollouts: batched sampling with the training model itself and a KV cache.

Prompts of different lengths are handled the way Megatron-LM's static generation does it:
the whole batch is prefilled up to the shortest prompt, then advanced one position per step
for everyone; a sequence whose prompt is not exhausted yet is fed its next prompt token
instead of a sample. No padding ever enters attention, positions are exact, and after the
prefill every step is a single-token forward against Megatron's ``StaticInferenceContext``
KV cache (``sequence_len_offset`` advances by the tokens consumed).

Parallelism. TP: each rank gets vocab-parallel logits ``[n, V/tp]`` of the last position;
they are all-gathered (only ``n × V`` numbers per step) and every TP rank samples with the
same seeded generator, then TP rank 0's choice is broadcast so ranks can never diverge.
PP: hidden states ``[s, n, h]`` go stage to stage with point-to-point send/recv; the last
stage samples and broadcasts the new tokens to the whole pipeline group. DP: each
data-parallel rank generates for its own prompts. Padded vocabulary ids are never sampled.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist

from copd_megatron.rollout.engine import register_engine
from copd_megatron.rollout.types import RolloutBatch, SamplingParams


def _filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) masking; masked entries become -inf."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (keeps >= 1 token).
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_tokens(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from ``[n, V]`` full-vocabulary logits. Returns ids ``[n]`` and their log-probs
    under the distribution actually sampled from (after temperature / top-k / top-p)."""
    logits = logits.float()
    if params.greedy:
        ids = logits.argmax(-1)
        return ids, torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)
    logp = torch.log_softmax(_filter_logits(logits, params), dim=-1)
    ids = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


class MegatronEngine:
    """Generate with a (DDP-wrapped or bare) single-chunk Megatron GPTModel on this rank."""

    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int,
        pad_id: int = 0,
        decode: Callable[[list[int]], str] | None = None,
        use_kv_cache: bool = True,
    ) -> None:
        self.model = model
        self.vocab_size = vocab_size  # true vocabulary: ids >= this are padding, never sampled
        self.pad_id = pad_id
        self.decode = decode  # needed for stop strings
        self.use_kv_cache = use_kv_cache

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> RolloutBatch:
        from megatron.core.inference.contexts import StaticInferenceContext

        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs a non-empty list of non-empty prompts")
        if params.stop_strings and self.decode is None:
            raise ValueError("stop strings need a decode function (pass the tokenizer's decode)")
        t0 = time.perf_counter()
        n = len(prompts)
        lens = torch.tensor([len(p) for p in prompts])
        total = int(lens.max()) + params.max_new_tokens
        tokens = torch.full((n, total), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p)
        logprobs = torch.zeros(n, total)
        done = torch.zeros(n, dtype=torch.bool)
        finished = torch.zeros(n, dtype=torch.bool)
        resp_lens = torch.zeros(n, dtype=torch.long)
        gen = torch.Generator().manual_seed(params.seed)
        ctx = StaticInferenceContext(n, total) if self.use_kv_cache else None
        was_training, sp = self.model.training, self._set_sequence_parallel(False)
        self.model.eval()
        prev, steps = 0, 0
        try:
            for cur in range(int(lens.min()), total):
                start = prev if ctx is not None else 0
                last_logits = self._forward_last(tokens[:, start:cur], start, ctx)
                prev, steps = cur, steps + 1
                ids, lps = self._sample_and_share(last_logits, params, gen, n)
                generating = (lens <= cur) & ~done  # position `cur` is a response position
                tokens[:, cur] = torch.where(generating, ids, torch.where(lens <= cur, self.pad_id, tokens[:, cur]))
                logprobs[:, cur] = torch.where(generating, lps, 0.0)
                resp_lens += generating.long()
                stopped = generating & self._stopped(tokens, lens, cur, params)
                finished |= stopped
                done |= stopped | (generating & (cur + 1 - lens >= params.max_new_tokens))
                if bool(done.all()):
                    break
        finally:
            self.model.train(was_training)
            self._set_sequence_parallel(sp)
        length = int((lens + resp_lens).max())
        seconds = time.perf_counter() - t0
        pos = torch.arange(length)[None, :]
        mask = ((pos >= lens[:, None]) & (pos < (lens + resp_lens)[:, None])).float()
        meta = {"decode_steps": steps, "seconds": seconds, "tokens_per_s": float(resp_lens.sum()) / max(seconds, 1e-9)}
        return RolloutBatch(tokens[:, :length], lens, resp_lens, logprobs[:, :length], mask, finished, meta)

    def _stopped(self, tokens, lens, cur, params) -> torch.Tensor:
        stop = torch.zeros(tokens.shape[0], dtype=torch.bool)
        if params.stop_token_ids:
            stop |= torch.isin(tokens[:, cur], torch.tensor(params.stop_token_ids))
        if params.stop_strings:
            for i in range(tokens.shape[0]):
                if cur >= lens[i]:
                    text = self.decode(tokens[i, lens[i] : cur + 1].tolist())
                    stop[i] |= any(s in text for s in params.stop_strings)
        return stop

    def _set_sequence_parallel(self, value: bool) -> bool:
        """Decoding one token cannot be sequence-sharded: switch SP off while generating."""
        config = _unwrap(self.model).config
        old, config.sequence_parallel = config.sequence_parallel, value
        return old

    def _forward_last(self, tokens: torch.Tensor, offset: int, ctx) -> torch.Tensor | None:
        """Run positions ``offset..offset+s`` through this rank's stage; on the last stage
        return the full-vocabulary logits of the final position ``[n, V]`` (else None)."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import (
            gather_from_tensor_model_parallel_region,
        )

        n, s = tokens.shape
        model = _unwrap(self.model)
        positions = torch.arange(offset, offset + s)[None, :].expand(n, -1)
        if not ps.is_pipeline_first_stage(ignore_virtual=True):
            h = model.config.hidden_size
            recv = torch.empty(s, n, h, dtype=model.config.pipeline_dtype)
            # Hidden states of the previous stage for these positions ([s, n, h], Megatron's layout).
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(recv)
        gathered = ctx is not None
        if gathered:
            # Megatron's inference mode makes the model apply the output layer to the last position
            # only (StaticInferenceContext materialises only last-token logits): the prefill then
            # costs [n, V] logits instead of [n, s, V], the largest matmul for a big vocabulary.
            # The model all-gathers those logits over TP itself (runtime_gather_output).
            from megatron.core.inference.utils import InferenceMode

            with InferenceMode.active():
                out = self.model(tokens, positions, None, inference_context=ctx, runtime_gather_output=True)
        else:
            out = self.model(tokens, positions, None, inference_context=ctx)
        if ctx is not None:
            ctx.sequence_len_offset += s
        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        last = out[:, -1, :].float()  # [n, V] (gathered) or [n, V/tp] vocab-parallel logits of the final position
        full = last if gathered else gather_from_tensor_model_parallel_region(last)  # [n, V]: one position only
        full[:, self.vocab_size :] = float("-inf")  # padded vocabulary entries
        return full

    def _sample_and_share(self, logits, params, gen, n) -> tuple[torch.Tensor, torch.Tensor]:
        from megatron.core import parallel_state as ps

        packed = torch.zeros(2, n)
        if logits is not None:
            ids, lps = sample_tokens(logits, params, gen)
            packed = torch.stack([ids.float(), lps])
        # (Groups of one rank are skipped: a broadcast costs a few ms per step even there.)
        if dist.is_initialized() and ps.get_tensor_model_parallel_world_size() > 1:
            # TP rank 0's sample wins (every TP rank drew the same, this makes it certain).
            dist.broadcast(packed, src=ps.get_tensor_model_parallel_src_rank(), group=ps.get_tensor_model_parallel_group())
        if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
            # The last pipeline stage sampled; every stage needs the tokens for the next step.
            dist.broadcast(packed, src=ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
        return packed[0].long(), packed[1]


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


@register_engine("megatron")
def make_megatron_engine(model, vocab_size: int, pad_id: int = 0, decode=None, use_kv_cache: bool = True):
    return MegatronEngine(model, vocab_size, pad_id, decode, use_kv_cache)
