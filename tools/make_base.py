"""Make the demo's base policy: a SentencePiece tokenizer and a tiny Llama-style Megatron model
SFT-trained briefly on synthetic task families, so it solves some but not all prompts.

    .venv/bin/python tools/make_base.py --out runs/demo/base --preset testbed   # the demo's base, <1 min
    .venv/bin/python tools/make_base.py --out runs/base                       # ~2 min on 2 CPU cores
    .venv/bin/python tools/make_base.py --out runs/base --families arithmetic reverse --steps 300
    # a vision-language base (LLaVA-style: tiny CLIP ViT + projector + the same language model)
    .venv/bin/python tools/make_base.py --out runs/vlm_base --vision tiny --families count shape_count video_motion
    # a tiny Qwen3-VL base (Qwen ViT with DeepStack taps + a language model with mRoPE)
    .venv/bin/python tools/make_base.py --out runs/qwen_vl_base --vision qwen3-vl-tiny --families count shape_count

``--preset testbed`` is the base of ``configs/demo_cpu.yaml`` (docs/testbed.md): families
``asc`` and ``desc``, SFT stopped mid-learning at a constant learning rate so that its sampled
pass@1 (T = 1) is about 1/3 and its greedy pass@1 about 60% on both; flags given explicitly
override the preset's values.

Writes ``<out>/tokenizer.model``, ``<out>/checkpoint`` (torch_dist, loadable at any TP/PP) and
``<out>/base.json`` with the held-out pass@1 per family. With ``--vision PRESET`` the tokenizer
reserves ``<image>`` and ``<video>`` (their ids become ``model.vision.image_token_id`` /
``video_token_id``; a Qwen-VL preset, ``qwen3-vl-tiny`` or ``qwen2.5-vl-tiny``, also reserves
``<|vision_start|>`` and ``<|vision_end|>``), the model gets a vision tower, and visual families (``shape_count``,
``video_motion``, ...) may be mixed with text ones. ``<out>`` is built in a hidden sibling and
renamed into place at the end; a non-empty ``<out>`` is replaced only with ``--force``. RLVR needs prompts the base sometimes
solves (the paper filters out pass rates of 0% and 100%); the defaults aim at 10-70% per family.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch

from copd_megatron.config import ConfigError, config_from_dict, validate
from copd_megatron.config.vision import PRESET_ARCH, QWEN_VL_ARCHS
from copd_megatron.data.tokenizer import load_tokenizer, train_sentencepiece
from copd_megatron.rewards.registry import get_verifier
from copd_megatron.rewards.synthetic import generate, get_family, sft_text
from copd_megatron.utils.cli import OneLineParser, doc_summary, report_error
from copd_megatron.utils.progress import Progress

logger = logging.getLogger("make_base")


# Chosen by tools/sweep_testbed.py (docs/testbed.md).
PRESETS = {
    "testbed": {"families": ["asc", "desc"], "difficulty": ["4"], "steps": 125, "lr": 1e-3, "lr_schedule": "constant",
                "vocab_size": 280, "eval_prompts": 200, "eval_samples": 8,
                "model": ["model.num_layers=4", "model.hidden_size=128", "model.ffn_hidden_size=352"]},
}  # fmt: skip


def _parser() -> OneLineParser:
    p = OneLineParser(prog="make_base.py", description=doc_summary(__doc__))
    p.add_argument("--out", required=True, help="output directory (new or empty; see --force)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named set of defaults (explicit flags win)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--families", nargs="+", default=["arithmetic", "reverse", "count", "sort"])
    p.add_argument("--difficulty", nargs="+", default=["2"],
                   help="one level for all families, or family=level items (e.g. arithmetic=1 reverse=4)")
    p.add_argument("--steps", type=int, default=250, help="SFT optimizer steps")
    p.add_argument("--batch", type=int, default=32, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                   help="constant stops SFT mid-learning (greedy not yet saturated); cosine anneals to lr/10")
    p.add_argument("--vocab-size", type=int, default=320, help="> 259: byte fallback needs 256 ids")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--eval-seed", type=int, default=12345,
                   help="seed of the held-out prompts (12345 = the trainer's eval.seed default: the same test set)")
    p.add_argument("--eval-samples", type=int, default=1,
                   help="n of the sampled mean@n (temperature 1) reported beside greedy pass@1 (1 = greedy only)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="also evaluate every N SFT steps (log only): where the learning curve crosses 20-50%%")
    p.add_argument("--model", nargs="*", default=[], help="model.* overrides, e.g. model.num_layers=4")
    p.add_argument("--vision", default=None,
                   help="vision preset (tiny, qwen3-vl-tiny, qwen2.5-vl-tiny): make a vision-language base")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = _parser()
    known, _ = p.parse_known_args(argv)
    if known.preset:
        p.set_defaults(**PRESETS[known.preset])
    return p.parse_args(argv)


def levels(families: list[str], spec: list[str]) -> dict[str, int]:
    """Difficulty per family from ``["2"]`` or ``["arithmetic=1", "reverse=4"]`` (others: 2)."""
    if len(spec) == 1 and spec[0].isdigit():
        return {f: int(spec[0]) for f in families}
    table = dict(item.split("=", 1) for item in spec)
    return {f: int(table.get(f, 2)) for f in families}


def build_tokenizer(out: Path, difficulty: dict[str, int], vocab_size: int, seed: int, symbols: tuple[str, ...] = ()):
    texts = []
    for fam, level in difficulty.items():
        for s in generate(fam, 3000 if not get_family(fam).visual else 300, level, seed=seed + 100):
            prompt, target = sft_text(s)
            texts.append(prompt + target)
    model = train_sentencepiece(texts, out / "tokenizer", vocab_size=vocab_size, user_defined_symbols=symbols)
    return load_tokenizer(model)


QWEN_SYMBOLS = ("<|vision_start|>", "<|vision_end|>")


def _symbols(vision: str | None) -> tuple[str, ...]:
    """Tokenizer symbols a vision base reserves (one id each): the prompt markers, and Qwen's block delimiters."""
    if not vision:
        return ()
    return ("<image>", "<video>") + (QWEN_SYMBOLS if PRESET_ARCH.get(vision) in QWEN_VL_ARCHS else ())


def _model_section(args, tok) -> dict:
    model = {"preset": "tiny", "vocab_size": tok.vocab_size, "seq_length": 64}
    if args.vision:
        ids = [tok.encode(marker)[0] for marker in _symbols(args.vision)]  # user-defined symbols: one id each
        model["seq_length"] = 160  # a 6-frame video is 96 placeholders at the tiny llava preset (Qwen: ~80)
        model["arch"] = PRESET_ARCH.get(args.vision, "llava")
        model["vision"] = {"preset": args.vision, "image_token_id": ids[0], "video_token_id": ids[1],
                           "video_fps": 1.0, "max_frames": 8}  # fmt: skip
        if model["arch"] in QWEN_VL_ARCHS:  # the tiny LM's head dim is 16: 8 rotary frequencies over (t, h, w)
            model["vision"].update(vision_start_token_id=ids[2], vision_end_token_id=ids[3], mrope_section=[4, 2, 2])
    return model


def _batches(tok, cfg, samples, pad_id):
    """SFT micro-batches of ``samples`` (text rows, or rows with images with a vision model)."""
    from copd_megatron.training.media_batches import sft_media_microbatches
    from copd_megatron.training.sft import sft_microbatches

    mbs = cfg.parallel.micro_batch_size
    if cfg.model.vision is None:
        return sft_microbatches(tok, [sft_text(s) for s in samples], mbs, pad_id)
    return sft_media_microbatches(tok, samples, [sft_text(s)[1] for s in samples], mbs, pad_id)


def _samples(cfg, family: str, n: int, level: int, seed: int) -> list:
    """``n`` samples of ``family``; with a vision model, their media checked and frames sampled."""
    samples = generate(family, n, level, seed=seed)
    if cfg.model.vision is not None:
        from copd_megatron.data.media import resolve_samples

        samples = resolve_samples(samples, cfg.model.vision, f"synthetic:{family}")
    return samples


def make_base(args, out: Path | None = None) -> dict:
    """Build the base into ``out`` (default ``args.out``; the summary names ``args.out``)."""
    from megatron.core import parallel_state as ps

    from copd_megatron.checkpoint.dist_ckpt import save_model
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.distributed.groups import shared_groups
    from copd_megatron.model.build import wrap_and_optimize
    from copd_megatron.model.provider import make_provider
    from copd_megatron.rollout.evaluate import evaluate
    from copd_megatron.rollout.megatron_engine import MegatronEngine
    from copd_megatron.training.step import train_step

    final, out = Path(args.out), Path(out or args.out)
    out.mkdir(parents=True, exist_ok=True)
    difficulty = levels(args.families, args.difficulty)
    tok = build_tokenizer(out, difficulty, args.vocab_size, args.seed, _symbols(args.vision))
    cfg = config_from_dict({
        "seed": args.seed, "schedule": {"mode": "smoke"}, "precision": {"params_dtype": "fp32"},
        "model": _model_section(args, tok),
        "optimizer": {"lr": args.lr, "lr_schedule": args.lr_schedule, "min_lr": args.lr / 10, "warmup_steps": 10,
                      "weight_decay": 0.0},
        "parallel": {"micro_batch_size": args.batch},
    }, args.model)  # fmt: skip
    layout = validate(cfg, torch.distributed.get_world_size())
    init_model_parallel(layout)
    set_seed(cfg.seed)
    provider, groups = make_provider(cfg.model, cfg.parallel, cfg.precision), shared_groups()
    chunks = provider.build_chunks(groups)
    branch = wrap_and_optimize(chunks, provider.tcfg, cfg.parallel, cfg.precision, cfg.optimizer, args.steps, groups,
                               provider)  # fmt: skip
    per_family = max(1, args.batch // len(args.families))
    pools = {f: _samples(cfg, f, per_family * args.steps, difficulty[f], args.seed) for f in args.families}
    engine = MegatronEngine(branch.chunks[0], cfg.model.vocab_size, pad_id=tok.pad_id, decode=tok.decode,
                            provider=provider, groups=groups)  # fmt: skip
    held_out = {f: (_samples(cfg, f, args.eval_prompts, difficulty[f], args.eval_seed),
                    get_verifier(f"synthetic_{f}")) for f in args.families}  # fmt: skip

    def score() -> dict:
        return evaluate(engine, tok, held_out, max_new_tokens=12, stop=["\n"], samples=args.eval_samples,
                        temperature=1.0, seed=args.seed)  # fmt: skip

    progress = Progress("sft", args.steps, logger, unit="steps", every_s=10.0, enabled=torch.distributed.get_rank() == 0)
    for step in range(args.steps):
        batch = [s for f in args.families for s in pools[f][step * per_family : (step + 1) * per_family]]
        mine = batch[ps.get_data_parallel_rank() :: layout.dp]  # this data-parallel rank's share
        res = train_step(branch, _batches(tok, cfg, mine, tok.pad_id))
        progress.update(note=f"loss {res.loss:.4f}")
        if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            logger.info("sft step %d held-out: %s", step + 1, _brief(score()))
    scores = score()
    logger.info("sft step %d held-out: %s", args.steps, _brief(scores))
    save_model([c.module for c in branch.chunks], out / "checkpoint", cfg.model, "fp32")
    summary = {"tokenizer": str(final / "tokenizer.model"), "checkpoint": str(final / "checkpoint"),
               "vocab_size": tok.vocab_size, "difficulty": difficulty, "model": dataclasses.asdict(cfg.model),
               "pass@1": {f: v["pass@1"] for f, v in scores.items()},
               **({f"mean@{args.eval_samples}": {f: v[f"mean@{args.eval_samples}"] for f, v in scores.items()}}
                  if args.eval_samples > 1 else {})}  # fmt: skip
    if torch.distributed.get_rank() == 0:
        (out / "base.json").write_text(json.dumps(summary, indent=1))
    return summary


def _brief(scores: dict) -> str:
    return " | ".join(f"{f} " + " ".join(f"{k} {v:.2f}" for k, v in r.items() if k != "n") for f, r in scores.items())


def main(argv: list[str] | None = None) -> int:
    from copd_megatron.distributed.init import destroy_distributed, init_distributed, read_dist_env
    from copd_megatron.utils.logging import setup_logging
    from copd_megatron.utils.outputs import check_output, staged_dir

    args = parse_args(argv)
    try:
        visual = [f for f in args.families if get_family(f).visual]
        if visual and not args.vision:
            raise ConfigError(f"--families {visual} have images; add --vision tiny for a vision-language base")
    except ConfigError as e:
        print(f"make_base.py: error: {e}", file=sys.stderr)
        return 2
    env = read_dist_env()
    setup_logging("INFO", env.rank)
    try:
        check_output(args.out, [], force=args.force)
    except ConfigError as e:
        return report_error("make_base.py", e, env.rank)
    from copd_megatron.distributed.rendezvous import RendezvousError

    try:
        init_distributed(env)
    except RendezvousError as e:  # peers that never arrive: one line, not a traceback
        return report_error("make_base.py", e, env.rank)
    try:
        with staged_dir(args.out) as stage:  # a killed run leaves no half-built base under --out
            summary = make_base(args, stage)
    finally:
        destroy_distributed()
    if env.rank == 0:
        sampled = next((k for k in summary if k.startswith("mean@")), None)
        print("| family | base greedy pass@1 |" + (f" base sampled {sampled} (T=1) |" if sampled else "")
              + "\n|---|---:|" + ("---:|" if sampled else ""))  # fmt: skip
        for fam, v in summary["pass@1"].items():
            print(f"| {fam} | {v:.2f} |" + (f" {summary[sampled][fam]:.2f} |" if sampled else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
