"""The Slurm tier: one throwaway single-node Slurm for the whole session (see cluster.py)."""

from __future__ import annotations

import pytest

from tests.slurm.cluster import Slurm, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm():
    try:
        cluster = Slurm.start()
    except SlurmUnavailable as e:
        pytest.skip(f"no Slurm on this machine: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
