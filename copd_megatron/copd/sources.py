"""Prompt sources of the run's domains and their data streams.

Every rank knows every domain (prompt files are small next to models): a student draws cross
prompts from a peer's data itself, whichever ranks hold the peer. Each (branch, purpose) pair
reads its own :class:`PromptStream` whose order derives from (seed, branch, purpose) alone, so
cross prompts never disturb the teacher's own data order and a resumed run sees exactly the
prompts the uninterrupted run would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

from copd_megatron.config.schema import Config, ConfigError
from copd_megatron.data.media import load_multimodal_prompts, resolve_samples
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


VISUAL_POOL = 4000  # generated prompts of a visual family (pixels are kept in memory: 3 KB per 32x32 image)


def make_source(cfg: Config, index: int) -> Source:
    """A branch's prompts. With ``model.vision`` their images and videos are checked and resolved
    (``data/media.py``): every branch is the same vision-language model, text rows included."""
    b, vision = cfg.branches[index], cfg.model.vision
    if b.data.startswith("synthetic:"):
        family = b.data.split(":", 1)[1]
        visual = synthetic.get_family(family).visual
        if visual and vision is None:
            raise ConfigError(f"branches.{index}.data: synthetic family {family!r} has images; it needs model.vision")
        train = synthetic.generate(family, VISUAL_POOL if visual else 20000, b.difficulty, seed=cfg.seed)
        held = synthetic.generate(family, cfg.eval.prompts_per_domain, b.difficulty, seed=cfg.eval.seed)
        if vision is not None:
            train, held = (resolve_samples(x, vision, b.data) for x in (train, held))
        domain = family
    else:
        def load(path: str) -> list[PromptSample]:
            if vision is None:
                return load_prompts(path, domain=b.name)[0]
            return load_multimodal_prompts(path, vision, domain=b.name)[0]

        train = load(b.data)
        domain = train[0].domain
        held = load(b.eval_data) if b.eval_data else train[-cfg.eval.prompts_per_domain :]
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
