"""Qwen3-VL / Qwen2.5-VL pieces that need no process group, each against transformers or a
hand-checked number: mRoPE ids (``get_rope_index``), rotary angles, patch geometry, the HF
mapping (names, shapes, config both ways, refusals), the ``model.vision`` config section,
its cross-section checks and the presets' parameter counts."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from copd_megatron.checkpoint import hf_vl
from copd_megatron.checkpoint.hf import hf_config_from_model, hf_shapes, hf_to_mcore, mcore_to_hf, model_fields_from_hf
from copd_megatron.config import config_from_dict, validate
from copd_megatron.config.schema import ConfigError
from copd_megatron.model.qwen_vl import grid, rope

transformers = pytest.importorskip("transformers", reason="Qwen-VL reference tests need transformers")
from transformers import vision_utils  # noqa: E402

IMG, VID, VS, VE = 1000, 1001, 1002, 1003
SMOKE = {"schedule": {"mode": "smoke"}}


def _hf_config(family: str) -> dict:
    """config.json of a tiny random model (what ``save_pretrained`` writes, trimmed)."""
    ids = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
    text = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=4096)  # fmt: skip
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, spatial_merge_size=2, out_hidden_size=64)
    if family == "qwen3_vl":
        rope_p = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [6, 5, 5], "mrope_interleaved": True}
        return {"architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl",
                "text_config": {**text, "head_dim": 32, "rope_parameters": rope_p},
                "vision_config": {**vision, "patch_size": 16, "num_position_embeddings": 16,
                                  "deepstack_visual_indexes": [0, 1], "hidden_act": "gelu_pytorch_tanh"},
                "tie_word_embeddings": False, **ids}  # fmt: skip
    rope_p = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "text_config": {**text, "rope_parameters": rope_p},
            "vision_config": {**vision, "patch_size": 14, "window_size": 56, "fullatt_block_indexes": [1],
                              "tokens_per_second": 2, "hidden_act": "silu"}, "tie_word_embeddings": True, **ids}  # fmt: skip


def _hf_model(family: str):
    cls = {"qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
           "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration}[family]  # fmt: skip
    return cls(cls.config_class(**_hf_config(family)))


def _model(family: str):
    fields = model_fields_from_hf(_hf_config(family), "config.json", 64)
    return config_from_dict({"model": fields, **SMOKE}).model


def _block(kind: int, n: int) -> list[int]:
    return [VS] + [kind] * n + [VE]


# ----------------------------------------------------------------------------- mRoPE


def _rope_case(family: str):
    """Two rows (the second left with padding), several images and videos of different shapes."""
    if family == "qwen3_vl":  # one block per temporal slice of a video, a timestamp before each
        video = [50] + _block(VID, 4) + [51] + _block(VID, 4)
        row0 = [1, 2] + _block(IMG, 6) + [3] + video + [4] + _block(IMG, 6) + [5]
        images, videos = torch.tensor([[1, 4, 6], [1, 6, 4], [1, 4, 4]]), torch.tensor([[2, 4, 4]])
        seconds = None
    else:  # a video is one block of t·h'·w' tokens; its temporal ids step by tokens_per_second · seconds
        row0 = [1, 2] + _block(IMG, 6) + [3] + _block(VID, 12) + [4] + _block(VID, 8) + _block(IMG, 4) + [5]
        images, videos = torch.tensor([[1, 4, 6], [1, 4, 4]]), torch.tensor([[3, 4, 4], [2, 4, 4], [1, 4, 4]])
        seconds = torch.tensor([0.7, 1.3, 2.0])
    row1 = [7] + (_block(IMG, 4) if family == "qwen3_vl" else _block(VID, 4)) + [8]
    mask = torch.ones(2, len(row0), dtype=torch.long)
    mask[1, len(row1) :] = 0
    ids = torch.tensor([row0, row1 + [0] * (len(row0) - len(row1))])
    return ids, mask, images, videos, seconds


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_mrope_ids_equal_transformers_get_rope_index(family: str) -> None:
    ids, mask, images, videos, seconds = _rope_case(family)
    hf = _hf_model(family).model
    types = rope.token_types(ids, IMG, VID)
    extra = {"second_per_grid_ts": seconds} if seconds is not None else {}
    want, want_delta = hf.get_rope_index(ids, types, image_grid_thw=images, video_grid_thw=videos,
                                         attention_mask=mask, **extra)  # fmt: skip
    got, delta = rope.mrope_position_ids(
        ids, image_grid_thw=images, video_grid_thw=videos, image_token_id=IMG, video_token_id=VID,
        spatial_merge_size=2, family=family, tokens_per_second=2, second_per_grid_ts=seconds, attention_mask=mask,
    )  # fmt: skip
    assert torch.equal(got, want) and torch.equal(delta, want_delta.view(-1))
    # A hand-checked piece: 2 text tokens, <vision_start>, then a 1×4×6 image (2×3 merged) at p = 3.
    assert got[:, 0, 3:9].tolist() == [[3] * 6, [3, 3, 3, 4, 4, 4], [3, 4, 5, 3, 4, 5]]
    assert got[:, 0, 9].tolist() == [6, 6, 6]  # <vision_end>: p advanced by max(h', w') = 3
    # Generated tokens continue at n + delta on every axis.
    after = rope.decode_position_ids(ids.shape[1], 2, delta)
    assert after[:, 0].tolist() == [[int(got[0, 0].max()) + 1, int(got[0, 0].max()) + 2]] * 3


def test_mrope_ids_refuse_placeholders_that_disagree_with_grids() -> None:
    kw = dict(video_grid_thw=None, image_token_id=IMG, video_token_id=VID, spatial_merge_size=2, family="qwen3_vl")
    ids = torch.tensor([[1] + _block(IMG, 6) + [2]])
    with pytest.raises(ValueError, match="describes 2 blocks but the tokens hold 1"):
        rope.mrope_position_ids(ids, image_grid_thw=torch.tensor([[1, 4, 6], [1, 4, 6]]), **kw)
    with pytest.raises(ValueError, match="cannot hold the next image block of 1x3x3"):
        rope.mrope_position_ids(ids, image_grid_thw=torch.tensor([[1, 6, 6]]), **kw)
    with pytest.raises(ValueError, match="more image placeholder tokens"):
        rope.mrope_position_ids(ids, image_grid_thw=None, **kw)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_mrope_angles_equal_transformers_rotary(family: str) -> None:
    """Qwen3-VL interleaves the T/H/W frequencies, Qwen2.5-VL chunks them (the latter is
    Megatron-Core's MultimodalRotaryEmbedding; the former is not)."""
    ids, mask, images, videos, seconds = _rope_case(family)
    hf = _hf_model(family).model.language_model
    pos, _ = rope.mrope_position_ids(ids, image_grid_thw=images, video_grid_thw=videos, image_token_id=IMG,
                                     video_token_id=VID, spatial_merge_size=2, family=family, tokens_per_second=2,
                                     second_per_grid_ts=seconds, attention_mask=mask)  # fmt: skip
    cos, sin = hf.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)  # [B, S, head_dim]
    section = hf.config.rope_parameters["mrope_section"]
    theta = hf.config.rope_parameters["rope_theta"]
    angles = rope.mrope_angles(pos, rope.inverse_frequencies(2 * sum(section), theta),
                               rope.mrope_axes(section, interleaved=family == "qwen3_vl"))  # fmt: skip
    assert angles.shape == (ids.shape[1], 2, 1, 2 * sum(section))
    torch.testing.assert_close(angles[:, :, 0].transpose(0, 1).cos(), cos, rtol=0, atol=0)
    torch.testing.assert_close(angles[:, :, 0].transpose(0, 1).sin(), sin, rtol=0, atol=0)
    axes = rope.mrope_axes([6, 5, 5], interleaved=True).tolist()
    assert axes[:9] == [0, 1, 2, 0, 1, 2, 0, 1, 2] and axes[15] == 0


def test_vision_rotary_and_geometry_equal_transformers() -> None:
    grids = torch.tensor([[1, 4, 6], [2, 6, 4], [1, 8, 12], [3, 2, 2], [1, 10, 14]])
    coords = grid.patch_coords(grids, 2)
    assert torch.equal(coords, vision_utils.get_vision_position_ids(grids, 2))
    for side in (4, 48):  # up- and down-sampling of the learned position table
        idx, w = grid.position_table_taps(grids, side, 2)
        want_idx, want_w = vision_utils.get_vision_interpolation_indices_and_weights(
            grids, side, mode="bilinear", align_corners=True, spatial_merge_size=2)  # fmt: skip
        assert torch.equal(idx, want_idx) and torch.equal(w, want_w)
    for window, patch in ((56, 14), (112, 14), (28, 14)):
        order, lengths = grid.window_partition(grids, 2, window, patch)
        want_order, want_cu = vision_utils.get_vision_window_index(grids, 2, window, patch)
        assert torch.equal(order, want_order)
        assert torch.equal(torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).int(), want_cu)
    assert torch.equal(torch.nn.functional.pad(grid.frame_segments(grids).cumsum(0), (1, 0)).int(),
                       vision_utils.get_vision_cu_seqlens(grids))  # fmt: skip
    vit = _hf_model("qwen3_vl").model.visual
    cos, _ = vit.rotary_pos_emb(torch.zeros(1), coords)
    torch.testing.assert_close(rope.vision_rotary_angles(coords, 16, 10000.0).cos(), cos, rtol=0, atol=0)
    mask = grid.segment_mask(torch.tensor([2, 3]))
    assert mask.shape == (1, 1, 5, 5) and mask[0, 0].int().tolist()[1] == [0, 0, 1, 1, 1]


# ----------------------------------------------------------------------------- HF mapping


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_hf_names_and_shapes_equal_a_transformers_model(family: str) -> None:
    m = _model(family)
    model = _hf_model(family)
    names = hf_vl.naming_of(m)
    saved = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "lm_head.weight" or not m.tie_embeddings}
    if names == "legacy":  # what save_pretrained writes for Qwen2.5-VL
        saved = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): s for k, s in saved.items()}
    assert hf_shapes(m) == saved
    # The mapping round-trips exactly, from either naming.
    g = torch.Generator().manual_seed(0)
    for naming in ("runtime", "legacy"):
        hf = {k: torch.randn(s, generator=g) for k, s in hf_vl.hf_shapes(m, naming).items()}
        back = dict(hf_vl.mcore_to_hf_iter(hf_to_mcore(hf, m).__getitem__, m, naming))
        assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    mc = hf_to_mcore({k: torch.randn(s, generator=g) for k, s in hf_shapes(m).items()}, m)
    assert mcore_to_hf(mc, m).keys() == hf_shapes(m).keys()


def test_vit_qkv_is_regrouped_per_head() -> None:
    m = _model("qwen3_vl")
    hf = {k: torch.zeros(s) for k, s in hf_shapes(m).items()}
    rows = torch.arange(96.0)  # HF: [q heads 0,1 | k heads 0,1 | v heads 0,1], 16 rows each
    hf["model.visual.blocks.0.attn.qkv.bias"] = rows
    fused = hf_to_mcore(hf, m)["vision_model.decoder.layers.0.self_attention.linear_qkv.bias"]
    assert fused.view(6, 16)[:, 0].tolist() == [0, 32, 64, 16, 48, 80]  # per head [q; k; v]


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_config_maps_both_ways_and_transformers_accepts_it(family: str) -> None:
    m = _model(family)
    assert m.arch == family and m.qk_layernorm == (family == "qwen3_vl")
    assert m.add_qkv_bias == (family == "qwen2_5_vl") and m.tie_embeddings == (family == "qwen2_5_vl")
    for template in (None, _hf_config(family)):
        cfg = hf_config_from_model(m, template=template)
        again = config_from_dict({"model": model_fields_from_hf(cfg, "x", 64), **SMOKE}).model
        assert again == m, template
        hf_cfg = type(_hf_model(family).config)(**cfg)
        assert hf_cfg.vision_config.out_hidden_size == 64 and hf_cfg.tie_word_embeddings == m.tie_embeddings


def test_flat_hub_qwen25_config_and_refusals() -> None:
    """Qwen2.5-VL's hub config.json (transformers 4.x) is flat, with rope_scaling type mrope."""
    nested = _hf_config("qwen2_5_vl")
    flat = {**{k: v for k, v in nested.items() if k != "text_config"}, **nested["text_config"]}
    flat.pop("rope_parameters")
    flat.update(rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, rope_theta=1e6)
    assert model_fields_from_hf(flat, "x", 64) == model_fields_from_hf(nested, "x", 64)
    m = _model("qwen2_5_vl")
    exported = hf_config_from_model(m, template=flat)  # a flat template stays flat, rope_scaling style kept
    assert "text_config" not in exported and exported["rope_scaling"]["mrope_section"] == [2, 3, 3]
    assert config_from_dict({"model": model_fields_from_hf(exported, "x", 64), **SMOKE}).model == m
    assert transformers.Qwen2_5_VLConfig(**exported).text_config.hidden_size == 64
    bad = [
        ({"vision_config": {**nested["vision_config"], "hidden_act": "gelu"}}, "vision_config.hidden_act='gelu'"),
        ({"vision_config": {**nested["vision_config"], "out_hidden_size": 32}}, "out_hidden_size=32 differs"),
        ({"text_config": {**nested["text_config"], "rope_parameters": {"rope_theta": 1e6}}}, "no rope_parameters.mrope"),
        ({"vision_config": None}, "vision_config is missing"),
    ]
    for change, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            model_fields_from_hf({**nested, **change}, "config.json", 64)
    with pytest.raises(ConfigError, match="template config.json: num_layers is 3"):
        hf_config_from_model(m, template={**nested, "text_config": {**nested["text_config"], "num_hidden_layers": 3}})
    with pytest.raises(ConfigError, match="does not match model.arch='qwen2_5_vl'"):
        hf_config_from_model(m, arch="Qwen3VLForConditionalGeneration")


# ----------------------------------------------------------------------------- config


def test_vision_section_is_checked_field_by_field() -> None:
    base = {"preset": "qwen3-vl-4b"}
    cases = [
        ({"vision": {"mrope_section": [24, 20, 10]}}, "model.vision.mrope_section: [24, 20, 10] sums to 54"),
        ({"vision": {"window_size": 112}}, "model.vision.window_size: is a qwen2_5_vl setting, but model.arch is 'qwen3_vl'"),
        ({"vision": {"deepstack_layers": [11, 5]}}, "model.vision.deepstack_layers: [11, 5] must be strictly increasing"),
        ({"vision": {"num_position_embeddings": 2000}}, "needs a square number"),
        ({"vision": {"num_layer": 3}}, "model.vision.num_layer: unknown key (did you mean 'num_layers'?)"),
        ({"arch": "qwen2_5_vl"}, "model.vision.num_position_embeddings: is a qwen3_vl setting, but model.arch is 'qwen2_5_vl'"),
        ({"num_layers": 2}, "model.vision.deepstack_layers: 3 taps feed language layers 0..2"),
        ({"vocab_size": 1000}, "model.vision.image_token_id: 151655 is not a vocabulary id (model.vocab_size=1000)"),
    ]
    for change, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)):
            config_from_dict({"model": {**base, **change}, **SMOKE})
    # A preset's vision keys are merged, not replaced; text-only presets have no vision section.
    cfg = config_from_dict({"model": {**base, "vision": {"num_layers": 20}}, **SMOKE})
    assert cfg.model.vision.num_layers == 20 and cfg.model.vision.deepstack_layers == [5, 11, 17]
    assert config_from_dict({"model": {"preset": "qwen3-4b"}, **SMOKE}).model.vision is None


def test_validate_checks_the_tower_against_the_layout() -> None:
    def check(preset: str, *overrides: str, world: int = 8) -> None:
        validate(config_from_dict({"model": {"preset": preset}, **SMOKE}, list(overrides)), world, cuda_available=False)

    check("qwen3-vl-4b", "parallel.tp=8")
    with pytest.raises(ConfigError, match=r"parallel.tp: 2 does not divide model.vision.ffn_hidden_size=3421"):
        check("qwen3-vl-4b", "parallel.tp=2", "model.vision.ffn_hidden_size=3421")
    with pytest.raises(ConfigError, match="the first pipeline stage holds 2 language layers but"):
        check("qwen3-vl-4b", "parallel.pp=18", world=18)
    with pytest.raises(ConfigError, match="parallel.cp: sequence and context parallelism are not supported with model.vision"):
        check("qwen3-vl-2b", "parallel.cp=2", world=2)


# Parameter counts of the released safetensors checkpoints (Qwen/Qwen3-VL-{2B,4B,8B}-Instruct,
# Qwen/Qwen2.5-VL-{3B,7B}-Instruct): a preset with one wrong shape misses them.
RELEASED = {"qwen3-vl-2b": 2_127_532_032, "qwen3-vl-4b": 4_437_815_808, "qwen3-vl-8b": 8_767_123_696,
            "qwen2.5-vl-3b": 3_754_622_976, "qwen2.5-vl-7b": 8_292_166_656}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_presets_have_the_released_parameter_counts(preset: str) -> None:
    m = config_from_dict({"model": {"preset": preset}, **SMOKE}).model
    count = sum(torch.Size(s).numel() for s in hf_shapes(m).values())
    assert count == RELEASED[preset]
    assert dataclasses.asdict(m)["arch"] in ("qwen3_vl", "qwen2_5_vl")


def test_cli_refuses_vl_checkpoints_it_cannot_explain(tmp_path, capsys) -> None:
    """One line on stderr, exit 2, nothing written: a tensor the config does not explain, an
    unsupported ViT activation, a template of another family."""
    import json

    from safetensors.torch import load_file, save_file

    from copd_megatron.checkpoint.convert_cli import main

    hf_dir = tmp_path / "hf"
    _hf_model("qwen3_vl").save_pretrained(hf_dir)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    save_file({**tensors, "model.visual.extra.weight": torch.zeros(2)}, str(hf_dir / "model.safetensors"))
    bad_act = tmp_path / "bad_act"
    bad_act.mkdir()
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg["vision_config"]["hidden_act"] = "quick_gelu"
    (bad_act / "config.json").write_text(json.dumps(cfg))
    cases = [(hf_dir, "1 tensors the config does not explain, e.g. model.visual.extra.weight"),
             (bad_act, "vision_config.hidden_act='quick_gelu' is not supported for qwen3_vl")]  # fmt: skip
    capsys.readouterr()  # save_pretrained's progress bar
    for src, message in cases:
        out = tmp_path / f"out_{src.name}"
        assert main(["hf-to-mcore", "--hf-dir", str(src), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("preset", sorted(RELEASED))
def test_closed_form_vision_count_equals_the_converters_tensor_shapes(preset: str) -> None:
    """``copd-train --check``'s tower count (config/summary.py, no checkpoint code) against the shapes."""
    from math import prod

    from copd_megatron.checkpoint.hf_vl import mcore_shapes
    from copd_megatron.config.summary import count_parameters, vision_parameters

    m = config_from_dict({"model": {"preset": preset}, **SMOKE}).model
    shapes = mcore_shapes(m)
    assert vision_parameters(m) == sum(prod(s) for k, s in shapes.items() if k.startswith("vision_model."))
    assert count_parameters(m) + vision_parameters(m) >= RELEASED[preset]  # + the padded vocabulary rows
