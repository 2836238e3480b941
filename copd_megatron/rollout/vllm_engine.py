"""vLLM rollouts behind the engine protocol, fed with the trainer's live weights (the only module
that imports vLLM; it is imported only when ``rollout.engine: vllm`` is asked for).

Placement. One vLLM instance per model-parallel group (TP×PP ranks of one data-parallel
replica), held by the group's first rank. Every rank of the group calls ``generate`` with the
same requests (as with the Megatron engine); the first rank runs vLLM and broadcasts the
:class:`RolloutBatch` to the others. vLLM's own ``tensor_parallel_size`` is independent of the
trainer's TP. vLLM runs in its own processes (the engine core), so its CUDA/CPU state never
mixes with the trainer's (the in-process engine does not run under our CPU compatibility layer).

Weights. The engine starts from the branch's current weights (``export_weights()`` written once
as an HF safetensors directory, plus a config.json made from the model config; no tokenizer:
token ids in, token ids out). After every update ``update_weights(named_tensors, version)``
streams the new HF-named tensors, packed into buckets of ``rollout.vllm.sync_bucket_mb``, to a
worker extension that runs vLLM's layerwise in-place reload (``initialize_layerwise_reload`` →
``model.load_weights`` per bucket → ``finalize_layerwise_reload``), which re-packs the kernels'
weight layouts (a bare ``load_weights`` is not enough: on CPU the linear weights are repacked and
the original parameters emptied). The prefix cache is reset after every load. Every tensor is
checked against the model's HF names and shapes as it arrives: an unknown, repeated or mis-shaped
tensor, or a stream that ends before every tensor came, is a *refused* partial update — the
stream is still drained (it is a collective over the trainer's model-parallel group), the
version does not advance, ``update_weights`` raises, and ``generate`` refuses until a complete
update succeeds (a partially reloaded vLLM layer would hold garbage).

Several branches. ``rollout.vllm.share_across_branches: false`` builds one instance per branch
(K× the memory, each update streamed at once); ``true`` builds one instance per model-parallel
group that all branches share: an update of the branch whose weights are loaded is streamed at
once, any other is recorded and its weights are streamed (``export_weights()`` again) the next
time that branch generates — one full load per switch of branch.

Sampling semantics are the Megatron engine's: temperature, then top-k, then top-p; greedy is
argmax; ``stop_token_ids`` end a sequence and are kept; a stop string ends it at the first token
whose decoded response contains it (checked here after generation, since vLLM has no tokenizer);
``max_new_tokens``; one seed per request, so a request's sample depends on its seed only. The
returned log-probs are vLLM's ``processed_logprobs``: the log-probability of the sampled token
under the distribution actually sampled from (after temperature / top-k / top-p; greedy: the
raw log-softmax), the same quantity the Megatron engine returns.

Sleep. On GPU ``sleep()`` puts vLLM to sleep (``rollout.vllm.sleep_level``) and ``wake()`` wakes
it; an update that arrives while asleep first wakes the weights only. On CPU vLLM has no sleep
mode, so both are no-ops (the engine keeps its memory while the trainer trains).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as dist

from copd_megatron.rollout.engine import EngineContext, register_engine
from copd_megatron.rollout.types import GenerationRequest, RolloutBatch, SamplingParams, as_requests

logger = logging.getLogger(__name__)

_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_EXTENSION = "copd_megatron.rollout.vllm_engine.WeightSyncExtension"


class PartialWeightUpdateError(ValueError):
    """``update_weights`` received an incomplete or inconsistent set of tensors (refused)."""


# ----------------------------------------------------------------------------- inside vLLM's worker


class WeightSyncExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); called through ``collective_rpc``.

    Buckets arrive as safetensors bytes (plain bytes cross vLLM's process boundary without
    insecure serialisation) and are loaded inside one layerwise-reload session."""

    def copd_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.get_model())
        self._copd_loaded = set()

    def copd_load_bucket(self, blob: bytes) -> int:
        from safetensors.torch import load
        from vllm.config import set_current_vllm_config

        tensors = load(blob)
        with set_current_vllm_config(self.vllm_config):
            loaded = self.model_runner.get_model().load_weights(iter(tensors.items()))
        self._copd_loaded |= set(loaded or ())
        return len(tensors)

    def copd_finish_update(self) -> list[str]:
        """Finalise the reload (re-pack kernels); returns vLLM parameters that got nothing."""
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        runner = self.model_runner
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(runner.get_model(), self.vllm_config.model_config)
        for reset in ("reset_lora_state", "reset_encoder_cache", "reset_mm_cache"):
            if hasattr(runner, reset):
                getattr(runner, reset)()
        names = {n for n, _ in runner.get_model().named_parameters()}
        return sorted(names - self._copd_loaded)


# ----------------------------------------------------------------------------- the driver side


@dataclass
class _Slot:
    """One vLLM instance of a model-parallel group; ``llm`` only on the group's first rank.
    The bookkeeping (who is loaded, sleep state) is kept identically on every rank, so every rank
    takes the same decisions about when to iterate an export (a collective)."""

    llm: Any = None
    holder: tuple[int, int] | None = None  # (engine id, weight version) currently loaded
    state: str = "awake"  # "awake" | "asleep" | "weights" (weights woken for a sync, KV cache not)
    sleep_ok: bool = False
    workdir: Path | None = None
    own_workdir: bool = False
    engines: list = field(default_factory=list)


_SHARED: dict[tuple, _Slot] = {}
_NEXT_ID = [0]


def _import_vllm():
    """``import vllm`` in the trainer process without its side effect on ``torch.cuda``.

    vLLM sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` at import, which makes ``torch.cuda.is_available()``
    answer ``device_count() > 0``; under our CPU compatibility layer (``device_count`` answers 1)
    the trainer would then believe it has a GPU (torch's optimizers ask CUDA for streams). vLLM's
    own processes set it again when they import vLLM."""
    before = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    import vllm

    if before is None:
        os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    else:
        os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = before
    return vllm


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _first_rank(group) -> int:
    return dist.get_global_rank(group, 0) if _group_size(group) > 1 else (dist.get_rank() if dist.is_initialized() else 0)


def _is_first(group) -> bool:
    return _group_size(group) == 1 or dist.get_rank(group) == 0


def _stop_index(ids: list[int], decode, stops: Sequence[str]) -> int | None:
    """First position i such that the decoded ``ids[:i+1]`` contains a stop string."""
    for i in range(len(ids)):
        text = decode(ids[: i + 1])
        if any(s in text for s in stops):
            return i
    return None


class VLLMEngine:
    """The rollout engine of one branch on this rank (see the module docstring)."""

    def __init__(self, ctx: EngineContext, slot: _Slot, shared: bool) -> None:
        self.ctx, self.slot, self.shared = ctx, slot, shared
        self.cfg = ctx.rollout_cfg.vllm
        self.mp = getattr(ctx.groups, "mp", None)
        self.owner = _is_first(self.mp)
        self.id = _NEXT_ID[0] = _NEXT_ID[0] + 1
        self.weight_version = 0
        self.stale: str | None = None  # why generate refuses (a refused partial update), else None
        self.pad_id = getattr(ctx.tokenizer, "pad_id", 0) if ctx.tokenizer is not None else 0
        self.sync_seconds: list[float] = []  # wall time of every weight load (for the benchmark)
        slot.engines.append(self)

    # -- protocol -----------------------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest] | Sequence[list[int]], params: SamplingParams) -> RolloutBatch:
        reqs = as_requests(requests, params)
        if not reqs or any(len(r.prompt_ids) == 0 for r in reqs):
            raise ValueError("generate needs a non-empty list of non-empty prompts")
        if self.stale:
            raise RuntimeError(f"vLLM engine refuses to generate: {self.stale}")
        if params.stop_strings and (self.ctx.tokenizer is None or not hasattr(self.ctx.tokenizer, "decode")):
            raise ValueError("stop strings need a tokenizer with decode in the engine context")
        if self.slot.holder != (self.id, self.weight_version):
            if self.ctx.export_weights is None:
                raise RuntimeError("a shared vLLM engine needs export_weights to swap this branch's weights in")
            self._load(self.ctx.export_weights())  # another branch's weights are loaded: swap
            self.slot.holder = (self.id, self.weight_version)
        self.wake()
        box = [self._generate_here(reqs, params) if self.owner else None]
        if _group_size(self.mp) > 1:
            # Only the first rank ran vLLM; the whole model-parallel group needs the same batch.
            dist.broadcast_object_list(box, src=_first_rank(self.mp), group=self.mp)
        batch = box[0]
        batch.weight_version = self.weight_version
        return batch

    def score(self, sequences: Sequence[list[int]]) -> torch.Tensor:
        """vLLM's log-probs of given token sequences ``[n, L]`` (right-padded with 0): position ``t``
        holds log π(token_t | tokens_<t), position 0 holds 0 (the parity check's fixed batch)."""
        if self.stale:
            raise RuntimeError(f"vLLM engine refuses to score: {self.stale}")
        box = [self._score_here(sequences) if self.owner else None]
        if _group_size(self.mp) > 1:
            dist.broadcast_object_list(box, src=_first_rank(self.mp), group=self.mp)
        return box[0]

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if version <= self.weight_version:
            raise ValueError(f"update_weights: version {version} does not advance the engine's {self.weight_version}")
        if self.shared and self.slot.holder is not None and self.slot.holder[0] != self.id:
            # Another branch is loaded: this branch's weights are streamed when it next generates.
            # Nothing of the stream is consumed, on every rank alike (no collective runs).
            self.weight_version, self.stale = version, None
            return
        self._load(named_tensors)
        self.weight_version = version
        self.slot.holder = (self.id, version)

    def sleep(self) -> None:
        if self.slot.sleep_ok and self.slot.state == "awake":
            if self.owner:
                self.slot.llm.reset_prefix_cache()
                self.slot.llm.sleep(level=self.cfg.sleep_level)
            self.slot.state = "asleep"

    def wake(self) -> None:
        if self.slot.sleep_ok and self.slot.state != "awake":
            if self.owner:
                self.slot.llm.wake_up(None if self.slot.state == "asleep" else ["kv_cache"])
            self.slot.state = "awake"

    def close(self) -> None:
        """Shut vLLM down once the last engine on its instance is closed (idempotent)."""
        if self in self.slot.engines:
            self.slot.engines.remove(self)
        if self.slot.engines or self.slot.llm is None:
            return
        _shutdown(self.slot)
        for key, slot in list(_SHARED.items()):
            if slot is self.slot:
                del _SHARED[key]

    # -- weights ------------------------------------------------------------------------------

    def _load(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Stream a full set of HF tensors into vLLM (refusing partial sets, see module doc)."""
        from copd_megatron.checkpoint.hf import hf_shapes

        t0 = time.perf_counter()
        expected = hf_shapes(self.ctx.model_cfg)
        seen: set[str] = set()
        problem: str | None = None
        llm = self.slot.llm if self.owner else None
        if llm is not None:
            if self.slot.sleep_ok and self.slot.state == "asleep":
                llm.wake_up(["weights"])  # the KV cache stays released until wake()
                self.slot.state = "weights"
            llm.collective_rpc("copd_begin_update")
        bucket, size, cap = {}, 0, self.cfg.sync_bucket_mb * 2**20
        for name, tensor in named_tensors:  # drained to the end on every rank: each item is a collective
            if problem is None:
                problem = _check_tensor(name, tensor, expected, seen)
            seen.add(name)
            if llm is None or problem is not None:
                continue
            bucket[name] = tensor.detach().cpu().contiguous()
            size += tensor.numel() * tensor.element_size()
            if size >= cap:
                _send(llm, bucket)
                bucket, size = {}, 0
        if problem is None and len(seen) < len(expected):
            missing = sorted(set(expected) - seen)
            problem = f"{len(missing)} of {len(expected)} tensors missing, e.g. {missing[0]}"
        if llm is not None:
            if bucket and problem is None:
                _send(llm, bucket)
            unloaded = llm.collective_rpc("copd_finish_update")[0]
            llm.reset_prefix_cache()
            if problem is None and unloaded:
                problem = f"vLLM parameters got no weights, e.g. {unloaded[0]}"
        self.sync_seconds.append(time.perf_counter() - t0)
        if problem is not None:
            self.stale = f"a partial weight update was refused ({problem}); send a complete update"
            self.slot.holder = None
            raise PartialWeightUpdateError(f"update_weights refused: {problem}")
        self.stale = None

    # -- sampling -----------------------------------------------------------------------------

    def _score_here(self, sequences: Sequence[list[int]]) -> torch.Tensor:
        VSamplingParams = _import_vllm().SamplingParams
        from vllm.inputs import TokensPrompt

        params = VSamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
        outputs = self.slot.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                         use_tqdm=False)  # fmt: skip
        out = torch.zeros(len(sequences), max(len(s) for s in sequences))
        for i, (seq, o) in enumerate(zip(sequences, outputs, strict=True)):
            for t in range(1, len(seq)):
                out[i, t] = o.prompt_logprobs[t][seq[t]].logprob
        return out

    def _generate_here(self, reqs: list[GenerationRequest], params: SamplingParams) -> RolloutBatch:
        VSamplingParams = _import_vllm().SamplingParams
        from vllm.inputs import TokensPrompt

        t0 = time.perf_counter()
        common = dict(max_tokens=params.max_new_tokens, logprobs=0, ignore_eos=True, detokenize=False,
                      stop_token_ids=list(params.stop_token_ids))  # fmt: skip
        if params.greedy:
            sampling = [VSamplingParams(temperature=0.0, **common) for _ in reqs]
        else:
            sampling = [VSamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                        seed=r.seed, **common) for r in reqs]  # fmt: skip
        prompts = [TokensPrompt(prompt_token_ids=list(r.prompt_ids)) for r in reqs]
        outputs = self.slot.llm.generate(prompts, sampling, use_tqdm=False)
        rows = []
        for r, out in zip(reqs, outputs, strict=True):
            c = out.outputs[0]
            ids = list(c.token_ids)
            # logprobs=0 asks for the sampled token's log-prob only: one {id: Logprob} per position.
            lps = [float(lp[t].logprob) for lp, t in zip(c.logprobs, ids, strict=True)]
            finished = bool(ids) and ids[-1] in params.stop_token_ids
            if params.stop_strings:
                cut = _stop_index(ids, self.ctx.tokenizer.decode, params.stop_strings)
                if cut is not None and (not finished or cut < len(ids) - 1):
                    ids, lps, finished = ids[: cut + 1], lps[: cut + 1], True
            rows.append((list(r.prompt_ids), ids, lps, finished))
        seconds = time.perf_counter() - t0
        return _assemble(rows, self.pad_id, seconds, [r.media for r in reqs])


def _check_tensor(name: str, tensor: torch.Tensor, expected: dict, seen: set) -> str | None:
    if name not in expected:
        return f"unknown tensor {name!r}"
    if name in seen:
        return f"tensor {name!r} sent twice"
    if tuple(tensor.shape) != tuple(expected[name]):
        return f"{name} has shape {tuple(tensor.shape)}, the model has {tuple(expected[name])}"
    return None


def _send(llm, bucket: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    llm.collective_rpc("copd_load_bucket", args=(save(bucket),))


def _assemble(rows: list, pad_id: int, seconds: float, media: list) -> RolloutBatch:
    """A right-padded RolloutBatch from (prompt, response ids, response log-probs, finished) rows."""
    n = len(rows)
    length = max(len(p) + len(ids) for p, ids, _, _ in rows)
    tokens = torch.full((n, length), pad_id, dtype=torch.long)
    logprobs = torch.zeros(n, length)
    mask = torch.zeros(n, length)
    for i, (p, ids, lps, _) in enumerate(rows):
        tokens[i, : len(p) + len(ids)] = torch.tensor(p + ids, dtype=torch.long)
        logprobs[i, len(p) : len(p) + len(ids)] = torch.tensor(lps, dtype=torch.float32)
        mask[i, len(p) : len(p) + len(ids)] = 1.0
    prompt_lens = torch.tensor([len(p) for p, *_ in rows], dtype=torch.long)
    response_lens = torch.tensor([len(ids) for _, ids, _, _ in rows], dtype=torch.long)
    finished = torch.tensor([f for *_, f in rows], dtype=torch.bool)
    meta = {"seconds": seconds, "tokens_per_s": float(response_lens.sum()) / max(seconds, 1e-9)}
    return RolloutBatch(tokens, prompt_lens, response_lens, logprobs, mask, finished, meta, 0, media)


# ----------------------------------------------------------------------------- building


def _write_hf_dir(ctx: EngineContext, out: Path, write: bool) -> str:
    """Stream ``export_weights()`` into an HF directory (every rank iterates; one writes)."""
    from copd_megatron.checkpoint.convert import ShardedSafetensorsWriter
    from copd_megatron.checkpoint.hf import hf_config_from_model

    dtype = None
    writer = None
    for name, tensor in ctx.export_weights():
        if dtype is None:
            dtype = tensor.dtype
            if write:
                out.mkdir(parents=True, exist_ok=True)
                writer = ShardedSafetensorsWriter(out, 2**30, dtype)
        if writer is not None:
            writer.add(name, tensor)
    if dtype not in _DTYPES:
        raise ValueError(f"vLLM engine: parameters of dtype {dtype} are not supported (fp32, bf16, fp16)")
    if writer is not None:
        writer.close()
        cfg = hf_config_from_model(ctx.model_cfg)
        cfg["torch_dtype"] = _DTYPES[dtype]
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return _DTYPES[dtype]


def _start_llm(hf_dir: Path, dtype: str, ctx: EngineContext, sleep_ok: bool):
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # vLLM names its processes with setproctitle, which by default overwrites the processes'
    # environment block: a job's cleanup that finds its processes by an environment variable (our
    # tests' reaper; some cluster tools) would then miss an engine whose trainer was killed.
    os.environ.setdefault("SPT_NOENV", "1")
    LLM = _import_vllm().LLM

    cfg = ctx.rollout_cfg.vllm
    kw: dict[str, Any] = {}
    if torch.cuda.is_available() and cfg.gpu_memory_utilization > 0:
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    else:
        kw["kv_cache_memory_bytes"] = int(cfg.kv_cache_gb * 2**30)
    if cfg.tensor_parallel_size == 1:
        kw["distributed_executor_backend"] = "uni"  # the worker lives in the engine-core process
    return LLM(
        model=str(hf_dir), dtype=dtype, skip_tokenizer_init=True, seed=0, enforce_eager=cfg.enforce_eager,
        logprobs_mode="processed_logprobs", max_model_len=ctx.model_cfg.seq_length, max_num_seqs=cfg.max_num_seqs,
        tensor_parallel_size=cfg.tensor_parallel_size, enable_prefix_caching=cfg.enable_prefix_caching,
        enable_sleep_mode=sleep_ok, worker_extension_cls=_EXTENSION, **kw,
    )  # fmt: skip


def _sleep_available(cfg) -> bool:
    if cfg.sleep_level == 0 or not torch.cuda.is_available():
        return False
    _import_vllm()
    from vllm.platforms import current_platform

    return bool(current_platform.is_sleep_mode_available())


def _new_slot(ctx: EngineContext) -> _Slot:
    if ctx.export_weights is None:
        raise ValueError("the vLLM engine needs export_weights in its EngineContext (HF tensors of the branch)")
    mp = getattr(ctx.groups, "mp", None)
    owner = _is_first(mp)
    slot = _Slot(sleep_ok=_sleep_available(ctx.rollout_cfg.vllm))
    if owner:
        if ctx.workdir is not None:
            slot.workdir = Path(ctx.workdir)
            slot.workdir.mkdir(parents=True, exist_ok=True)
        else:
            slot.workdir, slot.own_workdir = Path(tempfile.mkdtemp(prefix="copd_vllm_")), True
    hf_dir = slot.workdir / "hf_init" if owner else None
    t0 = time.perf_counter()
    dtype = _write_hf_dir(ctx, hf_dir, owner) if owner else _write_hf_dir(ctx, Path("."), False)
    if owner:
        slot.llm = _start_llm(hf_dir, dtype, ctx, slot.sleep_ok)
        shutil.rmtree(hf_dir, ignore_errors=True)  # loaded: the engine never reads it again
        logger.info("vLLM engine up in %.1fs (%s, %s)", time.perf_counter() - t0, dtype, slot.workdir)
    if _group_size(mp) > 1:
        dist.barrier(group=mp)  # the other ranks wait for the engine before their first collective
    return slot


def _shutdown(slot: _Slot) -> None:
    llm, slot.llm = slot.llm, None
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception as e:  # noqa: BLE001 - best effort at exit
        logger.warning("vLLM shutdown: %s", e)
    if slot.own_workdir and slot.workdir is not None:
        shutil.rmtree(slot.workdir, ignore_errors=True)


@register_engine("vllm")
def make_vllm_engine(ctx: EngineContext) -> VLLMEngine:
    """One engine per branch, or a handle on the instance shared by this rank's branches."""
    shared = ctx.rollout_cfg.vllm.share_across_branches
    if not shared:
        slot = _new_slot(ctx)
    else:
        key = (repr(ctx.model_cfg), id(getattr(ctx.groups, "mp", None)))
        if key not in _SHARED:
            _SHARED[key] = _new_slot(ctx)
        slot = _SHARED[key]
    engine = VLLMEngine(ctx, slot, shared)
    if slot.holder is None:
        slot.holder = (engine.id, 0)  # the instance was built from this branch's weights
    return engine
