"""``model.vision``: the vision tower of a vision-language model, one section for every architecture.

``model.arch`` picks the model provider; the section's fields are the union of what the
vision architectures need, each field belonging to the architectures listed in ``SCOPE``:

    every vision arch   tower shape (num_layers, hidden_size, ffn_hidden_size, num_attention_heads,
                        patch_size), placeholder ids, pixel normalisation, media limits
                        (video_fps, max_frames, max_images), freeze_vision / freeze_projector
    llava               a CLIP ViT at a fixed image size (image_height/width, class token, norm
                        epsilon, activation) and a projector (Megatron-Core's LLaVAModel)
    qwen3_vl,           images at their own resolution (min/max_pixels, smart resize to multiples
    qwen2_5_vl          of patch·merge), temporal patches, an m×m patch merger, 2-D ViT RoPE,
                        mRoPE sections of the language model, vision start/end tokens
    qwen3_vl            learned position table, DeepStack taps
    qwen2_5_vl          window attention, full-attention layers, temporal ids per second

Resolution (``resolve``, run by ``ModelConfig``): a field set for another architecture is an
error naming it; a required field left unset is an error; an unset architectural constant
(Qwen's temporal patch of 2, CLIP's class token, ...) takes its architecture's value from
``DEFAULTS``. Shapes and token ids have no defaults: presets (``config/presets.py``) or the
config give them, so a Qwen tower never silently inherits a LLaVA patch size or vice versa.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal, Optional

from copd_megatron.config.errors import ConfigError, require

LLAVA, QWEN3_VL, QWEN2_5_VL = "llava", "qwen3_vl", "qwen2_5_vl"
VISION_ARCHS = (LLAVA, QWEN3_VL, QWEN2_5_VL)
QWEN_VL_ARCHS = (QWEN3_VL, QWEN2_5_VL)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class VisionConfig:
    """The vision tower of ``model.arch`` ``llava``, ``qwen3_vl`` or ``qwen2_5_vl`` and how images
    and videos reach it (module docstring: which field belongs to which architecture). ``preset``
    fills the section first; fields given next to it override it."""

    preset: Optional[str] = None
    """Name of a vision preset (llava: ``tiny``, ``clip-vit-l-14-336``; qwen3_vl: ``qwen3-vl-tiny``).
    The Qwen-VL model presets (``model.preset: qwen3-vl-4b``, ...) fill this section themselves."""
    # ---- every vision architecture
    num_layers: Optional[int] = None
    """ViT transformer layers (HF ``depth``); required. The whole tower lives on the first pipeline stage."""
    hidden_size: Optional[int] = None
    """ViT width; required."""
    ffn_hidden_size: Optional[int] = None
    """ViT MLP inner width (HF ``intermediate_size``); required; divisible by ``parallel.tp``."""
    num_attention_heads: Optional[int] = None
    """ViT attention heads (HF ``num_heads``); required; divisible by ``parallel.tp``."""
    patch_size: Optional[int] = None
    """Side of a square patch in pixels; required (CLIP-L/14: 14, Qwen3-VL: 16, Qwen2.5-VL: 14)."""
    image_token_id: Optional[int] = None
    """Vocabulary id of an image placeholder (``<|image_pad|>`` = 151655 in Qwen's tokenizer); required.
    The data path writes one per image token; never sampled."""
    video_token_id: Optional[int] = None
    """Vocabulary id of a video placeholder (``<|video_pad|>`` = 151656); required for Qwen-VL, llava:
    null = ``image_token_id``; never sampled."""
    image_mean: Optional[list[float]] = None
    """Per-channel (RGB) mean subtracted after scaling pixels to [0, 1]; required (presets: CLIP's
    for llava and Qwen2.5-VL, 0.5 for Qwen3-VL)."""
    image_std: Optional[list[float]] = None
    """Per-channel (RGB) standard deviation divided out after the mean; required (as ``image_mean``)."""
    video_fps: Optional[float] = 1.0
    """Frames per second sampled from a video whose row gives its ``fps`` (null = keep every frame)."""
    max_frames: int = 8
    """Most frames one video may contribute after sampling; more is a data error naming the row."""
    max_images: int = 8
    """Most images one row may carry; more is a data error naming the row."""
    freeze_vision: bool = False
    """Keep the ViT fixed (no gradients, no optimizer state); the projector / mergers and the language model train."""
    freeze_projector: bool = False
    """Keep the projector (llava) or the patch mergers (Qwen-VL, DeepStack mergers included) fixed as well."""
    # ---- llava
    kv_channels: Optional[int] = None
    """llava: ViT head dimension (null = hidden_size / num_attention_heads)."""
    image_height: Optional[int] = None
    """llava: height every image and video frame is resized to; a multiple of ``patch_size``; required."""
    image_width: Optional[int] = None
    """llava: width every image and video frame is resized to; a multiple of ``patch_size``; required."""
    class_token: Optional[bool] = None
    """llava: prepend a learned class token inside the ViT (dropped before the language model); null = true."""
    norm_epsilon: Optional[float] = None
    """llava: epsilon of the ViT's LayerNorms (null = 1e-5)."""
    activation: Optional[Literal["gelu", "quick_gelu"]] = None
    """llava: ViT MLP activation (null = ``gelu``; OpenAI CLIP uses ``quick_gelu``)."""
    projector: Optional[Literal["mlp", "affine"]] = None
    """llava: vision-to-language projector, a 2-layer GELU MLP (LLaVA-1.5) or one linear layer (null = ``mlp``)."""
    projector_ffn_hidden_size: Optional[int] = None
    """llava: inner width of the ``mlp`` projector (null = the language model's hidden size); divisible by ``parallel.tp``."""
    # ---- qwen3_vl and qwen2_5_vl
    in_channels: Optional[int] = None
    """Qwen-VL: image channels (HF ``in_channels``; null = 3)."""
    temporal_patch_size: Optional[int] = None
    """Qwen-VL: frames per patch (HF ``temporal_patch_size``; null = 2); a still image is repeated to fill it."""
    spatial_merge_size: Optional[int] = None
    """Qwen-VL: m, an m×m block of patches becomes one language-model token (HF ``spatial_merge_size``; null = 2)."""
    rotary_base: Optional[float] = None
    """Qwen-VL: θ of the ViT's 2-D rotary embedding (HF ``vision_config.rope_parameters.rope_theta``; null = 10000)."""
    mrope_section: Optional[list[int]] = None
    """Qwen-VL: rotary frequencies of the language model given to the temporal, height and width ids; sums to
    head_dim / 2; required (HF ``rope_parameters.mrope_section``: Qwen3-VL [24, 20, 20], Qwen2.5-VL [16, 24, 24])."""
    vision_start_token_id: Optional[int] = None
    """Qwen-VL: ``<|vision_start|>`` (151652), written before every image / video block; required."""
    vision_end_token_id: Optional[int] = None
    """Qwen-VL: ``<|vision_end|>`` (151653), written after every image / video block; required."""
    min_pixels: Optional[int] = None
    """Qwen-VL: smallest image area after resizing (HF ``min_pixels``); required (presets: the processor's)."""
    max_pixels: Optional[int] = None
    """Qwen-VL: largest image area after resizing (HF ``max_pixels``); bounds the tokens of one image at
    max_pixels / (patch_size·spatial_merge_size)²; required."""
    video_max_pixels: Optional[int] = None
    """Qwen-VL: largest area of one video frame after resizing (null = ``max_pixels``)."""
    # ---- qwen3_vl
    num_position_embeddings: Optional[int] = None
    """qwen3_vl: rows of the learned position table, a square side² (HF ``num_position_embeddings``: 2304 = 48²); required."""
    deepstack_layers: Optional[list[int]] = None
    """qwen3_vl: ViT layers (0-based, increasing) whose merged outputs are added to language layers 0, 1, ... at
    the visual positions (HF ``deepstack_visual_indexes``); required ([] = none)."""
    # ---- qwen2_5_vl
    window_size: Optional[int] = None
    """qwen2_5_vl: side of an attention window in pixels (HF ``window_size``: 112); required."""
    full_attention_layers: Optional[list[int]] = None
    """qwen2_5_vl: ViT layers that attend over a whole frame, the others within windows (HF ``fullatt_block_indexes``);
    required ([] = none)."""
    tokens_per_second: Optional[float] = None
    """qwen2_5_vl: temporal mRoPE ids per second of video (HF ``tokens_per_second``: 2); required."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "patch_size", "max_frames",
                     "max_images", "image_height", "image_width", "in_channels", "temporal_patch_size",
                     "spatial_merge_size", "min_pixels", "max_pixels", "video_max_pixels", "num_position_embeddings",
                     "window_size", "kv_channels", "projector_ffn_hidden_size"):  # fmt: skip
            value = getattr(self, name)
            require(value is None or value > 0, f"model.vision.{name}", f"must be > 0, got {value}")
        for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"model.vision.{name}", f"must be >= 0, got {value}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            require(value is None or len(value) == 3, f"model.vision.{name}", f"expected 3 values (R, G, B), got {value}")
        require(self.image_std is None or all(s > 0 for s in self.image_std), "model.vision.image_std",
                f"must be > 0, got {self.image_std}")  # fmt: skip
        require(self.video_fps is None or self.video_fps > 0, "model.vision.video_fps",
                f"must be > 0 or null, got {self.video_fps}")  # fmt: skip

    # ------------------------------------------------------------------ per architecture

    def resolve(self, arch: str) -> None:
        """Check the section against ``model.arch`` and fill the architecture's constants (in place)."""
        self._arch = arch  # not a field: what the data path needs to know (LLaVA or Qwen processing)
        if self.preset is not None and PRESET_ARCH.get(self.preset, arch) != arch:
            raise ConfigError(f"model.vision.preset: {self.preset!r} is a {PRESET_ARCH[self.preset]} tower, but "
                              f"model.arch is {arch!r}")  # fmt: skip
        for f in fields(self):
            scope = SCOPE.get(f.name)
            if scope is not None and arch not in scope and getattr(self, f.name) is not None:
                raise ConfigError(f"model.vision.{f.name}: is a {' / '.join(scope)} setting, but model.arch is "
                                  f"{arch!r}; remove it")  # fmt: skip
        for name, value in DEFAULTS.get(arch, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, list(value) if isinstance(value, list) else value)
        for name in REQUIRED[arch]:
            require(getattr(self, name) is not None, f"model.vision.{name}", f"is required for model.arch {arch!r} "
                    f"({_REQUIRED_WHY.get(name, 'set it or use a preset')})")  # fmt: skip
        require(self.kv_channels is not None or self.hidden_size % self.num_attention_heads == 0,
                "model.vision.hidden_size", f"{self.hidden_size} is not divisible by model.vision.num_attention_heads="
                f"{self.num_attention_heads}" + ("; set model.vision.kv_channels explicitly" if arch == LLAVA else ""))  # fmt: skip
        if arch == LLAVA:
            for name in ("image_height", "image_width"):
                require(getattr(self, name) % self.patch_size == 0, f"model.vision.{name}",
                        f"{getattr(self, name)} is not a multiple of model.vision.patch_size={self.patch_size}")  # fmt: skip
            return
        self._resolve_qwen(arch)

    def _resolve_qwen(self, arch: str) -> None:
        require(len(self.mrope_section) == 3 and min(self.mrope_section) > 0, "model.vision.mrope_section",
                f"expected three positive numbers [temporal, height, width], got {self.mrope_section}")  # fmt: skip
        unit = self.merge_unit
        require(self.min_pixels <= self.max_pixels, "model.vision.min_pixels",
                f"{self.min_pixels} is above model.vision.max_pixels={self.max_pixels}")  # fmt: skip
        for name in ("max_pixels", "video_max_pixels"):
            value = getattr(self, name)
            require(value is None or value >= unit * unit, f"model.vision.{name}",
                    f"{value} is below one merged token ({unit}x{unit} = {unit * unit} pixels)")  # fmt: skip
        if arch == QWEN3_VL:
            side = int(round(self.num_position_embeddings**0.5))
            require(side * side == self.num_position_embeddings, "model.vision.num_position_embeddings",
                    f"qwen3_vl needs a square number (48*48 = 2304), got {self.num_position_embeddings}")  # fmt: skip
            _check_layer_list(self.deepstack_layers, self.num_layers, "model.vision.deepstack_layers")
        else:
            require(self.window_size >= unit, "model.vision.window_size",
                    f"qwen2_5_vl needs a window of at least patch_size*spatial_merge_size={unit} pixels, "
                    f"got {self.window_size}")  # fmt: skip
            _check_layer_list(self.full_attention_layers, self.num_layers, "model.vision.full_attention_layers")
            require(self.tokens_per_second > 0, "model.vision.tokens_per_second",
                    f"qwen2_5_vl needs a positive value, got {self.tokens_per_second}")  # fmt: skip

    # ------------------------------------------------------------------ derived sizes

    @property
    def arch(self) -> str:
        """The ``model.arch`` this section was resolved for."""
        arch = getattr(self, "_arch", None)
        if arch is None:
            raise ValueError("model.vision has not been resolved against a model.arch (build it inside a ModelConfig)")
        return arch

    @property
    def qwen(self) -> bool:
        """A Qwen-VL tower (images at their own resolution, temporal patches, vision start/end tokens)."""
        return self.arch in QWEN_VL_ARCHS

    @property
    def tokens_per_image(self) -> int:
        """llava: placeholder tokens of one image or video frame, one per patch (Qwen-VL: per image, see
        ``data/qwen_media.py``)."""
        return (self.image_height // self.patch_size) * (self.image_width // self.patch_size)

    @property
    def video_id(self) -> int:
        """The placeholder id of video tokens."""
        return self.image_token_id if self.video_token_id is None else self.video_token_id

    @property
    def merge_unit(self) -> int:
        """Qwen-VL: pixels per side of one language-model token (patch_size · spatial_merge_size)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def patch_features(self) -> int:
        """Qwen-VL: values of one pixel row, C · Tp · P · P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


def _check_layer_list(layers: list[int], depth: int, key: str) -> None:
    require(all(0 <= i < depth for i in layers), key, f"{layers} has an index outside the {depth} ViT layers [0, {depth})")
    require(all(a < b for a, b in zip(layers, layers[1:])), key, f"{layers} must be strictly increasing")


_QWEN = (QWEN3_VL, QWEN2_5_VL)
SCOPE: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("kv_channels", "image_height", "image_width", "class_token", "norm_epsilon", "activation",
                     "projector", "projector_ffn_hidden_size"), (LLAVA,)),
    **dict.fromkeys(("in_channels", "temporal_patch_size", "spatial_merge_size", "rotary_base", "mrope_section",
                     "vision_start_token_id", "vision_end_token_id", "min_pixels", "max_pixels", "video_max_pixels"),
                    _QWEN),
    **dict.fromkeys(("num_position_embeddings", "deepstack_layers"), (QWEN3_VL,)),
    **dict.fromkeys(("window_size", "full_attention_layers", "tokens_per_second"), (QWEN2_5_VL,)),
}  # fmt: skip
"""Fields that belong to some vision architectures only (the others belong to all of them)."""

DEFAULTS: dict[str, dict] = {
    LLAVA: dict(class_token=True, norm_epsilon=1e-5, activation="gelu", projector="mlp"),
    QWEN3_VL: dict(in_channels=3, temporal_patch_size=2, spatial_merge_size=2, rotary_base=10000.0),
    QWEN2_5_VL: dict(in_channels=3, temporal_patch_size=2, spatial_merge_size=2, rotary_base=10000.0),
}
"""Architectural constants an unset field takes (the model family's own fixed values)."""

_SHAPE = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "patch_size", "image_token_id",
          "image_mean", "image_std")  # fmt: skip
_QWEN_REQUIRED = ("video_token_id", "mrope_section", "vision_start_token_id", "vision_end_token_id", "min_pixels",
                  "max_pixels")  # fmt: skip
REQUIRED: dict[str, tuple[str, ...]] = {
    LLAVA: (*_SHAPE, "image_height", "image_width"),
    QWEN3_VL: (*_SHAPE, *_QWEN_REQUIRED, "num_position_embeddings", "deepstack_layers"),
    QWEN2_5_VL: (*_SHAPE, *_QWEN_REQUIRED, "window_size", "full_attention_layers", "tokens_per_second"),
}
_REQUIRED_WHY = {
    "image_token_id": "the vocabulary id that marks image tokens in the token stream",
    "video_token_id": "the vocabulary id that marks video tokens",
    "image_mean": "e.g. CLIP's [0.48145466, 0.4578275, 0.40821073], or 0.5s for Qwen3-VL",
    "image_std": "e.g. CLIP's [0.26862954, 0.26130258, 0.27577711], or 0.5s for Qwen3-VL",
    "deepstack_layers": "[] for none",
    "full_attention_layers": "[] for none",
}

PRESET_ARCH: dict[str, str] = {"tiny": LLAVA, "clip-vit-l-14-336": LLAVA, "qwen3-vl-tiny": QWEN3_VL,
                               "qwen2.5-vl-tiny": QWEN2_5_VL}  # fmt: skip
"""The architecture each vision preset (``config/presets.py`` ``VISION_PRESETS``) is a tower of."""
