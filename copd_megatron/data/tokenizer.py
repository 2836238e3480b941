"""Tokenizers: SentencePiece models and Hugging Face tokenizers from a local directory.

Both expose the same small interface (``encode``, ``decode``, ``eos_id``, ``pad_id``,
``bos_id``, ``vocab_size``, ``apply_chat_template``). The model's vocabulary is the
tokenizer's padded to a multiple of ``make_vocab_size_divisible_by · tp`` (config layer);
padded ids are never sampled. SentencePiece models have no chat template: prompts are
used as they are (the synthetic tasks carry their own "Q: … A:" format).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from copd_megatron.config.schema import ConfigError


class SentencePieceTokenizer:
    def __init__(self, model_file: str | Path) -> None:
        import sentencepiece as spm

        self.path = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.get_piece_size()
        self.eos_id, self.bos_id = self.sp.eos_id(), self.sp.bos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in ids if 0 <= i < self.vocab_size])

    def apply_chat_template(self, messages: list[dict]) -> str | None:
        return None


class HFTokenizer:
    """A ``tokenizers`` / ``transformers`` tokenizer from a local directory (no hub access)."""

    def __init__(self, directory: str | Path) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(f"{directory}: loading a Hugging Face tokenizer needs `transformers`") from None
        self.tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        self.bos_id = self.tok.bos_token_id if self.tok.bos_token_id is not None else -1
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str | None:
        if not getattr(self.tok, "chat_template", None):
            return None
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_tokenizer(path: str | Path):
    """A SentencePiece ``.model`` file, or a directory with ``tokenizer.json`` / ``tokenizer.model``."""
    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        return SentencePieceTokenizer(p)
    if p.is_dir() and ((p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file()):
        return HFTokenizer(p)
    if p.is_dir() and (p / "tokenizer.model").is_file():
        return SentencePieceTokenizer(p / "tokenizer.model")
    raise ConfigError(f"tokenizer: {p} is neither a SentencePiece .model file nor a directory with tokenizer files")


def train_sentencepiece(texts: Iterable[str], model_prefix: str | Path, vocab_size: int = 256,
                        character_coverage: float = 1.0) -> Path:  # fmt: skip
    """Train a small SentencePiece model (digits split one per token, byte fallback on)."""
    import io

    import sentencepiece as spm

    Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO("\n".join(texts).encode())
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(buf.getvalue().decode().splitlines()), model_prefix=str(model_prefix),
        vocab_size=vocab_size, character_coverage=character_coverage, model_type="bpe", split_digits=True,
        byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3, minloglevel=2,
        hard_vocab_limit=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity",  # keep newlines and spaces exactly (answers end at "\n")
    )  # fmt: skip
    return Path(f"{model_prefix}.model")


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids (with BOS) through the tokenizer's chat template when it has one."""
    templated = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    ids = tokenizer.encode(templated if templated is not None else prompt)
    bos = tokenizer.bos_id
    return ([bos] if bos is not None and bos >= 0 else []) + ids
