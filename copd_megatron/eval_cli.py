"""``copd-eval``: evaluate any checkpoint (branch, merged, baseline, base, converted) on held-out sets.

    copd-eval --checkpoint runs/demo/copd/merged --tokenizer runs/demo/base/tokenizer.model \\
        --set count=synthetic:count:4 --set sort=synthetic:sort:4 --samples 4 --out eval.json
    copd-eval --checkpoint runs/x/checkpoints/iter_0000040/math --tokenizer TOK_DIR \\
        --set math=data/math500.jsonl:math --max-new-tokens 2048
    torchrun --nproc-per-node 2 -m copd_megatron.eval_cli --tp 2 ...

A set is ``NAME=PATH.jsonl:VERIFIER`` (rows with prompt/answer, and images / video for a
vision-language checkpoint) or ``NAME=synthetic:FAMILY:LEVEL`` (visual families too). Synthetic
sets are the trainer's held-out sets: the first ``--limit`` (default ``eval.prompts_per_domain``)
prompts generated from ``--heldout-seed`` (default ``eval.seed``), so with the run's
``--max-new-tokens`` a checkpoint gets here the greedy pass@1 of its row in the run's ``eval.json``
(tested for branch, merged and converted checkpoints). Reports greedy pass@1 and, with
``--samples n > 1``, mean@n of sampled completions; prints a table, then writes JSON (``--out``).
The architecture comes from the checkpoint's ``copd_meta.yaml``. All inputs and ``--out`` are
checked before the model is built.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from copd_megatron.config.schema import ConfigError, EvalConfig, ParallelConfig, PrecisionConfig
from copd_megatron.utils.cli import OneLineParser, launcher_env_problem, report_error

logger = logging.getLogger("copd-eval")
_EVAL = EvalConfig()  # the trainer's defaults: one place for the held-out seed and size


def _parser() -> OneLineParser:
    p = OneLineParser(prog="copd-eval", description="Evaluate a torch_dist checkpoint (any kind, any layout) "
                      "on held-out sets with verifiers: greedy pass@1 and sampled mean@n.")  # fmt: skip
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint directory: a trainer branch (runs/x/checkpoints/iter_N/<branch>), merged/, a base")
    p.add_argument("--tokenizer", required=True, help="SentencePiece .model file or HF tokenizer directory")
    p.add_argument("--set", action="append", required=True, dest="sets", metavar="NAME=SPEC",
                   help="NAME=PATH.jsonl:VERIFIER or NAME=synthetic:FAMILY:LEVEL (repeat for several sets)")
    p.add_argument("--samples", type=int, default=1, help="n of mean@n (1 = greedy pass@1 only)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of mean@n")
    p.add_argument("--max-new-tokens", type=int, default=32, help="longest completion (the run's rollout.max_new_tokens)")
    p.add_argument("--stop", nargs="*", default=["\n"], help="stop strings (EOS always stops; default: newline)")
    p.add_argument("--limit", type=int, default=None,
                   help=f"first N prompts of each set (default: all of a file; {_EVAL.prompts_per_domain} synthetic "
                   "prompts, eval.prompts_per_domain)")  # fmt: skip
    p.add_argument("--heldout-seed", type=int, default=_EVAL.seed,
                   help=f"seed of the synthetic held-out sets (default {_EVAL.seed}, the trainer's eval.seed)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of mean@n (the run's seed to reproduce it)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size (world size = tp x pp, or a multiple)")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--out", type=Path, help="also write the results as JSON here (parent directories are created)")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    return p


def _synthetic_set(name: str, rest: str, limit: int | None, seed: int) -> tuple[list, str]:
    from copd_megatron.rewards import synthetic

    parts = rest.split(":")
    if len(parts) not in (2, 3):
        raise ConfigError(f"--set {name}={rest}: expected NAME=synthetic:FAMILY:LEVEL, e.g. count=synthetic:count:4")
    family, level = parts[1], parts[2] if len(parts) == 3 else "2"
    try:
        difficulty = int(level)
    except ValueError:
        raise ConfigError(f"--set {name}={rest}: LEVEL {level!r} is not an integer; expected "
                          f"{synthetic.MIN_DIFFICULTY}..{synthetic.MAX_DIFFICULTY}") from None  # fmt: skip
    synthetic.get_family(family)
    synthetic.check_difficulty(difficulty)
    n = _EVAL.prompts_per_domain if limit is None else limit
    return synthetic.generate(family, n, difficulty, seed=seed), f"synthetic_{family}"


def parse_sets(specs: list[str], limit: int | None, seed: int = _EVAL.seed, vision=None) -> dict:
    """NAME → (samples, verifier); every problem is one :class:`ConfigError` naming the spec.
    ``vision``: the checkpoint's ``model.vision`` (None: text-only); with it, rows may carry images
    and videos (checked and resolved now) and visual synthetic families are allowed."""
    from copd_megatron.data.media import load_multimodal_prompts, resolve_samples
    from copd_megatron.data.prompts import load_prompts
    from copd_megatron.rewards import synthetic
    from copd_megatron.rewards.registry import get_verifier

    sets = {}
    for spec in specs:
        name, eq, rest = spec.partition("=")
        if not eq or not name or not rest:
            raise ConfigError(f"--set {spec!r}: expected NAME=PATH:VERIFIER or NAME=synthetic:FAMILY:LEVEL")
        if name in sets:
            raise ConfigError(f"--set {spec!r}: the name {name!r} is used twice")
        if rest.startswith("synthetic:"):
            items, verifier = _synthetic_set(name, rest, limit, seed)
            family = rest.split(":")[1]
            if synthetic.get_family(family).visual and vision is None:
                raise ConfigError(f"--set {spec!r}: family {family!r} has images; the checkpoint has no model.vision")
            if vision is not None:
                items = resolve_samples(items, vision, f"synthetic:{family}")
        else:
            path, _, verifier = rest.rpartition(":")
            if not path or not verifier:
                raise ConfigError(f"--set {spec!r}: missing ':VERIFIER' after the path")
            get_verifier(verifier)  # before reading a large file
            items = load_prompts(path, domain=name)[0] if vision is None else \
                load_multimodal_prompts(path, vision, domain=name)[0]  # fmt: skip
            items = items[:limit] if limit else items
        sets[name] = (items, get_verifier(verifier))
    return sets


def _set_files(specs: list[str]) -> list[str]:
    return [s.partition("=")[2].rpartition(":")[0] for s in specs if not s.partition("=")[2].startswith("synthetic:")]


def _check_args(args) -> None:
    for flag, value, ok in (("--samples", args.samples, args.samples >= 1), ("--tp", args.tp, args.tp >= 1),
                            ("--pp", args.pp, args.pp >= 1), ("--max-new-tokens", args.max_new_tokens,
                                                              args.max_new_tokens >= 1),
                            ("--limit", args.limit, args.limit is None or args.limit >= 1)):  # fmt: skip
        if not ok:
            raise ConfigError(f"{flag}: {value}; expected a positive integer")
    if not args.temperature > 0:
        raise ConfigError(f"--temperature: {args.temperature}; expected > 0")


def main(argv: list[str] | None = None) -> int:
    from copd_megatron.checkpoint.dist_ckpt import check_weights_dir, read_meta
    from copd_megatron.config.layout import resolve_layout
    from copd_megatron.data.tokenizer import load_tokenizer
    from copd_megatron.distributed.init import destroy_distributed, init_distributed, init_model_parallel, read_dist_env, set_seed
    from copd_megatron.utils.logging import setup_logging
    from copd_megatron.utils.outputs import check_output

    args = _parser().parse_args(argv)
    problem = launcher_env_problem()
    if problem:
        return report_error("copd-eval", problem, 0)
    env = read_dist_env()
    setup_logging("INFO", env.rank)
    try:  # everything that can be wrong with the inputs, before the model is built
        _check_args(args)
        check_weights_dir(args.checkpoint, "--checkpoint")
        if args.out is not None:
            check_output(args.out, [args.checkpoint, args.tokenizer, *_set_files(args.sets)], force=args.force,
                         kind="file")  # fmt: skip
        model_cfg, dtype = read_meta(args.checkpoint)
        layout = resolve_layout(ParallelConfig(tp=args.tp, pp=args.pp), model_cfg, env.world_size)
        tok = load_tokenizer(args.tokenizer)
        if tok.vocab_size > model_cfg.vocab_size:
            raise ConfigError(f"--tokenizer: {args.tokenizer} has {tok.vocab_size} tokens, more than the "
                              f"checkpoint's vocabulary of {model_cfg.vocab_size}")  # fmt: skip
        sets = parse_sets(args.sets, args.limit, args.heldout_seed, model_cfg.vision)
        if args.out is not None and env.rank == 0:
            args.out.parent.mkdir(parents=True, exist_ok=True)  # now, not after the evaluation
    except (ConfigError, ValueError) as e:  # ValueError: data/media errors (FILE:LINE: ...)
        return report_error("copd-eval", e, env.rank)
    from copd_megatron.distributed.rendezvous import RendezvousError

    try:
        init_distributed(env)
    except RendezvousError as e:  # peers that never arrive: one line, not a traceback
        return report_error("copd-eval", e, env.rank)
    try:
        init_model_parallel(layout)
        set_seed(args.seed)
        results = _evaluate(args, model_cfg, dtype, tok, sets, env.rank == 0)
    except ConfigError as e:
        return report_error("copd-eval", e, env.rank)
    finally:
        destroy_distributed()
    if env.rank == 0:
        _print_table(results, args.samples)  # first: the numbers survive a failing write
        if args.out:
            from copd_megatron.utils.outputs import write_text_atomic

            payload = {"checkpoint": str(args.checkpoint), "heldout_seed": args.heldout_seed, "results": results}
            try:
                write_text_atomic(args.out, json.dumps(payload, indent=1))
            except OSError as e:
                return report_error("copd-eval", f"--out: cannot write {args.out} ({e.strerror})")
    return 0


def _print_table(results: dict, samples: int) -> None:
    keys = ["pass@1"] + ([f"mean@{samples}"] if samples > 1 else [])
    print("| set | n | " + " | ".join(keys) + " |\n|---|---:|" + "---:|" * len(keys))
    for name, r in results.items():
        print(f"| {name} | {r['n']} | " + " | ".join(f"{r[k]:.3f}" for k in keys) + " |")


def _evaluate(args, model_cfg, dtype, tok, sets, rank0: bool) -> dict:
    from copd_megatron.checkpoint.dist_ckpt import load_model
    from copd_megatron.distributed.groups import shared_groups
    from copd_megatron.model.provider import make_provider
    from copd_megatron.rollout.evaluate import evaluate
    from copd_megatron.rollout.megatron_engine import MegatronEngine
    from copd_megatron.utils.progress import Progress

    provider = make_provider(model_cfg, ParallelConfig(tp=args.tp, pp=args.pp), PrecisionConfig(params_dtype=dtype))
    chunks = provider.build_chunks(shared_groups())
    load_model(chunks, args.checkpoint)
    engine = MegatronEngine(chunks[0], model_cfg.vocab_size, tok.pad_id, tok.decode, provider=provider)
    total = sum(len(items) for items, _ in sets.values())
    progress = Progress("evaluation", total, logger, unit="prompts", every_s=10.0, enabled=rank0)
    results = {}
    for name, (items, verifier) in sets.items():  # one set at a time: the same numbers, visible progress
        results.update(evaluate(engine, tok, {name: (items, verifier)}, max_new_tokens=args.max_new_tokens,
                                stop=args.stop, samples=args.samples, temperature=args.temperature, seed=args.seed))
        progress.update(len(items), note=f"{name}: pass@1 {results[name]['pass@1']:.3f}")
    return results


if __name__ == "__main__":
    sys.exit(main())
