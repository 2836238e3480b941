"""Test utilities shipped with the package so extensions can test their parallel code the same way."""

from copd_megatron.testing.launch import DistributedTestError, reap, run_distributed

__all__ = ["DistributedTestError", "reap", "run_distributed"]
