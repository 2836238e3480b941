"""General verifiers: math final answers (math-verify), exact match, multiple choice, numeric."""

from __future__ import annotations

import re

from copd_megatron.rewards.registry import register_verifier


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def final_answer(text: str) -> str:
    """The boxed answer, else what follows "answer is"/"Answer:", else the last line."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = re.search(r"(?:answer is|answer:)\s*(.+)", text, flags=re.IGNORECASE)
    if m:
        return m.group(1).strip().rstrip(".")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


@register_verifier("math")
def math_answer(completion: str, sample) -> float:
    """Mathematical equivalence of the final answer (``math-verify``); 0 on any parser failure."""
    try:
        from math_verify import parse, verify

        gold = parse(f"${sample.answer}$")
        pred = parse(f"${final_answer(completion)}$")
        return 1.0 if gold and pred and verify(gold, pred) else 0.0
    except Exception:  # noqa: BLE001 - a pathological completion scores 0, never stops training
        return 0.0


def _norm(s: str) -> str:
    return " ".join(s.strip().lower().split())


@register_verifier("exact_match")
def exact_match(completion: str, sample) -> float:
    return 1.0 if _norm(final_answer(completion)) == _norm(sample.answer) else 0.0


@register_verifier("multiple_choice")
def multiple_choice(completion: str, sample) -> float:
    """Option letter: "(B)", "Answer: B", "B." or a boxed letter."""
    m = re.findall(r"\(([A-J])\)|\b([A-J])\b[.):]?", final_answer(completion).upper())
    letters = [a or b for a, b in m]
    return 1.0 if letters and letters[-1] == sample.answer.strip().upper().strip("()") else 0.0


@register_verifier("numeric")
def numeric(completion: str, sample) -> float:
    """|pred − gold| <= atol + rtol·|gold| (``extra.atol``/``extra.rtol``, default 1e-6 / 1e-4)."""
    nums = re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", final_answer(completion).replace(",", ""))
    if not nums:
        return 0.0
    try:
        pred, gold = float(nums[-1]), float(sample.answer)
    except ValueError:
        return 0.0
    atol, rtol = float(sample.extra.get("atol", 1e-6)), float(sample.extra.get("rtol", 1e-4))
    return 1.0 if abs(pred - gold) <= atol + rtol * abs(gold) else 0.0
