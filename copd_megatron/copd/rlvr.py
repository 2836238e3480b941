"""Update batches of one branch: native GRPO samples and cross-branch OPD samples.

Native (paper Eq. rlvr): prompts x ~ D_k, G completions each from π_k, rewards r_k, group
advantage Â_i = (r_i − mean)/(std + ε) on every response token.

Cross (paper Eq. delta): prompts x' ~ D_j from a peer's data, completions from the *student*
π_k, no task reward; per-token advantage Â_t = β_k·(log π_j(y_t|·) − log π_k(y_t|·)) with the
peer's live weights (stop-gradient). With a divergence ``opd.loss`` the advantage is 0 and the
row carries the teacher's top-k (or, colocated, its logits) and the weight β_k instead.

Every sample's randomness is a per-request seed derived from (run seed, branch, step, purpose,
the prompt's index in the step's global prompt list, the sample's index in its group): the same
rollouts at any data-parallel layout, in either placement, before and after a resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from copd_megatron.data.batch import RAGGED, ROW, TARGET, Batch
from copd_megatron.data.media import prompt_inputs
from copd_megatron.losses import group_advantages, opd_advantage
from copd_megatron.rollout.types import GenerationRequest, RolloutBatch, SamplingParams
from copd_megatron.utils.seeds import derived_seed


@dataclass
class Rollouts:
    """One purpose of one student's rollouts on this data-parallel rank: ``n = prompts·G`` rows."""

    student: str
    teacher: str | None  # None: native samples; else the peer whose prompts these are
    samples: list  # the PromptSample of each row
    batch: RolloutBatch
    texts: list[str]  # decoded responses
    rewards: torch.Tensor  # [n] task rewards (cross samples: the teacher domain's verifier, for metrics)
    indices: list[int]  # per row: its prompt's index in the step's global prompt list (layout-independent)

    def as_batch(self) -> Batch:
        """tokens, loss_mask (the response, target-aligned), sampler log-probs, media (if any)."""
        b = self.batch
        out = Batch(b.tokens)
        out.set("loss_mask", b.response_mask[:, 1:].contiguous(), TARGET)
        out.set("sampler_logprobs", b.logprobs[:, 1:].contiguous(), TARGET)
        if b.media and any(b.media):
            out.set("media", list(b.media), RAGGED)
        return out


def requests(tokenizer, prompts: list, indices: list[int], group_size: int, *seed_parts) -> list[GenerationRequest]:
    """G requests per prompt, each seeded by (seed_parts, global prompt index, sample index)."""
    out = []
    for sample, i in zip(prompts, indices):
        ids, media = prompt_inputs(tokenizer, sample)  # text: encode_prompt, {}; images: placeholders + pixels
        out.extend(GenerationRequest(ids, derived_seed(*seed_parts, i, g), media) for g in range(group_size))
    return out


def roll(worker, tokenizer, prompts: list, indices: list[int], group_size: int, params: SamplingParams, verifier,
         teacher: str | None, *seed_parts) -> Rollouts:  # fmt: skip
    """G completions per prompt from ``worker``'s engine, decoded and scored by ``verifier``."""
    rows = [s for s in prompts for _ in range(group_size)]
    row_indices = [i for i in indices for _ in range(group_size)]
    batch = worker.generate(requests(tokenizer, prompts, indices, group_size, *seed_parts), params)
    stop = set(params.stop_token_ids)
    texts = []
    for i in range(len(rows)):
        ids = batch.response_ids(i)
        texts.append(tokenizer.decode(ids[:-1] if ids and ids[-1] in stop else ids))
    rewards = torch.tensor([float(verifier(t, s)) for t, s in zip(texts, rows)])
    return Rollouts(worker.name, teacher, rows, batch, texts, rewards, row_indices)


def native_batch(r: Rollouts, old_logprobs: torch.Tensor, group_size: int, advantage: str) -> tuple[Batch, dict]:
    """GRPO: group advantages broadcast over response tokens; old log-probs from the trainer."""
    batch = r.as_batch()
    mask = batch["loss_mask"]
    adv, degenerate = group_advantages(r.rewards.view(-1, group_size), mode=advantage)
    batch.set("advantages", adv.reshape(-1, 1).float().to(mask.device) * mask, TARGET)
    batch.set("old_logprobs", old_logprobs, TARGET)
    # (sum, count) pairs, reduced over data-parallel ranks as Σsum / Σcount: the fraction of groups
    # whose rewards are all equal (no signal), and rows per data-parallel rank.
    stats = {"degenerate_frac": (float(degenerate), float(r.rewards.numel() // group_size)),
             "rows": (float(len(batch)), 1.0)}  # fmt: skip
    return batch, stats


def cross_batch(r: Rollouts, old_logprobs: torch.Tensor, teacher: dict, beta: float, opd_loss: str) -> tuple[Batch, dict]:
    """OPD rows: β·(log π_T − log π_S) per sampled token (``opd_loss: sampled``), or advantage 0 with
    the teacher's top-k / logits and weight β for a divergence loss. ``teacher`` is the peer's
    answer (its ``score`` of these rows, at its current weights)."""
    batch = r.as_batch()
    mask = batch["loss_mask"]
    t_lp = teacher["logprobs"].to(mask.device)
    # (sum, count) pairs, reduced over data-parallel ranks as Σsum / Σcount (see rollout_metrics).
    stats = {"opd_logratio": (float(((t_lp - old_logprobs) * mask).sum()), float(mask.sum())),
             "rows": (float(len(batch)), 1.0), "teacher_version": (float(teacher["weight_version"]), 1.0)}  # fmt: skip
    batch.set("old_logprobs", old_logprobs, TARGET)
    if opd_loss == "sampled":
        batch.set("advantages", opd_advantage(t_lp, old_logprobs, beta, mask), TARGET)
        return batch, stats
    batch.set("advantages", torch.zeros_like(mask), TARGET)
    batch.set("opd_weight", torch.full((len(batch),), float(beta), device=mask.device), ROW)
    if opd_loss == "topk_kl":
        batch.set("teacher_topk_ids", teacher["topk_ids"], TARGET)
        batch.set("teacher_topk_vals", teacher["topk_vals"], TARGET)
    else:
        batch.set("teacher_logits", teacher["logits"], RAGGED)
    return batch, stats


def rollout_metrics(r: Rollouts | None, prefix: str) -> dict[str, tuple[float, float]]:
    """(sum, count) pairs of one purpose's rollouts on this rank (``None``: this rank had no prompts
    of the purpose). Summed over the data-parallel ranks, Σsum / Σcount is the global batch's mean
    whatever the shares (tokens/s: the mean over the ranks that generated)."""
    if r is None:
        return {f"{prefix}/{k}": (0.0, 0.0) for k in ("reward", "pass@1", "response_len", "rollout_tokens_per_s")}
    n = float(r.rewards.numel())
    return {
        f"{prefix}/reward": (float(r.rewards.sum()), n),
        f"{prefix}/pass@1": (float((r.rewards >= 1.0).sum()), n),  # sampled completions verified correct
        f"{prefix}/response_len": (float(r.batch.response_lens.float().sum()), n),
        f"{prefix}/rollout_tokens_per_s": (float(r.batch.meta.get("tokens_per_s", 0.0)), 1.0),
    }
