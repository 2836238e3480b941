"""Rewards: verifiers ``(completion, sample) -> float`` looked up by name.

``registry`` (register / get), ``math_answer`` (math, exact_match, multiple_choice, numeric),
``code`` (sandboxed execution against unit tests), ``synthetic`` (generated task families
with exact verifiers). Nothing here needs a model or a process group.
"""

from copd_megatron.rewards.registry import get_verifier, register_verifier, registered

__all__ = ["get_verifier", "register_verifier", "registered"]
