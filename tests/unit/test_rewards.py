"""Verifiers: the registry, math answers (equivalence, LaTeX, boxes, extra text), multiple
choice, numeric tolerance, and the code-execution reward against hostile programs."""

import time

import pytest

from copd_megatron.config.schema import ConfigError
from copd_megatron.data.prompts import DataError, PromptSample
from copd_megatron.rewards import code as code_mod
from copd_megatron.rewards import math_answer
from copd_megatron.rewards.registry import get_verifier, register_verifier, registered


def _s(answer, domain="math", **extra):
    return PromptSample("q", answer, domain, extra, 0)


def test_registry_lookup_and_errors():
    names = registered()
    assert {"math", "exact_match", "multiple_choice", "numeric", "code", "synthetic_arithmetic"} <= set(names)
    assert get_verifier("math") is math_answer.math_equivalence
    with pytest.raises(ConfigError) as err:
        get_verifier("nope")
    assert "'nope' is not registered" in str(err.value) and "synthetic_sort" in str(err.value)

    @register_verifier("test_only_constant")
    def constant(completion, sample):
        return 1.0

    assert get_verifier("test_only_constant")("x", _s("y")) == 1.0
    with pytest.raises(ConfigError, match="already registered"):
        register_verifier("math")(lambda c, s: 0.0)


@pytest.mark.parametrize(
    "gold, completion",
    [
        ("\\frac{1}{2}", "So the result is \\boxed{0.5}."),  # LaTeX fraction vs decimal
        ("\\frac{1}{2}", "\\boxed{\\frac{2}{4}}"),  # equivalent fractions
        ("0.5", "\\boxed{\\dfrac12}"),
        ("1/2", "Thus the answer is $\\frac{1}{2}$."),  # final-answer phrase, inline math
        ("3", "Counting again, I think the answer is 3 apples"),  # extra text around the answer
        ("x^2+1", "**Answer:** 1+x^2"),
        ("72", "She sold 48 + 24 = 72 clips.\n#### 72"),  # GSM8K style
        ("\\sqrt{2}", "\\boxed{2^{1/2}}"),
        ("5", "first \\boxed{6}, wait, no: \\boxed{5}"),  # the last box counts
        ("\\frac{3}{4}", "\\boxed{\\boxed{\\frac{3}{4}}}"),  # nested boxes
    ],
)
def test_math_accepts_equivalent_answers(gold, completion):
    assert math_answer.math_equivalence(completion, _s(gold)) == 1.0


@pytest.mark.parametrize(
    "gold, completion",
    [
        ("5", "\\boxed{5} wait, actually \\boxed{6}"),  # the last box counts
        ("\\frac{1}{3}", "\\boxed{0.33}"),
        ("3", "I have no idea."),  # no marked answer: no reward, even if a number is present
        ("3", "3"),
        ("3", ""),
        ("3", "\\boxed{}"),
        ("2", "\\boxed{" + "1+" * 300 + "1}"),  # too long to be an answer
    ],
)
def test_math_rejects_wrong_or_missing_answers(gold, completion):
    assert math_answer.math_equivalence(completion, _s(gold)) == 0.0


def test_math_never_raises_and_times_out(monkeypatch):
    monkeypatch.setattr(math_answer, "MATH_TIMEOUT_S", 1)
    t0 = time.monotonic()
    assert math_answer.math_equivalence("\\boxed{9^{9^{9^{9^{9}}}}}", _s("1")) == 0.0
    assert time.monotonic() - t0 < 3.0
    for junk in ["\\boxed{\\frac{}{}}", "\\boxed{\\\\\\}", "answer: }{)(", "\\boxed{" + "(" * 200 + "}"]:
        assert math_answer.math_equivalence(junk, _s("1")) == 0.0


def test_extraction_helpers():
    assert math_answer.last_boxed("a \\boxed{x{y}z} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert math_answer.last_boxed("\\boxed{1} then \\boxed{2") == "1"  # an unclosed last box is skipped
    assert math_answer.last_boxed("nothing") is None
    assert math_answer.extract_final_answer("so the final answer is $12$.") == "12"
    assert math_answer.extract_final_answer("Answer: 3.5.") == "3.5"


def test_exact_match_normalises_case_and_spaces():
    assert math_answer.exact_match("  New   York. ", _s("new york", "qa")) == 1.0
    assert math_answer.exact_match("The answer is Paris.", _s("paris", "qa")) == 1.0
    assert math_answer.exact_match("Paris, France", _s("paris", "qa")) == 0.0


@pytest.mark.parametrize(
    "completion, score",
    [
        ("(B)", 1.0),
        ("B. Because the others are wrong.", 1.0),
        ("B", 1.0),
        ("Let me think. A is wrong, (C) too. Answer: B", 1.0),
        ("The answer is (B).", 1.0),
        ("\\boxed{B}", 1.0),
        ("\\boxed{\\text{B}}", 1.0),
        ("The answer is (C).", 0.0),
        ("A good question; I pick (C)", 0.0),  # "A" opening a sentence is not a choice
        ("I don't know", 0.0),
        ("Answer: F", 0.0),  # not among the 4 choices
    ],
)
def test_multiple_choice(completion, score):
    assert math_answer.multiple_choice(completion, _s("(B)", "mc", choices=["w", "x", "y", "z"])) == score


def test_multiple_choice_bad_reference_is_a_data_error():
    with pytest.raises(DataError, match="answer 'E' is not an option letter; expected one of A..D"):
        math_answer.multiple_choice("E", _s("E", "mc", choices=["w", "x", "y", "z"]))


def test_numeric_tolerance():
    assert math_answer.numeric("It is about 3.14159", _s("3.1416", "num")) == 1.0  # default rtol 1e-4
    assert math_answer.numeric("3.14", _s("3.1416", "num")) == 0.0
    assert math_answer.numeric("3.14", _s("3.1416", "num", rtol=1e-2)) == 1.0
    assert math_answer.numeric("1,234,567 people", _s("1234567", "num")) == 1.0
    assert math_answer.numeric("\\boxed{-2.5e3} and then 7", _s("-2500", "num")) == 1.0
    assert math_answer.numeric("answer: 1/4", _s("0.25", "num")) == 1.0
    assert math_answer.numeric("0.0001", _s("0", "num", atol=1e-3, rtol=0.0)) == 1.0
    assert math_answer.numeric("no number", _s("1", "num")) == 0.0
    with pytest.raises(DataError, match="expected a number and numeric tolerances"):
        math_answer.numeric("1", _s("one", "num"))
    with pytest.raises(DataError, match="rtol '0.1'"):
        math_answer.numeric("1", _s("1", "num", rtol="0.1"))


# ---- code execution -------------------------------------------------------------------

TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"


def _code(body: str) -> str:
    return f"Here is my solution:\n```python\n{body}\n```\n"


def _run(body: str, timeout_s: float = 10.0) -> tuple[float, float]:
    """Score ``body``; correct programs get a generous limit (an interpreter start can take over a
    second on a loaded 2-core machine), the kill tests pass their own short one."""
    t0 = time.monotonic()
    score = code_mod.code_reward(_code(body), _s("", "code", tests=TESTS, timeout_s=timeout_s))
    return score, time.monotonic() - t0


def test_code_correct_and_wrong_solutions():
    assert _run("def add(a, b):\n    return a + b")[0] == 1.0
    assert _run("def add(a, b):\n    return a - b")[0] == 0.0
    main_guard = "def add(a, b):\n    return a + b\nif __name__ == '__main__':\n    print(add(1, 2))"
    assert _run(main_guard)[0] == 1.0
    assert code_mod.code_reward("def add(a, b): return a + b", _s("", "code", tests=TESTS)) == 0.0  # no block


def test_code_extraction_prefers_the_last_python_block():
    text = "```python\nx = 1\n```\nthen\n```\nplain\n```\n```py\ny = 2\n```"
    assert code_mod.extract_code(text).strip() == "y = 2"
    assert code_mod.extract_code("```\nz = 3\n```").strip() == "z = 3"
    assert code_mod.extract_code("no code") is None


def test_code_infinite_loop_times_out():
    score, elapsed = _run("while True:\n    pass", timeout_s=1.0)
    assert score == 0.0 and elapsed < 2.0


@pytest.mark.parametrize(
    "body",
    [
        "import os\nos.abort()",  # crash (SIGABRT)
        "raise RuntimeError('boom')",
        "x = bytearray(8 * 1024 ** 3)\ndef add(a, b):\n    return a + b",  # memory bomb, one allocation
        "x = []\nwhile True:\n    x.append(' ' * 10 ** 6)",  # memory bomb, growing
        "import socket\ns = socket.socket()\ndef add(a, b):\n    return a + b",  # network attempt
        (
            "import urllib.request\nurllib.request.urlopen('http://example.com', timeout=1)\n"
            "def add(a, b):\n    return a + b"
        ),
        "import sys\nsys.exit(0)",  # exit 0 before the tests ran must not pass
        "import os\nos._exit(0)",
    ],
)
def test_hostile_programs_score_zero_and_never_raise(body):
    score, elapsed = _run(body, timeout_s=2.0)
    assert score == 0.0 and elapsed < 3.0


def test_code_leaves_no_processes_and_uses_a_fresh_directory(tmp_path):
    marker = tmp_path / "alive"
    body = (
        "import os, time\n"
        "assert not os.listdir('.') or sorted(os.listdir('.')) == ['solution.py', 'stderr', 'stdout', 'tests.py']\n"
        f"if os.fork() == 0:\n    time.sleep(1.5)\n    open({str(marker)!r}, 'w').close()\n    os._exit(0)\n"
        "def add(a, b):\n    return a + b"
    )
    assert _run(body)[0] == 1.0
    time.sleep(2.0)
    assert not marker.exists()  # the forked grandchild was killed with the process group


def test_code_sample_without_tests_is_a_data_error():
    with pytest.raises(DataError, match="extra field 'tests' is NoneType"):
        code_mod.code_reward(_code("pass"), _s("", "code"))
