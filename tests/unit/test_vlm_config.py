"""The ``model.vision`` section: presets, one-line errors, layout rules, text configs unchanged."""

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
        (["model.vision.image_token_id=null"], "model.vision.image_token_id: is required"),
        (["model.vision.image_token_id=512"], "model.vision.image_token_id: 512 is not a vocabulary id (model.vocab_size=512)"),
        (["model.vision.video_token_id=-1"], "model.vision.video_token_id: must be >= 0, got -1"),
        (["model.vision.image_height=30"], "model.vision.image_height: 30 is not a multiple of model.vision.patch_size=8"),
        (["model.vision.image_std=[1, 1]"], "model.vision.image_std: expected 3 values"),
        (["model.vision.projector=conv"], "model.vision.projector: 'conv' is not allowed; expected one of 'mlp', 'affine'"),
        (["model.vision.num_layer=2"], "model.vision.num_layer: unknown key (did you mean 'num_layers'?)"),
        (["model.vision.video_fps=0"], "model.vision.video_fps: must be > 0 or null"),
        (["model.arch=gpt"], "model.arch: 'gpt' has no vision tower; set model.arch: llava to use model.vision"),
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
