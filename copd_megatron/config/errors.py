"""``require``: the one-line check every config module uses (``ConfigError`` itself lives in
``utils/errors.py``, at the bottom of the import graph, so config modules can raise it without
importing the schema)."""

from __future__ import annotations

from copd_megatron.utils.errors import ConfigError

__all__ = ["ConfigError", "require"]


def require(cond: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("key: msg")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")
