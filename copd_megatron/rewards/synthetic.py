"""Synthetic verifiable task families, generated from a seed: the demo's "capabilities".

Each family makes short prompts that a ~1M-parameter model trained from scratch on a CPU
can learn, with a difficulty knob (1 = easy … 5 = hard), and registers an exact-answer
verifier ``synthetic_<family>``:

    family      prompt                          answer  difficulty
    arithmetic  "Q: 47+8=\\nA:"                  "55"    operand digits (a: 1,2,3,3,4; b: 1,2,2,2,3);
                                                        + from 1, − from 2, × from 4
    reverse     "Q: reverse cabd\\nA:"            "dbac"  word length 2 + difficulty
    count       "Q: count b in abbcb\\nA:"        "3"     string length 3 + difficulty
    sort        "Q: sort dbca\\nA:"               "abcd"  word length 2 + difficulty
    asc         "Q: asc 390720\\nA:"              "002379" digits (repeats allowed): 2 + difficulty
    desc        "Q: desc 390720\\nA:"             "973200" digits (repeats allowed): 2 + difficulty

Visual families (``rewards/visual.py``: coloured shapes in images and short videos, e.g.
``shape_count``, ``video_motion``) are registered here too; their samples carry the pixels in
``extra["images"]`` / ``extra["video"]`` and need a model with ``model.vision``.

Words use the letters a-h only, so the vocabulary stays tiny. ``asc`` and ``desc`` are the
CPU testbed (docs/testbed.md): one sub-skill (reading a multiset of digits, copies included,
and emitting it in order) in two opposite compositions, so an expert of one answers the other
wrongly, while what it learns about digits and copies is shared. Digits are one token each
(the tokenizer splits digits), which letters are not (SentencePiece merges them into pieces,
so "the 3rd letter" is not "the 3rd token"). The policy's answer is its
completion up to the first newline (the rollout stop string), stripped of spaces; it must
equal the reference exactly. Generation is deterministic in (family, difficulty, seed):
the same call gives the same samples on every rank and in every run.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from copd_megatron.config.schema import ConfigError
from copd_megatron.data.prompts import PromptSample, write_jsonl  # noqa: F401 - re-exported
from copd_megatron.rewards.registry import register_verifier
from copd_megatron.rewards.visual import VISUAL_MAKERS

LETTERS = "abcdefgh"
DIGITS = "0123456789"
MIN_DIFFICULTY, MAX_DIFFICULTY = 1, 5


def _arithmetic(rng: random.Random, d: int) -> tuple[str, str]:
    # Difficulty 1-4 reproduce the original generator exactly (bases built with it stay valid).
    hi_a, hi_b = (10, 100, 1000, 1000, 10_000)[d - 1], (10, 100, 100, 100, 1000)[d - 1]
    a, b = rng.randrange(hi_a), rng.randrange(hi_b)
    op = rng.choice("+-*" if d >= 4 else "+-" if d >= 2 else "+")
    if op == "-" and b > a:
        a, b = b, a  # non-negative results: one less thing for a tiny model to learn
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"Q: {a}{op}{b}=\nA:", str(value)


def _word(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(n))


def _reverse(rng: random.Random, d: int) -> tuple[str, str]:
    w = _word(rng, 2 + d)
    return f"Q: reverse {w}\nA:", w[::-1]


def _count(rng: random.Random, d: int) -> tuple[str, str]:
    w = _word(rng, 3 + d)
    c = rng.choice(w)  # a letter that occurs: the answer is >= 1 and depends on the string
    return f"Q: count {c} in {w}\nA:", str(w.count(c))


def _sort(rng: random.Random, d: int) -> tuple[str, str]:
    w = _word(rng, 2 + d)
    return f"Q: sort {w}\nA:", "".join(sorted(w))


def _digits(rng: random.Random, d: int) -> list[str]:
    # Repeats allowed: a sorted answer must keep every copy ("3903" -> "0339"), so a model
    # that only knows the order of the digits still fails; that is what keeps greedy decoding
    # off the ceiling for a base that has partly learned the task.
    return [rng.choice(DIGITS) for _ in range(2 + d)]


def _asc(rng: random.Random, d: int) -> tuple[str, str]:
    xs = _digits(rng, d)
    return f"Q: asc {''.join(xs)}\nA:", "".join(sorted(xs))


def _desc(rng: random.Random, d: int) -> tuple[str, str]:
    xs = _digits(rng, d)
    return f"Q: desc {''.join(xs)}\nA:", "".join(sorted(xs, reverse=True))


@dataclass(frozen=True)
class TaskFamily:
    """One synthetic family: how to make a (prompt, answer) pair at a difficulty."""

    name: str  # also the samples' domain and the verifier's suffix (synthetic_<name>)
    make: Callable[[random.Random, int], tuple]  # (rng, difficulty) -> (prompt, answer[, media fields])

    def generate(self, rng_or_seed: random.Random | int, n: int, difficulty: int = 2) -> list[PromptSample]:
        """``n`` samples; an int seed gives the same samples as the module-level :func:`generate`."""
        check_difficulty(difficulty)
        rng = rng_or_seed if isinstance(rng_or_seed, random.Random) else _rng(self.name, difficulty, rng_or_seed)
        return [self.sample(rng, difficulty, i) for i in range(n)]

    def sample(self, rng: random.Random, difficulty: int, index: int) -> PromptSample:
        prompt, answer, *media = self.make(rng, difficulty)
        return PromptSample(prompt, answer, self.name, {"difficulty": difficulty, **(media[0] if media else {})}, index)

    @property
    def visual(self) -> bool:
        """Its samples carry images or video frames."""
        return self.name in VISUAL_MAKERS

    @property
    def verifier_name(self) -> str:
        return f"synthetic_{self.name}"


FAMILIES: dict[str, TaskFamily] = {
    f.name: f
    for f in (
        TaskFamily("arithmetic", _arithmetic),
        TaskFamily("reverse", _reverse),
        TaskFamily("count", _count),
        TaskFamily("sort", _sort),
        TaskFamily("asc", _asc),
        TaskFamily("desc", _desc),
    )
}
# Families whose samples carry images / video frames (need a model with model.vision).
VISUAL_FAMILIES: dict[str, TaskFamily] = {name: TaskFamily(name, make) for name, make in VISUAL_MAKERS.items()}


def _rng(family: str, difficulty: int, seed: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: stable across processes and Python runs.
    return random.Random(f"{family}/{difficulty}/{seed}")


def check_difficulty(difficulty: int) -> None:
    if not isinstance(difficulty, int) or not MIN_DIFFICULTY <= difficulty <= MAX_DIFFICULTY:
        raise ConfigError(f"synthetic difficulty: {difficulty!r}; expected an integer in "
                          f"{MIN_DIFFICULTY}..{MAX_DIFFICULTY}")  # fmt: skip


def get_family(name: str) -> TaskFamily:
    """A text or visual family by name."""
    every = {**FAMILIES, **VISUAL_FAMILIES}
    if name not in every:
        raise ConfigError(f"synthetic family {name!r} is unknown; expected one of {list(every)}")
    return every[name]


def generate(family: str, n: int, difficulty: int = 2, seed: int = 0) -> list[PromptSample]:
    """``n`` samples of ``family`` (deterministic in ``seed``; duplicates possible)."""
    return get_family(family).generate(seed, n, difficulty)


def make_synthetic_split(family: str, n: int, difficulty: int, seed: int,
                         exclude: Iterable[str] = ()) -> list[PromptSample]:  # fmt: skip
    """``n`` *distinct* samples whose keys (:func:`sample_key`: the prompt of a text sample) are
    not in ``exclude`` (e.g. a training set's): a held-out evaluation set. Raises if the family
    has too few distinct samples."""
    fam, banned = get_family(family), set(exclude)
    check_difficulty(difficulty)
    rng = random.Random(f"{family}/{difficulty}/{seed}/split")  # its own stream, apart from generate()
    out: list[PromptSample] = []
    for _ in range(50 * n + 1000):  # bounded: small spaces (1-digit sums) run out
        if len(out) == n:
            break
        s = fam.sample(rng, difficulty, len(out))
        key = sample_key(s)
        if key not in banned:
            banned.add(key)
            out.append(s)
    if len(out) < n:
        raise ConfigError(f"synthetic split {family} at difficulty {difficulty}: found only {len(out)} distinct "
                          f"held-out prompts of the {n} asked; ask for fewer or raise the difficulty")  # fmt: skip
    return out


def sample_key(sample: PromptSample) -> str:
    """What makes two samples the same question: the prompt, and the pixels of visual ones."""
    import hashlib

    media = [sample.extra.get("images") or [], (sample.extra.get("video") or {}).get("frames", [])]
    if not any(media):
        return sample.prompt
    h = hashlib.sha1(sample.prompt.encode())
    for arr in media[0] + media[1]:
        h.update(arr.tobytes() if hasattr(arr, "tobytes") else str(arr).encode())
    return h.hexdigest()


def sft_text(sample: PromptSample) -> tuple[str, str]:
    """(prompt, target) for supervised training: the target is " answer" then a newline.

    The loss falls on the target only; the tokenizer's EOS follows it (``training/sft.py``)."""
    return sample.prompt, f" {sample.answer}\n"


def sft_document(sample: PromptSample) -> str:
    """Prompt + correct answer + end marker (newline) as one string, e.g. tokenizer corpora."""
    prompt, target = sft_text(sample)
    return prompt + target


def extract(completion: str) -> str:
    """The policy's answer: the completion up to its first newline, stripped."""
    return completion.split("\n", 1)[0].strip()


def exact_answer(completion: str, sample: PromptSample) -> float:
    """1.0 if the first line of the completion is exactly the reference answer."""
    return 1.0 if extract(completion) == sample.answer else 0.0


for _family in [*FAMILIES.values(), *VISUAL_FAMILIES.values()]:
    register_verifier(_family.verifier_name)(exact_answer)
