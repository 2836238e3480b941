"""Assembling a run: branches from the base checkpoint, evaluation, and the final merge."""

from __future__ import annotations

import logging

import torch

from copd_megatron.checkpoint.dist_ckpt import load_model, save_model
from copd_megatron.checkpoint.merge import merge_tensor
from copd_megatron.config.schema import Config, ConfigError
from copd_megatron.copd.branches import Branch, Source, make_source
from copd_megatron.copd.recipes import branch_names
from copd_megatron.data.prompts import PromptStream
from copd_megatron.distributed.init import set_seed
from copd_megatron.model.build import (
    build_model_chunks,
    transformer_config,
    wrap_and_optimize,
)
from copd_megatron.rollout.evaluate import evaluate
from copd_megatron.rollout.megatron_engine import MegatronEngine

logger = logging.getLogger(__name__)


def _base_chunks(cfg: Config) -> tuple[list, object]:
    """Model chunks holding the base weights (every branch starts from the same ones)."""
    tcfg = transformer_config(cfg.model, cfg.parallel, cfg.precision)
    set_seed(cfg.seed)  # identical random init everywhere when there is no base checkpoint
    chunks = build_model_chunks(cfg.model, cfg.parallel, cfg.precision, tcfg)
    if cfg.checkpoint.base is not None:
        load_model(chunks, cfg.checkpoint.base)
    return chunks, tcfg


def build_branches(cfg: Config, tokenizer, total_steps: int) -> tuple[dict[str, Branch], list[Source]]:
    from copd_megatron.copd.rlvr import derived_seed

    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} does not match the tokenizer's {tokenizer.vocab_size} "
            f"({cfg.tokenizer}); set model.vocab_size={tokenizer.vocab_size}"
        )
    sources = [make_source(cfg, i, tokenizer) for i in range(len(cfg.branches))]
    by_name = {b.name: (src, b.beta) for b, src in zip(cfg.branches, sources)}
    branches = {}
    for name in branch_names(cfg):
        chunks, tcfg = _base_chunks(cfg)
        model = wrap_and_optimize(chunks, tcfg, cfg.parallel, cfg.precision, cfg.optimizer, total_steps)
        engine = MegatronEngine(model.chunks[0], cfg.model.vocab_size, tokenizer.pad_id, tokenizer.decode)
        if name in by_name:
            src, beta = by_name[name]
            native = [(src, PromptStream(src.train, derived_seed(cfg.seed, "native", name)))]
        else:  # mixed RLVR pools every domain; the MOPD student has no native data
            beta = 1.0
            native = [(s, PromptStream(s.train, derived_seed(cfg.seed, "native", name, s.domain))) for s in sources]
            native = native if name == "mixed" else []
        branches[name] = Branch(name, model, engine, beta, native)
    return branches, sources


def eval_table(cfg: Config, tokenizer, models: dict[str, MegatronEngine], sources: list[Source]) -> dict:
    """model → domain → {pass@1, mean@n}: every model on every domain's held-out prompts."""
    from copd_megatron.utils.progress import Progress

    sets = {s.domain: (s.held_out, s.verifier) for s in sources}
    progress = Progress("evaluation", len(models), logger, unit="models", every_s=10.0,
                        enabled=torch.distributed.get_rank() == 0)  # fmt: skip
    table = {}
    for name, engine in models.items():
        table[name] = evaluate(engine, tokenizer, sets, max_new_tokens=cfg.rollout.max_new_tokens, stop=cfg.rollout.stop,
                               samples=cfg.eval.samples, temperature=cfg.eval.temperature, seed=cfg.seed)  # fmt: skip
        progress.update(note=f"{name} on {', '.join(sets)} ({sum(len(v[0]) for v in sets.values())} prompts)")
    return table


@torch.no_grad()
def merge_branches(cfg: Config, branches: dict[str, Branch], names: list[str], out_dir: str):
    """Merge ``names`` (same layout on every rank: shard-local), save, return an engine on it."""
    logger.info("merging %s (%s) into %s", names, cfg.schedule.merge, out_dir)
    chunks, _ = _base_chunks(cfg)  # starts as the base: task vectors are relative to it
    models = [[_unwrap(c) for c in branches[n].model.chunks] for n in names]
    for ci, chunk in enumerate(chunks):
        params = [dict(m[ci].named_parameters()) for m in models]
        for key, p in chunk.named_parameters():
            base = p.detach().clone()
            p.copy_(merge_tensor([ps[key] for ps in params], cfg.schedule.merge, base=base, seed=cfg.seed, key=key))
    save_model(chunks, out_dir, cfg.model, cfg.precision.params_dtype)
    logger.info("merged %s (%s) into %s", names, cfg.schedule.merge, out_dir)
    return MegatronEngine(chunks[0], cfg.model.vocab_size, branches[names[0]].engine.pad_id, branches[names[0]].engine.decode)


def _unwrap(m):
    while hasattr(m, "module"):
        m = m.module
    return m
