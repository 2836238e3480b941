"""Synthetic visual tasks: every answer agrees with what an independent reader sees in the pixels;
generation is deterministic per seed; verifiers are registered; the offline writer round-trips."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from copd_megatron.config import VisionConfig
from copd_megatron.data.media import load_media, load_multimodal_prompts, preprocess
from copd_megatron.rewards import synthetic
from copd_megatron.rewards.registry import get_verifier
from copd_megatron.rewards.visual import COLOURS, VISUAL_MAKERS

ROOT = Path(__file__).resolve().parents[2]
NAMES = {rgb: name for name, rgb in COLOURS.items()}
SQUARE = np.zeros((8, 8), dtype=bool)
SQUARE[1:7, 1:7] = True


def read(img: np.ndarray) -> dict[tuple[int, int], tuple[str, bool]]:
    """Cell (row, col) → (colour name, is a square), read from the pixels alone."""
    out = {}
    for r in range(4):
        for c in range(4):
            cell = img[8 * r : 8 * r + 8, 8 * c : 8 * c + 8].reshape(-1, 3)
            lit = [tuple(int(v) for v in px) for px in cell if tuple(px) in NAMES]
            if lit:
                mask = np.array([tuple(px) in NAMES for px in cell]).reshape(8, 8)
                out[(r, c)] = (NAMES[lit[0]], bool((mask == SQUARE).all()))
    return out


def answer_from_pixels(sample) -> str:
    q = sample.prompt
    if sample.domain == "shape_count":
        colour = q.split("how many ")[1].split()[0]
        return str(sum(v[0] == colour for v in read(sample.extra["images"][0]).values()))
    if sample.domain == "shape_position":
        colour = q.split("is the ")[1].split()[0]
        (r, c), = [k for k, v in read(sample.extra["images"][0]).items() if v[0] == colour]
        return ("top" if r < 2 else "bottom") if "top or bottom" in q else ("left" if c < 2 else "right")
    if sample.domain == "shape_compare":
        a, b = q.split("more ")[1].split("?")[0].split(" or ")
        seen = [v[0] for v in read(sample.extra["images"][0]).values()]
        assert seen.count(a) != seen.count(b)
        return a if seen.count(a) > seen.count(b) else b
    if sample.domain == "shape_sum":
        return str(sum(len(read(img)) for img in sample.extra["images"]))
    frames = [read(f) for f in sample.extra["video"]["frames"]]
    if sample.domain == "video_order":
        (first,) = frames[0].values()
        assert all(len(b) == len(a) + 1 for a, b in zip(frames, frames[1:]))  # one new shape per frame
        return first[0]
    if sample.domain == "video_change":
        squares = [[v[0] for v in f.values() if v[1]] for f in frames]
        assert all(len(s) == 1 for s in squares) and squares[0] != squares[-1]
        return squares[-1][0]
    moved = [k for k in frames[0] if k not in frames[-1]]  # the mover's start cell
    (start,) = moved
    (end,) = [k for k in frames[-1] if k not in frames[0]]
    dr, dc = end[0] - start[0], end[1] - start[1]
    return {(0, 1): "right", (0, -1): "left", (1, 0): "down", (-1, 0): "up"}[(int(np.sign(dr)), int(np.sign(dc)))]


@pytest.mark.parametrize("family", sorted(VISUAL_MAKERS))
def test_answers_match_the_pixels_and_generation_is_deterministic(family):
    verifier = get_verifier(f"synthetic_{family}")
    for difficulty in (1, 3, 5):
        samples = synthetic.generate(family, 60, difficulty, seed=4)
        again = synthetic.generate(family, 60, difficulty, seed=4)
        other = synthetic.generate(family, 60, difficulty, seed=5)
        assert [synthetic.sample_key(s) for s in samples] == [synthetic.sample_key(s) for s in again]
        assert [synthetic.sample_key(s) for s in samples] != [synthetic.sample_key(s) for s in other]
        for s in samples:
            assert answer_from_pixels(s) == s.answer, (family, difficulty, s.prompt)
            assert verifier(f" {s.answer}\nmore", s) == 1.0 and verifier(" nope\n", s) == 0.0
        assert len({s.answer for s in samples}) >= 2  # not a constant answer


def test_held_out_split_is_distinct_and_disjoint():
    train = synthetic.generate("video_motion", 200, 2, seed=0)
    seen = {synthetic.sample_key(s) for s in train}
    held = synthetic.make_synthetic_split("video_motion", 32, 2, seed=1, exclude=seen)
    keys = [synthetic.sample_key(s) for s in held]
    assert len(set(keys)) == 32 and not set(keys) & seen


def test_offline_writer_round_trips_through_the_media_loader(tmp_path):
    out = tmp_path / "sum"
    cmd = [sys.executable, "tools/make_visual_data.py", "--family", "shape_sum", "--n", "5", "--split", "3",
           "--seed", "2", "--out", str(out)]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().endswith("exists; pass --force to replace it")
    vision = VisionConfig(image_token_id=7)
    rows, _ = load_multimodal_prompts(out / "train.jsonl", vision)
    generated = synthetic.generate("shape_sum", 5, 2, seed=2)
    for row, gen in zip(rows, generated):
        assert (row.prompt, row.answer) == (gen.prompt, gen.answer)
        expected = np.stack([preprocess(a, vision).numpy() for a in gen.extra["images"]])
        np.testing.assert_array_equal(load_media(row, vision).pixels.numpy(), expected)  # PNG is lossless
    assert len((out / "eval.jsonl").read_text().splitlines()) == 3
    video = tmp_path / "motion"
    subprocess.run([sys.executable, "tools/make_visual_data.py", "--family", "video_motion", "--n", "2", "--out",
                    str(video)], check=True, capture_output=True, cwd=ROOT, timeout=120)  # fmt: skip
    row = json.loads((video / "train.jsonl").read_text().splitlines()[0])
    assert row["video"]["fps"] == 1.0 and (video / row["video"]["frames"]).is_dir()
    (s, _), _ = load_multimodal_prompts(video / "train.jsonl", VisionConfig(image_token_id=7, video_fps=1.0))
    gen = synthetic.generate("video_motion", 1, 2, seed=0)[0]
    assert load_media(s, vision).kinds == ["frame"] * len(gen.extra["video"]["frames"])
