"""Synthetic task families: deterministic generation, difficulty, correct reference answers,
verifiers that accept the true answer and reject a wrong one, held-out splits, SFT text."""

import random

import pytest

from copd_megatron.config.schema import ConfigError
from copd_megatron.data.prompts import PromptDataset
from copd_megatron.rewards.registry import get_verifier
from copd_megatron.rewards.synthetic import (
    FAMILIES,
    extract,
    generate,
    make_synthetic_split,
    sft_document,
    sft_text,
    write_jsonl,
)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_generation_is_deterministic_in_the_seed(family):
    a = generate(family, 50, 3, seed=5)
    assert a == generate(family, 50, 3, seed=5)
    assert a == FAMILIES[family].generate(5, 50, 3)
    assert [s.prompt for s in a] != [s.prompt for s in generate(family, 50, 3, seed=6)]
    from_rng = FAMILIES[family].generate(random.Random(0), 5, 2)
    assert from_rng == FAMILIES[family].generate(random.Random(0), 5, 2)
    assert all(s.domain == family and s.extra == {"difficulty": 3} for s in a)
    assert [s.index for s in a] == list(range(50))


def _solve(prompt: str) -> str:
    """An independent solver of every family's prompt format."""
    q = prompt.removeprefix("Q: ").removesuffix("\nA:")
    if q.startswith("reverse "):
        return q.split()[1][::-1]
    if q.startswith("sort "):
        return "".join(sorted(q.split()[1]))
    if q.startswith("count "):
        _, letter, _, word = q.split()
        return str(word.count(letter))
    if q.startswith(("asc ", "desc ")):
        op, digits = q.split()
        return "".join(sorted(digits, reverse=op == "desc"))
    a, op, b = __import__("re").fullmatch(r"(\d+)([-+*])(\d+)=", q).groups()
    return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_answers_are_correct_and_verifiers_accept_only_them(family, difficulty):
    verify = get_verifier(f"synthetic_{family}")
    for s in generate(family, 40, difficulty, seed=1):
        assert s.answer == _solve(s.prompt), s
        assert verify(f" {s.answer}\nQ: junk after the stop", s) == 1.0
        assert verify(f"{s.answer}", s) == 1.0
        assert verify(f" {s.answer}x\n", s) == 0.0
        assert verify(f"\n{s.answer}", s) == 0.0  # the answer must be on the first line
        assert verify("", s) == 0.0


def test_difficulty_grows_the_problems():
    def mean_len(family, d):
        return sum(len(s.prompt + s.answer) for s in generate(family, 200, d, seed=0)) / 200

    for family in FAMILIES:
        lengths = [mean_len(family, d) for d in range(1, 6)]
        assert lengths == sorted(lengths) and lengths[-1] > lengths[0], (family, lengths)
    ops = {d: {c for s in generate("arithmetic", 200, d, seed=0) for c in "+-*" if c in s.prompt} for d in (1, 2, 4)}
    assert ops == {1: {"+"}, 2: {"+", "-"}, 4: {"+", "-", "*"}}
    with pytest.raises(ConfigError, match="expected an integer in 1..5"):
        generate("arithmetic", 1, 6)
    with pytest.raises(ConfigError, match="unknown; expected one of"):
        generate("poetry", 1, 1)


def test_prompts_stay_short_for_a_tiny_model():
    for family in FAMILIES:
        assert max(len(s.prompt) for s in generate(family, 200, 5, seed=0)) <= 32


def test_held_out_split_is_distinct_and_disjoint_from_training():
    train = generate("arithmetic", 300, 2, seed=0)
    held = make_synthetic_split("arithmetic", 100, 2, seed=1, exclude=[s.prompt for s in train])
    prompts = [s.prompt for s in held]
    assert len(set(prompts)) == 100 and not set(prompts) & {s.prompt for s in train}
    assert held == make_synthetic_split("arithmetic", 100, 2, seed=1, exclude=[s.prompt for s in train])
    with pytest.raises(ConfigError, match="found only 100 distinct"):  # 1-digit sums: 10 x 10 prompts
        make_synthetic_split("arithmetic", 150, 1, seed=0)


def test_sft_text_and_jsonl(tmp_path):
    s = generate("reverse", 1, 2, seed=0)[0]
    prompt, target = sft_text(s)
    assert prompt == s.prompt and target == f" {s.answer}\n"
    assert sft_document(s) == f"{s.prompt} {s.answer}\n"
    assert extract(target) == s.answer
    samples = generate("count", 5, 2, seed=0)
    write_jsonl(tmp_path / "count.jsonl", samples)
    assert list(PromptDataset(tmp_path / "count.jsonl")) == samples


def _perturbations(answer: str) -> set[str]:
    """Every near miss of an answer: one digit changed, dropped or added, two neighbours swapped,
    the whole answer reversed."""
    out = {answer[::-1], answer + answer[-1], answer[1:], answer[:-1]}
    for i in range(len(answer)):
        out |= {answer[:i] + c + answer[i + 1 :] for c in "0123456789"}
        out |= {answer[:i] + c + answer[i:] for c in "0123456789"}
        if i + 1 < len(answer):
            out.add(answer[:i] + answer[i + 1] + answer[i] + answer[i + 2 :])
    return out - {answer}


@pytest.mark.parametrize("family", ["asc", "desc"])
@pytest.mark.parametrize("difficulty", [1, 4, 5])
def test_testbed_verifiers_are_exact(family, difficulty):
    """The testbed's verifiers accept the generated answer (however the line ends) and no near miss."""
    verify = get_verifier(f"synthetic_{family}")
    for s in generate(family, 100, difficulty, seed=3):
        assert len(s.answer) == 2 + difficulty and sorted(s.answer) == sorted(s.prompt.split()[2])
        for ok in (s.answer, f" {s.answer}", f" {s.answer}\n", f" {s.answer} \nA: 123"):
            assert verify(ok, s) == 1.0, (ok, s)
        for bad in _perturbations(s.answer):
            assert verify(f" {bad}\n", s) == 0.0, (bad, s)
        other = "desc" if family == "asc" else "asc"  # the peer domain's answer to the same digits
        peer = "".join(sorted(s.answer, reverse=other == "desc"))
        assert verify(peer, s) == float(peer == s.answer)  # equal only when every digit is the same


def test_testbed_generation_is_pinned():
    """The demo's base, training data and held-out sets derive from these exact samples: a change
    to the generator changes every published number, so it must be deliberate."""
    assert [(s.prompt, s.answer) for s in generate("asc", 3, 4, seed=0)] == [
        ("Q: asc 893676\nA:", "366789"), ("Q: asc 350608\nA:", "003568"), ("Q: asc 680681\nA:", "016688")]
    assert [(s.prompt, s.answer) for s in generate("desc", 3, 4, seed=0)] == [
        ("Q: desc 439759\nA:", "997543"), ("Q: desc 553693\nA:", "965533"), ("Q: desc 630700\nA:", "763000")]
    held = generate("asc", 200, 4, seed=12345)  # the trainer's held-out set (eval.seed)
    train = {s.prompt for s in generate("asc", 20000, 4, seed=1)}
    assert len({s.prompt for s in held}) >= 198  # 10^6 digit strings: duplicates are rare
    assert len({s.prompt for s in held} & train) <= 10  # and so is overlap with a run's training pool
