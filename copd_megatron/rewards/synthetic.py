"""Synthetic verifiable task families, generated from a seed: the demo's "capabilities".

Each family makes short prompts a ~1M-parameter model can learn on a CPU, with a difficulty
knob (1 = easy … 5 = hard), and registers an exact-answer verifier ``synthetic_<family>``:

    arithmetic  "Q: 47+8=\nA:" → "55"      operands grow with difficulty; + and − (and × from 4)
    reverse     "Q: reverse cabd\nA:" → "dbac"  word length 2 + difficulty
    count       "Q: count b in abbcb\nA:" → "3"  string length 3 + difficulty
    sort        "Q: sort dbca\nA:" → "abcd"     word length 2 + difficulty

The policy's answer is the completion up to its first newline (or end), stripped.
"""

from __future__ import annotations

import random

from copd_megatron.data.prompts import PromptSample
from copd_megatron.rewards.registry import register_verifier

LETTERS = "abcdefgh"
FAMILIES = ("arithmetic", "reverse", "count", "sort")


def _arithmetic(rng: random.Random, d: int) -> tuple[str, str]:
    hi = 10 ** min(d, 3) if d > 1 else 10
    a, b = rng.randrange(hi), rng.randrange(hi if d < 3 else 100)
    ops = "+-*" if d >= 4 else "+-" if d >= 2 else "+"
    op = rng.choice(ops)
    if op == "-" and b > a:
        a, b = b, a
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"Q: {a}{op}{b}=\nA:", str(value)


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def _reverse(rng: random.Random, d: int) -> tuple[str, str]:
    w = _word(rng, 2 + d)
    return f"Q: reverse {w}\nA:", w[::-1]


def _count(rng: random.Random, d: int) -> tuple[str, str]:
    w = _word(rng, 3 + d)
    c = rng.choice(w)
    return f"Q: count {c} in {w}\nA:", str(w.count(c))


def _sort(rng: random.Random, d: int) -> tuple[str, str]:
    w = _word(rng, 2 + d)
    return f"Q: sort {w}\nA:", "".join(sorted(w))


_MAKERS = {"arithmetic": _arithmetic, "reverse": _reverse, "count": _count, "sort": _sort}


def generate(family: str, n: int, difficulty: int = 2, seed: int = 0) -> list[PromptSample]:
    """``n`` samples of ``family`` (deterministic in ``seed``)."""
    if family not in _MAKERS:
        raise ValueError(f"unknown synthetic family {family!r}; expected one of {list(_MAKERS)}")
    if not 1 <= difficulty <= 5:
        raise ValueError(f"difficulty must be in 1..5, got {difficulty}")
    rng = random.Random(f"{family}/{difficulty}/{seed}")
    out = []
    for i in range(n):
        prompt, answer = _MAKERS[family](rng, difficulty)
        out.append(PromptSample(prompt, answer, family, {"difficulty": difficulty}, i))
    return out


def sft_text(sample: PromptSample) -> tuple[str, str]:
    """(prompt, target) for supervised training: the target is " answer" then a newline."""
    return sample.prompt, f" {sample.answer}\n"


def extract(completion: str) -> str:
    return completion.split("\n", 1)[0].strip()


def _exact(completion: str, sample) -> float:
    return 1.0 if extract(completion) == sample.answer else 0.0


for _family in FAMILIES:
    register_verifier(f"synthetic_{_family}")(_exact)
