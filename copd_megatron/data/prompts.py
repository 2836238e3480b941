"""Prompt datasets: typed samples, JSONL/Parquet loading with precise errors, resumable streams.

A row needs ``prompt`` (string), ``answer`` (string, or a number, kept as its string) and
``domain`` (string; may come from the branch config instead); every other field is kept in
``extra`` for the verifier (tolerances, choices, unit tests, ...). A malformed row stops
loading with ``FILE:LINE: what is wrong; what was expected`` (for Parquet, LINE is the
1-based row). Rows whose prompt is longer than ``max_prompt_tokens`` (counted as the
model will see it: chat template and BOS included) are dropped and counted, because a
prompt that leaves no room for the answer only wastes rollouts.

A :class:`PromptStream` walks a dataset endlessly in a fresh shuffle per epoch, derived
from (seed, epoch) alone, so the order never depends on what happened before. Its
``state_dict`` (epoch, position, seed) is all a checkpoint needs: a resumed run sees
exactly the prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from copd_megatron.config.schema import ConfigError

logger = logging.getLogger(__name__)

REQUIRED = ("prompt", "answer", "domain")


class DataError(ConfigError):
    """A malformed data file or stream state: the message names the file and line (a user
    mistake like a config error: one line, exit code 2)."""


@dataclass
class PromptSample:
    """One verifiable prompt."""

    prompt: str  # the question shown to the policy (before any chat template)
    answer: str  # the reference answer the verifier compares with
    domain: str  # capability / branch domain ("arithmetic", "math", "code", ...)
    extra: dict = field(default_factory=dict)  # the row's other fields (tolerance, choices, tests, ...)
    index: int = 0  # position in its dataset after filtering (a stable id for logs and resume checks)
    source: str = field(default="", compare=False)  # "FILE:LINE" of the row, for errors found later (media)
    vision: Any = field(default=None, compare=False, repr=False)  # model.vision its media were resolved for


class PromptDataset(Sequence[PromptSample]):
    """The rows of one JSONL (or Parquet, with ``pyarrow``) file as :class:`PromptSample` s."""

    def __init__(self, path: str | Path, domain: str | None = None, tokenizer: Any = None,
                 max_prompt_tokens: int | None = None) -> None:  # fmt: skip
        """``domain``: used for rows without a ``domain`` field. ``tokenizer`` and
        ``max_prompt_tokens``: drop rows whose encoded prompt is longer (both or neither)."""
        self.path = Path(path)
        if (tokenizer is None) != (max_prompt_tokens is None):
            raise DataError(f"{self.path}: max_prompt_tokens and tokenizer must be given together")
        if not self.path.exists():
            raise DataError(f"{self.path}: prompt file not found; expected a .jsonl or .parquet file")
        if not self.path.is_file():
            raise DataError(f"{self.path}: is a directory; expected a .jsonl or .parquet file")
        rows = _parquet_rows(self.path) if self.path.suffix == ".parquet" else _jsonl_rows(self.path)
        self.samples: list[PromptSample] = []
        self.num_skipped_too_long = 0  # rows dropped by the max_prompt_tokens filter
        for line_no, row in rows:
            s = parse_row(row, domain, len(self.samples), f"{self.path}:{line_no}")
            if max_prompt_tokens is not None and _prompt_tokens(tokenizer, s.prompt) > max_prompt_tokens:
                self.num_skipped_too_long += 1
                continue
            self.samples.append(s)
        if not self.samples:
            why = f" (all {self.num_skipped_too_long} longer than {max_prompt_tokens} tokens)" if rows else ""
            raise DataError(f"{self.path}: no usable rows{why}; expected at least one prompt")
        if self.num_skipped_too_long:
            logger.info("%s: skipped %d prompts longer than %d tokens", self.path, self.num_skipped_too_long,
                        max_prompt_tokens)  # fmt: skip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):  # int -> sample, slice -> list of samples
        return self.samples[i]


def _prompt_tokens(tokenizer, prompt: str) -> int:
    from copd_megatron.data.tokenizer import encode_prompt

    return len(encode_prompt(tokenizer, prompt))


def load_prompts(path: str | Path, domain: str | None = None, max_prompt_tokens: int | None = None,
                 tokenizer: Any = None) -> tuple[list[PromptSample], int]:  # fmt: skip
    """Samples of a prompt file and the number of rows skipped as too long."""
    ds = PromptDataset(path, domain, tokenizer, max_prompt_tokens)
    return ds.samples, ds.num_skipped_too_long


def _jsonl_rows(p: Path) -> list[tuple[int, Any]]:
    rows = []
    try:
        with p.open("rb") as f:
            for line_no, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{p}:{line_no}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                                    "expected a JSONL file, one JSON object per line") from None  # fmt: skip
                if not line.strip():
                    continue
                try:
                    rows.append((line_no, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{line_no}: invalid JSON ({e.msg}); expected one JSON object per line") from None
    except OSError as e:
        raise DataError(f"{p}: cannot be read ({e.strerror})") from None
    return rows


def _parquet_rows(p: Path) -> list[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow); or convert it to JSONL") from None
    try:
        return list(enumerate(pq.read_table(p).to_pylist(), 1))
    except Exception as e:  # noqa: BLE001 (pyarrow raises its own error types for every kind of bad file)
        raise DataError(f"{p}: not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None


def parse_row(row: Any, domain: str | None, index: int, where: str) -> PromptSample:
    """One row as a sample, or a :class:`DataError` naming ``where`` (``FILE:LINE``)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with {list(REQUIRED)}, got {type(row).__name__}")
    for key in REQUIRED:
        if key not in row and not (key == "domain" and domain is not None):
            raise DataError(f"{where}: missing field {key!r}; expected fields {list(REQUIRED)}"
                            + (" (or the branch's domain)" if key == "domain" else ""))  # fmt: skip
    prompt, answer, dom = row["prompt"], row["answer"], row.get("domain", domain)
    if not isinstance(prompt, str) or not prompt:
        raise DataError(f"{where}: field 'prompt' is {_show(prompt)}; expected a non-empty string")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: field 'answer' is {_show(answer)}; expected a string or a number")
    if not isinstance(dom, str) or not dom:
        raise DataError(f"{where}: field 'domain' is {_show(dom)}; expected a non-empty string")
    extra = {k: v for k, v in row.items() if k not in REQUIRED}
    return PromptSample(prompt, str(answer), dom, extra, index)


def _show(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def write_jsonl(path: str | Path, samples: Sequence[PromptSample]) -> None:
    """Write samples as JSONL rows that :class:`PromptDataset` reads back (extra fields flat)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("w", encoding="utf-8") as f:
        for s in samples:
            clash = set(s.extra) & set(REQUIRED)
            if clash:
                raise DataError(f"{p}: sample {s.index} has extra fields {sorted(clash)} that shadow required ones")
            f.write(json.dumps({"prompt": s.prompt, "answer": s.answer, "domain": s.domain, **s.extra}) + "\n")


class PromptStream:
    """Endless deterministic batches over samples: a fresh shuffle per epoch from (seed, epoch).

    ``take(n)`` returns the next ``n`` samples (a batch may straddle an epoch boundary);
    iterating yields batches of ``batch_size``."""

    def __init__(self, samples: Sequence[PromptSample], seed: int, batch_size: int | None = None) -> None:
        if len(samples) == 0:
            raise DataError("a prompt stream needs at least one sample")
        if batch_size is not None and batch_size < 1:
            raise DataError(f"prompt stream batch_size: {batch_size}; expected a positive integer")
        self.samples, self.seed, self.batch_size = list(samples), seed, batch_size
        self.epoch, self.position = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
        # Seeded by (seed, epoch) only: epoch e's order never depends on how we got there.
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[PromptSample]:
        out = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            out.append(self.samples[self._order[self.position]])
            self.position += 1
        return out

    def __iter__(self) -> Iterator[list[PromptSample]]:
        return self

    def __next__(self) -> list[PromptSample]:
        if self.batch_size is None:
            raise DataError("iterating a PromptStream needs batch_size; or call take(n)")
        return self.take(self.batch_size)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        missing = {"epoch", "position", "seed"} - set(state)
        if missing:
            raise DataError(f"prompt stream state: missing keys {sorted(missing)}; expected epoch, position, seed")
        if state["seed"] != self.seed:
            raise DataError(f"prompt stream state: seed {state['seed']} in the checkpoint != {self.seed} of this run")
        if not 0 <= state["position"] <= len(self.samples) or state["epoch"] < 0:
            raise DataError(f"prompt stream state: epoch {state['epoch']}, position {state['position']} do not fit "
                            f"a dataset of {len(self.samples)} samples; was the data file changed?")  # fmt: skip
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffle(self.epoch)
