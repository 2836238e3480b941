"""Process groups of each branch, and where branches live: colocated or disjoint placement.

Megatron's ``parallel_state`` is initialised once for the *branch* layout (tp, pp, cp) over the
whole world, so its data-parallel dimension has ``DP = world / (tp·pp·cp)`` ranks. A placement
then decides which ranks hold which branch:

* ``colocated``: every rank holds its shard of every branch; each branch's data-parallel group
  is Megatron's (size DP). Branches take turns on the same devices; a teacher's logits live on
  its student's ranks, so full-vocabulary divergences are local.
* ``disjoint``: the DP dimension is cut into K slices of ``DP / K``; branch k lives on the ranks
  whose DP index falls in slice k. Its tensor/pipeline/context groups are Megatron's (they never
  cross a DP index), its data-parallel groups are the slice. Branches generate, score and update
  concurrently. Ranks holding the same shard position (tp, cp, pp, DP index within the slice) of
  different branches form an *exchange group* (size K): student rollouts and teacher scores
  travel there, never logits.

Everything that communicates takes a :class:`BranchGroups` (explicit groups), and Megatron's
model, DDP, optimizer and schedules receive its ``pg_collection``, so the algorithm never reads
``parallel_state`` globals. Groups are created here, once, in the same order on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

COLOCATED, DISJOINT = "colocated", "disjoint"


@dataclass
class BranchGroups:
    """The groups of one branch as seen from this rank, and where the rank sits in them."""

    tp: Any
    pp: Any
    cp: Any
    dp: Any  # data parallel (without context parallel)
    dp_cp: Any  # data × context parallel: the replicas of a shard
    mp: Any  # tensor × pipeline (model parallel)
    world: Any  # every rank of the branch (gradient-norm reductions of the distributed optimizer)
    pg_collection: Any  # megatron ProcessGroupCollection for the model, DDP, optimizer, schedules
    ranks: list[int] = field(default_factory=list)  # global ranks of the branch

    @staticmethod
    def _size(g) -> int:
        return dist.get_world_size(g) if g is not None and dist.is_initialized() else 1

    @staticmethod
    def _rank(g) -> int:
        return dist.get_rank(g) if g is not None and dist.is_initialized() else 0

    @property
    def tp_size(self) -> int:
        return self._size(self.tp)

    @property
    def tp_rank(self) -> int:
        return self._rank(self.tp)

    @property
    def pp_size(self) -> int:
        return self._size(self.pp)

    @property
    def pp_rank(self) -> int:
        return self._rank(self.pp)

    @property
    def dp_size(self) -> int:
        return self._size(self.dp)

    @property
    def dp_rank(self) -> int:
        return self._rank(self.dp)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def pp_global(self, stage: int) -> int:
        """Global rank of ``stage`` in this rank's pipeline."""
        return dist.get_global_rank(self.pp, stage) if self.pp_size > 1 else dist.get_rank()

    def tp_global(self, tp_rank: int = 0) -> int:
        return dist.get_global_rank(self.tp, tp_rank) if self.tp_size > 1 else dist.get_rank()


@dataclass
class Placement:
    """Which branches this rank holds, their groups, and the groups that join branches."""

    kind: str
    names: list[str]  # every branch of the run, in config order
    groups: dict[str, BranchGroups]  # the branches held by this rank
    exchange: Any = None  # disjoint: one rank per branch at the same shard position (None: colocated)
    exchange_ranks: list[int] = field(default_factory=list)  # global ranks of ``exchange``, in branch order
    shared: BranchGroups | None = None  # the global layout (all DP ranks): base eval and merge
    ranks: dict[str, list[int]] = field(default_factory=dict)  # every branch's global ranks

    @property
    def local(self) -> list[str]:
        """Names of the branches this rank holds, in config order."""
        return [n for n in self.names if n in self.groups]

    def owner_index(self, name: str) -> int:
        return self.names.index(name)


def _megatron_collection():
    from megatron.core.process_groups_config import ProcessGroupCollection

    return ProcessGroupCollection.use_mpu_process_groups(
        ["tp", "pp", "mp", "cp", "tp_cp", "ep", "expt_tp", "tp_ep", "tp_ep_pp", "embd", "pos_embd", "dp", "dp_cp",
         "intra_dp_cp", "expt_dp", "intra_expt_dp", "tp_dp_cp", "intra_dist_opt"]
    )  # fmt: skip


def shared_groups() -> BranchGroups:
    """Megatron's global groups (parallel_state must be initialised): a branch that owns all DP ranks."""
    from megatron.core import parallel_state as ps

    pgc = _megatron_collection()
    pgc.inter_dist_opt = None
    world = dist.group.WORLD if dist.is_initialized() else None
    ranks = list(range(dist.get_world_size())) if dist.is_initialized() else [0]
    return BranchGroups(ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group(),
                        ps.get_context_parallel_group(), ps.get_data_parallel_group(),
                        ps.get_data_parallel_group(with_context_parallel=True), ps.get_model_parallel_group(),
                        world, pgc, ranks)  # fmt: skip


def build_placement(kind: str, names: list[str]) -> Placement:
    """Groups for ``names`` under ``kind`` (collective: every rank calls it, same arguments)."""
    shared = shared_groups()
    if kind == COLOCATED or len(names) == 1:
        return Placement(COLOCATED, list(names), {n: shared for n in names}, None, [], shared,
                         {n: list(shared.ranks) for n in names})  # fmt: skip
    if kind != DISJOINT:
        raise ValueError(f"unknown placement {kind!r}; expected {COLOCATED!r} or {DISJOINT!r}")
    return _disjoint(list(names), shared)


def _coordinates() -> list[tuple[int, int, int, int]]:
    """(tp, cp, dp, pp) ranks of every global rank, from Megatron's parallel_state."""
    from megatron.core import parallel_state as ps

    mine = (ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(), ps.get_data_parallel_rank(),
            ps.get_pipeline_model_parallel_rank())  # fmt: skip
    table: list = [None] * dist.get_world_size()
    dist.all_gather_object(table, mine)
    return [tuple(t) for t in table]


def _disjoint(names: list[str], shared: BranchGroups) -> Placement:
    from megatron.core.process_groups_config import ProcessGroupCollection

    k = len(names)
    coords = _coordinates()
    dp_total = max(c[2] for c in coords) + 1
    if dp_total % k:
        raise ValueError(f"disjoint placement: {k} branches need the data-parallel size {dp_total} to be a multiple of {k}")
    dp_b = dp_total // k
    me = dist.get_rank()
    tp_r, cp_r, dp_r, pp_r = coords[me]
    slot = dp_r // dp_b

    def ranks_where(pred) -> list[int]:
        return [r for r, c in enumerate(coords) if pred(*c)]

    # new_group is collective over the world: every rank creates every group in the same order
    # and keeps the ones it belongs to.
    mine: dict[str, Any] = {}

    def make(key: str, ranks: list[int]) -> None:
        g = dist.new_group(ranks)
        if me in ranks:
            mine[key] = (g, ranks)

    tps, cps, pps = (sorted({c[i] for c in coords}) for i in (0, 1, 3))
    for s in range(k):
        in_slot = lambda d, s=s: s * dp_b <= d < (s + 1) * dp_b  # noqa: E731
        for t in tps:
            for p in pps:
                for c in cps:
                    make(f"dp/{s}", ranks_where(lambda a, b, d, e: a == t and b == c and e == p and in_slot(d)))
                make(f"dp_cp/{s}", ranks_where(lambda a, b, d, e: a == t and e == p and in_slot(d)))
        for p in pps:
            make(f"tp_dp_cp/{s}", ranks_where(lambda a, b, d, e: e == p and in_slot(d)))
        make(f"world/{s}", ranks_where(lambda a, b, d, e: in_slot(d)))
    for t in tps:
        for c in cps:
            for p in pps:
                for j in range(dp_b):
                    make("exchange", ranks_where(lambda a, b, d, e: (a, b, e) == (t, c, p) and d % dp_b == j))
    name = names[slot]
    dp, dp_cp, tp_dp_cp, world = (mine[f"{key}/{slot}"][0] for key in ("dp", "dp_cp", "tp_dp_cp", "world"))
    base = shared.pg_collection
    pgc = ProcessGroupCollection(
        tp=base.tp, pp=base.pp, mp=base.mp, cp=base.cp, tp_cp=base.tp_cp, ep=base.ep, expt_tp=base.expt_tp,
        tp_ep=base.tp_ep, tp_ep_pp=base.tp_ep_pp, embd=base.embd, pos_embd=base.pos_embd, dp=dp, dp_cp=dp_cp,
        intra_dp_cp=dp_cp, expt_dp=dp_cp, intra_expt_dp=dp_cp, tp_dp_cp=tp_dp_cp, intra_dist_opt=world,
    )  # fmt: skip
    pgc.inter_dist_opt = None
    groups = BranchGroups(shared.tp, shared.pp, shared.cp, dp, dp_cp, shared.mp, world, pgc, mine[f"world/{slot}"][1])
    exchange, exchange_ranks = mine["exchange"]
    ranks = {n: ranks_where(lambda a, b, d, e, s=s: s * dp_b <= d < (s + 1) * dp_b) for s, n in enumerate(names)}
    return Placement(DISJOINT, names, {name: groups}, exchange, exchange_ranks, shared, ranks)
