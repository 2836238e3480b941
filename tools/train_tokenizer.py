"""Train a small SentencePiece tokenizer: digits split one per token, byte fallback on.

    .venv/bin/python tools/train_tokenizer.py --synthetic 2000 --model-prefix runs/tok/tokenizer --vocab-size 320
    .venv/bin/python tools/train_tokenizer.py --input corpus.txt more.txt --model-prefix runs/tok/tokenizer

``--input`` files are read as UTF-8 text, one training sentence per line. ``--synthetic N``
adds N SFT documents ("Q: 12+7=\\nA: 19\\n") per synthetic task family (see
``copd_megatron/rewards/synthetic.py``), so a demo tokenizer covers the demo's tasks.
Writes ``<prefix>.model`` and ``<prefix>.vocab``; prints the model path and a round-trip check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from copd_megatron.config.schema import ConfigError
from copd_megatron.data.tokenizer import load_tokenizer, train_sentencepiece
from copd_megatron.rewards.synthetic import FAMILIES, generate, sft_document


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", nargs="*", default=[], help="UTF-8 text files (one sentence per line)")
    p.add_argument("--synthetic", type=int, default=0, metavar="N", help="add N documents per synthetic family")
    p.add_argument("--families", nargs="+", default=list(FAMILIES), help="synthetic families to include")
    p.add_argument("--difficulty", type=int, default=3, help="synthetic difficulty (1..5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic documents")
    p.add_argument("--model-prefix", required=True, help="output path without extension")
    p.add_argument("--vocab-size", type=int, default=320, help="> 260: byte fallback takes 256 ids + 4 specials")
    p.add_argument("--character-coverage", type=float, default=1.0)
    return p


def corpus(args: argparse.Namespace) -> list[str]:
    texts = []
    for name in args.input:
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"--input: {path} is not a file")
        texts.append(path.read_text(encoding="utf-8"))
    for family in args.families:
        texts += [sft_document(s) for s in generate(family, args.synthetic, args.difficulty, seed=args.seed)]
    if not any(t.strip() for t in texts):
        raise ConfigError("no training text: give --input files and/or --synthetic N > 0")
    return texts


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        model = train_sentencepiece(corpus(args), args.model_prefix, args.vocab_size, args.character_coverage)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tok = load_tokenizer(model)
    sample = "Q: 123+45=\nA: 168\n"
    ids = tok.encode(sample)
    print(f"wrote {model} (vocab {tok.vocab_size}); {sample!r} -> {len(ids)} tokens, "
          f"round trip {'ok' if tok.decode(ids) == sample else 'DIFFERS'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
