"""Final-answer verifiers: math equivalence, exact match, multiple choice, numeric tolerance.

(Named ``math_answer`` rather than ``math`` so it can never shadow the standard library.)

Where the answer is. Reasoning models write a derivation and then an answer; only the
answer is scored. :func:`extract_final_answer` takes the content of the *last*
``\\boxed{...}`` (nested braces allowed, as in ``\\boxed{\\frac{1}{2}}``), else what follows
the last "final answer is" / "answer is" / "Answer:" / "####" on its line. Each verifier
then falls back in its own way when there is none: ``math`` scores 0 (a derivation
without a marked answer is not an answer), ``exact_match`` compares the whole completion,
``numeric`` takes its last number.

``math`` uses the ``math-verify`` package, which parses LaTeX and plain expressions with
sympy and compares them mathematically (``\\frac{2}{4}`` = ``0.5`` = ``1/2``,
``x^2+1`` = ``1+x^2``). Sympy can take unbounded time on adversarial input
(``\\boxed{9^{9^{9^9}}}``), so answers longer than :data:`MAX_ANSWER_CHARS` score 0 and
math-verify's own ``signal.alarm`` timeouts are on. Those timeouts work only in the main
thread; in a worker thread they are off, so score math in the main thread or in worker
processes. Any exception scores 0: a verifier never stops training.
"""

from __future__ import annotations

import logging
import re
import threading

from copd_megatron.data.prompts import DataError, PromptSample
from copd_megatron.rewards.registry import register_verifier

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 400  # longer "answers" are degenerate completions; never hand them to sympy
MATH_TIMEOUT_S = 3  # math-verify's per-call budget for parsing and for comparing (integer seconds)

_ANSWER_RE = re.compile(r"(?:final answer is|answer is|answer\s*:|####)\s*(.+)", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces allowed), or None."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    for i in reversed(starts):  # an unclosed last box falls back to the previous one
        depth = 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
    return None


def extract_final_answer(text: str) -> str | None:
    """The last boxed answer, else the text after the last final-answer phrase, else None."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip()
    answer = answer.strip("*").strip()  # markdown bold: **Answer:** 42
    answer = answer.removesuffix(".")  # a sentence end, not a decimal point
    return answer.strip().strip("$").strip() or None


def _math_verify_equal(gold_text: str, pred_text: str) -> bool:
    from math_verify import parse, verify

    main = threading.current_thread() is threading.main_thread()
    t = MATH_TIMEOUT_S if main else None  # signal.alarm exists only in the main thread

    def parse_any(s: str) -> list:
        # As LaTeX math first ("\frac12"), then with math-verify's text extraction ("0.5 dollars").
        return parse(f"${s}$", parsing_timeout=t) or parse(s, parsing_timeout=t)

    gold, pred = parse_any(gold_text), parse_any(pred_text)
    return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=t))


@register_verifier("math")
def math_equivalence(completion: str, sample: PromptSample) -> float:
    """1.0 if the completion's final answer equals ``sample.answer`` mathematically."""
    answer = extract_final_answer(completion)
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return 0.0
    try:
        return 1.0 if _math_verify_equal(sample.answer, answer) else 0.0
    except BaseException as e:  # sympy/latex2sympy raise anything; math-verify timeouts too
        if isinstance(e, KeyboardInterrupt):
            raise
        logger.debug("math verifier: %s on answer %r", type(e).__name__, answer[:80])
        return 0.0


def normalize_text(s: str) -> str:
    """Lower case, single spaces, no surrounding spaces or final period."""
    s = " ".join(s.strip().lower().split())
    return s[:-1].rstrip() if s.endswith(".") else s


@register_verifier("exact_match")
def exact_match(completion: str, sample: PromptSample) -> float:
    """The final answer (else the whole completion) equals the reference up to case and spaces."""
    answer = extract_final_answer(completion)
    answer = completion if answer is None else answer
    return 1.0 if normalize_text(answer) == normalize_text(sample.answer) else 0.0


_LETTER_PATTERNS = (
    re.compile(r"answer\s*(?:is|:)\s*:?\s*\(?([A-Z])\b\)?", re.IGNORECASE),  # "Answer: B", "answer is (B)"
    re.compile(r"^\s*\(?([A-Z])(?:[.:)]|\s*$)"),  # the completion opens with "B." / "(B)" / "B"
    re.compile(r"\(([A-Z])\)"),  # the last "(B)" anywhere
)


def extract_choice(text: str, num_choices: int = 10) -> str | None:
    """The chosen option letter (A.. the ``num_choices``-th letter) or None."""
    valid = {chr(ord("A") + i) for i in range(num_choices)}
    boxed = last_boxed(text)
    if boxed is not None:
        m = re.match(r"\s*(?:\\text\{)?\(?([A-Za-z])\)?\}?\s*$", boxed)
        return m.group(1).upper() if m and m.group(1).upper() in valid else None
    for pattern in _LETTER_PATTERNS:
        letters = [x.upper() for x in pattern.findall(text) if x.upper() in valid]
        if letters:
            return letters[-1]
    return None


@register_verifier("multiple_choice")
def multiple_choice(completion: str, sample: PromptSample) -> float:
    """The chosen letter equals ``sample.answer`` ("B" or "(B)"); ``extra["choices"]`` (a
    list) limits the valid letters."""
    gold = sample.answer.strip().strip("()").strip().upper()
    choices = sample.extra.get("choices")
    n = len(choices) if isinstance(choices, (list, tuple)) and choices else 10
    if len(gold) != 1 or not ("A" <= gold <= chr(ord("A") + n - 1)):
        raise DataError(f"sample {sample.index} ({sample.domain}): answer {sample.answer!r} is not an option "
                        f"letter; expected one of A..{chr(ord('A') + n - 1)}")  # fmt: skip
    return 1.0 if extract_choice(completion, n) == gold else 0.0


def parse_number(text: str) -> float | None:
    """A decimal, scientific or ``a/b`` number (thousands commas allowed), or None."""
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text.strip())
    m = _NUMBER_RE.fullmatch(text)
    if not m:
        return None
    num, _, den = text.partition("/")
    try:
        return float(num) / float(den) if den else float(num)
    except (ValueError, ZeroDivisionError):
        return None


@register_verifier("numeric")
def numeric(completion: str, sample: PromptSample) -> float:
    """``|pred − gold| <= atol + rtol·|gold|``; ``extra["atol"]``/``extra["rtol"]`` (defaults
    1e-6 and 1e-4). ``pred``: the last number of the final answer, else of the completion."""
    gold = parse_number(sample.answer)
    atol, rtol = sample.extra.get("atol", 1e-6), sample.extra.get("rtol", 1e-4)
    if gold is None or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (atol, rtol)):
        raise DataError(f"sample {sample.index} ({sample.domain}): answer {sample.answer!r}, atol {atol!r}, rtol "
                        f"{rtol!r}; expected a number and numeric tolerances")  # fmt: skip
    answer = extract_final_answer(completion)
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", completion if answer is None else answer)
    found = _NUMBER_RE.findall(text)
    pred = parse_number(found[-1]) if found else None
    return 1.0 if pred is not None and abs(pred - gold) <= atol + rtol * abs(gold) else 0.0
