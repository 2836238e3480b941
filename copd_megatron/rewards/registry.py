"""Verifiers by name. A verifier is a plain function ``(completion, sample) -> float`` in [0, 1].

    @register_verifier("exact_match")
    def exact_match(completion: str, sample: PromptSample) -> float: ...

Branches name their verifier in the config (``branches[i].verifier``); an unknown name is a
config error listing the registered ones.
"""

from __future__ import annotations

from typing import Callable

from copd_megatron.config.schema import ConfigError

Verifier = Callable[[str, object], float]
_VERIFIERS: dict[str, Verifier] = {}


def register_verifier(name: str):
    def deco(fn: Verifier) -> Verifier:
        _VERIFIERS[name] = fn
        return fn

    return deco


def get_verifier(name: str) -> Verifier:
    _load_builtin()
    if name not in _VERIFIERS:
        raise ConfigError(f"verifier {name!r} is not registered; expected one of {sorted(_VERIFIERS)}")
    return _VERIFIERS[name]


def registered() -> list[str]:
    _load_builtin()
    return sorted(_VERIFIERS)


def _load_builtin() -> None:
    # Importing the modules registers their verifiers.
    from copd_megatron.rewards import basic, synthetic  # noqa: F401
