"""Images and videos in prompt rows: reading, frame sampling, resizing, normalising, placeholders.

A multimodal row is a prompt row (``data/prompts.py``) with media fields:

    {"prompt": "<image> How many red squares?", "answer": "3", "images": ["img/0.png"]}
    {"prompt": "<video> Which way does the circle move?", "answer": "left",
     "video": {"frames": "clips/7", "fps": 4}}

``images`` is a list; an entry is a path (PNG/JPEG/BMP/GIF/WebP read by Pillow, or a ``.npy``
uint8 array ``[H, W, 3]`` or ``[H, W]``) relative to the JSONL file's folder, or an inline
array ``[H][W][3]`` of 0..255 integers. ``video`` is a folder of frame images (sorted by
name), a ``.npy`` uint8 array ``[T, H, W, 3]``, a list of image entries, or ``{"frames": one of
those, "fps": source frame rate}``. The prompt marks where they go: one ``<image>`` per image,
in order, and one ``<video>`` for the video; the counts must match.

Processing, with the model's ``model.vision`` section:

* frame sampling: a video with source rate f is sampled at ``video_fps`` r: sample k is taken
  at time k/r, i.e. frame ⌊k·f/r⌋, for every k with k/r inside the clip (T/f seconds); r ≥ f,
  no ``fps`` in the row, or ``video_fps: null`` keep every frame. More than ``max_frames``
  after sampling is an error, never a silent cut;
* resize to (image_height, image_width): bilinear with antialiasing (Pillow's BILINEAR);
* scale to [0, 1], then ``(x − mean) / std`` per RGB channel → ``[3, H, W]`` float32;
* patchify: the ViT cuts ``[3, H, W]`` into (H/p)·(W/p) patches of p×p pixels with its strided
  convolution, one token each. So an image is ``tokens_per_image`` image placeholder ids in the
  token stream and a video of n frames is n·tokens_per_image video placeholder ids.

Every problem is a :class:`MediaError` (a ``DataError``): one line naming ``FILE:LINE``, the
media entry and what was expected. :func:`load_multimodal_prompts` finds missing, unreadable
and corrupt files, too many images or frames and placeholder mismatches before any work starts.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from copd_megatron.config.schema import VisionConfig
from copd_megatron.data.prompts import DataError, PromptSample, _jsonl_rows, _parquet_rows, parse_row

IMAGE_MARKER, VIDEO_MARKER = "<image>", "<video>"
_MARKERS = re.compile(f"({re.escape(IMAGE_MARKER)}|{re.escape(VIDEO_MARKER)})")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
VIDEO_FILE_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


class MediaError(DataError):
    """A missing, unreadable or inconsistent image / video of a row (one line, ``FILE:LINE``)."""


@dataclass
class Media:
    """The processed images and video frames of one prompt, in placeholder order."""

    pixels: torch.Tensor  # [n, 3, H, W] float32, normalised
    kinds: list[str]  # "image" or "frame", one per row of pixels

    def to_dict(self) -> dict:
        return {"pixels": self.pixels, "kinds": list(self.kinds)}


# ---------------------------------------------------------------- reading one image / video


def _name(entry: Any) -> str:
    return entry if isinstance(entry, str) else f"inline array {tuple(np.shape(entry))}"


def _check_array(arr: np.ndarray, what: str, where: str, ndim: tuple[int, ...]) -> np.ndarray:
    if arr.ndim not in ndim or (arr.ndim == ndim[-1] and arr.shape[-1] != 3):
        raise MediaError(f"{where}: {what} has shape {tuple(arr.shape)}; expected [H, W, 3] or [H, W] pixels"
                         if ndim == (2, 3) else f"{where}: {what} has shape {tuple(arr.shape)}; "
                         "expected [T, H, W, 3] or [T, H, W] frames")  # fmt: skip
    if min(arr.shape[:3] if arr.ndim == 4 else arr.shape[:2]) == 0:
        raise MediaError(f"{where}: {what} is empty (shape {tuple(arr.shape)})")
    return arr


def _inline(entry: Any, where: str) -> np.ndarray:
    try:
        arr = np.asarray(entry)
    except ValueError:
        arr = None
    if arr is None or arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise MediaError(f"{where}: inline image is not a rectangular array of numbers; expected [H][W][3] of 0..255")
    if arr.size and (arr.min() < 0 or arr.max() > 255 or not np.all(np.equal(np.mod(arr, 1), 0))):
        raise MediaError(f"{where}: inline image has values outside the integers 0..255")
    return _check_array(arr.astype(np.uint8), "inline image", where, (2, 3))


def _resolve(entry: Any, base: Path, where: str, what: str = "image") -> str | np.ndarray:
    """A path made absolute (checked to exist), or an inline array as uint8."""
    if isinstance(entry, np.ndarray):
        return _check_array(entry.astype(np.uint8, copy=False), f"{what} array", where, (2, 3))
    if isinstance(entry, list):
        return _inline(entry, where)
    if not isinstance(entry, str) or not entry:
        raise MediaError(f"{where}: {what} entry {entry!r} is neither a path nor an [H][W][3] array")
    path = (base / entry) if not Path(entry).is_absolute() else Path(entry)
    if not path.is_file():
        raise MediaError(f"{where}: {what} file {entry} not found (looked for {path})")
    if path.suffix.lower() not in IMAGE_SUFFIXES + (".npy",):
        raise MediaError(f"{where}: {what} file {entry} has an unsupported type; expected one of "
                         f"{', '.join(IMAGE_SUFFIXES + ('.npy',))}")  # fmt: skip
    return str(path)


def read_image(ref: str | np.ndarray, where: str) -> np.ndarray:
    """Pixels ``[H, W, 3]`` uint8 of a resolved image (a path or an array)."""
    if isinstance(ref, np.ndarray):
        arr = ref
    elif ref.endswith(".npy"):
        try:
            arr = np.load(ref, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise MediaError(f"{where}: image file {ref} is not a readable .npy array ({e})") from None
        if arr.dtype != np.uint8:
            raise MediaError(f"{where}: image file {ref} holds {arr.dtype}; expected uint8 pixels")
        arr = _check_array(arr, f"image file {ref}", where, (2, 3))
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(ref) as img:
                img.load()  # decode now: a truncated or corrupt file fails here, not later
                arr = np.asarray(img.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise MediaError(f"{where}: image file {ref} is unreadable or corrupt ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None  # fmt: skip
    return np.repeat(arr[..., None], 3, axis=-1) if arr.ndim == 2 else arr


def sample_frame_indices(num_frames: int, source_fps: Optional[float], target_fps: Optional[float]) -> list[int]:
    """Indices of the frames kept from a clip of ``num_frames`` at ``source_fps`` when sampling
    at ``target_fps``: frame ⌊k·f/r⌋ for k = 0, 1, ... while k/r < num_frames/f. A target rate
    at or above the source keeps every frame once (frames are never repeated)."""
    if source_fps is None or target_fps is None or target_fps >= source_fps:
        return list(range(num_frames))
    step = source_fps / target_fps
    # The 1e-9 guards exact multiples against float rounding (30/10·3 = 8.999999…).
    return [int(math.floor(k * step + 1e-9)) for k in range(int(math.ceil(num_frames / step - 1e-9)))]


def _video_refs(entry: Any, base: Path, where: str) -> tuple[list[str | np.ndarray], Optional[float]]:
    """All frames of a video entry (resolved) and its source fps (None if not given)."""
    fps = None
    if isinstance(entry, dict):
        unknown = set(entry) - {"frames", "fps"}
        if unknown or "frames" not in entry:
            raise MediaError(f"{where}: video object has keys {sorted(entry)}; expected 'frames' and optional 'fps'")
        fps = entry.get("fps")
        if fps is not None and (isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps <= 0):
            raise MediaError(f"{where}: video fps {fps!r}; expected a positive number")
        entry = entry["frames"]
    if isinstance(entry, list) and entry and isinstance(entry[0], str):
        return [_resolve(e, base, f"{where}: video frame {i}", "frame") for i, e in enumerate(entry)], fps
    if isinstance(entry, (list, np.ndarray)):  # an inline [T][H][W][3] array or in-memory frames
        frames = list(entry) if isinstance(entry, list) else [entry[i] for i in range(entry.shape[0])]
        if not frames:
            raise MediaError(f"{where}: video has no frames")
        return [_resolve(np.asarray(f) if isinstance(f, np.ndarray) else f, base, where, "frame") for f in frames], fps
    if not isinstance(entry, str) or not entry:
        raise MediaError(f"{where}: video entry {entry!r}; expected a frame folder, a .npy file or a list of frames")
    path = base / entry if not Path(entry).is_absolute() else Path(entry)
    if path.suffix.lower() in VIDEO_FILE_SUFFIXES:
        raise MediaError(f"{where}: video file {entry}: encoded videos are not decoded here; extract frames first "
                         f"(e.g. ffmpeg -i {entry} -vf fps=2 frames/%05d.png) and give the folder")  # fmt: skip
    if path.is_dir():
        files = sorted(str(f) for f in path.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise MediaError(f"{where}: video folder {entry} has no frame images ({', '.join(IMAGE_SUFFIXES)})")
        return files, fps
    if not path.is_file():
        raise MediaError(f"{where}: video {entry} not found (looked for {path})")
    if path.suffix.lower() != ".npy":
        raise MediaError(f"{where}: video {entry}; expected a frame folder, a .npy [T, H, W, 3] file or a list")
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise MediaError(f"{where}: video file {entry} is not a readable .npy array ({e})") from None
    if arr.dtype != np.uint8:
        raise MediaError(f"{where}: video file {entry} holds {arr.dtype}; expected uint8 frames")
    _check_array(arr, f"video file {entry}", where, (3, 4))
    return [np.asarray(arr[i]) for i in range(arr.shape[0])], fps


def preprocess(pixels: np.ndarray, vision: VisionConfig) -> torch.Tensor:
    """``[H, W, 3]`` uint8 → resized, normalised ``[3, image_height, image_width]`` float32."""
    x = torch.from_numpy(np.array(pixels, dtype=np.float32)).permute(2, 0, 1).div_(255.0)  # a writable copy
    size = (vision.image_height, vision.image_width)
    if tuple(x.shape[1:]) != size:
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        x = x.clamp_(0.0, 1.0)  # antialiasing overshoots slightly at edges; pixels stay in range
    mean = torch.tensor(vision.image_mean).view(3, 1, 1)
    std = torch.tensor(vision.image_std).view(3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------- rows: resolve, load, encode


def resolve_row_media(sample: PromptSample, base: Path, vision: VisionConfig) -> None:
    """Check ``sample``'s media against its prompt and the vision limits, resolve paths against
    ``base`` and keep only the sampled video frames (in place, in ``sample.extra``)."""
    where = sample.source or f"sample {sample.index}"
    images, video = sample.extra.get("images", []), sample.extra.get("video")
    if images is None:
        images = []
    if not isinstance(images, list):
        raise MediaError(f"{where}: field 'images' is {type(images).__name__}; expected a list of images")
    if len(images) > vision.max_images:
        raise MediaError(f"{where}: {len(images)} images; model.vision.max_images is {vision.max_images}")
    markers = _MARKERS.findall(sample.prompt)
    if not images and video is None and not markers:
        return  # a text prompt: left as it is (encoded like any text prompt)
    n_img, n_vid = markers.count(IMAGE_MARKER), markers.count(VIDEO_MARKER)
    if n_img != len(images) or n_vid != (0 if video is None else 1):
        raise MediaError(f"{where}: the prompt has {n_img} {IMAGE_MARKER} and {n_vid} {VIDEO_MARKER} placeholders "
                         f"but the row has {len(images)} images and {0 if video is None else 1} video; "
                         f"expected one {IMAGE_MARKER} per image and one {VIDEO_MARKER} per video")  # fmt: skip
    sample.extra["images"] = [_resolve(e, base, f"{where}: image {i}") for i, e in enumerate(images)]
    sample.vision = vision
    if video is None:
        return
    frames, fps = _video_refs(video, base, f"{where}: video")
    keep = sample_frame_indices(len(frames), fps, vision.video_fps)
    if len(keep) > vision.max_frames:
        rate = f" sampled at {vision.video_fps:g} fps from {len(frames)} at {fps:g} fps" if fps and vision.video_fps else ""
        raise MediaError(f"{where}: video has too many frames ({len(keep)}{rate}); model.vision.max_frames is "
                         f"{vision.max_frames}: raise it, lower model.vision.video_fps or shorten the clip")  # fmt: skip
    sample.extra["video"] = {"frames": [frames[i] for i in keep], "fps": fps}


def resolve_samples(samples: list[PromptSample], vision: VisionConfig, origin: str) -> list[PromptSample]:
    """:func:`resolve_row_media` for samples made in memory (synthetic families): their errors
    name ``origin`` and the sample's index; paths, if any, are relative to the working folder."""
    for s in samples:
        s.source = s.source or f"{origin} sample {s.index}"
        resolve_row_media(s, Path("."), vision)
    return samples


def load_media(sample: PromptSample, vision: VisionConfig) -> Optional[Media]:
    """Decode and process ``sample``'s resolved media in placeholder order (None: a text prompt)."""
    where = sample.source or f"sample {sample.index}"
    images = list(sample.extra.get("images") or [])
    video = sample.extra.get("video")
    if not images and video is None:
        return None
    pixels, kinds = [], []
    for marker in _MARKERS.findall(sample.prompt):
        if marker == IMAGE_MARKER:
            k = kinds.count("image")
            pixels.append(preprocess(read_image(images[k], f"{where}: image {k}"), vision))
            kinds.append("image")
        else:
            for k, ref in enumerate(video["frames"]):
                pixels.append(preprocess(read_image(ref, f"{where}: video frame {k}"), vision))
                kinds.append("frame")
    return Media(torch.stack(pixels), kinds)


def encode_multimodal_prompt(tokenizer, sample: PromptSample, vision: VisionConfig) -> list[int]:
    """Prompt ids (chat template and BOS as for text prompts) with every ``<image>`` replaced by
    ``tokens_per_image`` image ids and ``<video>`` by frames·tokens_per_image video ids."""
    templated = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}])
    text = templated if templated is not None else sample.prompt
    bos = tokenizer.bos_id
    ids = [bos] if bos is not None and bos >= 0 else []
    reserved = {vision.image_token_id, vision.video_id}
    per = vision.tokens_per_image
    frames = len((sample.extra.get("video") or {}).get("frames", []))
    for piece in _MARKERS.split(text):
        if piece == IMAGE_MARKER:
            ids += [vision.image_token_id] * per
        elif piece == VIDEO_MARKER:
            ids += [vision.video_id] * (per * frames)
        elif piece:
            encoded = tokenizer.encode(piece)
            if reserved & set(encoded):
                raise MediaError(f"{sample.source or f'sample {sample.index}'}: the prompt text encodes to a placeholder "
                                 f"id {sorted(reserved & set(encoded))}; those ids are reserved for images")  # fmt: skip
            ids += encoded
    return ids


def prompt_inputs(tokenizer, sample: PromptSample) -> tuple[list[int], dict]:
    """What a rollout request of ``sample`` carries: its prompt ids and its media. A sample whose
    media were resolved for a vision model (``sample.vision``) gets placeholders expanded and
    ``{"pixels": [n, 3, H, W]}``; any other sample is a text prompt (``encode_prompt``, ``{}``)."""
    from copd_megatron.data.tokenizer import encode_prompt

    if sample.vision is None:
        return encode_prompt(tokenizer, sample.prompt), {}
    media = load_media(sample, sample.vision)
    return encode_multimodal_prompt(tokenizer, sample, sample.vision), ({} if media is None else {"pixels": media.pixels})


def load_multimodal_prompts(path: str | Path, vision: VisionConfig, domain: str | None = None, *,
                            tokenizer: Any = None, max_prompt_tokens: int | None = None,
                            verify: bool = True) -> tuple[list[PromptSample], int]:  # fmt: skip
    """Rows of a JSONL/Parquet file with their media checked and resolved; rows without media
    are text prompts. ``verify`` decodes every image once now (corrupt files fail here, not in
    the middle of a run). With ``tokenizer`` and ``max_prompt_tokens``, rows whose expanded
    prompt is longer are dropped and counted (as for text prompts). Returns (samples, dropped)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: prompt file not found; expected a .jsonl or .parquet file")
    rows = _parquet_rows(p) if p.suffix == ".parquet" else _jsonl_rows(p)
    samples, dropped = [], 0
    for line_no, row in rows:
        s = parse_row(row, domain, len(samples), f"{p}:{line_no}")
        s.source = f"{p}:{line_no}"
        resolve_row_media(s, p.parent, vision)
        if verify:
            load_media(s, vision)
        if tokenizer is not None and max_prompt_tokens is not None:
            if len(encode_multimodal_prompt(tokenizer, s, vision)) > max_prompt_tokens:
                dropped += 1
                continue
        samples.append(s)
    if not samples:
        raise DataError(f"{p}: no usable rows" + (f" (all {dropped} longer than {max_prompt_tokens} tokens)"
                                                   if dropped else "") + "; expected at least one prompt")  # fmt: skip
    return samples, dropped
