"""Tokenizers: SentencePiece models and Hugging Face tokenizers from a local directory.

Every backend exposes the small interface of :class:`Tokenizer` (``encode``, ``decode``,
``eos_id``, ``pad_id``, ``bos_id``, ``vocab_size``, ``apply_chat_template``,
``padded_vocab_size``), so rollouts, SFT and evaluation never care which one they hold.

Backends, picked by :func:`load_tokenizer` from what the path holds:

* ``*.model`` file (or a directory with only ``tokenizer.model``): SentencePiece.
* a directory with ``tokenizer.json``: the ``tokenizers`` package if importable, else
  ``transformers.AutoTokenizer`` (local files only, never the hub). Both are optional and
  imported lazily.

Chat templates. A Hugging Face tokenizer's own template (``chat_template`` in
``tokenizer_config.json`` or a ``chat_template.jinja`` file) is used when present; it is a
Jinja template rendered in a sandbox (needs ``jinja2``). SentencePiece models have none by
default, so prompts go to the model as they are (the synthetic tasks carry their own
"Q: … A:" format). ``chat_template="simple"`` selects the built-in plain-text format

    System: <system message>      (only if there is one)
    User: <user message>
    Assistant: <assistant message>
    User: <user message>
    Assistant:

which small models trained from scratch can learn; ``chat_template="none"`` disables any.

Vocabulary padding. The model's embedding has more rows than the tokenizer has ids:
:meth:`padded_vocab_size` rounds up exactly like the model builder does
(:func:`copd_megatron.config.layout.padded_vocab_size`); padded ids are never sampled and
``decode`` drops them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar, Protocol, runtime_checkable

from copd_megatron.config.layout import padded_vocab_size as _padded_vocab_size
from copd_megatron.config.schema import ConfigError

logger = logging.getLogger(__name__)

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer needs from a tokenizer."""

    vocab_size: int  # ids the tokenizer can produce (the model pads beyond it)
    eos_id: int  # end of sequence: rollouts stop at it, SFT targets end with it
    pad_id: int  # filler of right-padded batches (the EOS id when the tokenizer has no pad)
    bos_id: int | None  # prepended to prompts by encode_prompt; None = the model uses none

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def apply_chat_template(self, messages: list[Message]) -> str | None: ...

    def padded_vocab_size(self, multiple: int = 128, tp: int = 1) -> int: ...


def simple_chat_template(messages: list[Message]) -> str:
    """The built-in plain-text template (module docstring), ending with a generation prompt."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    lines = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in names:
            raise ConfigError(f"chat message {i}: role {role!r} is not one of {sorted(names)}")
        lines.append(f"{names[role]}: {m.get('content', '')}")
    return "\n".join(lines) + "\nAssistant:"


def _choose_template(mode: str | None, own: str | None) -> str | None:
    """The template in force: the tokenizer's own (mode None), the built-in, or none."""
    if mode not in (None, "simple", "none"):
        raise ConfigError(f"tokenizer chat_template: {mode!r}; expected null (the tokenizer's own), "
                          "'simple' or 'none'")  # fmt: skip
    return own if mode is None else ("simple" if mode == "simple" else None)


class _Base:
    """Shared behaviour: padding arithmetic and the chat-template choice."""

    vocab_size: int
    _template: str | None = None  # None (no template), "simple", or a Jinja source
    _specials: ClassVar[dict[str, str | None]] = {}  # bos_token / eos_token / ... for Jinja templates

    def padded_vocab_size(self, multiple: int = 128, tp: int = 1) -> int:
        """Embedding rows of the model: ``vocab_size`` rounded up to a multiple of ``multiple``.

        The project pads independently of TP (see ``config.layout.padded_vocab_size``), so a
        checkpoint reshards across TP sizes; ``tp`` must divide the result."""
        padded = _padded_vocab_size(self.vocab_size, multiple, tp)
        if padded % tp:
            raise ConfigError(f"parallel.tp: {tp} does not divide the padded vocabulary {padded}; "
                              f"use make_vocab_size_divisible_by a multiple of {tp}")  # fmt: skip
        return padded

    def apply_chat_template(self, messages: list[Message]) -> str | None:
        """The prompt text for ``messages`` plus a generation prompt; None without a template."""
        if self._template is None:
            return None
        if self._template == "simple":
            return simple_chat_template(messages)
        return _render_jinja(self._template, messages, self._specials)


class SentencePieceTokenizer(_Base):
    """A SentencePiece ``.model`` file."""

    def __init__(self, model_file: str | Path, chat_template: str | None = None,
                 own_template: str | None = None) -> None:  # fmt: skip
        """``chat_template`` as in :func:`load_tokenizer`; ``own_template``: a Jinja template
        that came with the model file (a Hugging Face directory), else it has none."""
        import sentencepiece as spm

        self.path = str(model_file)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"tokenizer: {self.path} is not a readable SentencePiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.eos_id() < 0:
            raise ConfigError(f"tokenizer: {self.path} has no EOS piece; train it with eos_id >= 0")
        self.eos_id = self.sp.eos_id()
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self._template = _choose_template(chat_template, own_template)
        bos = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        self._specials = {"eos_token": self.sp.id_to_piece(self.eos_id), "bos_token": bos}

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids if 0 <= i < self.vocab_size])


class HFTokenizer(_Base):
    """``tokenizer.json`` in a local directory, read with ``tokenizers`` or ``transformers``.

    Special tokens come from ``tokenizer_config.json`` (``eos_token`` is required)."""

    def __init__(self, directory: str | Path, chat_template: str | None = None) -> None:
        self.path = str(directory)
        d = Path(directory)
        config = _read_json(d / "tokenizer_config.json")
        self._specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        self._template = _choose_template(chat_template, _hf_template(d, config))
        self._fast, self._auto = _fast_tokenizer(d / "tokenizer.json"), None
        if self._fast is not None:
            self.vocab_size = self._fast.get_vocab_size(with_added_tokens=True)
            ids = {k: self._fast.token_to_id(v) if v else None for k, v in self._specials.items()}
        else:
            self._auto = _auto_tokenizer(d)
            self.vocab_size = len(self._auto)
            ids = {k: getattr(self._auto, f"{k}_id", None) for k in self._specials}
            self._specials = {k: v or getattr(self._auto, k, None) for k, v in self._specials.items()}
        if ids["eos_token"] is None:
            raise ConfigError(f"tokenizer: {d / 'tokenizer_config.json'} names no eos_token present in the "
                              "vocabulary; expected e.g. \"eos_token\": \"</s>\"")  # fmt: skip
        self.eos_id, self.bos_id = ids["eos_token"], ids["bos_token"]
        self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        if self._fast is not None:
            return self._fast.encode(text, add_special_tokens=False).ids
        return self._auto.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids if 0 <= i < self.vocab_size]
        if self._fast is not None:
            return self._fast.decode(ids, skip_special_tokens=True)
        return self._auto.decode(ids, skip_special_tokens=True)


def _fast_tokenizer(file: Path):
    """``tokenizers.Tokenizer`` for ``file``, or None when the package is not installed."""
    try:
        from tokenizers import Tokenizer as Fast
    except ImportError:
        return None
    try:
        return Fast.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
        raise ConfigError(f"tokenizer: {file} is not a readable tokenizer.json ({e})") from None


def _auto_tokenizer(d: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ConfigError(f"tokenizer: reading {d / 'tokenizer.json'} needs the `tokenizers` or `transformers` "
                          "package (pip install tokenizers)") from None  # fmt: skip
    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"tokenizer: {path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"tokenizer: {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value) -> str | None:
    """Special tokens are stored as a string or as an AddedToken dict with ``content``."""
    return value.get("content") if isinstance(value, dict) else value


def _hf_template(d: Path, config: dict) -> str | None:
    """The directory's chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    t = config.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t else None


def _render_jinja(template: str, messages: list[Message], specials: dict[str, str | None]) -> str:
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ConfigError("tokenizer: rendering a Hugging Face chat template needs jinja2 "
                          "(pip install jinja2)") from None  # fmt: skip

    def raise_exception(message: str):
        raise ConfigError(f"chat template: {message}")

    # Same environment options as Hugging Face uses, so templates render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, **specials)


def load_tokenizer(path: str | Path, chat_template: str | None = None) -> Tokenizer:
    """The tokenizer at ``path``: a SentencePiece ``.model`` file or a tokenizer directory.

    ``chat_template``: None = the tokenizer's own (if any), ``"simple"`` = the built-in
    plain-text format, ``"none"`` = no template (prompts are used as they are)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"tokenizer: {p} does not exist; expected a SentencePiece .model file or a directory "
                          "with tokenizer.json")  # fmt: skip
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer(p, chat_template)
    if p.is_dir() and (p / "tokenizer.json").is_file():
        return HFTokenizer(p, chat_template)
    if p.is_dir() and (p / "tokenizer.model").is_file():  # a SentencePiece-only HF directory
        own = _hf_template(p, _read_json(p / "tokenizer_config.json"))
        return SentencePieceTokenizer(p / "tokenizer.model", chat_template, own_template=own)
    raise ConfigError(f"tokenizer: {p} is neither a SentencePiece .model file nor a directory with "
                      "tokenizer.json or tokenizer.model")  # fmt: skip


def train_sentencepiece(texts: Iterable[str], model_prefix: str | Path, vocab_size: int = 256,
                        character_coverage: float = 1.0, model_type: str = "bpe",
                        user_defined_symbols: tuple[str, ...] = ()) -> Path:  # fmt: skip
    """Train a small SentencePiece model on ``texts``; returns the ``.model`` path.

    Digits are split one per token (``split_digits``) so arithmetic tokenises per digit;
    byte fallback is on, so any text encodes (unseen characters become byte pieces, which
    takes 256 ids: ``vocab_size`` must exceed 256 + 4 specials + the corpus' characters).
    Ids: pad 0, unk 1, bos 2, eos 3, then ``user_defined_symbols`` (e.g. ``<image>`` and
    ``<video>`` at 4 and 5: ids a vision-language model reserves for placeholders, never produced
    by other text). Text is kept byte-exact (no normalisation, no dummy
    prefix), because answers are compared exactly and end at a newline."""
    import sentencepiece as spm

    # SentencePiece trains on lines: a newline is never a piece, it encodes as byte <0x0A>.
    lines = [line for t in texts for line in t.split("\n") if line]
    if not lines:
        raise ConfigError(f"tokenizer training for {model_prefix}: the corpus is empty")
    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(model_prefix), vocab_size=vocab_size,
            character_coverage=character_coverage, model_type=model_type, split_digits=True,
            byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
            hard_vocab_limit=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
            normalization_rule_name="identity", user_defined_symbols=list(user_defined_symbols),
        )  # fmt: skip
    except RuntimeError as e:
        raise ConfigError(f"tokenizer training for {model_prefix}: {str(e).strip().splitlines()[-1]}") from None
    return Path(f"{model_prefix}.model")


def encode_prompt(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Prompt ids (with BOS when the tokenizer has one) through its chat template if any."""
    templated = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = tokenizer.encode(templated if templated is not None else prompt)
    bos = tokenizer.bos_id
    return ([bos] if bos is not None and bos >= 0 else []) + ids
