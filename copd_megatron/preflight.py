"""What ``copd-train`` checks before any process group starts (and all ``--check`` reports).

``config.validate`` checks the config against the world size (pure arithmetic). This module
checks the files the config names, on the machine that runs it, so that a wrong path or a
broken file is one line and exit code 2 in a second instead of a traceback minutes into a
launch:

* ``tokenizer``: loads, and its vocabulary equals ``model.vocab_size``;
* ``branches[i].data`` / ``eval_data``: a known synthetic family and difficulty, or a prompt
  file that parses completely (the same parser the trainer uses; errors name file and line);
  ``branches[i].verifier`` is registered;
* ``checkpoint.base``: one readable checkpoint (not a trainer save or iteration directory),
  intact shard files, and the architecture of ``model``;
* ``checkpoint.load_dir``: a complete trainer checkpoint with every branch of this run, written
  by the same experiment config (the first differing key is named);
* ``run_dir``: see ``utils/rundir.py`` (one run per directory; ``--force`` to start over).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from copd_megatron.config.schema import Config, ConfigError, ModelConfig
from copd_megatron.utils.rundir import check_run_dir

# Fields that decide the tensors of a checkpoint: a base that differs in one cannot be loaded.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "kv_channels", "normalization", "activation", "add_qkv_bias", "add_bias_linear", "qk_layernorm",
                "tie_embeddings", "num_moe_experts")  # fmt: skip


@dataclass
class Report:
    """What was checked (lines for ``--check``) and what ``--force`` will remove."""

    lines: list[str] = field(default_factory=list)
    removals: list[Path] = field(default_factory=list)


def preflight(cfg: Config, *, force: bool = False) -> Report:
    """Check every input and output the config names; raise :class:`ConfigError` on the first problem."""
    report = Report()
    _check_tokenizer(cfg, report)
    if cfg.schedule.mode != "smoke":
        for i in range(len(cfg.branches)):
            _check_branch(cfg, i, report)
    if cfg.checkpoint.base is not None:
        _check_base(cfg, report)
    load_dir = _load_dir(cfg, force)
    if load_dir is not None:
        _check_load_dir(cfg, load_dir, report)
    inputs = [("tokenizer", cfg.tokenizer), ("checkpoint.base", cfg.checkpoint.base)]
    inputs += [(f"branches.{i}.{k}", getattr(b, k)) for i, b in enumerate(cfg.branches) for k in ("data", "eval_data")]
    report.removals = check_run_dir(cfg.run_dir, resuming=load_dir is not None, force=force,
                                    save_dir=cfg.checkpoint.save_dir, inputs=inputs)  # fmt: skip
    if report.removals:
        report.lines.append("--force: removes " + ", ".join(str(p) for p in report.removals))
    return report


def _check_tokenizer(cfg: Config, report: Report) -> None:
    if cfg.tokenizer is None:
        return
    from copd_megatron.data.tokenizer import load_tokenizer

    tok = load_tokenizer(cfg.tokenizer)
    if cfg.schedule.mode != "smoke" and tok.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} does not match the tokenizer's {tok.vocab_size} "
                          f"({cfg.tokenizer}); set model.vocab_size={tok.vocab_size}")  # fmt: skip
    report.lines.append(f"tokenizer: {cfg.tokenizer} ({tok.vocab_size} tokens)")


def _check_branch(cfg: Config, i: int, report: Report) -> None:
    from copd_megatron.rewards.registry import get_verifier

    b = cfg.branches[i]
    try:
        get_verifier(b.verifier)
    except ConfigError as e:
        raise ConfigError(f"branches.{i}.verifier: {e}") from None
    what = [_check_data(f"branches.{i}.data", b.data, b.difficulty, b.name)]
    if b.eval_data is not None:
        what.append("held-out " + _check_data(f"branches.{i}.eval_data", b.eval_data, b.difficulty, b.name))
    report.lines.append(f"branch {b.name}: {'; '.join(what)}; verifier {b.verifier}")


def _check_data(key: str, spec: str, difficulty: int, name: str) -> str:
    from copd_megatron.data.prompts import PromptDataset
    from copd_megatron.rewards import synthetic

    try:
        if spec.startswith("synthetic:"):
            family = spec.split(":", 1)[1]
            synthetic.get_family(family)
            synthetic.check_difficulty(difficulty)
            return f"synthetic {family} (difficulty {difficulty})"
        return f"{spec} ({len(PromptDataset(spec, domain=name))} prompts)"
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def _check_base(cfg: Config, report: Report) -> None:
    from copd_megatron.checkpoint.dist_ckpt import check_weights_dir, read_meta
    from copd_megatron.config.layout import padded_vocab_size

    base = check_weights_dir(cfg.checkpoint.base, "checkpoint.base")
    saved, dtype = read_meta(base)
    _same_architecture(saved, cfg.model, f"checkpoint.base: {base}")
    pad = (padded_vocab_size(saved.vocab_size, saved.make_vocab_size_divisible_by),
           padded_vocab_size(cfg.model.vocab_size, cfg.model.make_vocab_size_divisible_by))  # fmt: skip
    if pad[0] != pad[1]:
        raise ConfigError(f"checkpoint.base: {base} has a padded vocabulary of {pad[0]} rows, model.vocab_size="
                          f"{cfg.model.vocab_size} pads to {pad[1]}; use the base's tokenizer and vocab_size "
                          f"({saved.vocab_size})")  # fmt: skip
    report.lines.append(f"checkpoint.base: {base} ({dtype}, matches the model)")


def _same_architecture(saved: ModelConfig, model: ModelConfig, where: str) -> None:
    for name in SHAPE_FIELDS:
        a, b = getattr(saved, name), getattr(model, name)
        if name == "kv_channels":  # null means hidden / heads
            a, b = a or saved.hidden_size // saved.num_attention_heads, b or model.hidden_size // model.num_attention_heads
        if name == "num_query_groups":
            a, b = a or saved.num_attention_heads, b or model.num_attention_heads
        if a != b:
            raise ConfigError(f"{where} holds a model with {name}={a!r}, the config has model.{name}={b!r}")


def _load_dir(cfg: Config, force: bool):
    """What this run resumes from: an explicit ``checkpoint.load_dir``, or with ``auto`` the run's own
    newest complete checkpoint (none with ``--force``: the previous run's outputs go, it starts over)."""
    from copd_megatron.checkpoint.resume import AUTO, latest_complete

    if cfg.checkpoint.load_dir != AUTO:
        return cfg.checkpoint.load_dir
    return None if force else latest_complete(cfg.checkpoint.save_dir or Path(cfg.run_dir) / "checkpoints")


def _check_load_dir(cfg: Config, load_dir, report: Report) -> None:
    import json

    from copd_megatron.checkpoint.dist_ckpt import check_weights_dir
    from copd_megatron.checkpoint.manager import resolve_iteration_dir
    from copd_megatron.config.load import check_resume
    from copd_megatron.copd.recipes import branch_names

    it_dir = resolve_iteration_dir(load_dir)
    try:
        state = json.loads((it_dir / "run_state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"checkpoint.load_dir: {it_dir / 'run_state.json'} is unreadable ({e}); the checkpoint "
                          "is damaged") from None  # fmt: skip
    check_resume(cfg, state, str(load_dir))
    names = ["main"] if cfg.schedule.mode == "smoke" else branch_names(cfg)
    for name in names:
        if not (it_dir / name).is_dir():
            have = sorted(p.name for p in it_dir.iterdir() if p.is_dir())
            raise ConfigError(f"checkpoint.load_dir: {it_dir} has no branch {name!r} (it has {have})")
        check_weights_dir(it_dir / name, "checkpoint.load_dir")
    report.lines.append(f"checkpoint.load_dir: resumes {it_dir} (step {state.get('iteration')})")
