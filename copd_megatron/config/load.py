"""Load a :class:`Config` from YAML plus dotted ``key=value`` overrides, strictly.

    cfg = load_config("configs/demo_cpu.yaml", ["parallel.tp=2", "branches.0.beta=0.5"])

Values of overrides are parsed as YAML scalars (``4`` → int, ``1e-6`` → float, ``null`` → None,
``[a, b]`` → list). Every problem is a :class:`ConfigError` whose message is one line naming
the file, the dotted key, what was found and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from copd_megatron.config.presets import PRESETS, VISION_PRESETS
from copd_megatron.config.schema import Config, ConfigError


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted (int→float only)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        if len(others) == 1 and dataclasses.is_dataclass(others[0]):
            return _convert(value, others[0], key)  # an optional section: its own errors name the field
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; expected {_type_name(tp)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool (true/false), got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            value = _yaml11_float(value)  # PyYAML reads 1e-6 (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {value!r}")
        return value
    if tp is Any:
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # a schema bug, not a user mistake


def _yaml11_float(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


# Keys that moved to another section: the error says where they live now.
MOVED = {
    "schedule.opd_loss": "opd.loss", "schedule.jsd_beta": "opd.jsd_beta", "schedule.opd_topk": "opd.topk",
    "schedule.merge": "merge.method", "optimizer.offload_inactive": "memory.offload_optimizer",
}  # fmt: skip


def _build(cls: type, data: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else str(k)
            if where in MOVED:
                raise ConfigError(f"{where}: this key moved; write it as {MOVED[where]}")
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{where}: unknown key{hint}; allowed: {', '.join(names)}")
    kwargs = {k: _convert(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _apply_override(tree: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError("expected dotted key=value, e.g. parallel.tp=2")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        where = ".".join(parts[: i + 1])
        if isinstance(node, dict) and parts[i + 1].isdigit() and not isinstance(node.get(part), list):
            raise ConfigError(f"{where}: has no list items to override with {key}; define the list in the file")
        if isinstance(node, list):
            node = _list_item(node, part, where)
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{where}: is a value, cannot set a key below it ({key})")
    last = parts[-1]
    if isinstance(node, list):
        _list_item(node, last, key)
        node[int(last)] = value
    else:
        node[last] = value


def _list_item(node: list, part: str, where: str) -> Any:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"{where}: expected a list index below {len(node)}, got {part!r}")
    return node[int(part)]


def _apply_preset(tree: dict) -> None:
    """Fill ``model`` from its preset; explicit model keys win over the preset."""
    model = tree.get("model")
    if not isinstance(model, dict) or model.get("preset") is None:
        return
    name = model["preset"]
    if name not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {name!r}; expected one of {', '.join(sorted(PRESETS))}")
    tree["model"] = {**PRESETS[name], **model}


def _apply_vision_preset(tree: dict) -> None:
    """Fill ``model.vision`` from its preset; explicit vision keys win over the preset."""
    vision = tree.get("model", {}).get("vision") if isinstance(tree.get("model"), dict) else None
    if not isinstance(vision, dict) or vision.get("preset") is None:
        return
    name = vision["preset"]
    if name not in VISION_PRESETS:
        raise ConfigError(f"model.vision.preset: unknown preset {name!r}; expected one of "
                          f"{', '.join(sorted(VISION_PRESETS))}")  # fmt: skip
    tree["model"]["vision"] = {**VISION_PRESETS[name], **vision}


def config_from_dict(tree: dict, overrides: list[str] | None = None, source: str = "<dict>") -> Config:
    """Build a validated-per-field :class:`Config` from a plain mapping plus overrides.

    An error is blamed on what caused it: ``override KEY=VALUE: ...`` when an override set the
    offending key (or is named in the message), else ``SOURCE: ...`` (the YAML file)."""
    tree = copy.deepcopy(tree)  # overrides must not leak into the caller's mapping
    for item in overrides or []:
        try:
            _apply_override(tree, item)
        except ConfigError as e:
            raise ConfigError(f"override {item}: {e}") from None
    try:
        _apply_preset(tree)
        _apply_vision_preset(tree)
        return _build(Config, tree, "")
    except ConfigError as e:
        raise ConfigError(f"{_blame(str(e), overrides or [], source)}: {e}") from None


def _blame(message: str, overrides: list[str], source: str) -> str:
    """``override ITEM`` if an override set the key the message is about, else ``source``."""
    match = re.match(r"([\w.\-]+):", message)
    key = match.group(1) if match else ""
    keys = [(item.split("=", 1)[0].strip(), item) for item in overrides]
    for k, item in reversed(keys):  # the last override of a key is the one that counts
        if key and (key == k or key.startswith(k + ".") or k.startswith(key + ".")):
            return f"override {item}"
    for k, item in reversed(keys):
        if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", message):
            return f"override {item}"
    return source


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (or nothing: defaults) and apply ``key=value`` overrides."""
    tree: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{source}: config file not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{source}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{source}: expected a mapping of sections at the top level")
    return config_from_dict(tree, overrides, source)


def config_to_dict(cfg: Config) -> dict:
    """The resolved config as plain data (written into the run directory)."""
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


# What may change when a run resumes (layout, outputs, logging, memory offload, the smoke recipe's length).
_RESUMABLE = {"parallel", "checkpoint", "logging", "memory", "run_dir", "name"}
RESUMABLE_TEXT = "parallel.*, checkpoint.*, logging.*, memory.*, run_dir, name and schedule.train_steps"


def experiment_dict(cfg: Config) -> dict:
    """Everything that defines the experiment (not the layout or outputs), as JSON data."""
    tree = {k: v for k, v in config_to_dict(cfg).items() if k not in _RESUMABLE}
    if tree["model"].get("vision") is None:  # text-only runs hash as they did before the field existed
        tree["model"].pop("vision", None)
    tree["schedule"] = {k: v for k, v in tree["schedule"].items() if k != "train_steps"}
    return json.loads(json.dumps(tree))


def config_hash(cfg: Config) -> str:
    """A short hash of :func:`experiment_dict`, stored in every checkpoint's run state."""
    import hashlib

    return hashlib.sha256(json.dumps(experiment_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def check_resume(cfg: Config, run_state: dict, where: str) -> None:
    """Refuse to resume a checkpoint written by another experiment config, naming the first key
    that differs (checkpoints record their experiment config; older ones only its hash)."""
    if run_state.get("config_hash") == config_hash(cfg):
        return
    saved, now = run_state.get("experiment"), experiment_dict(cfg)
    diffs = _differences(saved, now) if isinstance(saved, dict) else []
    if diffs:
        key, old, new = diffs[0]
        more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
        what = f"{key} is {old!r} there and {new!r} now{more}"
    else:
        what = f"config hash {run_state.get('config_hash')} there, {config_hash(cfg)} now"
    raise ConfigError(f"checkpoint.load_dir: {where} was written by a different experiment config: {what}; "
                      f"only {RESUMABLE_TEXT} may change on resume")  # fmt: skip


def _differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += _differences(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{prefix}.{i}")]
    return [] if a == b else [(prefix, a, b)]
