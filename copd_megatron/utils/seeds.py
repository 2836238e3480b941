"""Seeds derived from names and numbers: the same value on every rank, machine and run."""

from __future__ import annotations

import zlib


def derived_seed(*parts) -> int:
    """A 31-bit seed from any tuple of names and numbers (stable across runs and machines)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


_M32 = 0xFFFFFFFF


def _mix32(x):
    """murmur3's 32-bit finaliser on int64 tensors holding values < 2³²."""
    x = x & _M32
    x = (x ^ (x >> 16)) * 0x85EBCA6B & _M32
    x = (x ^ (x >> 13)) * 0xC2B2AE35 & _M32
    return x ^ (x >> 16)


def counter_uniforms(seeds, counters):
    """U[0, 1) (float64) per element from (seed, counter) int64 tensors of one shape: a counter-based
    generator, so a draw depends on its own seed and counter only, never on what else is drawn."""
    import torch

    s = torch.as_tensor(seeds, dtype=torch.int64)
    c = torch.as_tensor(counters, dtype=torch.int64, device=s.device)
    h = _mix32(_mix32(s & _M32) ^ _mix32((s >> 32) & _M32 ^ 0x9E3779B9) ^ (c & _M32) * 0x27D4EB2F)
    h = _mix32(h ^ ((c >> 32) & _M32))
    return h.double() / 2.0**32
