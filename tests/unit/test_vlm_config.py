"""The ``model.vision`` section (one dataclass for llava, qwen3_vl and qwen2_5_vl): presets, per-arch
scope / required fields / defaults, one-line errors, layout rules, text configs unchanged."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from copd_megatron.config import ConfigError, config_from_dict, config_hash, dump_config, load_config, validate

SMOKE = {"schedule": {"mode": "smoke"}}
VLM = {**SMOKE, "model": {"preset": "tiny", "arch": "llava", "vision": {"preset": "tiny", "image_token_id": 5}}}


def test_vision_preset_fills_fields_and_explicit_keys_win():
    cfg = config_from_dict(VLM, ["model.vision.num_layers=3", "model.vision.freeze_vision=true"])
    v = cfg.model.vision
    assert (v.num_layers, v.hidden_size, v.image_height, v.patch_size, v.freeze_vision) == (3, 64, 32, 8, True)
    assert v.tokens_per_image == 16 and v.video_id == 5  # video frames use the image id unless set
    clip = config_from_dict({**SMOKE, "model": {"preset": "qwen2.5-7b", "arch": "llava",
                                                 "vision": {"preset": "clip-vit-l-14-336", "image_token_id": 151655}}})
    assert clip.model.vision.tokens_per_image == 576 and clip.model.vision.activation == "quick_gelu"
    assert config_from_dict(SMOKE).model.vision is None  # text-only by default


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.vision.preset=vit-huge"], "model.vision.preset: unknown preset 'vit-huge'"),
        (["model.vision.image_token_id=null"], "model.vision.image_token_id: is required for model.arch 'llava'"),
        (["model.vision.image_token_id=512"], "model.vision.image_token_id: 512 is not a vocabulary id (model.vocab_size=512)"),
        (["model.vision.video_token_id=-1"], "model.vision.video_token_id: must be >= 0, got -1"),
        (["model.vision.image_height=30"], "model.vision.image_height: 30 is not a multiple of model.vision.patch_size=8"),
        (["model.vision.image_std=[1, 1]"], "model.vision.image_std: expected 3 values"),
        (["model.vision.projector=conv"], "model.vision.projector: 'conv' is not allowed; expected one of 'mlp', 'affine'"),
        (["model.vision.num_layer=2"], "model.vision.num_layer: unknown key (did you mean 'num_layers'?)"),
        (["model.vision.video_fps=0"], "model.vision.video_fps: must be > 0 or null"),
        (["model.arch=gpt"], "model.arch: 'gpt' has no vision tower; set model.arch to one of llava, qwen3_vl, "
                              "qwen2_5_vl to use model.vision"),
        (["model.vision.spatial_merge_size=2"], "model.vision.spatial_merge_size: is a qwen3_vl / qwen2_5_vl setting, "
                                                "but model.arch is 'llava'; remove it"),
        (["model.vision.deepstack_layers=[0]"], "model.vision.deepstack_layers: is a qwen3_vl setting"),
        (["model.vision.image_mean=null"], "model.vision.image_mean: is required for model.arch 'llava' (e.g. CLIP's"),
        (["model.vision.preset=qwen3-vl-tiny"], "model.vision.preset: 'qwen3-vl-tiny' is a qwen3_vl tower, but "
                                                "model.arch is 'llava'"),
        (["model.vision=null"], "model.arch: 'llava' needs a model.vision section"),
    ],
)  # fmt: skip
def test_vision_field_errors_are_one_line(overrides, expected):
    with pytest.raises(ConfigError) as e:
        config_from_dict(VLM, overrides)
    assert expected in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides, world, expected",
    [
        (["parallel.tp=2", "model.vision.num_attention_heads=3", "model.vision.hidden_size=96"], 2,
         "parallel.tp: 2 does not divide model.vision.num_attention_heads=3; allowed tp values: [1, 3]"),
        (["parallel.tp=2", "model.vision.ffn_hidden_size=129"], 2, "does not divide model.vision.ffn_hidden_size=129"),
        (["parallel.tp=2", "model.vision.projector_ffn_hidden_size=33"], 2,
         "does not divide model.vision.projector_ffn_hidden_size=33"),
        (["parallel.tp=2", "parallel.sequence_parallel=true"], 2, "parallel.sequence_parallel: sequence and context"),
        (["parallel.cp=2"], 2, "parallel.cp: sequence and context parallelism are not supported with model.vision"),
        (["parallel.pp=2", "parallel.vpp=1"], 2, "parallel.vpp: virtual pipeline stages are not supported"),
    ],
)  # fmt: skip
def test_layout_rules_for_the_vision_tower(overrides, world, expected):
    with pytest.raises(ConfigError) as e:
        validate(config_from_dict(VLM, overrides), world, cuda_available=False)
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert validate(config_from_dict(VLM, ["parallel.tp=2", "parallel.pp=2"]), 4, cuda_available=False).dp == 1


def test_text_config_hash_ignores_the_absent_vision_section():
    from copd_megatron.config.load import _RESUMABLE

    cfg = load_config("configs/count_sort_cpu.yaml")
    tree = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE}
    tree["model"].pop("vision")
    tree["schedule"].pop("train_steps")
    # The hash a text run had before model.vision existed: resumes of older runs stay allowed.
    assert config_hash(cfg) == hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]
    assert config_hash(config_from_dict(VLM)) != config_hash(config_from_dict({**SMOKE, "model": {"preset": "tiny"}}))


def test_resolved_config_and_checkpoint_meta_round_trip(tmp_path):
    from copd_megatron.checkpoint.dist_ckpt import read_meta, write_meta

    cfg = config_from_dict(VLM, ["model.vision.video_token_id=6", "model.vision.max_frames=4"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "metadata.json").write_text("{}")
    write_meta(tmp_path / "ckpt", cfg.model, "fp32")
    model, dtype = read_meta(tmp_path / "ckpt")
    assert model == cfg.model and dtype == "fp32"


QWEN = {**SMOKE, "model": {"preset": "tiny", "arch": "qwen3_vl", "num_layers": 2, "kv_channels": 16,
                           "vision": {"preset": "qwen3-vl-tiny", "image_token_id": 4, "video_token_id": 5,
                                      "vision_start_token_id": 6, "vision_end_token_id": 7, "mrope_section": [4, 2, 2]}}}


def test_one_section_for_every_arch_with_arch_defaults():
    """The same dataclass serves llava and Qwen-VL: each arch's constants filled in, the other arch's
    fields left null, and the resolved config round-trips through YAML."""
    q = config_from_dict(QWEN).model.vision
    assert (q.arch, q.temporal_patch_size, q.spatial_merge_size, q.in_channels, q.rotary_base) == ("qwen3_vl", 2, 2, 3, 1e4)
    assert q.image_height is None and q.class_token is None and q.window_size is None and q.merge_unit == 8
    llava = config_from_dict(VLM).model.vision
    assert (llava.class_token, llava.projector, llava.norm_epsilon) == (True, "mlp", 1e-5) and llava.spatial_merge_size is None
    # Shared media settings mean the same for both
    for cfg in (QWEN, VLM):
        v = config_from_dict(cfg, ["model.vision.max_frames=4", "model.vision.freeze_vision=true"]).model.vision
        assert (v.max_frames, v.freeze_vision, v.video_fps) == (4, True, 1.0)
    # The 4B preset: arch, tower and processor settings from the released model
    m = config_from_dict({**SMOKE, "model": {"preset": "qwen3-vl-4b"}}).model
    assert m.arch == "qwen3_vl" and m.vision.num_layers == 24 and m.vision.image_mean == [0.5] * 3
    assert config_from_dict({**SMOKE, "model": {"preset": "qwen2.5-vl-7b"}}).model.vision.tokens_per_second == 2.0


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.vision.image_height=32"], "model.vision.image_height: is a llava setting, but model.arch is 'qwen3_vl'"),
        (["model.vision.window_size=16"], "model.vision.window_size: is a qwen2_5_vl setting, but model.arch is 'qwen3_vl'"),
        (["model.vision.vision_end_token_id=null"], "model.vision.vision_end_token_id: is required for model.arch 'qwen3_vl'"),
        (["model.vision.deepstack_layers=null"], "model.vision.deepstack_layers: is required for model.arch 'qwen3_vl' ([] for none)"),
        (["model.arch=qwen2_5_vl"], "model.vision.preset: 'qwen3-vl-tiny' is a qwen3_vl tower, but model.arch is 'qwen2_5_vl'"),
        (["model.arch=qwen2_5_vl", "model.vision.preset=null", "model.vision.num_position_embeddings=64"],
         "model.vision.num_position_embeddings: is a qwen3_vl setting, but model.arch is 'qwen2_5_vl'"),
        (["model.vision.preset=tiny"], "model.vision.preset: 'tiny' is a llava tower, but model.arch is 'qwen3_vl'"),
        (["model.vision.max_pixels=32"], "model.vision.min_pixels: 64 is above model.vision.max_pixels=32"),
        (["model.vision.min_pixels=16", "model.vision.max_pixels=32"], "model.vision.max_pixels: 32 is below one merged token"),
        (["model.vision.mrope_section=[4, 2, 1]"], "model.vision.mrope_section: [4, 2, 1] sums to 7; it must be head_dim / 2 = 8"),
        (["model.vision.video_token_id=600"], "model.vision.video_token_id: 600 is not a vocabulary id"),
    ],
)  # fmt: skip
def test_qwen_vision_errors_are_one_line(overrides, expected):
    with pytest.raises(ConfigError) as e:
        config_from_dict(QWEN, overrides)
    assert expected in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_qwen_layout_rules_and_round_trip(tmp_path):
    with pytest.raises(ConfigError, match="parallel.tp: 2 does not divide model.vision.ffn_hidden_size=63"):
        validate(config_from_dict(QWEN, ["parallel.tp=2", "model.vision.ffn_hidden_size=63"]), 2, cuda_available=False)
    with pytest.raises(ConfigError, match="parallel.vpp: virtual pipeline stages are not supported"):
        validate(config_from_dict(QWEN, ["parallel.pp=2", "parallel.vpp=1"]), 2, cuda_available=False)
    assert validate(config_from_dict(QWEN, ["parallel.pp=2"]), 2, cuda_available=False).dp == 1
    cfg = config_from_dict(QWEN)
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg and again.model.vision.arch == "qwen3_vl"
