"""Multimodal RoPE (mRoPE) of the Qwen-VL language models: position ids and rotary angles.

Pure tensor functions, no process group, no Megatron.

**Position ids** ``[3, B, S]`` (temporal, height, width). A text token at running position p
gets (p, p, p) and advances p by one. A block of vision placeholders for a grid of
``t × h × w`` patches covers ``t·h'·w'`` tokens (h' = h/m, w' = w/m after the m×m merge) in
raster order (frame, row, column); token (k, i, j) gets

    T = p + ⌊k · interval⌋,   H = p + i,   W = p + j

and afterwards p advances by max(h', w') (the temporal extent is not added: that is what
transformers 5.x does, and what the released checkpoints are served with). ``interval`` is 1
for images; for Qwen2.5-VL videos it is ``tokens_per_second · second_per_grid_ts`` (seconds
per temporal patch). Qwen3-VL writes every temporal slice of a video as its own block,
separated by a text timestamp (``<t seconds><|vision_start|>…<|vision_end|>``), so each slice
is a grid of t = 1 and time reaches the model only through the text. A run of identical
placeholders consumes as many grids (or slices) as it holds tokens. The rope delta of a row,
``max position + 1 − length``, continues positions during decoding: a generated token at
index n gets n + delta on all three axes.

**Angles.** With head dim d, ``inv_freq_j = θ^(−2j/d)`` for j < d/2 and each frequency j
reads the position of one axis. Qwen2.5-VL is *chunked*: the first ``mrope_section[0]``
frequencies read T, the next ``[1]`` read H, the last ``[2]`` read W. Qwen3-VL is
*interleaved*: frequency j reads H if j ≡ 1 (mod 3) and j < 3·section[1], W if j ≡ 2 (mod 3)
and j < 3·section[2], else T. The angle vector ``[f, f]`` (length d) feeds Megatron's
rotate-half RoPE, the same formula transformers uses. (Megatron-Core's own
``MultimodalRotaryEmbedding`` is the chunked layout only.)

**ViT rotary.** Each patch has a (row, col) on its image's patch grid; with ViT head dim d the
``d/4`` frequencies ``θ^(−4j/d)`` are applied to the row and to the column:
angles = [row·inv, col·inv, row·inv, col·inv].
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TEXT, IMAGE, VIDEO = 0, 1, 2


def token_types(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """0 = text, 1 = image placeholder, 2 = video placeholder (transformers' ``mm_token_type_ids``)."""
    return (input_ids == image_token_id).long() * IMAGE + (input_ids == video_token_id).long() * VIDEO


def _runs(types: list[int]) -> list[tuple[int, int]]:
    """(type, length) of each maximal run of equal token types."""
    runs: list[tuple[int, int]] = []
    for t in types:
        if runs and runs[-1][0] == t:
            runs[-1] = (t, runs[-1][1] + 1)
        else:
            runs.append((t, 1))
    return runs


def _vision_block(p: int, t: int, h: int, w: int, interval: torch.Tensor | int) -> torch.Tensor:
    """Positions [3, t·h·w] of one vision block starting at running position p (merged grid).
    ``interval`` is a 0-d fp32 tensor for videos, so ⌊k·interval⌋ rounds as transformers does."""
    frames = (torch.arange(t) * interval).long()
    tt = frames.view(t, 1, 1).expand(t, h, w)
    hh = torch.arange(h).view(1, h, 1).expand(t, h, w)
    ww = torch.arange(w).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt, hh, ww]).reshape(3, -1) + p


def _blocks(grids: torch.Tensor | None, merge: int, split_frames: bool) -> list[tuple[int, int, int]]:
    """Merged (t, h', w') of every block of placeholders, in order; Qwen3-VL splits videos per frame."""
    out: list[tuple[int, int, int]] = []
    for t, h, w in (grids.tolist() if grids is not None else []):
        if h % merge or w % merge:
            raise ValueError(f"grid (t={t}, h={h}, w={w}): h and w must be multiples of spatial_merge_size={merge}")
        out += [(1, h // merge, w // merge)] * t if split_frames else [(t, h // merge, w // merge)]
    return out


def mrope_position_ids(
    input_ids: torch.Tensor,
    *,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    family: str,
    tokens_per_second: float | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mRoPE ids ``[3, B, S]`` and rope deltas ``[B]`` of a batch (transformers' ``get_rope_index``).

    Grids are consumed in order across the batch (row by row), images and videos separately.
    ``attention_mask`` (1 = token, 0 = padding) excludes padding, whose ids are 0.
    Raises ``ValueError`` when placeholders and grids disagree."""
    qwen3 = family == "qwen3_vl"
    blocks = {IMAGE: _blocks(image_grid_thw, spatial_merge_size, False),
              VIDEO: _blocks(video_grid_thw, spatial_merge_size, qwen3)}  # fmt: skip
    seconds = second_per_grid_ts.float() if second_per_grid_ts is not None else None
    if not qwen3 and video_grid_thw is not None and seconds is not None and len(seconds) != len(video_grid_thw):
        raise ValueError(f"second_per_grid_ts has {len(seconds)} entries for {len(video_grid_thw)} videos")
    used = {IMAGE: 0, VIDEO: 0}
    b, s = input_ids.shape
    out = torch.zeros(3, b, s, dtype=torch.long)
    deltas = torch.zeros(b, dtype=torch.long)
    types = token_types(input_ids, image_token_id, video_token_id)
    for row in range(b):
        keep = attention_mask[row].bool() if attention_mask is not None else torch.ones(s, dtype=torch.bool)
        pieces, p = [], 0
        for kind, length in _runs(types[row][keep].tolist()):
            if kind == TEXT:
                pieces.append(torch.arange(p, p + length).expand(3, -1))
                p += length
                continue
            name = "image" if kind == IMAGE else "video"
            while length > 0:
                if used[kind] >= len(blocks[kind]):
                    raise ValueError(f"row {row}: more {name} placeholder tokens than {name}_grid_thw describes")
                t, h, w = blocks[kind][used[kind]]
                if t * h * w > length:
                    raise ValueError(f"row {row}: a run of {length} {name} placeholders cannot hold the next "
                                     f"{name} block of {t}x{h}x{w} tokens")  # fmt: skip
                interval: torch.Tensor | int = 1
                if kind == VIDEO and not qwen3:  # ids per second × seconds per temporal patch, in fp32
                    per_patch = seconds[used[kind]] if seconds is not None else torch.tensor(1.0)
                    interval = torch.tensor(float(tokens_per_second)) * per_patch
                pieces.append(_vision_block(p, t, h, w, interval))
                used[kind] += 1
                p += max(h, w)
                length -= t * h * w
        ids = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
        out[:, row, keep] = ids
        deltas[row] = (int(ids.max()) + 1 if ids.numel() else 0) - int(keep.sum())
    for kind, name in ((IMAGE, "image"), (VIDEO, "video")):
        if used[kind] != len(blocks[kind]):
            raise ValueError(f"{name}_grid_thw describes {len(blocks[kind])} blocks but the tokens hold {used[kind]}")
    return out, deltas


def row_blocks(grid_thw: torch.Tensor, is_video: torch.Tensor, seconds: torch.Tensor, merge: int, family: str,
               tokens_per_second: float | None) -> list[tuple[int, int, int, torch.Tensor | int]]:  # fmt: skip
    """Merged (t, h', w', interval) of every placeholder block of one row, in prompt order: the
    row's images and videos as ``data/qwen_media.py`` lists them (Qwen3-VL: a block per temporal
    patch of a video; Qwen2.5-VL: ids per second × seconds per patch as the video's interval)."""
    qwen3 = family == "qwen3_vl"
    out: list[tuple[int, int, int, torch.Tensor | int]] = []
    for (t, h, w), video, secs in zip(grid_thw.tolist(), is_video.tolist(), seconds.float()):
        if h % merge or w % merge:
            raise ValueError(f"grid (t={t}, h={h}, w={w}): h and w must be multiples of spatial_merge_size={merge}")
        if video and qwen3:
            out += [(1, h // merge, w // merge, 1)] * t
        else:
            interval = torch.tensor(float(tokens_per_second)) * secs if video else 1
            out.append((t, h // merge, w // merge, interval))
    return out


@dataclass
class PositionStream:
    """The mRoPE ids of one sequence fed in consecutive windows (a whole row is one window).

    The state is the running position ``p``, the block being filled and how many of its
    placeholders came already; a text token gets (p, p, p) and advances p, a placeholder takes
    the next id of the current block (``_vision_block`` offsets + p), and a finished block
    advances p by max(h', w'). So a window may end inside an image (a prompt cut by
    ``Batch.micro_batches`` or a prefill shorter than the prompt) and the next one continues
    it; the ids of a complete sequence equal :func:`mrope_position_ids`'. Generated tokens are
    text after the prompt: they continue at p, which equals transformers' ``n + rope delta``
    except after a Qwen2.5-VL video whose temporal ids outrun max(h', w') (transformers then
    decodes from the largest id while its own full-sequence forward continues at p; we keep
    the full-sequence rule so rollouts and training see the same positions)."""

    blocks: list[tuple[int, int, int, torch.Tensor | int]]
    p: int = 0
    block: int = 0
    used: int = 0
    _offsets: dict = field(default_factory=dict, repr=False)

    def _block_ids(self, i: int) -> torch.Tensor:
        if i not in self._offsets:
            t, h, w, interval = self.blocks[i]
            self._offsets[i] = _vision_block(0, t, h, w, interval)
        return self._offsets[i]

    def advance(self, is_placeholder: torch.Tensor) -> torch.Tensor:
        """Ids ``[3, s]`` of the next s tokens of the sequence (``is_placeholder [s]`` bool)."""
        flags = is_placeholder.tolist()
        pieces = []
        for kind, length in _runs(flags):
            if not kind:
                if self.used:
                    raise ValueError(f"a text token inside a vision block ({self.used} of its placeholders came)")
                pieces.append(torch.arange(self.p, self.p + length).expand(3, -1))
                self.p += length
                continue
            while length:
                if self.block >= len(self.blocks):
                    raise ValueError(f"more image / video placeholder tokens than the row's {len(self.blocks)} "
                                     "blocks (grid_thw) hold")  # fmt: skip
                ids = self._block_ids(self.block)
                take = min(length, ids.shape[1] - self.used)
                pieces.append(ids[:, self.used : self.used + take] + self.p)
                self.used += take
                length -= take
                if self.used == ids.shape[1]:
                    _, h, w, _ = self.blocks[self.block]
                    self.p, self.block, self.used = self.p + max(h, w), self.block + 1, 0
        return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)


def decode_position_ids(start: int, length: int, deltas: torch.Tensor) -> torch.Tensor:
    """Ids ``[3, B, length]`` of tokens at indices start..start+length−1 after the prompt."""
    ids = torch.arange(start, start + length, device=deltas.device)[None, :] + deltas[:, None]
    return ids.unsqueeze(0).expand(3, -1, -1)


def inverse_frequencies(dim: int, base: float, device=None) -> torch.Tensor:
    """``1 / base^(2j/dim)`` for j < dim/2, in fp32 (the exact expression transformers evaluates)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))


def mrope_axes(mrope_section: list[int], interleaved: bool) -> torch.Tensor:
    """Which axis (0 = T, 1 = H, 2 = W) each of the head_dim/2 frequencies reads."""
    n = sum(mrope_section)
    if not interleaved:
        return torch.repeat_interleave(torch.arange(3), torch.tensor(mrope_section))
    axes = torch.zeros(n, dtype=torch.long)
    for axis in (1, 2):
        axes[axis : 3 * mrope_section[axis] : 3] = axis
    return axes


def mrope_angles(position_ids: torch.Tensor, inv_freq: torch.Tensor, axes: torch.Tensor) -> torch.Tensor:
    """Rotary angles ``[S, B, 1, head_dim]`` (Megatron's layout) for ids ``[3, B, S]``, in fp32."""
    freqs = position_ids[..., None].float() * inv_freq.float()  # [3, B, S, d/2]
    index = axes.to(freqs.device).view(1, 1, 1, -1).expand(1, *freqs.shape[1:])
    chosen = freqs.gather(0, index)[0]  # [B, S, d/2]
    return torch.cat([chosen, chosen], dim=-1).transpose(0, 1).unsqueeze(2)


def vision_rotary_angles(coords: torch.Tensor, head_dim: int, base: float) -> torch.Tensor:
    """ViT angles ``[N, head_dim]`` (fp32) for patch coordinates ``[N, 2]`` (row, col)."""
    inv = inverse_frequencies(head_dim // 2, base, device=coords.device)  # head_dim/4 frequencies
    rows, cols = coords[:, 0:1].float() * inv, coords[:, 1:2].float() * inv
    half = torch.cat([rows, cols], dim=-1)
    return torch.cat([half, half], dim=-1)


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x`` in fp32 (cast back), angles broadcast against ``x``."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * angles.cos() + torch.cat([-x2, x1], dim=-1) * angles.sin()).to(x.dtype)
