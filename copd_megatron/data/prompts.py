"""Prompt datasets: typed samples, JSONL/Parquet loading with precise errors, resumable streams.

A row needs ``prompt``, ``answer`` and ``domain`` (the domain may come from the branch
config); any other field is kept in ``extra`` for verifiers (tolerances, choices, tests).
A :class:`PromptStream` walks a dataset in a deterministic per-epoch shuffle derived from
(seed, epoch); its ``state_dict`` (epoch, position) makes a resumed run see exactly the
prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence


class DataError(ValueError):
    """A malformed data file: the message names the file and line."""


@dataclass
class PromptSample:
    """One verifiable prompt."""

    prompt: str  # the question shown to the policy (before any chat template)
    answer: str  # the reference answer the verifier compares with
    domain: str  # capability / branch domain ("arithmetic", "math", "image", ...)
    extra: dict = field(default_factory=dict)  # free fields of the row (tolerance, choices, tests, ...)
    index: int = 0  # position in its dataset (stable id for logging and resume checks)


def load_prompts(path: str | Path, domain: str | None = None, max_prompt_tokens: int | None = None,
                 count_tokens: Callable[[str], int] | None = None) -> tuple[list[PromptSample], int]:  # fmt: skip
    """Read a JSONL (or Parquet, with pyarrow) file. Returns (samples, rows skipped as too long)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: prompt file not found")
    rows = _parquet_rows(p) if p.suffix == ".parquet" else _jsonl_rows(p)
    samples, skipped = [], 0
    for line_no, row in rows:
        s = _sample(row, domain, len(samples), f"{p}:{line_no}")
        if max_prompt_tokens is not None and count_tokens is not None and count_tokens(s.prompt) > max_prompt_tokens:
            skipped += 1
            continue
        samples.append(s)
    if not samples:
        raise DataError(f"{p}: no usable rows")
    return samples, skipped


def _jsonl_rows(p: Path):
    with p.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{line_no}: invalid JSON ({e.msg}); expected one object per line") from None


def _parquet_rows(p: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    for i, row in enumerate(pq.read_table(p).to_pylist(), 1):
        yield i, row


def _sample(row, domain: str | None, index: int, where: str) -> PromptSample:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "answer"):
        if key not in row:
            raise DataError(f"{where}: missing field {key!r}; rows need 'prompt', 'answer' and 'domain'")
        if not isinstance(row[key], (str, int, float)):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
    dom = row.get("domain", domain)
    if not isinstance(dom, str):
        raise DataError(f"{where}: missing field 'domain' (or set the branch's domain)")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "answer", "domain")}
    return PromptSample(str(row["prompt"]), str(row["answer"]), dom, extra, index)


def write_jsonl(path: str | Path, samples: Sequence[PromptSample]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps({"prompt": s.prompt, "answer": s.answer, "domain": s.domain, **s.extra}) + "\n")


class PromptStream:
    """Endless deterministic batches over a dataset: a fresh shuffle per epoch from (seed, epoch)."""

    def __init__(self, samples: Sequence[PromptSample], seed: int) -> None:
        if not samples:
            raise DataError("a prompt stream needs at least one sample")
        self.samples, self.seed = list(samples), seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(len(self.samples)))
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

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            raise DataError(f"data stream seed {state['seed']} in the checkpoint != {self.seed} of this run")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle(self.epoch)
