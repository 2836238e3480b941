"""Command-line entry points.

``copd-train CONFIG [key=value ...]`` (also ``torchrun ... -m copd_megatron.cli CONFIG ...``):
load the YAML, apply dotted overrides, validate against the world size from the launcher's
environment (torchrun or Slurm), check the files the config names and the run directory
(``preflight.py``), all before any process group starts; then run the recipe named by
``schedule.mode``. A mistake is one line on stderr (printed by rank 0 only) and exit code 2.
``--check`` stops after the checks and prints what was checked: the model, the layout, the
files; ``--check-layout`` checks the config and layout only (for a cluster launch planned
from a machine without its files).
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from copd_megatron.config import ConfigError, dump_config, load_config, validate
from copd_megatron.distributed.init import read_dist_env
from copd_megatron.utils.cli import EXIT_USER_ERROR, OneLineParser, launcher_env_problem, report_error

EXIT_CONFIG_ERROR = EXIT_USER_ERROR
PROG = "copd-train"
logger = logging.getLogger(PROG)


def _train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Train CoPD branches (or a baseline recipe) on Megatron-Core: K branches start from one base, "
        "train with RLVR and mutual on-policy distillation, and are merged and evaluated at the end.",
        epilog="Config keys: every field, its type, default and meaning is in copd_megatron/config/schema.py "
        "(summary table in the README, section Configuration). "
        "Example: .venv/bin/torchrun --nproc-per-node 2 -m copd_megatron.cli configs/smoke_cpu.yaml parallel.tp=2",
    )
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=2 optimizer.lr=1e-6")
    p.add_argument("--check", action="store_true",
                   help="check the config for this world size and the files and run_dir it names on this machine, "
                   "print the model, and exit")
    p.add_argument("--check-layout", action="store_true",
                   help="check the config and the parallel layout only (files are not looked at: plan a cluster "
                   "launch from anywhere), print the model, and exit")
    p.add_argument("--force", action="store_true",
                   help="start over in a non-empty run_dir: the previous run's outputs there are removed first")
    return p


def train_main(argv: list[str] | None = None) -> int:
    from copd_megatron.preflight import preflight
    from copd_megatron.utils.logging import filter_known_noise

    args = _train_parser().parse_args(argv)
    problem = launcher_env_problem()
    if problem:
        return report_error(PROG, problem, 0)
    env = read_dist_env()
    filter_known_noise()
    try:
        cfg = load_config(args.config, args.overrides)
        layout = validate(cfg, env.world_size)
        report = None if args.check_layout else preflight(cfg, force=args.force)
    except ConfigError as e:
        return report_error(PROG, e, env.rank)
    try:
        _check_media(cfg)
    except (ConfigError, ValueError) as e:  # DataError / MediaError: FILE:LINE: what is wrong
        return report_error(PROG, e, env.rank)
    if args.check or args.check_layout:
        if env.rank == 0:
            lines = report.lines if report else ["files and run_dir: not checked (--check-layout); --check checks them"]
            _print_check(args.config, cfg, layout, env.world_size, lines)
        return 0
    return _run(cfg, layout, env, report.removals, [PROG, *(sys.argv[1:] if argv is None else argv)])


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


def _print_check(config: str, cfg, layout, world_size: int, lines: list[str]) -> None:
    from copd_megatron.config.summary import count_parameters, describe_model, human_count
    from copd_megatron.copd.recipes import branch_names

    n = 1 if cfg.schedule.mode == "smoke" else len(branch_names(cfg))
    per_rank = count_parameters(cfg.model) / (layout.tp * layout.pp)
    print(f"{config}: ok for world size {world_size} (tp={layout.tp} pp={layout.pp} cp={layout.cp} ep={layout.ep} "
          f"dp={layout.dp} vpp={layout.vpp})")  # fmt: skip
    print(f"model: {describe_model(cfg.model)} per branch, {n} branch{'es' * (n > 1)} "
          f"({cfg.schedule.mode}); about {human_count(int(per_rank))} per rank and branch at tp*pp={layout.tp * layout.pp}")
    for line in lines:
        print(line)


def _run(cfg, layout, env, removals: list[Path], argv: list[str]) -> int:
    from copd_megatron.config.summary import describe_model
    from copd_megatron.distributed.init import (
        destroy_distributed,
        init_distributed,
        init_model_parallel,
        set_seed,
    )
    from copd_megatron.distributed.rendezvous import RendezvousError
    from copd_megatron.trainer import run_recipe, run_smoke
    from copd_megatron.utils.logging import attach_log_file, log_to_file, setup_logging
    from copd_megatron.utils.rundir import remove_outputs

    setup_logging(cfg.logging.level, env.rank)
    if env.rank == 0 and removals:
        remove_outputs(removals)  # --force: before the rendezvous, so no rank has written anything yet
    try:
        init_distributed(env, cfg.parallel.backend, rendezvous_timeout_s=cfg.parallel.rendezvous_timeout_s)
    except RendezvousError as e:
        return report_error(PROG, e, env.rank)
    try:
        attach_log_file(cfg.run_dir, env.rank)
        logger.info("command: %s (run_dir %s)", " ".join(argv), cfg.run_dir)
        logger.info("model: %s", describe_model(cfg.model))
        if removals:
            logger.info("--force: removed the previous run's %s", ", ".join(p.name for p in removals))
        init_model_parallel(layout)
        set_seed(cfg.seed)
        if env.rank == 0:
            dump_config(cfg, Path(cfg.run_dir) / "config.yaml")
        (run_smoke if cfg.schedule.mode == "smoke" else run_recipe)(cfg, layout)
    except ConfigError as e:  # found while starting, e.g. a checkpoint that cannot be resumed
        log_to_file(f"{PROG}: error: {e}")
        return report_error(PROG, e, env.rank)
    except BaseException:
        log_to_file(traceback.format_exc())  # the log file keeps what the console showed
        raise
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
