"""Write a synthetic visual reasoning family to disk: a JSONL of rows plus PNG images / frames.

    python tools/make_visual_data.py --family shape_count --n 2000 --difficulty 2 --seed 0 --out data/shape_count
    python tools/make_visual_data.py --family video_motion --n 500 --split 64 --out data/video_motion

writes ``OUT/train.jsonl`` (and ``OUT/eval.jsonl`` with ``--split N`` distinct held-out rows
that do not occur in the training rows) next to ``OUT/media/``: ``media/<row>_<k>.png`` for
images, ``media/<row>/<frame>.png`` folders for videos (``{"frames": "media/<row>", "fps": 1}``).
Paths in the JSONL are relative to it, so the folder can move. Deterministic in
(family, difficulty, seed). An existing OUT is refused unless ``--force``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from PIL import Image


def _write_rows(samples, out: Path, name: str) -> None:
    lines = []
    for s in samples:
        row = {"prompt": s.prompt, "answer": s.answer, "domain": s.domain, "difficulty": s.extra["difficulty"]}
        tag = f"{name}{s.index:06d}"
        if s.extra.get("images"):
            row["images"] = []
            for k, arr in enumerate(s.extra["images"]):
                Image.fromarray(arr).save(out / "media" / f"{tag}_{k}.png")
                row["images"].append(f"media/{tag}_{k}.png")
        if s.extra.get("video"):
            (out / "media" / tag).mkdir()
            for k, arr in enumerate(s.extra["video"]["frames"]):
                Image.fromarray(arr).save(out / "media" / tag / f"{k:04d}.png")
            row["video"] = {"frames": f"media/{tag}", "fps": s.extra["video"]["fps"]}
        lines.append(json.dumps(row))
    (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    from copd_megatron.config.schema import ConfigError
    from copd_megatron.rewards import synthetic

    p = argparse.ArgumentParser(prog="make_visual_data.py", description=__doc__.split("\n")[0])
    p.add_argument("--family", required=True, help=f"one of {list(synthetic.VISUAL_FAMILIES)}")
    p.add_argument("--n", type=int, default=1000, help="training rows")
    p.add_argument("--split", type=int, default=0, help="distinct held-out rows in eval.jsonl (0 = none)")
    p.add_argument("--difficulty", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    args = p.parse_args(argv)
    try:
        fam = synthetic.get_family(args.family)
        if not fam.visual:
            raise ConfigError(f"--family {args.family!r} is a text family; this tool writes visual ones")
        if args.out.exists() and not args.force:
            raise ConfigError(f"--out {args.out} exists; pass --force to replace it")
        if args.out.exists() and not (args.out / "train.jsonl").is_file():
            raise ConfigError(f"--out {args.out} exists and was not written by this tool (no train.jsonl); "
                              "refusing to replace it")  # fmt: skip
        train = synthetic.generate(args.family, args.n, args.difficulty, seed=args.seed)
        held = []
        if args.split:
            seen = {synthetic.sample_key(s) for s in train}
            held = synthetic.make_synthetic_split(args.family, args.split, args.difficulty, args.seed, exclude=seen)
    except ConfigError as e:
        print(f"make_visual_data.py: error: {e}", file=sys.stderr)
        return 2
    if args.out.exists():
        shutil.rmtree(args.out)
    (args.out / "media").mkdir(parents=True)
    _write_rows(train, args.out, "train")
    if held:
        _write_rows(held, args.out, "eval")
    print(f"{args.out}: {len(train)} training rows" + (f", {len(held)} held-out rows" if held else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
