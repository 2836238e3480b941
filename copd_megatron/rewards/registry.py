"""Verifiers by name. A verifier is a plain function ``(completion, sample) -> float`` in [0, 1].

    @register_verifier("exact_match")
    def exact_match(completion: str, sample: PromptSample) -> float: ...

Branches name their verifier in the config (``branches[i].verifier``); an unknown name is a
config error listing the registered ones. Built-in verifiers live in
``rewards/math_answer.py`` (math, exact_match, multiple_choice, numeric), ``rewards/code.py``
(code) and ``rewards/synthetic.py`` (synthetic_<family>); they register on first lookup.
A verifier must never raise on a model's completion: malformed output scores 0.
"""

from __future__ import annotations

from collections.abc import Callable

from copd_megatron.config.schema import ConfigError
from copd_megatron.data.prompts import PromptSample

Verifier = Callable[[str, PromptSample], float]
_VERIFIERS: dict[str, Verifier] = {}


def register_verifier(name: str) -> Callable[[Verifier], Verifier]:
    """Decorator registering ``fn`` under ``name``; a second, different function is an error."""

    def deco(fn: Verifier) -> Verifier:
        old = _VERIFIERS.get(name)
        if old is not None and old is not fn and _qualname(old) != _qualname(fn):
            raise ConfigError(f"verifier {name!r} is already registered by {_qualname(old)}; "
                              f"pick another name for {_qualname(fn)}")  # fmt: skip
        _VERIFIERS[name] = fn
        return fn

    return deco


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def get_verifier(name: str) -> Verifier:
    """The verifier registered as ``name``."""
    _load_builtin()
    if name not in _VERIFIERS:
        raise ConfigError(f"verifier {name!r} is not registered; expected one of {sorted(_VERIFIERS)}")
    return _VERIFIERS[name]


def registered() -> list[str]:
    """Names of every registered verifier."""
    _load_builtin()
    return sorted(_VERIFIERS)


def _load_builtin() -> None:
    # Importing the modules registers their verifiers (imported here, not at module level,
    # because they import this module).
    from copd_megatron.rewards import code, math_answer, synthetic  # noqa: F401
