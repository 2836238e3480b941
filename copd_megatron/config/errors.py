"""The one exception type of configuration mistakes (kept apart so every config module can raise it)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user mistake in a config file or override: reported as one line, exit code 2."""


def require(cond: bool, key: str, msg: str) -> None:
    """Raise ``ConfigError("key: msg")`` unless ``cond``."""
    if not cond:
        raise ConfigError(f"{key}: {msg}")
