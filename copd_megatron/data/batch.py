"""A batch of declared fields, and the one piece of code that pads, joins and splits it.

Every tensor that travels with a batch of sequences says how it lines up with them:

    token   [n, L, ...]   one entry per input token (aligned with ``tokens``)
    target  [n, L-1, ...] one entry per next-token target: position t refers to predicting
                          tokens[:, t+1] from tokens[:, :t+1] (loss masks, advantages, log-probs)
    row     [n, ...]      one entry per sequence (rewards, OPD weights, group ids)
    ragged  list of n     one entry per sequence of any shape (the images of a row, their grid
                          sizes, video frames); never padded, only selected and concatenated

``Batch.concat`` right-pads token/target fields to the longest sequence (pad id for tokens, 0
elsewhere) and gives rows that lack a field zeros (or an empty entry for ragged fields);
``Batch.micro_batches`` cuts the rows into micro-batches. Code written for token tensors never
touches pixel tensors: a model provider reads the ragged fields it declared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

TOKEN, TARGET, ROW, RAGGED = "token", "target", "row", "ragged"
KINDS = (TOKEN, TARGET, ROW, RAGGED)


@dataclass
class MicroBatch:
    """Rows of one forward pass on one rank. ``[b, s]`` with s = the trimmed input length."""

    tokens: torch.Tensor  # [b, s] int64 input ids (tokens[:, :-1] of the batch rows)
    labels: torch.Tensor  # [b, s] int64 next-token targets (tokens[:, 1:])
    loss_mask: torch.Tensor  # [b, s] float, 1 where the target's loss counts
    fields: dict = field(default_factory=dict)  # target fields [b, s, ...], row [b, ...], ragged lists, token [b, s+1]
    position_ids: torch.Tensor | None = None  # [b, s] (or provider-specific, e.g. [3, b, s]); None: provider computes
    rows: int = 0  # real rows; rows beyond it are padding copies of row 0 with a zero mask
    offset: int = 0  # position of tokens[:, 0] in its sequences (KV-cached decoding feeds a suffix)

    @staticmethod
    def from_tokens(tokens: torch.Tensor, loss_mask: torch.Tensor | None = None) -> "MicroBatch":
        """Language-model micro-batch from ``[b, s+1]`` ids; ``loss_mask`` is token-aligned ``[b, s+1]``."""
        inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
        b, s = inputs.shape
        mask = torch.ones(b, s, device=tokens.device) if loss_mask is None else loss_mask[:, 1:].float().contiguous()
        return MicroBatch(inputs, labels, mask, rows=b)

    def to(self, device) -> "MicroBatch":
        """Every tensor (fields, and tensors inside ragged lists one level deep) on ``device``."""
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, list):
                return [x.to(device) if isinstance(x, torch.Tensor) else x for x in v]
            return v

        pos = self.position_ids.to(device) if self.position_ids is not None else None
        return MicroBatch(self.tokens.to(device), self.labels.to(device), self.loss_mask.to(device),
                          {k: move(v) for k, v in self.fields.items()}, pos, self.rows, self.offset)  # fmt: skip


@dataclass
class Batch:
    """``n`` sequences (right-padded ``tokens [n, L]``) with declared fields (see module doc)."""

    tokens: torch.Tensor
    fields: dict[str, Any] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def __getitem__(self, name: str):
        return self.fields[name]

    def __contains__(self, name: str) -> bool:
        return name in self.fields

    def get(self, name: str, default=None):
        return self.fields.get(name, default)

    def set(self, name: str, value, kind: str) -> "Batch":
        """Add or replace a field (checked against the batch's shape); returns self."""
        if kind not in KINDS:
            raise ValueError(f"field {name!r}: kind {kind!r} is not one of {KINDS}")
        n, width = len(self), self.width
        if kind == RAGGED:
            if len(value) != n:
                raise ValueError(f"ragged field {name!r} has {len(value)} entries for {n} rows")
        else:
            if value.shape[0] != n:
                raise ValueError(f"field {name!r} has {value.shape[0]} rows, the batch {n}")
            want = {TOKEN: width, TARGET: width - 1}.get(kind)
            if want is not None and (value.dim() < 2 or value.shape[1] != want):
                raise ValueError(f"{kind} field {name!r} must be [n, {want}, ...], got {tuple(value.shape)}")
        self.fields[name] = value
        self.kinds[name] = kind
        return self

    def select(self, rows: Sequence[int] | torch.Tensor) -> "Batch":
        """The given rows (in that order), every field with them."""
        idx = torch.as_tensor(rows, dtype=torch.long)
        out = Batch(self.tokens[idx.to(self.tokens.device)])
        for k, v in self.fields.items():
            out.fields[k] = [v[int(i)] for i in idx] if self.kinds[k] == RAGGED else v[idx.to(v.device)]
            out.kinds[k] = self.kinds[k]
        return out

    @staticmethod
    def concat(batches: Sequence["Batch"], pad_id: int) -> "Batch":
        """One batch from several: right-padded to the longest sequence; missing fields are zeros."""
        batches = [b for b in batches if len(b)]
        if not batches:
            raise ValueError("Batch.concat needs at least one non-empty batch")
        width = max(b.width for b in batches)
        kinds: dict[str, str] = {}
        for b in batches:
            for k, kind in b.kinds.items():
                if kinds.setdefault(k, kind) != kind:
                    raise ValueError(f"field {k!r} is {kinds[k]} in one batch and {kind} in another")
        out = Batch(torch.cat([_pad_dim1(b.tokens, width, pad_id) for b in batches]))
        for k, kind in kinds.items():
            like = next(b.fields[k] for b in batches if k in b.fields)
            parts = []
            for b in batches:
                v = b.fields.get(k)
                if kind == RAGGED:
                    parts.extend(v if v is not None else [None] * len(b))
                    continue
                if v is None:
                    shape = {TOKEN: (b.width,), TARGET: (b.width - 1,)}.get(kind, ())
                    v = torch.zeros((len(b), *shape, *like.shape[1 + len(shape):]), dtype=like.dtype, device=like.device)
                if kind in (TOKEN, TARGET):
                    v = _pad_dim1(v, width - (kind == TARGET), 0)
                parts.append(v)
            out.fields[k] = parts if kind == RAGGED else torch.cat(parts)
            out.kinds[k] = kind
        return out

    def micro_batches(self, size: int, *, trim: bool = True, mask_field: str = "loss_mask",
                      pad_multiple: int = 1, device=None) -> list[MicroBatch]:  # fmt: skip
        """Cut the rows into micro-batches of ``size`` rows, each moved to ``device`` (the one move
        of a batch from the host to the device; None: where the batch is).

        A short last micro-batch is filled with copies of row 0 whose loss mask is 0 (pipeline
        stages exchange fixed shapes; the copies keep ragged inputs consistent). With ``trim``
        (no pipeline stages), each micro-batch is cut after its last position where ``mask_field``
        is non-zero, so short responses do not pay for the longest one. The input length is then
        rounded up to ``pad_multiple`` (FP8 GEMMs need multiples of 16, sequence parallelism of TP),
        right-padding past the batch's width with masked zeros when needed: causal attention keeps
        the real positions' results unchanged."""
        n = len(self)
        mask = self.fields.get(mask_field)
        if mask is None:
            mask = torch.ones(n, self.width - 1, device=self.tokens.device)
        pad = (-n) % size
        rows = list(range(n)) + [0] * pad
        out = []
        for start in range(0, n + pad, size):
            idx = rows[start : start + size]
            real = max(0, min(size, n - start))
            m = mask[torch.as_tensor(idx, device=mask.device)].float()
            if real < len(idx):
                m[real:] = 0.0
            used = self.width - 1
            if trim:
                nz = m.sum(0).nonzero()
                used = int(nz[-1]) + 1 if nz.numel() else 1
            used = -(-used // pad_multiple) * pad_multiple
            sub = self.select(idx)
            mb = MicroBatch.from_tokens(_fit(sub.tokens, used + 1))
            mb.loss_mask = _fit(m, used)
            mb.rows = real
            for k, v in sub.fields.items():
                kind = sub.kinds[k]
                if k == mask_field:
                    continue
                mb.fields[k] = _fit(v, used) if kind == TARGET else _fit(v, used + 1) if kind == TOKEN else v
            out.append(mb.to(device) if device is not None else mb)
        return out

    def to(self, device) -> "Batch":
        """Every tensor field (not ragged entries) on ``device``; returns a new batch."""
        out = Batch(self.tokens.to(device))
        for k, v in self.fields.items():
            out.fields[k] = v if self.kinds[k] == RAGGED else v.to(device)
            out.kinds[k] = self.kinds[k]
        return out


def _pad_dim1(t: torch.Tensor, width: int, value) -> torch.Tensor:
    extra = width - t.shape[1]
    if extra <= 0:
        return t
    pad = [0, 0] * (t.dim() - 2) + [0, extra]
    return torch.nn.functional.pad(t, pad, value=value)


def _fit(t: torch.Tensor, width: int) -> torch.Tensor:
    """Dim 1 cut or zero-padded to ``width``."""
    return t[:, :width] if t.shape[1] >= width else _pad_dim1(t, width, 0)


def pad_to_width(t: torch.Tensor, width: int) -> torch.Tensor:
    """Dim 1 of a micro-batch result back to the batch's full width: zero-padded when it was
    trimmed, cut when it was padded past the width (FP8 / sequence-parallel multiples)."""
    return _fit(t, width)
