"""Process start-up: read the launcher's environment, join torch.distributed, build Megatron groups.

Two launchers are supported:

* ``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
* Slurm ``srun`` (one task per GPU) sets ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID``
  and ``SLURM_JOB_NODELIST``; the master is the first host of the node list and the port is
  derived from the job id (10000 + id mod 20000: below Linux's ephemeral range, different for
  jobs that share a node) unless ``MASTER_ADDR`` / ``MASTER_PORT`` are set.

Without either, the process is a world of one. The config is validated against the world
size from the environment *before* ``init_process_group``, so an impossible layout never
reaches a collective. The ranks then meet through ``distributed.rendezvous``, which logs what
it waits for and gives up after ``parallel.rendezvous_timeout_s`` with one line.
"""

from __future__ import annotations

import logging
import os
import random
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch

from copd_megatron.config.layout import Layout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "single"


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm node list: ``gpu[001-003,7],cpu1`` → gpu001, gpu002, gpu003, gpu7, cpu1."""
    hosts: list[str] = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(f"{prefix}{part}")
    return hosts


def read_dist_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The process's rank, world size and rendezvous address from torchrun or Slurm variables."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodes = parse_slurm_nodelist(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        # A port per job, so two jobs sharing a node do not collide on the rendezvous; below
        # 32768 so it never meets a port the kernel handed out for an outgoing connection.
        default_port = 10000 + int(env.get("SLURM_JOB_ID", "0")) % 20000
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR", nodes[0] if nodes else "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", default_port)),
            launcher="slurm",
        )
    # A world of one: any free local port (two single-process jobs on a machine must not collide).
    return DistEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    dist_env: DistEnv, backend: str = "auto", timeout_s: int = 600, rendezvous_timeout_s: float = 600.0
) -> str:
    """Join the default process group (idempotent). Returns the backend in use.

    ``rendezvous_timeout_s`` bounds the wait for the other ranks at start-up (a
    :class:`~copd_megatron.distributed.rendezvous.RendezvousError` names what was missing);
    ``timeout_s`` is the collective timeout afterwards. On a machine without CUDA this activates
    the CPU compatibility layer first, so that Megatron-Core's real code runs under gloo.
    """
    import torch.distributed as dist

    from copd_megatron.distributed.rendezvous import rendezvous

    cuda = torch.cuda.is_available()
    if backend == "auto":
        backend = "nccl" if cuda else "gloo"
    from copd_megatron.distributed.device import set_runtime_device

    if cuda:
        local = dist_env.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(local)
        set_runtime_device(torch.device("cuda", local))  # every batch, buffer and collective goes here
    else:
        from copd_megatron.distributed import cpu_compat

        cpu_compat.activate()
        set_runtime_device("cpu")
    if not dist.is_initialized():
        store = rendezvous(dist_env, rendezvous_timeout_s)
        dist.init_process_group(
            backend,
            store=store,
            rank=dist_env.rank,
            world_size=dist_env.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return backend


def init_model_parallel(layout: Layout) -> None:
    """Build Megatron's TP/PP/DP/CP/EP groups for ``layout`` (after ``init_distributed``)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        context_parallel_size=layout.cp,
        expert_model_parallel_size=layout.ep,
    )
    logger.info(
        "parallel layout: world=%d tp=%d pp=%d cp=%d ep=%d dp=%d vpp=%s",
        layout.world_size, layout.tp, layout.pp, layout.cp, layout.ep, layout.dp, layout.vpp,
    )  # fmt: skip


def set_seed(seed: int) -> None:
    """Seed every RNG so that replicated parameters are identical on all ranks.

    Megatron's tracker gives TP-sharded weights (and dropout in TP regions) a per-TP-rank
    stream ``seed + 2718 + tp_rank``; everything else draws from the default stream, which is
    seeded with ``seed`` on every rank. Call after :func:`init_model_parallel`.
    """
    import numpy as np
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    random.seed(seed)
    np.random.seed(seed)
    model_parallel_cuda_manual_seed(seed)
    # Last, so the default CPU stream is the same on every rank whatever the tracker did.
    torch.manual_seed(seed)


def destroy_distributed() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
