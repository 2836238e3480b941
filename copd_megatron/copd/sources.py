"""Prompt sources of the run's domains and their data streams.

Every rank knows every domain (prompt files are small next to models): a student draws cross
prompts from a peer's data itself, whichever ranks hold the peer. Each (branch, purpose) pair
reads its own :class:`PromptStream` whose order derives from (seed, branch, purpose) alone, so
cross prompts never disturb the teacher's own data order and a resumed run sees exactly the
prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

from copd_megatron.config.schema import Config
from copd_megatron.data.prompts import PromptSample, PromptStream, load_prompts
from copd_megatron.rewards import synthetic
from copd_megatron.rewards.registry import get_verifier
from copd_megatron.rollout.types import SamplingParams
from copd_megatron.utils.seeds import derived_seed


@dataclass
class Source:
    """Prompts of one domain and the verifier that scores them."""

    domain: str
    branch: str  # the branch whose data this is
    train: list[PromptSample]
    held_out: list[PromptSample]
    verifier: object


def make_source(cfg: Config, index: int) -> Source:
    b = cfg.branches[index]
    if b.data.startswith("synthetic:"):
        family = b.data.split(":", 1)[1]
        train = synthetic.generate(family, 20000, b.difficulty, seed=cfg.seed)
        held = synthetic.generate(family, cfg.eval.prompts_per_domain, b.difficulty, seed=cfg.eval.seed)
        domain = family
    else:
        train, _ = load_prompts(b.data, domain=b.name)
        domain = train[0].domain
        held = load_prompts(b.eval_data, domain=b.name)[0] if b.eval_data else train[-cfg.eval.prompts_per_domain :]
        if not b.eval_data:
            train = train[: -cfg.eval.prompts_per_domain] or train
    return Source(domain, b.name, train, held[: cfg.eval.prompts_per_domain], get_verifier(b.verifier))


def make_sources(cfg: Config) -> dict[str, Source]:
    """Branch name → its source, in config order."""
    return {b.name: make_source(cfg, i) for i, b in enumerate(cfg.branches)}


def make_streams(cfg: Config, name: str, sources: dict[str, Source]) -> dict[str, PromptStream]:
    """The streams a model branch reads: its native data (mixed RLVR: every domain pooled; the
    MOPD student: none) and one cross stream per other data branch."""
    streams: dict[str, PromptStream] = {}
    if name in sources:
        streams[f"native/{sources[name].domain}"] = PromptStream(sources[name].train, derived_seed(cfg.seed, "native", name))
    elif name == "mixed":
        for src in sources.values():
            streams[f"native/{src.domain}"] = PromptStream(src.train, derived_seed(cfg.seed, "native", name, src.domain))
    for j, src in sources.items():
        if j != name:
            streams[f"cross/{j}"] = PromptStream(src.train, derived_seed(cfg.seed, "cross", name, j))
    return streams


def sampling(cfg: Config, tokenizer) -> SamplingParams:
    """The run's sampling parameters (seeds are per request, see ``copd/rlvr.py``)."""
    r = cfg.rollout
    return SamplingParams(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                          stop_token_ids=(tokenizer.eos_id,), stop_strings=tuple(r.stop))  # fmt: skip


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` items in ``parts`` near-equal counts (the first ones get the remainder)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
