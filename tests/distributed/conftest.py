"""Fixtures of the distributed tests: one tiny base per session and the tests' CoPD config."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "configs" / "copd_tiny.yaml"
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176"]


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """A small base (tokenizer + briefly SFT-ed tiny model on count and sort), built once per session."""
    out = tmp_path_factory.mktemp("base")
    cmd = [sys.executable, "tools/make_base.py", "--out", str(out), "--families", "count", "sort", "--difficulty", "4",
           "--steps", "60", "--eval-prompts", "8", "--model", *MODEL]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def base_overrides(base: Path) -> list[str]:
    """Overrides that point the tests' config at ``base``."""
    vocab = json.loads((base / "base.json").read_text())["vocab_size"]
    return [f"tokenizer={base / 'tokenizer.model'}", f"checkpoint.base={base / 'checkpoint'}", f"model.vocab_size={vocab}"]


def launch_cli(args: list[str], run_dir: Path, nproc: int = 1, *, fault: str | None = None, timeout: int = 900) -> int:
    """``copd_megatron.cli *args`` as a user runs it (``torchrun`` for ``nproc`` > 1); its output goes to
    ``<run_dir>.log`` beside the run directory, and every process of the run is reaped afterwards.
    ``fault``: a ``COPD_FAULT`` injection (e.g. ``train@3``); none is inherited otherwise."""
    from copd_megatron.testing import reap

    token = uuid.uuid4().hex
    env = {**os.environ, "COPD_TEST_SESSION": token, "OMP_NUM_THREADS": "1"}
    env.pop("COPD_FAULT", None)
    if fault:
        env["COPD_FAULT"] = fault
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [*(torchrun if nproc > 1 else [sys.executable]), "-m", "copd_megatron.cli", *args]
    with open(Path(run_dir).parent / f"{Path(run_dir).name}.log", "w") as log:
        try:
            return subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout).returncode
        finally:
            reap(token)


def tiny_config(base: Path, run_dir: Path, *overrides: str):
    """The tests' CoPD config on ``base``, writing to ``run_dir``."""
    from copd_megatron.config import load_config

    return load_config(TINY, [*base_overrides(base), f"run_dir={run_dir}", *overrides])


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def run_recipe_here(cfg):
    """Validate, build the groups and run ``cfg`` in this (spawned) world; returns the eval table."""
    import torch.distributed as dist

    from copd_megatron.config import validate
    from copd_megatron.distributed.init import init_model_parallel, set_seed
    from copd_megatron.trainer import run_recipe

    layout = validate(cfg, dist.get_world_size())
    init_model_parallel(layout)
    set_seed(cfg.seed)
    return run_recipe(cfg, layout)
