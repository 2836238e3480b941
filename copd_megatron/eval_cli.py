"""``copd-eval``: evaluate any checkpoint (branch, merged, baseline) on held-out sets.

    copd-eval --checkpoint runs/demo/copd/merged --tokenizer runs/demo/base/tokenizer.model \\
        --set count=synthetic:count:4 --set sort=synthetic:sort:4 --samples 4 --out eval.json
    copd-eval --checkpoint CKPT --tokenizer TOK_DIR --set math=data/math500.jsonl:math --max-new-tokens 2048
    torchrun --nproc-per-node 2 -m copd_megatron.eval_cli --tp 2 ...

A set is ``NAME=PATH.jsonl:VERIFIER`` (rows with prompt/answer, and images / video for a
vision-language checkpoint) or ``NAME=synthetic:FAMILY:LEVEL`` (visual families too).
Reports greedy pass@1 and, with ``--samples n > 1``, mean@n of sampled completions; writes JSON
and prints a table. The architecture comes from the checkpoint's ``copd_meta.yaml``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from copd_megatron.config.schema import ConfigError, ParallelConfig, PrecisionConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="copd-eval", description="Evaluate a torch_dist checkpoint with verifiers.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--set", action="append", required=True, dest="sets", help="NAME=PATH:VERIFIER or NAME=synthetic:FAMILY:LEVEL")
    p.add_argument("--samples", type=int, default=1, help="n of mean@n (1 = greedy only)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--stop", nargs="*", default=["\n"], help="stop strings (EOS always stops)")
    p.add_argument("--limit", type=int, default=0, help="first N prompts of each set (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    return p


def parse_sets(specs: list[str], limit: int, seed: int, vision=None) -> dict:
    """``vision``: the checkpoint's ``model.vision`` (None: text-only); with it, rows may carry
    images and videos (checked and resolved now) and visual synthetic families are allowed."""
    from copd_megatron.data.media import load_multimodal_prompts, resolve_samples
    from copd_megatron.data.prompts import load_prompts
    from copd_megatron.rewards import synthetic
    from copd_megatron.rewards.registry import get_verifier

    sets = {}
    for spec in specs:
        if "=" not in spec:
            raise ConfigError(f"--set {spec!r}: expected NAME=PATH:VERIFIER or NAME=synthetic:FAMILY:LEVEL")
        name, rest = spec.split("=", 1)
        if rest.startswith("synthetic:"):
            _, family, level = (rest.split(":") + ["2"])[:3]
            if synthetic.get_family(family).visual and vision is None:
                raise ConfigError(f"--set {spec!r}: family {family!r} has images; the checkpoint has no model.vision")
            items, verifier = synthetic.generate(family, limit or 64, int(level), seed=seed), f"synthetic_{family}"
            if vision is not None:
                items = resolve_samples(items, vision, f"synthetic:{family}")
        else:
            path, _, verifier = rest.rpartition(":")
            if not path:
                raise ConfigError(f"--set {spec!r}: missing ':VERIFIER' after the path")
            items = load_prompts(path, domain=name)[0] if vision is None else \
                load_multimodal_prompts(path, vision, domain=name)[0]  # fmt: skip
        sets[name] = (items[:limit] if limit else items, get_verifier(verifier))
    return sets


def main(argv: list[str] | None = None) -> int:
    from copd_megatron.checkpoint.dist_ckpt import load_model, read_meta
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.data.tokenizer import load_tokenizer
    from copd_megatron.distributed.init import destroy_distributed, init_distributed, init_model_parallel, read_dist_env, set_seed
    from copd_megatron.utils.logging import setup_logging

    args = _parser().parse_args(argv)
    env = read_dist_env()
    setup_logging("WARNING", env.rank)
    try:
        model_cfg, dtype = read_meta(args.checkpoint)
        layout = resolve_layout(ParallelConfig(tp=args.tp, pp=args.pp), model_cfg, env.world_size)
        tok = load_tokenizer(args.tokenizer)
        sets = parse_sets(args.sets, args.limit, args.seed, model_cfg.vision)
    except (ConfigError, ValueError) as e:
        print(f"copd-eval: error: {e}", file=sys.stderr)
        return 2
    init_distributed(env)
    try:
        init_model_parallel(layout)
        set_seed(args.seed)
        results = _evaluate(args, model_cfg, dtype, tok, sets, load_model)
    finally:
        destroy_distributed()
    if env.rank == 0:
        if args.out:
            args.out.write_text(json.dumps({"checkpoint": args.checkpoint, "results": results}, indent=1))
        keys = ["pass@1"] + ([f"mean@{args.samples}"] if args.samples > 1 else [])
        print("| set | n | " + " | ".join(keys) + " |\n|---|---:|" + "---:|" * len(keys))
        for name, r in results.items():
            print(f"| {name} | {r['n']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")
    return 0


def _evaluate(args, model_cfg, dtype, tok, sets, load_model) -> dict:
    from copd_megatron.distributed.groups import shared_groups
    from copd_megatron.model.provider import make_provider
    from copd_megatron.rollout.evaluate import evaluate
    from copd_megatron.rollout.megatron_engine import MegatronEngine

    provider = make_provider(model_cfg, ParallelConfig(tp=args.tp, pp=args.pp), PrecisionConfig(params_dtype=dtype))
    chunks = provider.build_chunks(shared_groups())
    load_model(chunks, args.checkpoint)
    engine = MegatronEngine(chunks[0], model_cfg.vocab_size, tok.pad_id, tok.decode, provider=provider)
    return evaluate(engine, tok, sets, max_new_tokens=args.max_new_tokens, stop=args.stop, samples=args.samples,
                    temperature=args.temperature, seed=args.seed)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
