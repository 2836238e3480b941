"""The Qwen-VL image / video processor: images at their own resolution, cut into temporal patches.

For ``model.arch`` ``qwen3_vl`` / ``qwen2_5_vl`` (the LLaVA path, one fixed image size, is
``data/media.py``; reading files, frame sampling and the one-line data errors are shared).
With P = ``patch_size``, m = ``spatial_merge_size``, Tp = ``temporal_patch_size`` and the
factor f = P·m:

* **smart resize** (the formula of Qwen's processor): round H and W to multiples of f; if
  the area exceeds ``max_pixels``, scale both sides by √(HW / max_pixels) and floor to f; if
  it is below ``min_pixels``, scale up by √(min_pixels / HW) and ceil to f. Aspect ratios
  above 200 are refused. Resampling is bicubic with antialiasing, clamped to [0, 1];
* **normalise**: ``(x − image_mean) / image_std`` per RGB channel;
* **temporal patches**: a still image is repeated Tp times; a video's frames (sampled at
  ``video_fps``, all resized like its first frame, bounded by ``video_max_pixels``) are padded
  to a multiple of Tp by repeating the last frame;
* **patchify**: a clip of T = t·Tp frames ``[T, C, H, W]`` becomes ``t·h·w`` rows of
  ``C·Tp·P·P`` values (h = H/P, w = W/P), in merge-block order: frame group, block row, block
  column, row in block, column in block; each row's values ordered (channel, frame, pixel
  row, pixel column). Its ``grid_thw`` is (t, h, w); it covers t·h·w / m² language-model tokens.

Placeholders (``placeholder_ids``): an image is ``<|vision_start|>`` + h·w/m² × ``<|image_pad|>``
+ ``<|vision_end|>``. A Qwen3-VL video writes every temporal patch as its own block after a text
timestamp, ``<{s:.1f} seconds>``, s the mean time of the patch's first and last frame (time
reaches Qwen3-VL through text only); a Qwen2.5-VL video is one block of t·h·w/m² ``<|video_pad|>``
and its mRoPE temporal ids step by ``tokens_per_second`` · Tp / fps (``seconds`` per patch).

The media of one prompt travel as one dict (the ragged ``media`` batch field):
``{"patches": [N, C·Tp·P·P], "grid_thw": [n, 3], "video": [n] bool, "seconds": [n]}``, its
images and videos in the order their markers appear in the prompt.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from copd_megatron.config.vision import QWEN3_VL, VisionConfig
from copd_megatron.data.prompts import DataError


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(H', W'): multiples of ``factor`` with min_pixels ≤ H'·W' ≤ max_pixels, aspect kept (module doc)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} is above 200")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return max(h, factor), max(w, factor)


def resize_normalise(frames: list[np.ndarray], size: tuple[int, int], vision: VisionConfig) -> torch.Tensor:
    """``[T, H, W, 3]`` uint8 frames → ``[T, 3, H', W']`` float32, resized (bicubic, antialiased) and normalised."""
    x = torch.from_numpy(np.stack(frames).astype(np.float32)).permute(0, 3, 1, 2).div_(255.0)
    if tuple(x.shape[2:]) != size:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0.0, 1.0)
    mean = torch.tensor(vision.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(vision.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def patchify(clip: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """``[T, C, H, W]`` (T a multiple of ``temporal``) → rows ``[t·h·w, C·Tp·P·P]`` and (t, h, w)."""
    frames, c, height, width = clip.shape
    t, h, w = frames // temporal, height // patch, width // patch
    x = clip.reshape(t, temporal, c, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, block row, block col, in-row, in-col, C, Tp, P, P
    return x.reshape(t * h * w, c * temporal * patch * patch), (t, h, w)


def image_patches(pixels: np.ndarray, vision: VisionConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """One image ``[H, W, 3]`` uint8 → its patch rows and grid (the image repeated over a temporal patch)."""
    size = smart_resize(pixels.shape[0], pixels.shape[1], vision.merge_unit, vision.min_pixels, vision.max_pixels)
    x = resize_normalise([pixels], size, vision)
    return patchify(x.expand(vision.temporal_patch_size, -1, -1, -1), vision.patch_size, vision.spatial_merge_size,
                    vision.temporal_patch_size)  # fmt: skip


def video_patches(frames: list[np.ndarray], vision: VisionConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Sampled frames (each ``[H, W, 3]`` uint8) → patch rows and grid; frames padded to a multiple of Tp."""
    bound = vision.video_max_pixels or vision.max_pixels
    size = smart_resize(frames[0].shape[0], frames[0].shape[1], vision.merge_unit, vision.min_pixels, bound)
    x = resize_normalise(frames, size, vision)
    pad = -x.shape[0] % vision.temporal_patch_size
    if pad:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
    return patchify(x, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size)


def patch_times(indices: list[int], source_fps: Optional[float], vision: VisionConfig) -> tuple[list[float], float]:
    """Per temporal patch, the mean time of its first and last frame (seconds), and the seconds one
    patch spans (Tp / the sampled frame rate). ``indices`` are the kept frames' indices in the
    source clip; without a source rate, frames are taken to be ``video_fps`` apart (1 fps if null)."""
    fps = source_fps or vision.video_fps or 1.0
    rate = min(fps, vision.video_fps) if vision.video_fps else fps
    tp = vision.temporal_patch_size
    idx = list(indices) + [indices[-1]] * (-len(indices) % tp)
    times = [i / fps for i in idx]
    return [(times[k] + times[k + tp - 1]) / 2 for k in range(0, len(times), tp)], tp / rate


def process(images: list[np.ndarray], video: Optional[dict], order: list[str], vision: VisionConfig,
            where: str) -> tuple[dict, list[tuple[str, tuple[int, int, int], list[float]]]]:  # fmt: skip
    """The media dict of one prompt (module doc) and, per marker in ``order`` (``"image"`` / ``"video"``),
    (kind, grid, patch timestamps) for its placeholders. ``video``: ``{"frames": [arrays], "indices", "fps"}``."""
    rows, grids, is_video, seconds, blocks = [], [], [], [], []
    k = 0
    for kind in order:
        try:
            if kind == "image":
                patches, grid = image_patches(images[k], vision)
                k += 1
                times, span = [], 0.0
            else:
                patches, grid = video_patches(video["frames"], vision)
                times, span = patch_times(video["indices"], video.get("fps"), vision)
        except ValueError as e:  # an aspect ratio above 200
            raise DataError(f"{where}: {kind}: {e}") from None
        rows.append(patches)
        grids.append(grid)
        is_video.append(kind == "video")
        seconds.append(span)
        blocks.append((kind, grid, times))
    media = {"patches": torch.cat(rows), "grid_thw": torch.tensor(grids, dtype=torch.long),
             "video": torch.tensor(is_video), "seconds": torch.tensor(seconds, dtype=torch.float32)}  # fmt: skip
    return media, blocks


def placeholder_ids(tokenizer: Any, kind: str, grid: tuple[int, int, int], times: list[float], vision: VisionConfig,
                    arch: str) -> list[int]:  # fmt: skip
    """The token ids that stand for one image or video in the prompt (module doc)."""
    t, h, w = grid
    per_frame = h * w // vision.spatial_merge_size**2
    vs, ve = vision.vision_start_token_id, vision.vision_end_token_id
    if kind == "image":
        return [vs] + [vision.image_token_id] * (t * per_frame) + [ve]
    if arch != QWEN3_VL:
        return [vs] + [vision.video_token_id] * (t * per_frame) + [ve]
    out: list[int] = []
    for s in times:
        out += tokenizer.encode(f"<{s:.1f} seconds>") + [vs] + [vision.video_token_id] * per_frame + [ve]
    return out
