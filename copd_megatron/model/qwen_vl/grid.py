"""Patch geometry of the Qwen-VL vision towers: pure functions of ``grid_thw``.

Pixel rows. The processor cuts an image (or a video, two frames per temporal patch) into
``t × h × w`` patches and writes them *merge-block major*: for every m×m block (block row,
block column) its m² patches (in-block row, in-block column), frame after frame. The
patch merger then takes m² consecutive rows as one language-model token, so this order is
what every function below reproduces.

* :func:`patch_coords`: (row, col) of every patch on its frame's grid, for the 2-D rotary.
* :func:`position_table_taps`: Qwen3-VL's learned ``side × side`` position table resampled
  to an ``h × w`` grid by bilinear interpolation with ``align_corners=True``: target row i
  reads source row ``i·(side−1)/max(h−1, 1)``, i.e. rows ⌊x⌋ and ⌊x⌋+1 (clamped) with
  weights 1−frac and frac; likewise for columns; 4 taps per patch, weights in fp32.
* :func:`frame_segments`: attention never crosses frames or images; one segment per frame.
* :func:`window_partition`: Qwen2.5-VL's windows. With ``k = window_size / m / patch_size``
  merged tokens per window side, each frame's merged grid is tiled by k×k windows in raster
  order (the last row/column of windows may be partial). ``window_index`` lists the merged
  tokens window by window (raster order inside a window); the tower permutes its patches
  (in units of m²) by it, attends within windows in most layers, and undoes the permutation
  after the merger.
"""

from __future__ import annotations

import torch


def _merged_rc(h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each patch of one frame, in merge-block order."""
    idx = torch.arange(h * w)
    inner, block = idx % (merge * merge), idx // (merge * merge)
    rows = (block // (w // merge)) * merge + inner // merge
    cols = (block % (w // merge)) * merge + inner % merge
    return rows, cols


def patch_coords(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """``[N, 2]`` (row, col) of every patch, every frame repeating its image's coordinates."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows, cols = _merged_rc(h, w, merge)
        out.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))
    return torch.cat(out)


def _axis_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = index.float() * (side - 1) / max(size - 1, 1)
    low = torch.floor(src)[:, None]
    offsets = torch.arange(2)
    taps = (low.long() + offsets).clamp(0, side - 1)
    # The hat kernel 1 − |src − tap| (not 1 − frac / frac): the same fp32 rounding as transformers.
    return taps, (1 - (src[:, None] - low - offsets).abs()).clamp(min=0)


def position_table_taps(grid_thw: torch.Tensor, side: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[N, 4]`` into the flattened ``side × side`` table and fp32 weights ``[N, 4]``."""
    indices, weights = [], []
    for t, h, w in grid_thw.tolist():
        rows, cols = _merged_rc(h, w, merge)
        rt, rw = _axis_taps(rows, h, side)
        ct, cw = _axis_taps(cols, w, side)
        indices.append((rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4).repeat(t, 1))
        weights.append((rw[:, :, None] * cw[:, None, :]).reshape(-1, 4).repeat(t, 1))
    return torch.cat(indices), torch.cat(weights)


def frame_segments(grid_thw: torch.Tensor) -> torch.Tensor:
    """Patches per attention segment: h·w for every frame of every image or video."""
    return torch.cat([torch.full((t,), h * w, dtype=torch.long) for t, h, w in grid_thw.tolist()])


def window_partition(
    grid_thw: torch.Tensor, merge: int, window_size: int, patch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``window_index [N/m²]`` (merged tokens in window order) and patches per window ``[n_windows]``."""
    k = window_size // merge // patch_size
    order, lengths, offset = [], [], 0
    for t, h, w in grid_thw.tolist():
        hm, wm = h // merge, w // merge
        rows, cols = hm // k + (hm % k > 0), wm // k + (wm % k > 0)  # windows per frame side (last may be partial)
        f, r, c = torch.meshgrid(torch.arange(t), torch.arange(hm), torch.arange(wm), indexing="ij")
        window = ((f * rows + r // k) * cols + c // k).reshape(-1)  # raster order of windows, frame by frame
        inside = ((r % k) * k + c % k).reshape(-1)  # raster order inside a window
        order.append(torch.argsort(window * k * k + inside) + offset)
        lengths.append(torch.bincount(window, minlength=t * rows * cols) * merge * merge)
        offset += t * hm * wm
    return torch.cat(order), torch.cat(lengths)


def segment_mask(lengths: torch.Tensor) -> torch.Tensor:
    """``[1, 1, N, N]`` bool, True where query and key lie in different segments (Megatron's
    convention: True = masked), for the local attention path."""
    seg = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    return (seg[:, None] != seg[None, :])[None, None]
