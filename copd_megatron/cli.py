"""Command-line entry points.

``copd-train CONFIG [key=value ...]`` (also ``torchrun ... -m copd_megatron.cli CONFIG ...``):
load the YAML, apply dotted overrides, validate against the world size from the launcher's
environment (torchrun or Slurm) before any process group starts, then run the recipe named
by ``schedule.mode``. A config mistake is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from copd_megatron.config import ConfigError, dump_config, load_config, validate
from copd_megatron.distributed.init import read_dist_env

EXIT_CONFIG_ERROR = 2


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="copd-train",
        description="Train CoPD branches (or a baseline recipe) on Megatron-Core.",
        epilog="example: torchrun --nproc-per-node 2 -m copd_megatron.cli configs/smoke_cpu.yaml parallel.tp=2",
    )
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=2 optimizer.lr=1e-6")
    p.add_argument("--check", action="store_true", help="validate the config for this world size and exit")
    return p


def train_main(argv: list[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    env = read_dist_env()
    try:
        cfg = load_config(args.config, args.overrides)
        layout = validate(cfg, env.world_size)
    except ConfigError as e:
        print(f"copd-train: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        _check_media(cfg)
    except (ConfigError, ValueError) as e:  # DataError / MediaError: FILE:LINE: what is wrong
        print(f"copd-train: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.check:
        print(f"{args.config}: ok for world size {env.world_size} ({layout})")
        return 0
    return _run(cfg, layout, env)


def _check_media(cfg) -> None:
    """With ``model.vision``: read every branch's prompt file and its images and videos now, so a
    missing, corrupt or mismatched file is one line before any process group starts. Without it,
    a visual synthetic family is refused."""
    from copd_megatron.rewards import synthetic

    for i, b in enumerate(cfg.branches):
        if cfg.model.vision is None:
            family = (b.data or "").removeprefix("synthetic:")
            if (b.data or "").startswith("synthetic:") and synthetic.get_family(family).visual:
                raise ConfigError(f"branches.{i}.data: synthetic family {family!r} has images; it needs model.vision")
            continue
        from copd_megatron.data.media import load_multimodal_prompts

        for path in (b.data, b.eval_data):
            if path is not None and not path.startswith("synthetic:"):
                load_multimodal_prompts(path, cfg.model.vision, domain=b.name)


def _run(cfg, layout, env) -> int:
    from copd_megatron.distributed.init import (
        destroy_distributed,
        init_distributed,
        init_model_parallel,
        set_seed,
    )
    from copd_megatron.distributed.rendezvous import RendezvousError
    from copd_megatron.trainer import run_recipe, run_smoke
    from copd_megatron.utils.logging import setup_logging

    setup_logging(cfg.logging.level, env.rank)
    try:
        init_distributed(env, cfg.parallel.backend, rendezvous_timeout_s=cfg.parallel.rendezvous_timeout_s)
    except RendezvousError as e:
        print(f"copd-train: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        init_model_parallel(layout)
        set_seed(cfg.seed)
        if env.rank == 0:
            dump_config(cfg, Path(cfg.run_dir) / "config.yaml")
        (run_smoke if cfg.schedule.mode == "smoke" else run_recipe)(cfg, layout)
    except ConfigError as e:  # found while starting, e.g. a checkpoint that cannot be resumed
        print(f"copd-train: error: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
