"""Megatron-native rollouts: batched sampling with the training model itself and a KV cache.

Prompts of different lengths are handled the way Megatron-LM's static generation does it:
the whole batch is prefilled up to the shortest prompt, then advanced one position per step
for everyone; a sequence whose prompt is not exhausted yet is fed its next prompt token
instead of a sample. No padding ever enters attention, positions are exact, and after the
prefill every step is a single-token forward against Megatron's ``StaticInferenceContext``
KV cache (``sequence_len_offset`` advances by the tokens consumed). The model runs through its
provider (``provider.forward(chunk, micro_batch, inference_context=...)``), so vision-language
models prefill with their media.

Sampling is per request: a request's k-th response token is drawn by inverse-CDF sampling with
the uniform ``counter_uniforms(seed, k)``, so its completion depends on its own seed and tokens
only — not on the batch it was put in, the data-parallel rank, or a resume.

Parallelism (on the branch's own groups). TP: each rank gets vocab-parallel logits ``[n, V/tp]``
of the last position; they are all-gathered (only ``n × V`` numbers per step) and every TP rank
samples the same tokens, then TP rank 0's choice is broadcast so ranks can never diverge. PP:
hidden states ``[s, n, h]`` go stage to stage with point-to-point send/recv; the last stage
samples and broadcasts the new tokens to the whole pipeline group. DP: each data-parallel rank
generates for its own requests. Padded vocabulary ids are never sampled.

The engine shares the trainer's module: ``update_weights`` records the version only and
``sleep``/``wake`` release nothing.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from copd_megatron.data.batch import MicroBatch
from copd_megatron.distributed.device import runtime_device
from copd_megatron.model.precision import precision_pass
from copd_megatron.model.provider import forward_of, unwrap
from copd_megatron.rollout.engine import EngineContext, register_engine
from copd_megatron.rollout.types import GenerationRequest, RolloutBatch, SamplingParams, as_requests
from copd_megatron.utils.seeds import counter_uniforms


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


def sample_tokens(logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample from ``[n, V]`` full-vocabulary logits with one U[0,1) per row (inverse CDF). Returns
    ids ``[n]`` and their log-probs under the distribution sampled from (after temperature/top-k/top-p)."""
    logits = logits.float()
    if params.greedy:
        ids = logits.argmax(-1)
        return ids, torch.log_softmax(logits, -1).gather(-1, ids[:, None]).squeeze(-1)
    logp = torch.log_softmax(_filter_logits(logits, params), dim=-1)
    cdf = logp.exp().double().cumsum(-1)
    # The first id whose CDF exceeds u·total has positive probability, and u < 1 keeps it in range.
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    ids = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp(max=logits.shape[-1] - 1)
    return ids, logp.gather(-1, ids[:, None]).squeeze(-1)


class MegatronEngine:
    """Generate with a (DDP-wrapped or bare) single-chunk Megatron model on this rank."""

    def __init__(
        self,
        model: torch.nn.Module,
        vocab_size: int,
        pad_id: int = 0,
        decode: Callable[[list[int]], str] | None = None,
        use_kv_cache: bool = True,
        *,
        provider=None,
        groups=None,
    ) -> None:
        from copd_megatron.distributed.groups import shared_groups

        self.model = model
        self.vocab_size = vocab_size  # true vocabulary: ids >= this are padding, never sampled
        self.pad_id = pad_id
        self.decode = decode  # needed for stop strings
        self.use_kv_cache = use_kv_cache
        self.forward = forward_of(provider)
        self.never_sample = list(getattr(provider, "never_sample", ()))  # e.g. image placeholder ids
        self.groups = groups if groups is not None else (shared_groups() if dist.is_initialized() else None)
        self.weight_version = 0
        self.device = runtime_device()  # token buffers, KV cache and sampling live here
        self.precision = getattr(provider, "precision", None)  # precision.generate (model/precision.py)

    # -- protocol -----------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """The engine runs the trainer's own module: nothing to load (the iterator is never read)."""
        self.weight_version = int(version)

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass

    @torch.no_grad()
    def generate(self, requests: Sequence[GenerationRequest] | Sequence[list[int]], params: SamplingParams) -> RolloutBatch:
        from megatron.core.inference.contexts import StaticInferenceContext

        requests = as_requests(requests, params)
        if not requests or any(len(r.prompt_ids) == 0 for r in requests):
            raise ValueError("generate needs a non-empty list of non-empty prompts")
        if params.stop_strings and self.decode is None:
            raise ValueError("stop strings need a decode function (pass the tokenizer's decode)")
        t0 = time.perf_counter()
        n, dev = len(requests), self.device
        host_lens = [len(r.prompt_ids) for r in requests]
        total = max(host_lens) + params.max_new_tokens
        tokens = torch.full((n, total), self.pad_id, dtype=torch.long)
        for i, r in enumerate(requests):
            tokens[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        # Every per-step tensor lives on the device; the only per-step sync is the "all done?" test.
        tokens, lens = tokens.to(dev), torch.tensor(host_lens, device=dev)
        seeds = torch.tensor([int(r.seed) for r in requests], dtype=torch.int64, device=dev)
        logprobs = torch.zeros(n, total, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        finished = torch.zeros(n, dtype=torch.bool, device=dev)
        resp_lens = torch.zeros(n, dtype=torch.long, device=dev)
        media = [r.media for r in requests]
        # Sequence parallelism splits every input over the TP ranks, and TE's linear layers fix the
        # flag when they are built: decoding keeps SP on, recomputes the prefix (no KV cache) and pads
        # it to a multiple of TP. Without SP: prefill once, then one token per step against the cache.
        sp = bool(getattr(unwrap(self.model).config, "sequence_parallel", False))
        pad = self.groups.tp_size if sp and self.groups is not None else 1
        ctx = StaticInferenceContext(n, total) if self.use_kv_cache and not sp else None
        was_training = self.model.training
        self.model.eval()
        prev, steps = 0, 0
        hook = self._output_on_last_position() if ctx is not None else None
        try:
            with precision_pass([self.model], self.precision, "generate"):
                for cur in range(min(host_lens), total):
                    start = prev if ctx is not None else 0
                    last_logits = self._forward_last(tokens[:, start:cur], start, ctx, media, pad)
                    prev, steps = cur, steps + 1
                    u = counter_uniforms(seeds, (cur - lens).clamp(min=0))  # the k-th response token's draw
                    ids, lps = self._sample_and_share(last_logits, params, u, n)
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
            if hook is not None:
                hook.remove()
            self.model.train(was_training)
        # The rollout goes to the host once: decoding, verifiers and batch bookkeeping run there.
        tokens, logprobs, resp_lens, finished = tokens.cpu(), logprobs.cpu(), resp_lens.cpu(), finished.cpu()
        lens = torch.tensor(host_lens)
        length = int((lens + resp_lens).max())
        seconds = time.perf_counter() - t0
        pos = torch.arange(length)[None, :]
        mask = ((pos >= lens[:, None]) & (pos < (lens + resp_lens)[:, None])).float()
        meta = {"decode_steps": steps, "seconds": seconds, "tokens_per_s": float(resp_lens.sum()) / max(seconds, 1e-9)}
        return RolloutBatch(tokens[:, :length], lens, resp_lens, logprobs[:, :length], mask, finished, meta,
                            self.weight_version, media)  # fmt: skip

    def _stopped(self, tokens, lens, cur, params) -> torch.Tensor:
        stop = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        if params.stop_token_ids:
            stop |= torch.isin(tokens[:, cur], torch.tensor(params.stop_token_ids, device=tokens.device))
        if params.stop_strings:  # decoding text needs the host: one copy of the rows per step
            rows, host_lens = tokens[:, : cur + 1].cpu(), lens.cpu().tolist()
            hit = [cur >= host_lens[i] and any(s in self.decode(rows[i, host_lens[i] :].tolist())
                                              for s in params.stop_strings) for i in range(len(host_lens))]  # fmt: skip
            stop |= torch.tensor(hit, dtype=torch.bool, device=tokens.device)
        return stop

    def _output_on_last_position(self):
        """Make the output layer see only the final position (a forward pre-hook; returns its handle,
        or None on stages without one). Only the last position's logits are ever sampled from, so
        the prefill then costs [n, V] logits instead of [n, s, V]: for a 32k vocabulary the output
        layer was the largest matmul of the prefill. (Megatron's own inference mode does the same
        slice, but needs ``runtime_gather_output``, which model providers do not pass.)"""
        layers = [m for name, m in unwrap(self.model).named_modules() if name.rsplit(".", 1)[-1] == "output_layer"]
        if len(layers) != 1:
            return None
        # Megatron's layout is [s, n, h]: keep the last position, as a length-1 sequence.
        return layers[0].register_forward_pre_hook(lambda module, args: (args[0][-1:], *args[1:]))

    def _forward_last(self, tokens: torch.Tensor, offset: int, ctx, media: list, pad: int = 1) -> torch.Tensor | None:
        """Run positions ``offset..offset+s`` through this rank's stage; on the last stage
        return the full-vocabulary logits of the final position ``[n, V]`` (else None). ``pad``:
        right-pad the input to a multiple of it (sequence parallelism; causal attention keeps the
        real positions' outputs exact)."""
        from megatron.core.tensor_parallel.mappings import gather_from_tensor_model_parallel_region

        g = self.groups
        n, real = tokens.shape
        if real % pad:
            tokens = torch.nn.functional.pad(tokens, (0, pad - real % pad), value=self.pad_id)
        s = tokens.shape[1]
        model = unwrap(self.model)
        first = g is None or g.is_first_stage
        last = g is None or g.is_last_stage
        if not first:
            h = model.config.hidden_size
            recv = torch.empty(s, n, h, dtype=model.config.pipeline_dtype, device=tokens.device)
            # Hidden states of the previous stage for these positions ([s, n, h], Megatron's layout).
            dist.recv(recv, src=g.pp_global(g.pp_rank - 1), group=g.pp)
            model.set_input_tensor(recv)
        mb = MicroBatch(tokens, tokens, torch.zeros(n, s, device=tokens.device), rows=n, offset=offset)
        if any(media):
            mb.fields["media"] = media
        out = self.forward(self.model, mb, inference_context=ctx)
        if ctx is not None:
            ctx.sequence_len_offset += s
        if not last:
            dist.send(out.contiguous(), dst=g.pp_global(g.pp_rank + 1), group=g.pp)
            return None
        # [n, V/tp] vocab-parallel logits of the final real position, counted from the end: the output
        # holds every position, or only the last one when the KV-cache path's hook slices it (no padding).
        logits = out[:, real - 1 - s, :].float()
        if g is not None and g.tp_size > 1:
            logits = gather_from_tensor_model_parallel_region(logits, g.tp)  # [n, V]: one position only
        logits[:, self.vocab_size :] = float("-inf")  # padded vocabulary entries
        logits[:, self.never_sample] = float("-inf")  # ids the model reserves (image placeholders)
        return logits

    def _sample_and_share(self, logits, params, uniforms, n) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.groups
        packed = torch.zeros(2, n, device=self.device)
        if logits is not None:
            ids, lps = sample_tokens(logits, params, uniforms)
            packed = torch.stack([ids.float(), lps])
        if g is not None:
            # TP rank 0's sample wins (every TP rank drew the same, this makes it certain).
            if g.tp_size > 1:
                dist.broadcast(packed, src=g.tp_global(0), group=g.tp)
            # The last pipeline stage sampled; every stage needs the tokens for the next step.
            if g.pp_size > 1:
                dist.broadcast(packed, src=g.pp_global(g.pp_size - 1), group=g.pp)
        return packed[0].long(), packed[1]


@register_engine("megatron")
def make_megatron_engine(ctx: EngineContext) -> MegatronEngine:
    """The ``megatron`` engine of one branch: its own first model chunk, provider and groups."""
    return MegatronEngine(ctx.chunks[0], ctx.model_cfg.vocab_size, ctx.tokenizer.pad_id, ctx.tokenizer.decode,
                          provider=ctx.provider, groups=ctx.groups)  # fmt: skip
