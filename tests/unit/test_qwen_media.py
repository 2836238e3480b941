"""The Qwen-VL image processor (``data/qwen_media.py``) against transformers' own (the PIL backend of
``Qwen2VLImageProcessor``, which Qwen2.5-VL and Qwen3-VL share for images), and the placeholder blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from copd_megatron.config import config_from_dict
from copd_megatron.data import qwen_media

pil_qwen = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl",
                               reason="needs transformers (pip install .[hf])")  # fmt: skip

IDS = {"image_token_id": 4, "video_token_id": 5, "vision_start_token_id": 6, "vision_end_token_id": 7,
       "mrope_section": [4, 2, 2]}  # fmt: skip


def _vision(arch: str, **extra):
    preset = {"qwen3_vl": "qwen3-vl-tiny", "qwen2_5_vl": "qwen2.5-vl-tiny"}[arch]
    model = {"preset": "tiny", "arch": arch, "vocab_size": 320, "vision": {"preset": preset, **IDS, **extra}}
    return config_from_dict({"schedule": {"mode": "smoke"}, "model": model}).model.vision


def _reference(v, **kw):
    return pil_qwen.Qwen2VLImageProcessorPil(patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                                             merge_size=v.spatial_merge_size, min_pixels=v.min_pixels,
                                             max_pixels=v.max_pixels, image_mean=v.image_mean, image_std=v.image_std,
                                             **kw)  # fmt: skip


def _smooth(shape, seed=0) -> np.ndarray:
    x = np.cumsum(np.cumsum(np.random.default_rng(seed).random(shape), 0), 1)
    return (x / x.max() * 255).astype(np.uint8)


@pytest.mark.parametrize("bounds", [(64, 1024), (3136, 12845056), (65536, 16777216)])
def test_smart_resize_equals_transformers(bounds):
    lo, hi = bounds
    for factor in (8, 28, 32):
        for h in range(factor // 2, 3000, 97):
            for w in range(factor // 2, 3000, 89):
                try:
                    want = tuple(pil_qwen.smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi))
                except ValueError:  # an aspect ratio above 200: refused by both
                    with pytest.raises(ValueError, match="aspect ratio"):
                        qwen_media.smart_resize(h, w, factor, lo, hi)
                    continue
                assert qwen_media.smart_resize(h, w, factor, lo, hi) == want, (h, w, factor, bounds)
    with pytest.raises(ValueError, match="aspect ratio"):
        qwen_media.smart_resize(10, 2500, 8, lo, hi)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_patches_equal_the_hf_processor_exactly_without_resampling(arch):
    """An image whose sides are multiples of patch·merge: same rows, same order, same values."""
    v = _vision(arch)
    img = np.random.default_rng(1).integers(0, 256, (32, 24, 3), dtype=np.uint8)
    ref = _reference(v)(images=[img], do_resize=False, return_tensors="pt")
    patches, grid = qwen_media.image_patches(img, v)
    assert grid == tuple(ref["image_grid_thw"][0].tolist()) == (1, 8, 6)
    torch.testing.assert_close(patches, torch.as_tensor(ref["pixel_values"]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(50, 37, 3), (20, 70, 3), (9, 9, 3), (40, 40, 3)])
def test_resized_patches_equal_the_hf_processor_to_its_uint8_rounding(shape):
    """Other sizes are resized (bicubic) to the same grid; PIL resamples uint8 and rounds, we stay in
    float: the values differ by at most ~1/255 before normalisation."""
    v = _vision("qwen3_vl")
    img = _smooth(shape)
    ref = _reference(v)(images=[img], return_tensors="pt")
    patches, grid = qwen_media.image_patches(img, v)
    assert grid == tuple(ref["image_grid_thw"][0].tolist())
    diff = (patches - torch.as_tensor(ref["pixel_values"])).abs()
    assert diff.max() <= 2.5 / 255 / 0.5 and diff.mean() < 1.0 / 255 / 0.5, (diff.max(), diff.mean())


class _Tok:
    def encode(self, text: str) -> list[int]:
        return [100 + ord(c) % 50 for c in text]


def test_placeholder_blocks_per_arch():
    """Images: start, t·h·w/m² pads, end. Qwen3-VL videos: one block per temporal patch after its
    timestamp text; Qwen2.5-VL videos: one block."""
    q3, q25 = _vision("qwen3_vl"), _vision("qwen2_5_vl")
    assert qwen_media.placeholder_ids(_Tok(), "image", (1, 8, 6), [], q3, "qwen3_vl") == [6] + [4] * 12 + [7]
    times = [0.5, 2.5]
    ids = qwen_media.placeholder_ids(_Tok(), "video", (2, 4, 4), times, q3, "qwen3_vl")
    block = [6] + [5] * 4 + [7]
    assert ids == _Tok().encode("<0.5 seconds>") + block + _Tok().encode("<2.5 seconds>") + block
    assert qwen_media.placeholder_ids(_Tok(), "video", (2, 4, 4), times, q25, "qwen2_5_vl") == [6] + [5] * 8 + [7]


def test_video_frames_pad_to_temporal_patches_and_timestamps():
    v = _vision("qwen3_vl")
    frames = [_smooth((32, 32, 3), seed=k) for k in range(3)]
    patches, grid = qwen_media.video_patches(frames, v)
    assert grid == (2, 8, 8) and patches.shape == (2 * 64, v.patch_features)
    # The last temporal patch repeats frame 2: its two frame slices are equal.
    last = patches[64:].view(64, 3, 2, v.patch_size, v.patch_size)
    torch.testing.assert_close(last[:, :, 0], last[:, :, 1])
    times, span = qwen_media.patch_times([0, 2, 4], source_fps=2.0, vision=v)  # frames 0, 1, 2 s; fps 1 sampled
    assert times == [0.5, 2.0] and span == 2.0
