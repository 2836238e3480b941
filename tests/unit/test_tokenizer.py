"""Tokenizers: SentencePiece training and round trips, chat templates, vocabulary padding,
backend choice and its errors, and (when `tokenizers` is installed) a local HF directory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from copd_megatron.config.schema import ConfigError
from copd_megatron.data.tokenizer import (
    SentencePieceTokenizer,
    Tokenizer,
    encode_prompt,
    load_tokenizer,
    simple_chat_template,
    train_sentencepiece,
)
from copd_megatron.rewards.synthetic import generate, sft_document

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    texts = [sft_document(s) for fam in ("arithmetic", "reverse", "count") for s in generate(fam, 300, 3, seed=1)]
    return train_sentencepiece(texts, tmp_path_factory.mktemp("tok") / "tok", vocab_size=300)


def test_sentencepiece_round_trip_and_special_ids(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    assert tok.vocab_size == 300
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    for text in ["Q: 123+45=\nA: 168\n", "Q: reverse abcd\nA: dcba\n", "unseen ÄÖ € text\t!"]:
        assert tok.decode(tok.encode(text)) == text  # byte fallback: any text survives exactly
    # Digits are split one per token, so arithmetic is learnable digit by digit.
    pieces = [tok.sp.id_to_piece(i) for i in tok.encode("9876543210")]
    assert pieces == list("9876543210")
    # decode drops padded ids (>= vocab_size) that a padded model could emit.
    assert tok.decode(tok.encode("abc") + [tok.vocab_size + 5]) == "abc"


def test_padding_matches_the_model_builder(sp_model):
    from copd_megatron.config.layout import padded_vocab_size

    tok = load_tokenizer(sp_model)
    assert tok.padded_vocab_size(128) == 384 == padded_vocab_size(300, 128)
    assert tok.padded_vocab_size(128, tp=4) == 384  # padding does not depend on TP
    assert tok.padded_vocab_size(64, tp=2) == 320
    with pytest.raises(ConfigError, match="tp: 5 does not divide"):
        tok.padded_vocab_size(128, tp=5)


def test_chat_templates(sp_model):
    assert load_tokenizer(sp_model).apply_chat_template([{"role": "user", "content": "hi"}]) is None
    simple = load_tokenizer(sp_model, chat_template="simple")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert simple.apply_chat_template(msgs) == "System: Be brief.\nUser: 2+2?\nAssistant:"
    assert encode_prompt(simple, "2+2?") == [simple.bos_id] + simple.encode("User: 2+2?\nAssistant:")
    with pytest.raises(ConfigError, match="role 'robot'"):
        simple_chat_template([{"role": "robot", "content": "x"}])
    with pytest.raises(ConfigError, match="expected null"):
        load_tokenizer(sp_model, chat_template="fancy")


def test_backend_choice_and_errors(sp_model, tmp_path):
    with pytest.raises(ConfigError, match=f"{tmp_path / 'nope'} does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(ConfigError, match="neither a SentencePiece"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="bad.model is not a readable SentencePiece model"):
        load_tokenizer(bad)
    # A Hugging Face style directory holding only tokenizer.model uses SentencePiece, with the
    # directory's Jinja chat template.
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.model").write_bytes(sp_model.read_bytes())
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{{ eos_token }}"
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = load_tokenizer(hf_dir)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<user>x</s>"
    assert load_tokenizer(hf_dir, chat_template="none").apply_chat_template([{"role": "user", "content": "x"}]) is None


def test_training_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="corpus is empty"):
        train_sentencepiece(["", "\n"], tmp_path / "t")
    with pytest.raises(ConfigError, match="Vocabulary size is smaller"):
        train_sentencepiece(["abc 123"], tmp_path / "t", vocab_size=50)


def test_train_tokenizer_cli(tmp_path):
    prefix = tmp_path / "cli" / "tok"
    out = subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--synthetic", "200",
                          "--model-prefix", str(prefix), "--vocab-size", "300"],
                         check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "round trip ok" in out.stdout and prefix.with_suffix(".model").is_file()
    out = subprocess.run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--model-prefix", str(prefix)],
                         check=False, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2 and "no training text" in out.stderr


def _tiny_hf_dir(path: Path) -> Path:
    tokenizers = pytest.importorskip("tokenizers", reason="the HF-directory backend needs `tokenizers`")
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{c: 4 + i for i, c in enumerate("abcdefgh +=0123456789")}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # join tokens without spaces
    tok.add_special_tokens(["<s>", "</s>", "<pad>"])
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"
    cfg = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>", "chat_template": template}
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def test_hf_directory_with_tokenizers_package(tmp_path):
    d = _tiny_hf_dir(tmp_path / "hf")
    tok = load_tokenizer(d)
    assert isinstance(tok, Tokenizer)
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 25)
    assert tok.decode(tok.encode("ab 12+3")) == "ab 12+3"
    assert tok.decode(tok.encode("ab") + [tok.eos_id]) == "ab"  # special tokens are skipped
    assert tok.apply_chat_template([{"role": "user", "content": "a+b"}]) == "[user] a+b\n[assistant]"
    assert tok.padded_vocab_size(8) == 32
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(ConfigError, match="names no eos_token"):
        load_tokenizer(d)


def test_hf_directory_without_any_backend_is_one_clear_error(tmp_path, monkeypatch):
    d = tmp_path / "hf"
    d.mkdir()
    (d / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # None in sys.modules makes the import fail
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ConfigError, match="tokenizer.json needs the `tokenizers` or `transformers` package"):
        load_tokenizer(d)
