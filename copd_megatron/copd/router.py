"""Teachers answer students' score requests, wherever the two branches live.

A request is (student, teacher, rows of the student's rollouts, what to return). Colocated, the
teacher's worker is on this rank and answers directly. Disjoint, each rank holds one branch and
the *exchange group* joins the ranks holding the same shard position of every branch: requests
travel there (token ids, masks, media), every teacher answers the ones addressed to it with a
forward pass on its own ranks, and the answers travel back (per-token log-probs, top-k ids and
values: never logits). Each member of a teacher's model-parallel group receives the same requests
from its counterparts in the student's group (rollouts are identical across a branch's TP/PP
ranks), so the teacher's forward passes line up.

``answer`` is synchronous for everyone: it returns only when every teacher has answered, and no
branch updates before that. This is the barrier of the live-teacher invariant (teachers answer
with their weights after step s−1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from copd_megatron.data.batch import Batch
from copd_megatron.distributed.comm import broadcast_tree
from copd_megatron.distributed.groups import DISJOINT, Placement


@dataclass
class ScoreRequest:
    student: str
    teacher: str
    batch: Batch  # tokens, loss_mask (and media) of the student's rows
    logprobs: bool = True
    topk: int = 0
    full_logits: bool = False  # colocated placement only


class Router:
    def __init__(self, placement: Placement, workers: dict) -> None:
        self.placement, self.workers = placement, workers

    def answer(self, requests: list[ScoreRequest]) -> list[dict]:
        """The teachers' answers to ``requests`` (this rank's), in order. Collective in disjoint placement."""
        if self.placement.kind != DISJOINT:
            return [self._score(r) for r in requests]
        return self._exchange(requests)

    def _score(self, r: ScoreRequest) -> dict:
        worker = self.workers[r.teacher]
        worker.activate()
        try:
            return worker.score(r.batch, logprobs=r.logprobs, topk=r.topk, full_logits=r.full_logits)
        finally:
            worker.deactivate()

    def _exchange(self, requests: list[ScoreRequest]) -> list[dict]:
        p = self.placement
        if any(r.full_logits for r in requests):
            raise ValueError("full-vocabulary teacher logits cannot travel between disjoint branches")
        mine = [_pack(r) for r in requests]
        # Round 1: every member's requests to every member (one broadcast per member, branch order).
        everyone = [broadcast_tree(mine if src == dist.get_rank() else None, src, p.exchange) for src in p.exchange_ranks]
        (me,) = p.local
        answers = {}
        for slot, reqs in enumerate(everyone):
            for i, packed in enumerate(reqs):
                if packed["teacher"] == me:
                    answers[(slot, i)] = self._score(_unpack(packed))
        # Round 2: every member's answers back; each keeps those to its own requests.
        my_slot = p.exchange_ranks.index(dist.get_rank())
        out: dict[int, dict] = {}
        for slot, src in enumerate(p.exchange_ranks):
            sent = broadcast_tree(answers if src == dist.get_rank() else None, src, p.exchange)
            for (to_slot, i), ans in sent.items():
                if to_slot == my_slot:
                    out[i] = ans
        return [out[i] for i in range(len(requests))]


def _pack(r: ScoreRequest) -> dict:
    b = r.batch
    fields = {k: v for k, v in b.fields.items() if k in ("loss_mask", "media")}
    return {"student": r.student, "teacher": r.teacher, "tokens": b.tokens, "fields": fields,
            "kinds": {k: b.kinds[k] for k in fields}, "want": (r.logprobs, r.topk)}  # fmt: skip


def _unpack(p: dict) -> ScoreRequest:
    b = Batch(p["tokens"])
    for k, v in p["fields"].items():
        b.set(k, v, p["kinds"][k])
    logprobs, topk = p["want"]
    return ScoreRequest(p["student"], p["teacher"], b, logprobs, topk)

