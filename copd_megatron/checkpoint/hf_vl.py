"""Hugging Face ⇄ Megatron-Core mapping for Qwen3-VL and Qwen2.5-VL: pure functions.

The language model maps exactly as the text families do (``checkpoint/hf.py``: Qwen3 with
QK-norm for Qwen3-VL, Qwen2 with QKV bias for Qwen2.5-VL), under the prefixes below. HF files
come in two namings; both are read, and export writes the one transformers 5 writes itself
(Qwen3-VL: runtime names; Qwen2.5-VL: the legacy names its checkpoints were released with)::

    HF (runtime / legacy)                       Megatron
    model.language_model.X  /  model.X          language_model.<text mapping of model.X>
    lm_head.weight                              language_model.output_layer.weight
    model.visual.Y          /  visual.Y         vision_model.<table below>

Vision tower (i = ViT layer, j = DeepStack tap; local-spec names, TE's fused names accepted)::

    patch_embed.proj.{weight,bias}    [hv, C, Tp, P, P]   patch_embed.proj.{weight,bias} (no bias: Qwen2.5-VL)
    pos_embed.weight                  [side², hv]         pos_embed.weight (Qwen3-VL)
    blocks.i.norm1.{weight,bias}                          decoder.layers.i.input_layernorm.{weight,bias}
    blocks.i.attn.qkv.{weight,bias}   [Q | K | V]         decoder.layers.i.self_attention.linear_qkv.* = per head [q_h; k_h; v_h]
    blocks.i.attn.proj.{weight,bias}                      decoder.layers.i.self_attention.linear_proj.*
    blocks.i.norm2.{weight,bias}                          decoder.layers.i.pre_mlp_layernorm.{weight,bias}
    blocks.i.mlp.linear_fc{1,2}.*     (Qwen3-VL)          decoder.layers.i.mlp.linear_fc{1,2}.*
    blocks.i.mlp.{gate,up}_proj.*     (Qwen2.5-VL)        decoder.layers.i.mlp.linear_fc1.* = [gate; up] (weights and biases)
    blocks.i.mlp.down_proj.*          (Qwen2.5-VL)        decoder.layers.i.mlp.linear_fc2.*
    merger.norm.* / merger.ln_q.weight                    merger.norm.*
    merger.linear_fc{1,2}.* / merger.mlp.{0,2}.*          merger.linear_fc{1,2}.*
    deepstack_merger_list.j.{norm,linear_fc1,linear_fc2}.*  deepstack_mergers.j.{norm,linear_fc1,linear_fc2}.*

The ViT's QKV is the GQA layout of ``hf.fuse_qkv`` with one query per group (heads = groups),
so TP splits it by whole heads. Qwen2.5-VL norms carry no bias (RMSNorm).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import torch

from copd_megatron.checkpoint import hf as text
from copd_megatron.config.schema import ConfigError, ModelConfig

ARCHITECTURES = {"Qwen3VLForConditionalGeneration": "qwen3_vl", "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl"}
"""Supported HF vision-language architectures and their ``model_type``."""
FAMILY_ARCH = {family: arch for arch, family in ARCHITECTURES.items()}
_VIT_ACT = {"qwen3_vl": "gelu_pytorch_tanh", "qwen2_5_vl": "silu"}
_TEXT_DEFAULTS = {  # transformers' class defaults where a config.json may omit the field
    "qwen3_vl": {"rope_theta": 500000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 128000},
    "qwen2_5_vl": {"rope_theta": 1000000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 32768},
}
# What the hub's preprocessor_config.json says when a checkpoint directory has none (see processor_fields).
_PROCESSOR_DEFAULTS = {
    "qwen3_vl": dict(image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], min_pixels=65536, max_pixels=16777216),
    "qwen2_5_vl": dict(image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                       min_pixels=3136, max_pixels=12845056),
}
_PREFIXES = {"runtime": ("model.language_model.", "model.visual."), "legacy": ("model.", "visual.")}


# ----------------------------------------------------------------------------- config mapping


def _text_section(hf: dict) -> dict:
    """The language model's fields: ``text_config``, or the top level of a flat (hub 4.x) config."""
    return hf["text_config"] if isinstance(hf.get("text_config"), dict) and hf["text_config"] else hf


def _rope(t: dict, family: str, src: str) -> tuple[float, list[int]]:
    params = dict(t.get("rope_parameters") or t.get("rope_scaling") or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ConfigError(f"{src}: text rope type {kind!r} is not supported; expected mRoPE ('default' or 'mrope')")
    section = params.get("mrope_section")
    if not section:
        raise ConfigError(f"{src}: the text config has no rope_parameters.mrope_section")
    theta = params.get("rope_theta", t.get("rope_theta", _TEXT_DEFAULTS[family]["rope_theta"]))
    return float(theta), [int(x) for x in section]


def _check_supported(hf: dict, t: dict, vis: dict, family: str, src: str) -> None:
    if t.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{src}: text hidden_act={t['hidden_act']!r} is not supported; only 'silu' (SwiGLU)")
    if vis.get("hidden_act", _VIT_ACT[family]) != _VIT_ACT[family]:
        raise ConfigError(f"{src}: vision_config.hidden_act={vis['hidden_act']!r} is not supported for {family}; "
                          f"expected {_VIT_ACT[family]!r}")  # fmt: skip
    if family == "qwen3_vl" and t.get("attention_bias"):
        raise ConfigError(f"{src}: attention_bias=true is not supported for Qwen3-VL")
    if t.get("use_sliding_window"):
        raise ConfigError(f"{src}: use_sliding_window=true is not supported")
    if hf.get("quantization_config") or t.get("quantization_config"):
        raise ConfigError(f"{src}: quantization_config is set; convert an unquantized checkpoint")
    theta = (vis.get("rope_parameters") or {}).get("rope_type", "axial")
    if theta not in ("axial", "default"):
        raise ConfigError(f"{src}: vision_config rope type {theta!r} is not supported; expected 'axial'")


def model_fields(hf: dict, src: str, make_vocab_size_divisible_by: int) -> dict:
    """``ModelConfig`` fields (with a ``vision`` section) from a Qwen-VL config.json dict."""
    family = ARCHITECTURES[(hf.get("architectures") or [FAMILY_ARCH.get(hf.get("model_type"))])[0]]
    t, vis = _text_section(hf), hf.get("vision_config")
    if not isinstance(vis, dict):
        raise ConfigError(f"{src}: vision_config is missing")
    _check_supported(hf, t, vis, family, src)
    theta, section = _rope(t, family, src)
    heads, hidden = t["num_attention_heads"], t["hidden_size"]
    head_dim = (t.get("head_dim") if family == "qwen3_vl" else None) or hidden // heads
    out = vis.get("out_hidden_size", hidden)
    if out != hidden:
        raise ConfigError(f"{src}: vision_config.out_hidden_size={out} differs from the text hidden_size={hidden}")
    defaults = _TEXT_DEFAULTS[family]
    vision = dict(
        num_layers=vis["depth"], hidden_size=vis["hidden_size"], ffn_hidden_size=vis["intermediate_size"],
        num_attention_heads=vis["num_heads"], in_channels=vis.get("in_channels", vis.get("in_chans", 3)),
        patch_size=vis.get("patch_size", 16 if family == "qwen3_vl" else 14),
        temporal_patch_size=vis.get("temporal_patch_size", 2), spatial_merge_size=vis.get("spatial_merge_size", 2),
        rotary_base=float((vis.get("rope_parameters") or {}).get("rope_theta", 10000.0)), mrope_section=section,
        **{k: hf.get(k, default) for k, default in (("image_token_id", 151655), ("video_token_id", 151656),
                                                     ("vision_start_token_id", 151652), ("vision_end_token_id", 151653))},
        **_PROCESSOR_DEFAULTS[family],
    )  # fmt: skip
    if family == "qwen3_vl":
        vision.update(num_position_embeddings=vis.get("num_position_embeddings", 2304),
                      deepstack_layers=list(vis.get("deepstack_visual_indexes", (8, 16, 24))))  # fmt: skip
    else:
        vision.update(window_size=vis.get("window_size", 112), tokens_per_second=float(vis.get("tokens_per_second", 4)),
                      full_attention_layers=list(vis.get("fullatt_block_indexes", (7, 15, 23, 31))))  # fmt: skip
    return dict(
        arch=family, num_layers=t["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=t["intermediate_size"],
        num_attention_heads=heads, num_query_groups=t.get("num_key_value_heads") or heads,
        kv_channels=head_dim if head_dim * heads != hidden else None, vocab_size=t["vocab_size"],
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        seq_length=t.get("max_position_embeddings", defaults["max_position_embeddings"]), rotary_base=theta,
        normalization="RMSNorm", norm_epsilon=float(t.get("rms_norm_eps", defaults["rms_norm_eps"])),
        activation="swiglu", add_qkv_bias=family == "qwen2_5_vl", add_bias_linear=False,
        qk_layernorm=family == "qwen3_vl",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False) or t.get("tie_word_embeddings", False)),
        vision=vision,
    )  # fmt: skip


def processor_fields(pre: dict, src: str) -> dict:
    """``model.vision`` pixel settings from a preprocessor_config.json dict: normalisation and the
    image area bounds (``min_pixels`` / ``max_pixels``, or ``size.shortest_edge`` / ``longest_edge``)."""
    size = pre.get("size") if isinstance(pre.get("size"), dict) else {}
    out = {"min_pixels": pre.get("min_pixels", size.get("shortest_edge")),
           "max_pixels": pre.get("max_pixels", size.get("longest_edge")),
           "image_mean": pre.get("image_mean"), "image_std": pre.get("image_std")}  # fmt: skip
    for key in ("image_mean", "image_std"):
        value = out[key]
        if value is not None and not (isinstance(value, list) and len(value) == 3):
            raise ConfigError(f"{src}: {key}={value!r}; expected three numbers (R, G, B)")
    return {k: (int(v) if k.endswith("pixels") else [float(x) for x in v]) for k, v in out.items() if v is not None}


def _check_exportable(m: ModelConfig, arch: str) -> None:
    family = m.arch
    if arch != FAMILY_ARCH[family]:
        raise ConfigError(f"--arch {arch} does not match model.arch={family!r} ({FAMILY_ARCH[family]})")
    if m.qk_layernorm != (family == "qwen3_vl") or m.add_qkv_bias != (family == "qwen2_5_vl"):
        raise ConfigError(f"model.qk_layernorm={m.qk_layernorm} / add_qkv_bias={m.add_qkv_bias} have no {arch} "
                          "equivalent (Qwen3-VL: QK-norm, no QKV bias; Qwen2.5-VL: QKV bias, no QK-norm)")  # fmt: skip
    if m.add_bias_linear:
        raise ConfigError(f"model.add_bias_linear=True has no {arch} equivalent")


def _compare_template(m: ModelConfig, template: dict) -> None:
    theirs = model_fields(template, "template config.json", m.make_vocab_size_divisible_by)
    ours = dataclasses.asdict(m)
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "vocab_size", "tie_embeddings")
    for key in keys:
        if theirs[key] != ours[key]:
            raise ConfigError(f"template config.json: {key} is {theirs[key]} but the checkpoint has {ours[key]}")
    for key, value in theirs["vision"].items():
        if key in _PROCESSOR_DEFAULTS[m.arch]:  # pixel settings: the processor's, not the weights'
            continue
        if value != ours["vision"][key]:
            raise ConfigError(f"template config.json: vision {key} is {value} but the checkpoint has {ours['vision'][key]}")


def hf_config(m: ModelConfig, arch: str | None, template: dict | None) -> dict:
    """config.json for ``m``; ``template`` (the base model's) keeps the fields we do not model and
    its layout (nested ``text_config`` or flat; ``rope_parameters`` or ``rope_scaling``)."""
    v = m.vision
    arch = arch or FAMILY_ARCH[m.arch]
    _check_exportable(m, arch)
    if template:
        if (template.get("architectures") or [None])[0] != arch:
            raise ConfigError(f"template config.json: architectures {template.get('architectures')} is not [{arch!r}]")
        _compare_template(m, template)
    cfg = dict(template or {})
    qwen3 = m.arch == "qwen3_vl"
    nested = not template or isinstance(cfg.get("text_config"), dict)
    t = dict(cfg.get("text_config") or {}) if nested else cfg
    d = text.dims(m)
    t.update(hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
             num_attention_heads=m.num_attention_heads, num_key_value_heads=d.groups, vocab_size=m.vocab_size,
             max_position_embeddings=m.seq_length, rms_norm_eps=m.norm_epsilon, hidden_act="silu")  # fmt: skip
    t.setdefault("model_type", f"{m.arch}_text")
    if qwen3:
        t.update(head_dim=d.head_dim, attention_bias=False)
    rope = {"rope_type": "default", "mrope_section": list(v.mrope_section), **({"mrope_interleaved": True} if qwen3 else {})}
    if "rope_scaling" in t and "rope_parameters" not in t:  # transformers 4.x style
        t.update(rope_scaling={**rope, "type": "mrope"} if not qwen3 else rope, rope_theta=m.rotary_base)
    else:
        t["rope_parameters"] = {**rope, "rope_theta": m.rotary_base}
    if nested:
        cfg["text_config"] = t
    vis = dict(cfg.get("vision_config") or {})
    vis.update(depth=v.num_layers, hidden_size=v.hidden_size, intermediate_size=v.ffn_hidden_size,
               num_heads=v.num_attention_heads, in_channels=v.in_channels, patch_size=v.patch_size,
               temporal_patch_size=v.temporal_patch_size, spatial_merge_size=v.spatial_merge_size,
               out_hidden_size=m.hidden_size, hidden_act=_VIT_ACT[m.arch])  # fmt: skip
    vis.setdefault("model_type", f"{m.arch}_vision")
    if qwen3:
        vis.update(num_position_embeddings=v.num_position_embeddings, deepstack_visual_indexes=list(v.deepstack_layers))
    else:
        tps = v.tokens_per_second
        vis.update(window_size=v.window_size, fullatt_block_indexes=list(v.full_attention_layers),
                   tokens_per_second=int(tps) if float(tps).is_integer() else tps)  # fmt: skip
    if v.rotary_base != 10000.0 or "rope_parameters" in vis:
        vis["rope_parameters"] = {"rope_type": "axial", "rope_theta": v.rotary_base}
    cfg.update(architectures=[arch], model_type=m.arch, vision_config=vis, tie_word_embeddings=m.tie_embeddings,
               image_token_id=v.image_token_id, video_token_id=v.video_token_id,
               vision_start_token_id=v.vision_start_token_id, vision_end_token_id=v.vision_end_token_id)  # fmt: skip
    return cfg


# ----------------------------------------------------------------------------- tensor layout


def naming_of(m: ModelConfig, hf_names: set[str] | None = None) -> str:
    """``runtime`` or ``legacy`` HF names: detected from a checkpoint's names, else what
    transformers 5 writes for the family."""
    if hf_names is not None:
        runtime = any(n.startswith(("model.language_model.", "model.visual.")) for n in hf_names)
        return "runtime" if runtime else "legacy"
    return "runtime" if m.arch == "qwen3_vl" else "legacy"


def _text_model(m: ModelConfig) -> ModelConfig:
    return dataclasses.replace(m, arch="gpt", vision=None)


def _hf_text_name(name: str, naming: str) -> str:
    """The text families' HF name (model.X, lm_head.weight) under this naming."""
    return _PREFIXES[naming][0] + name[len("model.") :] if name.startswith("model.") else name


def hf_embedding_name(m: ModelConfig, naming: str) -> str:
    return _hf_text_name("model.embed_tokens.weight", naming)


def _vit_dims(m: ModelConfig) -> text.Dims:
    v = m.vision
    hd = v.hidden_size // v.num_attention_heads
    return text.Dims(v.num_attention_heads, v.num_attention_heads, hd, 0, 0)


def _embed_pairs(m: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    """(HF suffix under the visual prefix, Megatron suffix under ``vision_model.``, shape) before the ViT layers."""
    v = m.vision
    patch = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    out = [("patch_embed.proj.weight", "patch_embed.proj.weight", patch)]
    if m.arch == "qwen3_vl":
        out += [("patch_embed.proj.bias", "patch_embed.proj.bias", (v.hidden_size,)),
                ("pos_embed.weight", "pos_embed.weight", (v.num_position_embeddings, v.hidden_size))]  # fmt: skip
    return out


def _layer_pairs(m: ModelConfig, i: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """One-to-one tensors of ViT layer i (fused QKV and Qwen2.5-VL's gate/up are separate)."""
    v, qwen3 = m.vision, m.arch == "qwen3_vl"
    h, f = v.hidden_size, v.ffn_hidden_size
    hf, mc = f"blocks.{i}.", f"decoder.layers.{i}."
    kinds = ("weight", "bias") if qwen3 else ("weight",)  # LayerNorm (Qwen3-VL) or RMSNorm
    fc2 = "linear_fc2" if qwen3 else "down_proj"
    out = [(f"{hf}norm1.{k}", f"{mc}input_layernorm.{k}", (h,)) for k in kinds]
    out += [(f"{hf}attn.proj.weight", f"{mc}self_attention.linear_proj.weight", (h, h)),
            (f"{hf}attn.proj.bias", f"{mc}self_attention.linear_proj.bias", (h,))]  # fmt: skip
    out += [(f"{hf}norm2.{k}", f"{mc}pre_mlp_layernorm.{k}", (h,)) for k in kinds]
    out += [(f"{hf}mlp.{fc2}.weight", f"{mc}mlp.linear_fc2.weight", (h, f)),
            (f"{hf}mlp.{fc2}.bias", f"{mc}mlp.linear_fc2.bias", (h,))]  # fmt: skip
    if qwen3:
        out += [(f"{hf}mlp.linear_fc1.weight", f"{mc}mlp.linear_fc1.weight", (f, h)),
                (f"{hf}mlp.linear_fc1.bias", f"{mc}mlp.linear_fc1.bias", (f,))]  # fmt: skip
    return out


def _merger_pairs(m: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    v, out_h = m.vision, m.hidden_size
    h, width = v.hidden_size, v.hidden_size * v.spatial_merge_size**2
    out = []
    mergers = [("merger.", "merger.", h)] + [(f"deepstack_merger_list.{j}.", f"deepstack_mergers.{j}.", width)
                                             for j in range(len(v.deepstack_layers or []))]  # fmt: skip
    for hf, mc, norm in mergers:
        if m.arch == "qwen3_vl":
            names = [("norm.weight", "norm.weight", (norm,)), ("norm.bias", "norm.bias", (norm,)),
                     ("linear_fc1.weight", "linear_fc1.weight", (width, width)),
                     ("linear_fc1.bias", "linear_fc1.bias", (width,)),
                     ("linear_fc2.weight", "linear_fc2.weight", (out_h, width)), ("linear_fc2.bias", "linear_fc2.bias", (out_h,))]  # fmt: skip
        else:
            names = [("ln_q.weight", "norm.weight", (norm,)), ("mlp.0.weight", "linear_fc1.weight", (width, width)),
                     ("mlp.0.bias", "linear_fc1.bias", (width,)), ("mlp.2.weight", "linear_fc2.weight", (out_h, width)),
                     ("mlp.2.bias", "linear_fc2.bias", (out_h,))]  # fmt: skip
        out += [(hf + a, mc + b, shape) for a, b, shape in names]
    return out


def _fused_hf(m: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    """HF tensors of ViT layer i that Megatron fuses: qkv (and Qwen2.5-VL's gate/up)."""
    v = m.vision
    h, f, p = v.hidden_size, v.ffn_hidden_size, f"blocks.{i}."
    out = {p + "attn.qkv.weight": (3 * h, h), p + "attn.qkv.bias": (3 * h,)}
    if m.arch == "qwen2_5_vl":
        out.update({p + f"mlp.{g}_proj.weight": (f, h) for g in ("gate", "up")})
        out.update({p + f"mlp.{g}_proj.bias": (f,) for g in ("gate", "up")})
    return out


def _all_pairs(m: ModelConfig) -> list[tuple[str, str, tuple[int, ...]]]:
    pairs = _embed_pairs(m)
    for i in range(m.vision.num_layers):
        pairs += _layer_pairs(m, i)
    return pairs + _merger_pairs(m)


def hf_shapes(m: ModelConfig, naming: str | None = None) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of ``m`` with its shape."""
    naming = naming or naming_of(m)
    vis = _PREFIXES[naming][1]
    out = {_hf_text_name(k, naming): s for k, s in text.hf_shapes(_text_model(m)).items()}
    out.update({vis + a: s for a, _, s in _all_pairs(m)})
    for i in range(m.vision.num_layers):
        out.update({vis + k: s for k, s in _fused_hf(m, i).items()})
    return out


def mcore_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every full (TP=1/PP=1) Megatron parameter of ``m``, local-spec names."""
    v = m.vision
    out = {"language_model." + k: s for k, s in text.mcore_shapes(_text_model(m)).items()}
    out.update({"vision_model." + b: s for _, b, s in _all_pairs(m)})
    h, f = v.hidden_size, v.ffn_hidden_size
    fc1 = f if m.arch == "qwen3_vl" else 2 * f
    for i in range(v.num_layers):
        p = f"vision_model.decoder.layers.{i}."
        out.update({p + "self_attention.linear_qkv.weight": (3 * h, h), p + "self_attention.linear_qkv.bias": (3 * h,)})
        if m.arch == "qwen2_5_vl":
            out.update({p + "mlp.linear_fc1.weight": (fc1, h), p + "mlp.linear_fc1.bias": (fc1,)})
    return out


def hf_to_mcore_iter(get: text.Getter, m: ModelConfig, naming: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full Megatron tensors, one at a time (one ViT layer after the other), reading HF tensors via ``get``."""
    naming = naming or naming_of(m)
    get = text._checked(get, hf_shapes(m, naming), "HF checkpoint")
    for name, t in text.hf_to_mcore_iter(lambda n: get(_hf_text_name(n, naming)), _text_model(m)):
        yield "language_model." + name, t
    vis, v, d = _PREFIXES[naming][1], m.vision, _vit_dims(m)
    for a, b, _ in _embed_pairs(m):
        yield "vision_model." + b, get(vis + a)
    for i in range(v.num_layers):
        hf, mc = f"{vis}blocks.{i}.", f"vision_model.decoder.layers.{i}."
        for a, b, _ in _layer_pairs(m, i):
            yield "vision_model." + b, get(vis + a)
        for kind in ("weight", "bias"):
            q, k, val = get(f"{hf}attn.qkv.{kind}").chunk(3)
            yield f"{mc}self_attention.linear_qkv.{kind}", text.fuse_qkv(q, k, val, d)
            if m.arch == "qwen2_5_vl":
                yield f"{mc}mlp.linear_fc1.{kind}", torch.cat([get(f"{hf}mlp.gate_proj.{kind}"), get(f"{hf}mlp.up_proj.{kind}")])
    for a, b, _ in _merger_pairs(m):
        yield "vision_model." + b, get(vis + a)


def mcore_to_hf_iter(get: text.Getter, m: ModelConfig, naming: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """HF tensors, one at a time (one ViT layer after the other), reading full Megatron tensors via ``get``."""
    naming = naming or naming_of(m)
    for name, t in text.mcore_to_hf_iter(lambda n: get("language_model." + n), _text_model(m)):
        yield _hf_text_name(name, naming), t
    vis, v, d = _PREFIXES[naming][1], m.vision, _vit_dims(m)
    for a, b, _ in _embed_pairs(m):
        yield vis + a, get("vision_model." + b)
    for i in range(v.num_layers):
        hf, mc = f"{vis}blocks.{i}.", f"vision_model.decoder.layers.{i}."
        for a, b, _ in _layer_pairs(m, i):
            yield vis + a, get("vision_model." + b)
        for kind in ("weight", "bias"):
            yield f"{hf}attn.qkv.{kind}", torch.cat(text.split_qkv(get(f"{mc}self_attention.linear_qkv.{kind}"), d))
            if m.arch == "qwen2_5_vl":
                gate, up = get(f"{mc}mlp.linear_fc1.{kind}").chunk(2)
                yield f"{hf}mlp.gate_proj.{kind}", gate.contiguous()
                yield f"{hf}mlp.up_proj.{kind}", up.contiguous()
    for a, b, _ in _merger_pairs(m):
        yield vis + a, get("vision_model." + b)
