"""Assembling a run: placement, branch workers from the base checkpoint, evaluation, the final merge.

Every branch starts from the same weights (``checkpoint.base``, or the same seeded random init).
Each rank builds the workers of the branches its placement gives it, each on that branch's own
process groups, with the rollout engine named by ``rollout.engine`` (built through the registry).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch.distributed as dist

from copd_megatron.checkpoint.dist_ckpt import load_model
from copd_megatron.checkpoint.hf_export import export_hf_tensors
from copd_megatron.config.precision import token_pad_multiple
from copd_megatron.config.schema import Config, ConfigError
from copd_megatron.copd.recipes import branch_names
from copd_megatron.copd.router import Router
from copd_megatron.copd.sources import Source, make_sources, make_streams, sampling
from copd_megatron.copd.step import StepEnv
from copd_megatron.distributed.groups import Placement, build_placement
from copd_megatron.data.media import prompt_inputs
from copd_megatron.distributed.init import set_seed
from copd_megatron.model.build import wrap_and_optimize
from copd_megatron.model.provider import make_provider
from copd_megatron.rollout.engine import EngineContext, build_engine
from copd_megatron.rollout.evaluate import evaluate
from copd_megatron.rollout.megatron_engine import MegatronEngine
from copd_megatron.training.parity import parity_check
from copd_megatron.training.worker import BranchWorker, WorkerSettings

logger = logging.getLogger(__name__)


@dataclass
class Run:
    placement: Placement
    workers: dict[str, BranchWorker]  # the branches this rank holds
    sources: dict[str, Source]
    env: StepEnv


def settings(cfg: Config) -> WorkerSettings:
    return WorkerSettings(
        vocab_size=cfg.model.vocab_size, temperature=cfg.rollout.temperature,
        micro_batch_size=cfg.parallel.micro_batch_size, max_new_tokens=cfg.rollout.max_new_tokens, loss=cfg.loss,
        opd=cfg.opd, offload_weights=cfg.memory.offload_weights, offload_optimizer=cfg.memory.offload_optimizer,
        logprob_chunk_size=cfg.loss.logprob_chunk_size, pad_multiple=token_pad_multiple(cfg.precision, cfg.parallel),
    )  # fmt: skip


def betas(cfg: Config) -> dict[str, float]:
    """β of every model branch (``opd.beta`` where a branch sets none; the MOPD student: opd.beta)."""
    out = {b.name: (cfg.opd.beta if b.beta is None else b.beta) for b in cfg.branches}
    for name in ("mixed", "student"):
        out.setdefault(name, cfg.opd.beta)
    return out


def build_run(cfg: Config, tokenizer, total_steps: int) -> Run:
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} does not match the tokenizer's {tokenizer.vocab_size} "
            f"({cfg.tokenizer}); set model.vocab_size={tokenizer.vocab_size}"
        )
    sources = make_sources(cfg)
    placement = build_placement(cfg.parallel.placement, branch_names(cfg))
    workers = {}
    for name in placement.local:
        groups = placement.groups[name]
        provider = make_provider(cfg.model, cfg.parallel, cfg.precision)
        set_seed(cfg.seed)  # identical random init everywhere when there is no base checkpoint
        chunks = provider.build_chunks(groups)
        if cfg.checkpoint.base is not None:
            load_model(chunks, cfg.checkpoint.base)
        model = wrap_and_optimize(chunks, provider.tcfg, cfg.parallel, cfg.precision, cfg.optimizer, total_steps,
                                  groups, provider)  # fmt: skip
        ctx = EngineContext(cfg.model, cfg.rollout, model.chunks, provider, tokenizer, groups,
                            export_weights=partial(export_hf_tensors, model.chunks, groups, provider),
                            workdir=Path(cfg.run_dir) / "engines" / name)  # fmt: skip
        worker = BranchWorker(name, model, build_engine(cfg.rollout.engine, ctx), settings(cfg),
                              make_streams(cfg, name, sources))  # fmt: skip
        worker.deactivate()  # inactive until its first phase
        workers[name] = worker
    env = StepEnv(cfg, tokenizer, workers, Router(placement, workers), sources, betas(cfg))
    return Run(placement, workers, sources, env)


def eval_sets(sources: dict[str, Source]) -> dict:
    return {s.domain: (s.held_out, s.verifier) for s in sources.values()}


def evaluate_engine(cfg: Config, tokenizer, engine, sources: dict[str, Source], groups) -> dict:
    """domain → {pass@1, mean@n} of one model on every domain's held-out prompts."""
    return evaluate(engine, tokenizer, eval_sets(sources), max_new_tokens=cfg.rollout.max_new_tokens,
                    stop=cfg.rollout.stop, samples=cfg.eval.samples, temperature=cfg.eval.temperature,
                    seed=cfg.eval.seed, groups=groups)  # fmt: skip


def evaluate_workers(run: Run, names: list[str] | None = None) -> dict:
    """model → domain → metrics for the given branches (default: every branch), on every rank:
    each branch is evaluated on its own ranks, then the tables are shared. Progress with an ETA."""
    from copd_megatron.utils.progress import Progress

    cfg, tok = run.env.cfg, run.env.tokenizer
    mine = [n for n in run.workers if names is None or n in names]
    progress = Progress("evaluation", len(mine), logger, unit="models", every_s=10.0, enabled=dist.get_rank() == 0)
    table = {}
    for name in mine:
        w = run.workers[name]
        w.activate()
        table[name] = evaluate_engine(cfg, tok, w.engine, run.sources, w.groups)
        w.deactivate()
        progress.update(note=f"{name} on {', '.join(s.domain for s in run.sources.values())}")
    return gather_tables(table, run.placement)


def gather_tables(table: dict, placement: Placement) -> dict:
    """Union of every rank's tables (disjoint branches evaluate on their own ranks)."""
    if placement.kind != "disjoint" or not dist.is_initialized():
        return table
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, table)
    out = {}
    for p in parts:
        out.update(p)
    return {n: out[n] for n in placement.names if n in out}


def parity_prompts(sources: dict, name: str, n: int) -> list:
    """The first ``n`` held-out prompts of branch ``name``'s domain; a model branch without data of
    its own (the mixed-RLVR baseline, the MOPD student) takes every domain's in turn."""
    if name in sources:
        return sources[name].held_out[:n]
    pools = [s.held_out for s in sources.values()]
    mixed = [p[i] for i in range(max(map(len, pools), default=0)) for p in pools if i < len(p)]
    return mixed[:n]


def rollout_parity(run: Run) -> dict[str, dict]:
    """The start-up parity check of every local branch's engine (``training/parity.py``) on the
    first ``rollout.parity_prompts`` held-out prompts of its domain; branch → metrics."""
    cfg, tok = run.env.cfg, run.env.tokenizer
    n = cfg.rollout.parity_prompts
    out = {}
    for name, w in run.workers.items() if n else ():
        inputs = [prompt_inputs(tok, s) for s in parity_prompts(run.sources, name, n)]  # ids (+ images of VLM prompts)
        w.activate()
        out[name] = parity_check(w, [i for i, _ in inputs], sampling(cfg, tok), warn=cfg.rollout.parity_warn,
                                 media=[m for _, m in inputs])  # fmt: skip
        w.deactivate()
    return out


def evaluate_base(run: Run) -> dict:
    """The base (every branch before its first update) on every domain, over all data-parallel ranks."""
    cfg, tok = run.env.cfg, run.env.tokenizer
    w = next(iter(run.workers.values()))
    w.activate()
    engine = MegatronEngine(w.model.chunks[0], cfg.model.vocab_size, tok.pad_id, tok.decode, provider=w.model.provider,
                            groups=run.placement.shared)  # fmt: skip
    table = {"base": evaluate_engine(cfg, tok, engine, run.sources, run.placement.shared)}
    w.deactivate()
    return table


def merge_final(cfg: Config, inputs: list[str], out_dir: str) -> None:
    """Merge the final branch checkpoints with the same code as ``copd-merge`` (collective, all ranks)."""
    from copd_megatron.checkpoint.merge_cli import check_compatible, run_merge

    m = cfg.merge
    from copd_megatron.checkpoint.merge import NEEDS_BASE

    base = cfg.checkpoint.base if m.method in NEEDS_BASE else None  # an average reads no base
    args = SimpleNamespace(inputs=inputs, base=base, method=m.method, weights=m.weights, lam=m.lam,
                           density=m.density, drop_p=m.drop_p, seed=cfg.seed if m.seed is None else m.seed,
                           tp=cfg.parallel.tp, pp=cfg.parallel.pp, out=out_dir)  # fmt: skip
    check_compatible(inputs + ([args.base] if args.base else []))
    logger.info("merging %s (%s) into %s", [Path(i).name for i in inputs], m.method, out_dir)
    run_merge(args)
    logger.info("merged %s (%s) into %s", [Path(i).name for i in inputs], m.method, out_dir)


def evaluate_checkpoint(cfg: Config, tokenizer, ckpt_dir: str, sources: dict[str, Source], placement: Placement) -> dict:
    """A saved model (e.g. the merge) on every domain, built on the global layout."""
    shared = placement.shared
    provider = make_provider(cfg.model, cfg.parallel, cfg.precision)
    chunks = provider.build_chunks(shared)
    load_model(chunks, ckpt_dir)
    engine = MegatronEngine(chunks[0], cfg.model.vocab_size, tokenizer.pad_id, tokenizer.decode, provider=provider,
                            groups=shared)  # fmt: skip
    return evaluate_engine(cfg, tokenizer, engine, sources, shared)

