"""Images and videos as data: processing vs references, frame sampling, placeholders, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from copd_megatron.config import VisionConfig
from copd_megatron.data.media import (
    MediaError,
    encode_multimodal_prompt,
    load_media,
    load_multimodal_prompts,
    preprocess,
    sample_frame_indices,
)

ROOT = Path(__file__).resolve().parents[2]
VISION = VisionConfig(image_token_id=7, video_token_id=8, video_fps=1.0, max_frames=4, max_images=2)


class CharTokenizer:
    """One id per character (ids >= 10), BOS 1, no chat template."""

    bos_id, eos_id, pad_id, vocab_size = 1, 2, 0, 300

    def encode(self, text: str) -> list[int]:
        return [10 + ord(c) % 250 for c in text]

    def apply_chat_template(self, messages):
        return None


def _png(path: Path, arr: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path.name if path.parent.name == "" else str(path)


def _rand_image(seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_preprocess_normalises_and_resizes_like_pillow():
    arr = _rand_image(0)
    mean, std = torch.tensor(VISION.image_mean).view(3, 1, 1), torch.tensor(VISION.image_std).view(3, 1, 1)
    exact = (torch.from_numpy(arr).permute(2, 0, 1).float() / 255 - mean) / std
    torch.testing.assert_close(preprocess(arr, VISION), exact)  # no resize: the formula exactly
    big = np.kron(_rand_image(1, 24, 20), np.ones((3, 3, 1), dtype=np.uint8))  # 72x60 -> 32x32, antialiased
    ref = np.asarray(Image.fromarray(big).resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
    got = (preprocess(big, VISION) * std + mean).permute(1, 2, 0).numpy()
    assert got.shape == (32, 32, 3)
    assert np.abs(got - ref).max() < 3 / 255  # Pillow rounds to uint8; torch keeps floats
    small = _rand_image(2, 16, 8)  # upsampling a non-square image: rows and columns kept apart
    got = (preprocess(small, VISION) * std + mean).permute(1, 2, 0).numpy()
    ref = np.asarray(Image.fromarray(small).resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
    assert np.abs(got - ref).max() < 3 / 255


@pytest.mark.parametrize(
    "frames, src, dst, expected",
    [(90, 30.0, 1.0, [0, 30, 60]), (7, 2.0, 1.0, [0, 2, 4, 6]), (10, 3.0, 2.0, [0, 1, 3, 4, 6, 7, 9]),
     (5, 4.0, 4.0, [0, 1, 2, 3, 4]), (5, 1.0, 2.0, [0, 1, 2, 3, 4]), (5, None, 1.0, [0, 1, 2, 3, 4]),
     (5, 30.0, None, [0, 1, 2, 3, 4]), (91, 30.0, 10.0, list(range(0, 91, 3)))],
)  # fmt: skip
def test_frame_sampling(frames, src, dst, expected):
    assert sample_frame_indices(frames, src, dst) == expected


def _write_rows(tmp: Path, rows: list[dict]) -> Path:
    p = tmp / "data.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_rows_load_in_placeholder_order_and_expand(tmp_path):
    a, b, frames = _rand_image(3), _rand_image(4, 48, 64), [_rand_image(10 + i) for i in range(6)]
    _png(tmp_path / "img" / "a.png", a)
    np.save(tmp_path / "b.npy", b)
    for i, f in enumerate(frames):
        _png(tmp_path / "clip" / f"{i:03d}.png", f)
    np.save(tmp_path / "clip.npy", np.stack(frames))
    rows = [
        {"prompt": "Q: <video> then <image> and <image>?", "answer": "1", "domain": "v",
         "images": ["img/a.png", "b.npy"], "video": {"frames": "clip", "fps": 2}},
        {"prompt": "Q: plain text", "answer": "2", "domain": "t"},
        {"prompt": "<image>", "answer": "3", "domain": "v", "images": [a[:4, :4].tolist()]},
        {"prompt": "<video>", "answer": "4", "domain": "v", "video": "clip.npy"},  # no fps: every frame... too many
    ]
    with pytest.raises(MediaError, match=r"data.jsonl:4: video has too many frames \(6\)"):
        load_multimodal_prompts(_write_rows(tmp_path, rows), VISION)
    rows[3]["video"] = {"frames": "clip.npy", "fps": 4}  # 4 fps sampled at 1 fps: frames 0 and 4
    samples, dropped = load_multimodal_prompts(_write_rows(tmp_path, rows), VISION)
    assert dropped == 0 and [s.source.rsplit(":", 1)[1] for s in samples] == ["1", "2", "3", "4"]
    m = load_media(samples[0], VISION)
    assert m.kinds == ["frame"] * 3 + ["image", "image"]  # 6 frames at 2 fps sampled at 1 fps: 0, 2, 4
    expected = [frames[0], frames[2], frames[4], a, b]
    for got, arr in zip(m.pixels, expected):
        torch.testing.assert_close(got, preprocess(arr, VISION))
    assert load_media(samples[1], VISION) is None
    torch.testing.assert_close(load_media(samples[2], VISION).pixels[0], preprocess(a[:4, :4], VISION))
    torch.testing.assert_close(load_media(samples[3], VISION).pixels[1], preprocess(frames[4], VISION))
    ids = encode_multimodal_prompt(CharTokenizer(), samples[0], VISION)
    tok = CharTokenizer()
    T = VISION.tokens_per_image
    assert ids == [1] + tok.encode("Q: ") + [8] * 3 * T + tok.encode(" then ") + [7] * T + tok.encode(" and ") + \
        [7] * T + tok.encode("?")  # fmt: skip
    # Rows whose expanded prompt is too long are dropped and counted, as for text prompts.
    kept, dropped = load_multimodal_prompts(tmp_path / "data.jsonl", VISION, tokenizer=tok, max_prompt_tokens=2 * T)
    assert dropped == 2 and [s.answer for s in kept] == ["2", "3"]


def _error(tmp_path: Path, row: dict, files=None) -> str:
    for name, content in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    p = _write_rows(tmp_path, [{"prompt": "ok", "answer": "1", "domain": "d"}, row])
    with pytest.raises(MediaError) as e:
        load_multimodal_prompts(p, VISION, domain="d")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{p}:2: "), msg
    return msg


def test_data_errors_are_one_line_naming_file_and_line(tmp_path):
    png = tmp_path / "good.png"
    Image.fromarray(_rand_image(5)).save(png)
    whole = png.read_bytes()
    img = lambda name: {"prompt": "<image> q", "answer": "1", "images": [name]}  # noqa: E731
    assert "image file missing.png not found" in _error(tmp_path, img("missing.png"))
    assert "is unreadable or corrupt" in _error(tmp_path, img("junk.png"), {"junk.png": b"not an image at all"})
    assert "is unreadable or corrupt" in _error(tmp_path, img("cut.png"), {"cut.png": whole[: len(whole) // 2]})
    assert "unsupported type" in _error(tmp_path, img("notes.txt"), {"notes.txt": b"hello"})
    assert "integers 0..255" in _error(tmp_path, {"prompt": "<image>", "answer": "1", "images": [[[[300, 0, 0]]]]})
    assert "the prompt has 0 <image> and 0 <video> placeholders but the row has 1 images" in _error(
        tmp_path, {"prompt": "no marker", "answer": "1", "images": ["good.png"]})
    assert "the prompt has 2 <image>" in _error(tmp_path, {"prompt": "<image><image>", "answer": "1",
                                                           "images": ["good.png"]})  # fmt: skip
    assert "3 images; model.vision.max_images is 2" in _error(
        tmp_path, {"prompt": "<image>" * 3, "answer": "1", "images": ["good.png"] * 3})
    frames = {f"clip/{i}.png": whole for i in range(5)}
    msg = _error(tmp_path, {"prompt": "<video>", "answer": "1", "video": "clip"}, frames)
    assert "video has too many frames (5); model.vision.max_frames is 4" in msg
    msg = _error(tmp_path, {"prompt": "<video>", "answer": "1", "video": {"frames": "clip", "fps": 0.5}}, frames)
    assert "too many frames (5 sampled at 1 fps from 5 at 0.5 fps); model.vision.max_frames is 4" in msg
    ok = _write_rows(tmp_path, [{"prompt": "<video>", "answer": "1", "domain": "d", "video": {"frames": "clip", "fps": 2}}])
    (s,), _ = load_multimodal_prompts(ok, VISION)  # 5 frames at 2 fps sampled at 1 fps: 0, 2, 4
    assert len(s.extra["video"]["frames"]) == 3
    assert "encoded videos are not decoded here" in _error(
        tmp_path, {"prompt": "<video>", "answer": "1", "video": "movie.mp4"}, {"movie.mp4": b"x"})
    assert "video folder empty has no frame images" in _error(
        tmp_path, {"prompt": "<video>", "answer": "1", "video": "empty"}, {"empty/readme.txt": b"x"})


def test_prompt_text_that_encodes_to_a_placeholder_is_refused(tmp_path):
    class Clash(CharTokenizer):
        def encode(self, text):
            return [7 if c == "X" else 20 for c in text]

    Image.fromarray(_rand_image(6)).save(tmp_path / "a.png")
    (s,), _ = load_multimodal_prompts(_write_rows(tmp_path, [{"prompt": "<image> X?", "answer": "1",
                                                                "domain": "d", "images": ["a.png"]}]), VISION)  # fmt: skip
    with pytest.raises(MediaError, match="data.jsonl:1: the prompt text encodes to a placeholder id"):
        encode_multimodal_prompt(Clash(), s, VISION)


def _vlm_config(tmp_path: Path, data: Path) -> Path:
    from copd_megatron.data.tokenizer import load_tokenizer, train_sentencepiece

    # A real tokenizer (copd-train --check also checks it): <image> at id 4, vocabulary 300.
    tok = train_sentencepiece([f"q {i} count a in abba" for i in range(200)], tmp_path / "tok", vocab_size=300,
                              user_defined_symbols=("<image>", "<video>"))  # fmt: skip
    vocab = load_tokenizer(tok).vocab_size
    cfg = {
        "tokenizer": str(tok),
        "model": {"preset": "tiny", "arch": "llava", "vocab_size": vocab,
                  "vision": {"preset": "tiny", "image_token_id": 4, "video_token_id": 5}},
        "branches": [{"name": "img", "data": str(data), "verifier": "exact_match"},
                     {"name": "txt", "data": "synthetic:count", "verifier": "synthetic_count"}],
    }  # fmt: skip
    path = tmp_path / "vlm.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def test_cli_check_reports_a_missing_image_in_one_line(tmp_path):
    data = _write_rows(tmp_path, [{"prompt": "<image> q", "answer": "1", "images": ["nope.png"]}])
    cmd = [sys.executable, "-m", "copd_megatron.cli", str(_vlm_config(tmp_path, data)), "--check"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"copd-train: error: {data}:1: image 0: image file nope.png not found (looked for " \
                               f"{tmp_path / 'nope.png'})"  # fmt: skip
    Image.fromarray(_rand_image(7)).save(tmp_path / "nope.png")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "ok for world size 1" in r.stdout, r.stderr


def test_prompt_inputs_of_text_and_image_samples(tmp_path):
    from copd_megatron.data.media import prompt_inputs
    from copd_megatron.data.prompts import PromptSample
    from copd_megatron.data.tokenizer import encode_prompt

    tok = CharTokenizer()
    text = PromptSample("Q: 1+1=\nA:", "2", "arithmetic")
    assert prompt_inputs(tok, text) == (encode_prompt(tok, text.prompt), {})
    Image.fromarray(_rand_image(8)).save(tmp_path / "a.png")
    (img,), _ = load_multimodal_prompts(_write_rows(tmp_path, [{"prompt": "<image>?", "answer": "1", "domain": "d",
                                                                  "images": ["a.png"]}]), VISION)  # fmt: skip
    ids, media = prompt_inputs(tok, img)
    assert ids == [1] + [7] * VISION.tokens_per_image + tok.encode("?")
    torch.testing.assert_close(media["pixels"], load_media(img, VISION).pixels)


def test_sources_resolve_visual_families_and_refuse_them_without_vision():
    from copd_megatron.config import ConfigError, config_from_dict
    from copd_megatron.copd.sources import make_source

    branches = [{"name": "img", "data": "synthetic:video_change", "verifier": "synthetic_video_change"},
                {"name": "txt", "data": "synthetic:count", "verifier": "synthetic_count"}]  # fmt: skip
    vlm = config_from_dict({"model": {"preset": "tiny", "arch": "llava", "vision": {"preset": "tiny", "image_token_id": 7,
                            "video_token_id": 8, "max_frames": 6}}, "branches": branches, "tokenizer": "t"})  # fmt: skip
    src = make_source(vlm, 0)
    s = src.train[0]
    assert s.vision is vlm.model.vision and len(s.extra["video"]["frames"]) >= 3
    assert src.held_out[0].vision is vlm.model.vision and make_source(vlm, 1).train[0].vision is None
    text = config_from_dict({"model": {"preset": "tiny"}, "branches": branches, "tokenizer": "t"})
    with pytest.raises(ConfigError, match="branches.0.data: synthetic family 'video_change' has images; it needs"):
        make_source(text, 0)
