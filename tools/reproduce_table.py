"""The paper's comparison at CPU scale over several seeds: every recipe, Param-Merge, tables, figures.

    .venv/bin/python tools/reproduce_table.py --root runs/table --seeds 1 2 3     # what reproduce_table_cpu.sh runs

For each seed, from one base and one config (``configs/demo_cpu.yaml``: every recipe gets the
same per-branch budget T = N·(S_RL + S_OPD) updates):

* ``copd``                CoPD (merged, and each branch alone: the no-merge ablation);
* ``copd_beta0``          CoPD with β = 0 on every branch: independent RLVR in CoPD's rhythm that
                          still merges (the OPD ablation; its top-k overlap is logged every phase);
* ``expert``              single-domain experts (``schedule.mode=expert``);
* ``mixed``               one model on the pooled data, K·T updates;
* ``static_opd_<t>_to_<s>`` both directions; ``mopd``.
* ``merge_<method>``      Param-Merge: the experts' final checkpoints merged by ``copd-merge``
                          (average; TIES and DARE-TIES with ``--base``, a small grid) and scored
                          by ``copd-eval`` on the trainer's held-out sets.

Then ``tools/compare_runs.py`` writes ``table.md`` and ``accuracy.png`` and
``tools/plot_mechanism.py`` the transfer, overlap and merge figures. Finished pieces are kept
(a stopped reproduction resumes; a piece stopped halfway starts over); every run logs to
``<run_dir>/train.log`` and its output goes to ``<root>/<recipe>/seed<k>.log``; the driver prints
progress with an ETA (work is counted in branch updates, so the ETA adapts to the machine's
load) and appends it to ``<root>/progress.log``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from copd_megatron.checkpoint.merge import NEEDS_BASE

ROOT = Path(__file__).resolve().parent.parent
MERGE_GRID = ["average", "ties_d0.2", "ties_d0.5", "dare_ties_p0.5", "dare_ties_p0.9"]
MERGE_COST = 8  # a merge + evaluation costs about this many branch updates


@dataclass
class Job:
    name: str  # recipe directory
    seed: int
    cmds: list[list[str]]
    out: Path  # eval.json written when done
    cost: float  # branch updates (the unit of the ETA)
    log: Path = field(default=Path())


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path("runs/table"))
    p.add_argument(
        "--base", type=Path, default=Path("runs/demo/base"), help="made with make_base.py --preset testbed if absent"
    )
    p.add_argument("--config", type=Path, default=Path("configs/demo_cpu.yaml"))
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--merges", nargs="*", default=MERGE_GRID, help="Param-Merge grid: METHOD[_dDENSITY|_pDROP]")
    p.add_argument("--skip", nargs="*", default=[], help="recipes to leave out (e.g. mopd)")
    p.add_argument("--nice", type=int, default=0, help="niceness of the runs (the CPU may be shared)")
    p.add_argument("overrides", nargs="*", help="copd-train overrides for every run (key=value)")
    return p


def recipes(cfg) -> dict[str, list[str]]:
    names = [b.name for b in cfg.branches]
    out = {"copd": [], "copd_beta0": [f"branches.{i}.beta=0" for i in range(len(names))],
           "expert": ["schedule.mode=expert"], "mixed": ["schedule.mode=mixed"]}  # fmt: skip
    for t in names:
        for s in names:
            if s != t:
                out[f"static_opd_{t}_to_{s}"] = ["schedule.mode=static_opd", f"schedule.static_teacher={t}",
                                                  f"schedule.static_student={s}"]  # fmt: skip
    out["mopd"] = ["schedule.mode=mopd"]
    return out


def cost(recipe: str, cfg) -> float:
    """Branch updates of a recipe (an OPD update counts 1.3: it also runs the teacher)."""
    s, k = cfg.schedule, len(cfg.branches)
    rl, opd, t = s.cycles * s.s_rl, 1.3 * s.cycles * s.s_opd, s.cycles * (s.s_rl + s.s_opd)
    if recipe == "copd":
        return k * (rl + opd)
    if recipe.startswith("static_opd"):
        return k * rl + opd
    if recipe == "mopd":
        return k * t + 1.3 * t
    return k * t  # expert, mixed (one model, K·T updates), copd_beta0 (no teacher)


def eval_sets(cfg) -> list[str]:
    """copd-eval --set arguments naming the trainer's held-out sets."""
    out = []
    for b in cfg.branches:
        if b.data.startswith("synthetic:"):
            out.append(f"--set={b.name}={b.data}:{b.difficulty}")
        elif b.eval_data:
            out.append(f"--set={b.name}={b.eval_data}:{b.verifier}")
        else:
            sys.exit(f"reproduce_table: branch {b.name}: Param-Merge needs synthetic data or branches[].eval_data")
    return out


def merge_args(spec: str) -> list[str]:
    m = re.fullmatch(r"(average|task_arithmetic|ties|dare|dare_ties)(?:_d([\d.]+)|_p([\d.]+))?", spec)
    if not m:
        sys.exit(f"reproduce_table: --merges: {spec!r}: expected METHOD, METHOD_dDENSITY or METHOD_pDROP")
    method, density, drop = m.groups()
    return ["--method", method] + (["--density", density] if density else []) + (["--drop-p", drop] if drop else [])


def plan(a, cfg, py: str) -> list[Job]:
    tok, ckpt = a.base / "tokenizer.model", a.base / "checkpoint"
    jobs = []
    for seed in a.seeds:
        for name, extra in recipes(cfg).items():
            if name in a.skip:
                continue
            run = a.root / name / f"seed{seed}"
            # --force: only unfinished runs are run, and a run stopped halfway starts over.
            cmd = [py, "-m", "copd_megatron.cli", str(a.config), f"seed={seed}", f"run_dir={run}", f"tokenizer={tok}",
                   f"checkpoint.base={ckpt}", *a.overrides, *extra, "--force"]  # fmt: skip
            jobs.append(Job(name, seed, [cmd], run / "eval.json", cost(name, cfg), _driver_log(run)))
        if "expert" in a.skip:
            continue
        experts = a.root / "expert" / f"seed{seed}" / "checkpoints"
        sets = eval_sets(cfg)
        for spec in a.merges:
            out = a.root / f"merge_{spec}" / f"seed{seed}"
            inputs = [f"{experts}/LAST/{b.name}" for b in cfg.branches]
            method = merge_args(spec)
            base = ["--base", str(ckpt)] if method[1] in NEEDS_BASE else []  # copd-merge refuses an unused base
            merge = [py, "-m", "copd_megatron.checkpoint.merge_cli", "--inputs", *inputs, *base,
                     "--seed", str(seed), "--out", str(out / "merged"), *method]  # fmt: skip
            ev = [py, "-m", "copd_megatron.eval_cli", "--checkpoint", str(out / "merged"), "--tokenizer", str(tok), *sets,
                  "--limit", str(cfg.eval.prompts_per_domain), "--heldout-seed", str(cfg.eval.seed),
                  "--seed", str(cfg.eval.seed), "--samples",
                  str(cfg.eval.samples), "--temperature", str(cfg.eval.temperature), "--max-new-tokens",
                  str(cfg.rollout.max_new_tokens), "--out", str(out / "eval.json")]  # fmt: skip
            jobs.append(Job(f"merge_{spec}", seed, [merge, ev], out / "eval.json", MERGE_COST, _driver_log(out)))
    return jobs


def _driver_log(run: Path) -> Path:
    """stdout + stderr of a piece, beside its directory (``<root>/<recipe>/seed<k>.log``): the
    trainer writes its own ``<run_dir>/train.log``, and a run_dir must hold one run only."""
    return run.parent / f"{run.name}.log"


def _resolve(cmd: list[str]) -> list[str]:
    """Replace the LAST placeholder by the newest complete checkpoint iteration."""
    out = []
    for c in cmd:
        if "/LAST/" in c:
            ckpts = Path(c.split("/LAST/")[0])
            latest = (ckpts / "latest").read_text().strip() if (ckpts / "latest").is_file() else None
            if latest is None:
                sys.exit(f"reproduce_table: {ckpts}: no complete checkpoint (did the expert run finish?)")
            c = c.replace("/LAST/", f"/{latest}/")
        out.append(c)
    return out


class Progress:
    """Work done in branch updates → percentage and ETA; printed and appended to progress.log."""

    def __init__(self, jobs: list[Job], log: Path) -> None:
        self.total = sum(j.cost for j in jobs)
        self.done, self.measured_work, self.measured_time = 0.0, 0.0, 0.0
        self.t0, self.log = time.perf_counter(), log

    def say(self, text: str, inflight: float = 0.0) -> None:
        elapsed = time.perf_counter() - self.t0
        rate = self.measured_time / self.measured_work if self.measured_work else None
        left = self.total - self.done - inflight
        eta = f"ETA {left * rate / 60:.1f} min" if rate else "ETA after the first run"
        line = (f"{time.strftime('%H:%M:%S')} {text} | {100 * (self.done + inflight) / self.total:.0f}% of the work"
                f" | elapsed {elapsed / 60:.1f} min | {eta}")  # fmt: skip
        print(line, flush=True)
        with self.log.open("a") as f:
            f.write(line + "\n")


def run_job(job: Job, progress: Progress, nice: int, env: dict) -> None:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    stale = job.out.parent / "merged"
    if job.name.startswith("merge_") and stale.exists():  # our own half-finished output, never an input
        shutil.rmtree(stale)
    t0 = time.perf_counter()
    last_report = t0
    with job.log.open("w") as log:
        for cmd in job.cmds:
            proc = subprocess.Popen(["nice", "-n", str(nice), *_resolve(cmd)], stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env=env)  # fmt: skip
            while proc.poll() is None:
                time.sleep(2)
                if time.perf_counter() - last_report > 60:  # a live line inside long runs
                    frac = _fraction(job.log)
                    progress.say(f"seed {job.seed} · {job.name}: {100 * frac:.0f}%", inflight=frac * job.cost)
                    last_report = time.perf_counter()
            if proc.returncode != 0:
                tail = "\n".join(job.log.read_text().splitlines()[-15:])
                sys.exit(f"reproduce_table: seed {job.seed} {job.name} failed (exit {proc.returncode}); "
                         f"see {job.log}:\n{tail}")  # fmt: skip
    dt = time.perf_counter() - t0
    progress.done += job.cost
    progress.measured_work += job.cost
    progress.measured_time += dt
    progress.say(f"seed {job.seed} · {job.name}: done in {dt / 60:.1f} min")


def _fraction(log: Path) -> float:
    """How far a copd-train run is, from its last 'step i/n' log line."""
    hits = re.findall(r"\| step (\d+)/(\d+) \|", log.read_text(errors="replace")[-4000:])
    return int(hits[-1][0]) / int(hits[-1][1]) if hits else 0.0


def main() -> int:
    from copd_megatron.config import load_config
    from copd_megatron.config.schema import ConfigError

    a = _parser().parse_args()
    py = sys.executable
    try:
        cfg = load_config(ROOT / a.config if not a.config.is_absolute() else a.config, a.overrides)
    except ConfigError as e:
        print(f"reproduce_table: error: {e}", file=sys.stderr)
        return 2
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    a.root.mkdir(parents=True, exist_ok=True)
    if not (a.base / "base.json").exists():
        print(f"building the base in {a.base} (tools/make_base.py --preset testbed)", flush=True)
        subprocess.run(["nice", "-n", str(a.nice), py, "tools/make_base.py", "--out", str(a.base), "--preset", "testbed"],
                       cwd=ROOT, env=env, check=True)  # fmt: skip
    jobs = plan(a, cfg, py)
    todo = [j for j in jobs if not j.out.exists()]
    progress = Progress(todo, a.root / "progress.log")
    progress.say(f"{len(todo)} of {len(jobs)} pieces to run ({len(a.seeds)} seeds); output in {a.root}/<recipe>/seed<k>.log")
    for job in todo:
        run_job(job, progress, a.nice, env)
    subprocess.run([py, "tools/compare_runs.py", str(a.root), "--out", str(a.root / "table.md"), "--plot",
                    str(a.root / "accuracy.png")], cwd=ROOT, env=env, check=True)  # fmt: skip
    subprocess.run([py, "tools/plot_mechanism.py", str(a.root), "--out", str(a.root / "figures")], cwd=ROOT, env=env,
                   check=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
