"""Prompt datasets: loading, FILE:LINE errors for malformed rows, the too-long filter, and a
resumed stream that yields exactly what the uninterrupted stream yields."""

import json

import pytest

from copd_megatron.data.prompts import (
    DataError,
    PromptDataset,
    PromptSample,
    PromptStream,
    load_prompts,
    write_jsonl,
)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _row(**kw):
    return json.dumps({"prompt": "1+1?", "answer": "2", "domain": "math", **kw})


def test_loads_rows_keeps_extra_fields_and_defaults_the_domain(tmp_path):
    f = _write(tmp_path / "d.jsonl", [_row(), "", json.dumps({"prompt": "p", "answer": 3.5, "rtol": 0.1})])
    ds = PromptDataset(f, domain="branch_domain")
    assert len(ds) == 2 and ds.num_skipped_too_long == 0
    assert ds[0] == PromptSample("1+1?", "2", "math", {}, 0)
    assert ds[1] == PromptSample("p", "3.5", "branch_domain", {"rtol": 0.1}, 1)  # numbers kept as strings
    samples, skipped = load_prompts(f, domain="x")
    assert [s.prompt for s in samples] == ["1+1?", "p"] and skipped == 0


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "answer": "a", "domain": "m"', "invalid JSON"),
        ('["p", "a"]', "expected a JSON object"),
        ('{"answer": "a", "domain": "m"}', "missing field 'prompt'"),
        ('{"prompt": "p", "domain": "m"}', "missing field 'answer'"),
        ('{"prompt": "p", "answer": "a"}', "missing field 'domain'"),
        ('{"prompt": 5, "answer": "a", "domain": "m"}', "field 'prompt' is int 5; expected a non-empty string"),
        ('{"prompt": "p", "answer": [1], "domain": "m"}', "field 'answer' is list"),
        ('{"prompt": "p", "answer": true, "domain": "m"}', "field 'answer' is bool"),
        ('{"prompt": "p", "answer": "a", "domain": null}', "field 'domain' is NoneType"),
    ],
)
def test_malformed_row_names_file_and_line(tmp_path, line, message):
    f = _write(tmp_path / "bad.jsonl", [_row(), _row(), line])
    with pytest.raises(DataError) as err:
        PromptDataset(f)
    text = str(err.value)
    assert text.startswith(f"{f}:3: ") and message in text and "expected" in text
    assert "\n" not in text  # one line


def test_missing_file_empty_file_and_missing_parquet_support(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: prompt file not found"):
        PromptDataset(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="empty.jsonl: no usable rows"):
        PromptDataset(_write(tmp_path / "empty.jsonl", [""]))
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(DataError, match="d.parquet: reading Parquet needs pyarrow"):
            PromptDataset(tmp_path / "d.parquet")


def test_parquet_rows_when_pyarrow_is_installed(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet support needs pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"prompt": ["a", "b"], "answer": ["1", "2"], "domain": ["m", "m"], "tol": [0.1, 0.2]})
    pq.write_table(table, tmp_path / "d.parquet")
    ds = PromptDataset(tmp_path / "d.parquet")
    assert [(s.prompt, s.extra) for s in ds] == [("a", {"tol": 0.1}), ("b", {"tol": 0.2})]


class _CharTokenizer:
    """One id per character, BOS 1, no chat template."""

    bos_id = 1

    def encode(self, text):
        return [ord(c) for c in text]

    def apply_chat_template(self, messages):
        return None


def test_too_long_prompts_are_dropped_and_counted(tmp_path):
    f = _write(tmp_path / "d.jsonl", [_row(prompt="x" * n) for n in (3, 10, 4, 12)])
    ds = PromptDataset(f, tokenizer=_CharTokenizer(), max_prompt_tokens=5)  # BOS counts: 3+1, 4+1 fit
    assert [len(s.prompt) for s in ds] == [3, 4] and [s.index for s in ds] == [0, 1]
    assert ds.num_skipped_too_long == 2
    with pytest.raises(DataError, match="all 4 longer than 2 tokens"):
        PromptDataset(f, tokenizer=_CharTokenizer(), max_prompt_tokens=2)
    with pytest.raises(DataError, match="must be given together"):
        PromptDataset(f, max_prompt_tokens=5)


def test_write_jsonl_round_trips(tmp_path):
    samples = [PromptSample("p", "a", "m", {"tests": "assert True"}, 0), PromptSample("q", "b", "m", {}, 1)]
    write_jsonl(tmp_path / "sub" / "o.jsonl", samples)
    assert list(PromptDataset(tmp_path / "sub" / "o.jsonl")) == samples


def _samples(n):
    return [PromptSample(f"p{i}", str(i), "d", {}, i) for i in range(n)]


def test_stream_shuffles_each_epoch_deterministically():
    s = PromptStream(_samples(10), seed=3, batch_size=5)
    epoch0 = [x.index for batch in (next(s), next(s)) for x in batch]
    epoch1 = [x.index for x in s.take(10)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10))  # every sample once per epoch
    assert epoch0 != epoch1  # a fresh order per epoch
    again = PromptStream(_samples(10), seed=3)
    assert [x.index for x in again.take(20)] == epoch0 + epoch1  # same seed, same order
    assert [x.index for x in PromptStream(_samples(10), seed=4).take(10)] != epoch0


def test_resumed_stream_equals_the_uninterrupted_stream():
    reference = PromptStream(_samples(7), seed=11, batch_size=3)
    expected = [[x.index for x in next(reference)] for _ in range(12)]  # crosses several epochs
    for stop in (1, 2, 5, 7):  # interrupt mid-epoch and at batches straddling epoch ends
        first = PromptStream(_samples(7), seed=11, batch_size=3)
        got = [[x.index for x in next(first)] for _ in range(stop)]
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint would store it
        assert set(state) == {"epoch", "position", "seed"}
        resumed = PromptStream(_samples(7), seed=11, batch_size=3)
        resumed.load_state_dict(state)
        got += [[x.index for x in next(resumed)] for _ in range(12 - stop)]
        assert got == expected, stop


def test_stream_state_errors():
    s = PromptStream(_samples(4), seed=1)
    with pytest.raises(DataError, match="seed 2 in the checkpoint != 1"):
        s.load_state_dict({"epoch": 0, "position": 0, "seed": 2})
    with pytest.raises(DataError, match="do not fit a dataset of 4 samples"):
        s.load_state_dict({"epoch": 0, "position": 9, "seed": 1})
    with pytest.raises(DataError, match="missing keys"):
        s.load_state_dict({"seed": 1})
    with pytest.raises(DataError, match="needs batch_size"):
        next(s)
    with pytest.raises(DataError, match="at least one sample"):
        PromptStream([], seed=0)


def test_parity_prompts_of_a_branch_without_data_interleave_every_domain():
    from types import SimpleNamespace

    from copd_megatron.copd.runtime import parity_prompts

    sources = {"a": SimpleNamespace(held_out=["a0", "a1", "a2"]), "b": SimpleNamespace(held_out=["b0"])}
    assert parity_prompts(sources, "a", 2) == ["a0", "a1"]
    assert parity_prompts(sources, "mixed", 3) == ["a0", "b0", "a1"]  # the mixed baseline / MOPD student
    assert parity_prompts(sources, "student", 10) == ["a0", "b0", "a1", "a2"]
