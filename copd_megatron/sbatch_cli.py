"""``copd-sbatch``: print the ``sbatch`` command that runs a config on a cluster of a given size.

    copd-sbatch CONFIG [key=value ...] --nodes 4 --gpus-per-node 8 --time 24:00:00

The config (with its overrides) is loaded and validated for the world size the allocation
will have (nodes × tasks per node; one task per GPU) *before* anything is submitted, exactly
as ``copd-train`` validates it at start-up, so an impossible layout costs one line (exit 2)
instead of a queue wait and a failed job. On success it prints one shell line on stdout:

    mkdir -p RUN_DIR/slurm && sbatch --job-name=NAME --nodes=4 ... examples/slurm/train.sbatch CONFIG ...

``--output`` must name a directory that exists when sbatch runs (sbatch resolves it before the
script starts), hence the ``mkdir -p``. Notes about choices that lose work on preemption (no
automatic resume, no periodic saves) go to stderr, so ``copd-sbatch ... | bash`` submits.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from copd_megatron.config import ConfigError, load_config, validate

EXIT_USAGE = 2
DEFAULT_SCRIPT = "examples/slurm/train.sbatch"
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def slurm_time_seconds(text: str) -> int:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME.match(text.strip())
    if not m:
        raise ConfigError(f"--time: {text!r} is not a Slurm time (minutes, MM:SS, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = m.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        h, mi, s = int(a), int(b or 0), int(c or 0)
        return ((int(days) * 24 + h) * 60 + mi) * 60 + s
    if c is not None:
        return int(a) * 3600 + int(b) * 60 + int(c)
    if b is not None:
        return int(a) * 60 + int(b)
    return int(a) * 60


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="copd-sbatch",
        description="Validate a config for a Slurm allocation (nodes x tasks per node) and print the sbatch command "
        "that runs it with examples/slurm/train.sbatch (save on the time-limit signal, requeue, resume).",
        epilog="example: copd-sbatch configs/smoke_cpu.yaml model.preset=llama3-8b parallel.tp=8 --nodes 2 "
        "--time 04:00:00 | bash     (config keys: copd_megatron/config/schema.py)",
    )
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, passed on to copd-train")
    p.add_argument("--nodes", type=int, default=1, help="nodes in the allocation (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8; 0 for CPU nodes)")
    p.add_argument("--tasks-per-node", type=int, default=None,
                   help="ranks per node (default: one per GPU; required with --gpus-per-node 0)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPU cores per rank (default: the script's, 16)")
    p.add_argument("--time", default="24:00:00", help="time limit, Slurm format (default 24:00:00)")
    p.add_argument("--signal-lead", type=int, default=300,
                   help="seconds before the time limit at which the ranks are told to save and requeue (default 300)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--account", help="Slurm account")
    p.add_argument("--job-name", help="job name (default: the config's name)")
    p.add_argument("--output", help="job log (default: RUN_DIR/slurm/%%x-%%j.out; its directory is created first)")
    p.add_argument("--script", default=DEFAULT_SCRIPT, help=f"batch script (default {DEFAULT_SCRIPT})")
    return p


def _layout_args(args) -> int:
    """Check the allocation's shape; return tasks per node."""
    if args.nodes < 1:
        raise ConfigError(f"--nodes: must be >= 1, got {args.nodes}")
    if args.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node: must be >= 0, got {args.gpus_per_node}")
    tasks = args.tasks_per_node if args.tasks_per_node is not None else args.gpus_per_node
    if tasks < 1:
        raise ConfigError("--tasks-per-node: required (>= 1) when --gpus-per-node is 0")
    if args.gpus_per_node and tasks != args.gpus_per_node:
        raise ConfigError(f"--tasks-per-node: {tasks} != --gpus-per-node {args.gpus_per_node}; copd-train runs one "
                          "rank per GPU")  # fmt: skip
    if args.cpus_per_task is not None and args.cpus_per_task < 1:
        raise ConfigError(f"--cpus-per-task: must be >= 1, got {args.cpus_per_task}")
    limit = slurm_time_seconds(args.time)
    if not 0 < args.signal_lead < limit:
        raise ConfigError(f"--signal-lead: {args.signal_lead}s must be > 0 and shorter than --time {args.time} "
                          f"({limit}s), or the save-and-requeue signal comes at once")  # fmt: skip
    if not Path(args.script).is_file():
        raise ConfigError(f"--script: {args.script} not found; run from the repository root or pass --script")
    return tasks


def build_command(args) -> tuple[str, list[str]]:
    """The shell line to run, and notes for stderr. Raises ConfigError for impossible requests."""
    tasks = _layout_args(args)
    cfg = load_config(args.config, args.overrides)
    world = args.nodes * tasks
    try:
        layout = validate(cfg, world, cuda_available=args.gpus_per_node > 0)
    except ConfigError as e:
        raise ConfigError(f"{e} (for --nodes {args.nodes} x {tasks} tasks = world size {world})") from None
    output = args.output or f"{cfg.run_dir}/slurm/%x-%j.out"
    sbatch = ["sbatch", f"--job-name={args.job_name or cfg.name}", f"--nodes={args.nodes}",
              f"--ntasks-per-node={tasks}", f"--gpus-per-node={args.gpus_per_node}"]  # fmt: skip
    if args.cpus_per_task is not None:
        sbatch.append(f"--cpus-per-task={args.cpus_per_task}")
    sbatch += [f"--time={args.time}", f"--signal=B:USR1@{args.signal_lead}", f"--output={output}"]
    sbatch += [f"--partition={args.partition}"] * bool(args.partition) + [f"--account={args.account}"] * bool(args.account)
    sbatch += [args.script, args.config, *args.overrides]
    line = shlex.join(sbatch)
    out_dir = str(Path(output).parent)
    if out_dir not in ("", "."):
        line = f"mkdir -p {shlex.quote(out_dir)} && {line}"
    notes = [f"ok: world size {world} = tp {layout.tp} x pp {layout.pp} x cp {layout.cp} x dp {layout.dp}; "
             f"run_dir {cfg.run_dir}"]  # fmt: skip
    if cfg.checkpoint.load_dir != "auto":
        shown = "null" if cfg.checkpoint.load_dir is None else repr(cfg.checkpoint.load_dir)
        notes.append(f"note: checkpoint.load_dir is {shown}, not 'auto': a requeued job starts "
                     "from there again, not from its own newest checkpoint")  # fmt: skip
    if not cfg.checkpoint.save_interval:
        notes.append("note: checkpoint.save_interval is 0: a crash (not a time limit) loses everything since the start")
    return line, notes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)
    try:
        line, notes = build_command(args)
    except ConfigError as e:
        print(f"copd-sbatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for note in notes:
        print(note, file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
