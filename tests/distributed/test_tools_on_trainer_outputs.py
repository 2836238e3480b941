"""Every tool on the trainer's own outputs, driven from the command line as a user would.

One short CoPD run at TP=1 (one process) and one at TP=2 (``torchrun``, two processes) share
a tiny base; then ``copd-merge``, ``copd-eval``, ``copd-convert`` and ``copd-train``'s
``checkpoint.base`` read every kind of checkpoint they wrote (trainer branch checkpoints with
optimizer state, the trainer's merge, the base, a Hugging Face round trip) and the results
are compared with references: full-tensor merges, and the run's own ``eval.json`` (the same
held-out prompts, greedy, so the numbers must be identical). The other tests check what
must never happen to those outputs: being overwritten, a tool's result lost, orphaned
processes after ``kill -9``, two runs mixed in one ``run_dir``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from copd_megatron.testing import reap, run_distributed

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
MODEL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176"]
HELD_OUT = ["--set", "count=synthetic:count:4", "--set", "sort=synthetic:sort:4", "--limit", "8", "--max-new-tokens", "6"]


def _cli(args: list[str], *, nproc: int = 1, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """A tool as a user runs it (``python -m ...``, or under torchrun), every process it
    leaves behind reaped afterwards (found by an environment token)."""
    token = uuid.uuid4().hex
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "COPD_TEST_SESSION": token, **(env or {})}
    cmd = [PY, "-m", *args] if nproc == 1 else [TORCHRUN, "--standalone", f"--nproc-per-node={nproc}", "-m", *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    finally:
        reap(token)


def _ok(out: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def _one_line_error(out: subprocess.CompletedProcess, expected: str) -> str:
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in out.stderr, (
        out.returncode, out.stderr[-3000:])  # fmt: skip
    return lines[0]


def _train_args(base: Path, run_dir: Path, *extra: str) -> list[str]:
    vocab = json.loads((base / "base.json").read_text())["vocab_size"]
    return ["copd_megatron.cli", "configs/count_sort_cpu.yaml", f"tokenizer={base / 'tokenizer.model'}",
            f"checkpoint.base={base / 'checkpoint'}", f"model.vocab_size={vocab}", *MODEL, f"run_dir={run_dir}",
            "schedule.cycles=1", "schedule.s_rl=1", "schedule.s_opd=1", "rollout.prompts_per_step=4",
            "rollout.group_size=4", "rollout.max_new_tokens=6", "eval.prompts_per_domain=8", "eval.samples=1",
            "eval.overlap_prompts=4", "parallel.micro_batch_size=8", *extra]  # fmt: skip


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A base, a CoPD run at TP=1 and one at TP=2 (torchrun), each written by the CLIs."""
    root = tmp_path_factory.mktemp("runs")
    base = root / "base"
    _ok(subprocess.run([PY, "tools/make_base.py", "--out", str(base), "--families", "count", "sort", "--difficulty",
                        "4", "--steps", "60", "--eval-prompts", "8", "--model", *MODEL], cwd=ROOT, capture_output=True,
                       text=True, timeout=300))  # fmt: skip
    _ok(_cli(_train_args(base, root / "tp1")))
    _ok(_cli(_train_args(base, root / "tp2", "parallel.tp=2"), nproc=2))
    return {"root": root, "base": base, "tp1": root / "tp1", "tp2": root / "tp2"}


def _branch(run: Path, name: str) -> Path:
    it = (run / "checkpoints" / "latest").read_text().strip()
    return run / "checkpoints" / it / name


def _table(run: Path) -> dict:
    return json.loads((run / "eval.json").read_text())["table"]


# ----------------------------------------------------------------------------- item 1


def _plain(dirs: list[str]) -> list[dict]:
    from megatron.core import dist_checkpointing

    return [{k: v for k, v in dist_checkpointing.load_plain_tensors(d).items()
             if isinstance(v, torch.Tensor) and not k.startswith("optimizer.")} for d in dirs]  # fmt: skip


def _ties_reference(branches: list[dict], base: dict, key: str, num_layers: int) -> torch.Tensor:
    """TIES over full tensors: per layer for stacked decoder tensors (the model's parameters),
    and per projection for SwiGLU's fused gate/up ``linear_fc1`` (stored as two tensors, like
    Hugging Face's gate_proj and up_proj), so every magnitude threshold is one tensor's."""
    from copd_megatron.checkpoint.merge import merge_tensor

    def ties(xs: list[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
        if key.endswith("linear_fc1.weight"):
            halves = [x.chunk(2) for x in xs]
            return torch.cat([ties_one([h[i] for h in halves], b.chunk(2)[i]) for i in range(2)])
        return ties_one(xs, b)

    def ties_one(xs: list[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
        return merge_tensor(xs, "ties", base=b, density=0.2)

    if key.startswith("decoder.layers.") and base[key].shape[0] == num_layers:
        return torch.stack([ties([b[key][i] for b in branches], base[key][i]) for i in range(num_layers)])
    return ties([b[key] for b in branches], base[key])


def test_merge_reads_trainer_branch_checkpoints_at_any_layout(runs, tmp_path):
    """The README's merge of a run's branch checkpoints (saved with optimizer state at TP=2) and
    TIES with ``--base`` under torchrun at TP=2 (inputs saved at TP=1) equal full-tensor merges;
    the trainer's own merged/ equals copd-merge's."""
    c2, s2 = _branch(runs["tp2"], "count"), _branch(runs["tp2"], "sort")
    c1, s1 = _branch(runs["tp1"], "count"), _branch(runs["tp1"], "sort")
    base = runs["base"] / "checkpoint"
    _ok(_cli(["copd_megatron.checkpoint.merge_cli", "--inputs", str(c2), str(s2), "--out", str(tmp_path / "avg")]))
    _ok(_cli(["copd_megatron.checkpoint.merge_cli", "--tp", "2", "--inputs", str(c1), str(s1), "--base", str(base),
              "--method", "ties", "--out", str(tmp_path / "ties")], nproc=2))  # fmt: skip
    dirs = [c2, s2, c1, s1, base, tmp_path / "avg", tmp_path / "ties", runs["tp2"] / "merged"]
    tc2, ts2, tc1, ts1, tb, avg, ties, trainer_merged = run_distributed(_plain, 1, args=([str(d) for d in dirs],),
                                                                        timeout=120)[0]  # fmt: skip
    assert set(avg) == set(tb) and "decoder.layers.mlp.linear_fc1.weight" in avg  # only model tensors written
    for key in avg:
        torch.testing.assert_close(avg[key], (tc2[key] + ts2[key]) / 2, rtol=1e-6, atol=1e-6, msg=key)
        torch.testing.assert_close(trainer_merged[key], avg[key], rtol=1e-6, atol=1e-6, msg=key)
        torch.testing.assert_close(ties[key], _ties_reference([tc1, ts1], tb, key, 2), rtol=1e-6, atol=1e-7, msg=key)
    assert any(not torch.equal(tc1[k], tb[k]) for k in tb)  # the branches did move away from the base


def _eval(ckpt: Path, tokenizer: Path, *extra: str, nproc: int = 1) -> dict:
    out = _ok(_cli(["copd_megatron.eval_cli", "--checkpoint", str(ckpt), "--tokenizer", str(tokenizer), *HELD_OUT,
                    *extra], nproc=nproc))  # fmt: skip
    rows = [line.split("|") for line in out.stdout.splitlines() if line.startswith("| count ") or line.startswith("| sort ")]
    return {r[1].strip(): float(r[3]) for r in rows}


def test_eval_scores_every_checkpoint_kind_as_the_run_did(runs, tmp_path):
    """copd-eval on the trainer's merge, (torchrun, TP=2) a trainer branch checkpoint saved at
    TP=2 with its optimizer state, and a Hugging Face round trip of a branch: the same held-out
    pass@1 as the run's eval.json (same prompts from eval.seed, greedy decoding: identical numbers)."""
    tok = runs["base"] / "tokenizer.model"
    one, two = _table(runs["tp1"]), _table(runs["tp2"])
    expect = lambda table, model: {d: table[model][d]["pass@1"] for d in ("count", "sort")}  # noqa: E731
    assert _eval(runs["tp1"] / "merged", tok) == pytest.approx(expect(one, "merged"), abs=1e-9)
    assert _eval(_branch(runs["tp2"], "sort"), tok, "--tp", "2", nproc=2) == pytest.approx(expect(two, "sort"), abs=1e-9)
    # A branch checkpoint exported to Hugging Face and imported back: the converted kind.
    hf, back = tmp_path / "hf", tmp_path / "back"
    _ok(_cli(["copd_megatron.checkpoint.convert_cli", "mcore-to-hf", "--mcore-dir", str(_branch(runs["tp1"], "sort")),
              "--out", str(hf)]))  # fmt: skip
    _ok(_cli(["copd_megatron.checkpoint.convert_cli", "hf-to-mcore", "--hf-dir", str(hf), "--out", str(back)]))
    assert _eval(back, tok) == pytest.approx(expect(one, "sort"), abs=1e-9)


def test_train_starts_from_a_branch_checkpoint(runs, tmp_path):
    """checkpoint.base = a trainer branch checkpoint (optimizer state inside): the new run's
    base is that branch (its base evaluation equals the branch's row of the first run)."""
    run = tmp_path / "from_branch"
    _ok(_cli(_train_args(runs["base"], run, f"checkpoint.base={_branch(runs['tp1'], 'count')}", "schedule.s_opd=0")))
    assert _table(run)["base"] == _table(runs["tp1"])["count"]


# ----------------------------------------------------------------------------- items 2, 3


def test_no_tool_writes_over_its_inputs_or_an_existing_output(runs, tmp_path):
    """The issue's data loss: ``--inputs base merged --out base`` averaged the base in place.
    Refused even with --force; a non-empty --out needs --force, and then is replaced whole."""
    base = tmp_path / "base"
    shutil.copytree(runs["base"] / "checkpoint", base)
    merged, before = runs["tp1"] / "merged", _checksums(tmp_path)
    merge = ["copd_megatron.checkpoint.merge_cli", "--inputs", str(base), str(merged)]
    for out, flags, message in ((base, ["--force"], "is the input"), (tmp_path, ["--force"], "contains the input"),
                                (base / "sub", ["--force"], "is inside the input")):  # fmt: skip
        _one_line_error(_cli([*merge, "--out", str(out), *flags]), message)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    before = _checksums(tmp_path)
    _one_line_error(_cli([*merge, "--out", str(other)]), "is not empty; pass --force")
    assert _checksums(tmp_path) == before  # nothing changed, nothing half-written
    _ok(_cli([*merge, "--out", str(other), "--force"]))
    assert (other / "metadata.json").is_file() and not (other / "notes.txt").exists()
    assert not list(tmp_path.glob(".*"))  # no staging directory left behind
    assert _checksums(base) == {k.removeprefix("base/"): v for k, v in before.items() if k.startswith("base/")}
    # make_base.py and copd-convert follow the same rules.
    _one_line_error(subprocess.run([PY, "tools/make_base.py", "--out", str(other)], cwd=ROOT, capture_output=True,
                                   text=True, timeout=120), "is not empty")  # fmt: skip
    _one_line_error(_cli(["copd_megatron.checkpoint.convert_cli", "mcore-to-hf", "--mcore-dir", str(base), "--out",
                          str(base), "--force"]), "is the input")  # fmt: skip


def test_eval_out_in_a_new_directory_and_never_after_the_work(runs, tmp_path):
    """``--out a/new/dir/eval.json`` is created (the table is printed first); an existing --out
    without --force, or --out over an input, is refused before the model is even built."""
    tok, ckpt = runs["base"] / "tokenizer.model", runs["tp1"] / "merged"
    out = tmp_path / "a" / "new" / "dir" / "eval.json"
    res = _ok(_cli(["copd_megatron.eval_cli", "--checkpoint", str(ckpt), "--tokenizer", str(tok), *HELD_OUT,
                    "--out", str(out)]))  # fmt: skip
    assert "| count | 8 |" in res.stdout
    saved = json.loads(out.read_text())["results"]
    assert saved["count"]["pass@1"] == _table(runs["tp1"])["merged"]["count"]["pass@1"]
    t0 = time.perf_counter()
    again = _cli(["copd_megatron.eval_cli", "--checkpoint", str(ckpt), "--tokenizer", str(tok), *HELD_OUT,
                  "--out", str(out)])  # fmt: skip
    _one_line_error(again, "already exists; pass --force")
    _one_line_error(_cli(["copd_megatron.eval_cli", "--checkpoint", str(ckpt), "--tokenizer", str(tok), *HELD_OUT,
                          "--out", str(tok), "--force"]), "is the input")  # fmt: skip
    assert json.loads(out.read_text())["results"] == saved and time.perf_counter() - t0 < 60


# ----------------------------------------------------------------------------- item 4


def test_data_errors_are_one_line_once_even_under_torchrun(runs, tmp_path):
    """A malformed prompt file given to a real (not --check) two-rank launch: one line naming
    file and line, printed once, exit 2, before any process group; a truncated checkpoint in
    copd-eval: one line naming the shard file."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q: 1+1=", "answer": "2"}\n{"prompt": "Q: 2+2=", "answer": \n')
    out = _cli(_train_args(runs["base"], tmp_path / "r", f"branches.0.data={bad}", "branches.0.verifier=numeric",
                           "parallel.tp=2"), nproc=2)  # fmt: skip
    line = next(x for x in out.stderr.splitlines() if "copd-train: error" in x)
    assert out.returncode != 0 and f"branches.0.data: {bad}:2: invalid JSON" in line
    assert out.stderr.count("copd-train: error") == 1 and "Traceback (most recent call last):\n  File" not in \
        out.stderr.split("copd-train: error")[0]  # fmt: skip
    assert not (tmp_path / "r").exists()
    damaged = tmp_path / "damaged"
    shutil.copytree(_branch(runs["tp1"], "count"), damaged)
    shard = sorted(damaged.glob("__*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    _one_line_error(_cli(["copd_megatron.eval_cli", "--checkpoint", str(damaged), "--tokenizer",
                          str(runs["base"] / "tokenizer.model"), *HELD_OUT]), f"shard file {shard.name} is truncated")


# ----------------------------------------------------------------------------- item 5


def test_values_that_crashed_mid_run_are_refused_before_it(runs, tmp_path):
    """Real launches (not --check) with values that used to pass validation and then crash
    (or silently score 0): each is one line and exit 2 in seconds, and no run_dir appears."""
    (tmp_path / "a_file").write_text("x")
    for override, message in (("rollout.prompts_per_step=0", "rollout.prompts_per_step: must be >= 1"),
                              ("eval.prompts_per_domain=0", "eval.prompts_per_domain: must be >= 1"),
                              ("schedule.cycles=0", "schedule.cycles: 0; mode 'copd' needs at least 1 cycle"),
                              ("rollout.max_new_tokens=0", "rollout.max_new_tokens: must be >= 1"),
                              (f"run_dir={tmp_path / 'a_file'}", "is a file; expected a directory")):  # fmt: skip
        _one_line_error(_cli(_train_args(runs["base"], tmp_path / "run", override)), message)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# ----------------------------------------------------------------------------- item 7


def _session_processes(token: str) -> list[int]:
    needle = f"COPD_TEST_SESSION={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    if needle in f.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_copd_train_leaves_no_process_behind(tmp_path):
    """SIGKILL a run that saves asynchronously every step: the checkpoint writer's helpers (its
    multiprocessing manager, a forked writer) exit with it instead of living on as orphans."""
    token = uuid.uuid4().hex
    run = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COPD_TEST_SESSION": token}
    cmd = [PY, "-m", "copd_megatron.cli", "configs/smoke_cpu.yaml", "schedule.train_steps=100000",
           "checkpoint.save_interval=1", "checkpoint.async_save=true", f"run_dir={run}"]  # fmt: skip
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and len(list((run / "checkpoints").glob("iter_*"))) < 2:
            time.sleep(0.2)
        helpers = [p for p in _session_processes(token) if p != proc.pid]
        assert helpers, "the writer's helper processes should be running (or the test would prove nothing)"
        proc.kill()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _session_processes(token):
            time.sleep(0.2)
        survivors = _session_processes(token)
        assert not survivors, f"processes of the killed run still alive after 10 s: {survivors}"
    finally:
        proc.kill()
        reap(token)


# ----------------------------------------------------------------------------- item 8


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_one_run_per_run_dir_force_and_resume(runs, tmp_path):
    """The same command in a finished run_dir resumes its last checkpoint (checkpoint.load_dir:
    auto) and trains nothing more; a fresh start (load_dir null) into it is refused (nothing
    changes); --force starts over (metrics of one run, fresh log); a run killed after writing
    step 2's metrics but before its checkpoint resumes into the same run_dir with every step
    recorded once, in metrics.jsonl and in TensorBoard, and the log file continues."""
    done = tmp_path / "done"
    shutil.copytree(runs["tp1"], done)
    before = _checksums(done)
    again = _cli(_train_args(runs["base"], done))
    _ok(again)
    assert "resuming from iter_0000002" in again.stdout + again.stderr and _steps(done) == [1, 2]
    assert {k: v for k, v in _checksums(done).items() if k.startswith("checkpoints/")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints/")}  # fmt: skip
    before = _checksums(done)
    _one_line_error(_cli(_train_args(runs["base"], done, "checkpoint.load_dir=null")), "is not empty")
    assert _checksums(done) == before
    _ok(_cli(_train_args(runs["base"], done, "--force")))
    assert _steps(done) == [1, 2] and (done / "train.log").read_text().count("copd-train configs/count_sort_cpu.yaml") == 1

    run = tmp_path / "resumed"
    args = _train_args(runs["base"], run, "checkpoint.save_interval=1", "logging.tensorboard=true")
    assert _cli(args, env={"COPD_FAULT": "save@2"}).returncode != 0  # dies before step 2's checkpoint completes
    assert _steps(run) == [1, 2] and (run / "checkpoints" / "latest").read_text().strip() == "iter_0000001"
    _ok(_cli([*args, f"checkpoint.load_dir={run / 'checkpoints'}"]))
    assert _steps(run) == [1, 2]
    log = (run / "train.log").read_text()
    assert log.count("copd-train configs/count_sort_cpu.yaml") == 2 and "step 2/2" in log.split("resumed from")[-1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("branch/count/loss")] == [1, 2]
