"""A corpus of bad inputs for every command-line tool: each is one line on stderr, exit code 2,
no traceback, and no existing file changes (checksums of everything around, before and after).

Bad configs, overrides, data files, checkpoint paths, output paths, flags and launcher
variables, each given to the real CLI in a subprocess as a user would. ``copd-train`` cases
run with ``--check`` (the same checks a launch runs before any process group), so every case
fails before any heavy work; the whole corpus takes about a minute on two cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _checksums(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: a small base checkpoint + tokenizer, damaged copies, a fake trainer
    checkpoint of another experiment config, prompt files good and bad, occupied outputs."""
    from copd_megatron.config import experiment_dict, load_config

    w = tmp_path_factory.mktemp("ws")
    out = subprocess.run([sys.executable, "tools/make_base.py", "--out", str(w / "base"), "--families", "count", "sort",
                          "--steps", "2", "--eval-prompts", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    ckpt = w / "base" / "checkpoint"
    shutil.copytree(ckpt, w / "truncated")
    shard = sorted((w / "truncated").glob("__*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:64])
    # A trainer save directory whose run state says optimizer.lr was 0.5.
    it = w / "ckpts" / "iter_0000002"
    for branch in ("count", "sort"):
        shutil.copytree(ckpt, it / branch)
    other = load_config(ROOT / "configs/count_sort_cpu.yaml", _train_overrides(w)[:-1] + ["optimizer.lr=0.5"])
    (it / "run_state.json").write_text(json.dumps({"iteration": 2, "config_hash": "0" * 16,
                                                    "experiment": experiment_dict(other)}))  # fmt: skip
    (it / "COMPLETE").write_text("ok\n")
    (w / "ckpts" / "latest").write_text("iter_0000002\n")
    (w / "plain_dir").mkdir()
    (w / "plain_dir" / "notes.txt").write_text("not a checkpoint")
    data = w / "data"
    data.mkdir()
    (data / "good.jsonl").write_text('{"prompt": "Q: 1+1=", "answer": "2"}\n')
    (data / "malformed.jsonl").write_text('{"prompt": "Q: 1+1=", "answer": "2"}\n{"prompt": "Q", \n')
    (data / "missing_field.jsonl").write_text('{"prompt": "Q: 1+1="}\n')
    (data / "empty.jsonl").write_text("")
    (data / "binary.jsonl").write_bytes(bytes(range(128, 256)) * 4)  # not UTF-8 from the first byte
    (w / "garbage.model").write_bytes(b"\x00\x01not a sentencepiece model" * 10)
    (w / "bad.yaml").write_text("model:\n  num_layers: [1,\n")
    (w / "list.yaml").write_text("- a\n- b\n")
    (w / "typo.yaml").write_text("schedule:\n  mode: smoke\nmodel:\n  num_layer: 2\n")
    (w / "a_file").write_text("x")
    (w / "occupied" / "merged").mkdir(parents=True)
    (w / "occupied" / "metrics.jsonl").write_text('{"step": 1}\n')
    shutil.copy(w / "base" / "tokenizer.model", w / "occupied" / "merged" / "tok.model")  # an input among outputs
    (w / "eval.json").write_text("{}")
    return w


def _train_overrides(w: Path) -> list[str]:
    return [f"tokenizer={w / 'base' / 'tokenizer.model'}", f"checkpoint.base={w / 'base' / 'checkpoint'}",
            "model.vocab_size=320", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=176",
            f"run_dir={w / 'fresh_run'}"]  # fmt: skip


def _cases(w: Path) -> list[tuple[str, list[str], dict, str]]:
    """(name, argv after ``python -m``, extra environment, expected text in the error line)."""
    T = ["copd_megatron.cli", "configs/count_sort_cpu.yaml", *_train_overrides(w)]
    C = ["--check"]
    E = ["copd_megatron.eval_cli", "--checkpoint", str(w / "base" / "checkpoint"), "--tokenizer",
         str(w / "base" / "tokenizer.model")]  # fmt: skip
    S = ["--set", "count=synthetic:count:2"]
    M = ["copd_megatron.checkpoint.merge_cli"]
    ck, d = str(w / "base" / "checkpoint"), w / "data"
    iteration = str(w / "ckpts" / "iter_0000002")
    return [
        # config files and overrides
        ("config missing", ["copd_megatron.cli", str(w / "nope.yaml"), *C], {}, "config file not found"),
        ("config invalid YAML", ["copd_megatron.cli", str(w / "bad.yaml"), *C], {}, "bad.yaml:3: invalid YAML"),
        ("config not a mapping", ["copd_megatron.cli", str(w / "list.yaml"), *C], {}, "expected a mapping"),
        ("config unknown key", ["copd_megatron.cli", str(w / "typo.yaml"), *C], {}, "typo.yaml: model.num_layer: unknown key"),
        ("override unknown key", [*T, "foo.bar=1", *C], {}, "override foo.bar=1: foo: unknown key"),
        ("override without =", [*T, "parallel.tp", *C], {}, "override parallel.tp: expected dotted key=value"),
        ("override wrong type", [*T, "parallel.tp=two", *C], {}, "parallel.tp: expected int, got 'two'"),
        ("unknown mode", [*T, "schedule.mode=bogus", *C], {}, "schedule.mode: 'bogus' is not allowed"),
        ("tp does not divide heads", [*T, "parallel.tp=3", *C], {}, "parallel.tp: 3 does not divide"),
        # values that passed validation and crashed later
        ("prompts_per_step 0", [*T, "rollout.prompts_per_step=0", *C], {}, "rollout.prompts_per_step: must be >= 1"),
        ("prompts_per_domain 0", [*T, "eval.prompts_per_domain=0", *C], {}, "eval.prompts_per_domain: must be >= 1"),
        ("cycles 0", [*T, "schedule.cycles=0", *C], {}, "schedule.cycles: 0; mode 'copd' needs at least 1 cycle"),
        ("max_new_tokens 0", [*T, "rollout.max_new_tokens=0", *C], {}, "rollout.max_new_tokens: must be >= 1"),
        ("log_interval 0", [*T, "logging.log_interval=0", *C], {}, "logging.log_interval: must be >= 1"),
        ("no steps per cycle", [*T, "schedule.s_rl=0", "schedule.s_opd=0", *C], {}, "at least one must be >= 1"),
        # run_dir
        ("run_dir is a file", [*T, f"run_dir={w / 'a_file'}", *C], {}, "run_dir: " + str(w / "a_file") + " is a file"),
        ("run_dir not empty", [*T, f"run_dir={w / 'occupied'}", *C], {}, "is not empty (holds merged, metrics.jsonl)"),
        ("--force over an input", [*T, f"run_dir={w / 'occupied'}", f"tokenizer={w / 'occupied/merged/tok.model'}",
                                   "--force", *C], {}, "--force: would remove " + str(w / "occupied/merged")),  # fmt: skip
        # tokenizer and data files
        ("tokenizer missing", [*T, f"tokenizer={w / 'nope.model'}", *C], {}, "does not exist"),
        ("tokenizer garbage", [*T, f"tokenizer={w / 'garbage.model'}", *C], {}, "not a readable SentencePiece model"),
        ("vocab mismatch", [*T, "model.vocab_size=999", *C], {}, "model.vocab_size: 999 does not match the tokenizer's"),
        ("data missing", [*T, f"branches.0.data={d / 'nope.jsonl'}", *C], {}, "branches.0.data: " + str(d / "nope.jsonl")),
        ("data malformed", [*T, f"branches.0.data={d / 'malformed.jsonl'}", *C], {}, "malformed.jsonl:2: invalid JSON"),
        ("data missing field", [*T, f"branches.0.data={d / 'missing_field.jsonl'}", *C], {}, "missing field 'answer'"),
        ("data empty", [*T, f"branches.0.data={d / 'empty.jsonl'}", *C], {}, "empty.jsonl: no usable rows"),
        ("data binary", [*T, f"branches.0.data={d / 'binary.jsonl'}", *C], {}, "binary.jsonl:1: not UTF-8 text (byte 0x80 at column 1)"),
        ("data is a directory", [*T, f"branches.0.data={d}", *C], {}, "is a directory"),
        ("unknown family", [*T, "branches.0.data=synthetic:nope", *C], {}, "synthetic family 'nope' is unknown"),
        ("unknown verifier", [*T, "branches.0.verifier=nope", *C], {}, "branches.0.verifier: verifier 'nope'"),
        # checkpoints
        ("base missing", [*T, f"checkpoint.base={w / 'nope'}", *C], {}, "checkpoint.base: " + str(w / "nope") + " does not exist"),
        ("base is an iteration", [*T, f"checkpoint.base={iteration}", *C], {}, "trainer iteration directory"),
        ("base truncated", [*T, f"checkpoint.base={w / 'truncated'}", *C], {}, "is truncated (64 bytes"),
        ("base other architecture", [*T, "model.num_layers=4", *C], {}, "num_layers=2, the config has model.num_layers=4"),
        ("load_dir plain directory", [*T, f"checkpoint.load_dir={w / 'plain_dir'}", *C], {}, "is not a checkpoint"),
        ("load_dir other config", [*T, f"checkpoint.load_dir={w / 'ckpts'}", *C], {},
         "optimizer.lr is 0.5 there and 5e-05 now"),
        # flags and launcher variables
        ("unknown flag", [*T, "--bogus"], {}, "unrecognized arguments: --bogus"),
        ("WORLD_SIZE not an int", [*T, *C], {"WORLD_SIZE": "abc", "RANK": "0"}, "WORLD_SIZE='abc' is not an integer"),
        # copd-eval
        ("eval level not int", [*E, "--set", "count=synthetic:count:hard"], {}, "LEVEL 'hard' is not an integer"),
        ("eval set without =", [*E, "--set", "count"], {}, "expected NAME=PATH:VERIFIER"),
        ("eval checkpoint missing", [*E[:2], str(w / "nope"), *E[3:], *S], {}, "--checkpoint: " + str(w / "nope")),
        ("eval checkpoint iteration", [*E[:2], iteration, *E[3:], *S], {}, "pass one of its branches"),
        ("eval checkpoint truncated", [*E[:2], str(w / "truncated"), *E[3:], *S], {}, "is truncated (64 bytes"),
        ("eval tokenizer missing", [*E[:4], str(w / "nope.model"), *S], {}, "tokenizer: " + str(w / "nope.model")),
        ("eval data missing", [*E, "--set", f"x={d / 'nope.jsonl'}:exact_match"], {}, "prompt file not found"),
        ("eval verifier unknown", [*E, "--set", f"x={d / 'good.jsonl'}:nope"], {}, "verifier 'nope' is not registered"),
        ("eval out exists", [*E, *S, "--out", str(w / "eval.json")], {}, "already exists; pass --force"),
        ("eval out over input", [*E, "--set", f"x={d / 'good.jsonl'}:exact_match", "--out", str(d / "good.jsonl"),
                                 "--force"], {}, "is the input"),  # fmt: skip
        ("eval samples 0", [*E, *S, "--samples", "0"], {}, "--samples: 0; expected a positive integer"),
        # copd-merge
        ("merge out not empty", [*M, "--inputs", ck, ck, "--out", str(w / "occupied")], {}, "is not empty"),
        ("merge out is input", [*M, "--inputs", ck, ck, "--out", ck, "--force"], {}, "is the input"),
        ("merge out contains input", [*M, "--inputs", ck, ck, "--out", str(w / "base"), "--force"], {}, "contains the input"),
        ("merge ties no base", [*M, "--inputs", ck, ck, "--method", "ties", "--out", str(w / "m")], {}, "needs --base"),
        ("merge base unused", [*M, "--inputs", ck, ck, "--base", ck, "--out", str(w / "m")], {}, "does not use a base"),
        ("merge input iteration", [*M, "--inputs", ck, iteration, "--out", str(w / "m")], {}, "trainer iteration directory"),
        # copd-convert and make_base.py
        ("convert out inside source", ["copd_megatron.checkpoint.convert_cli", "mcore-to-hf", "--mcore-dir", ck,
                                       "--out", f"{ck}/hf", "--force"], {}, "is inside the input"),  # fmt: skip
        ("convert out not empty", ["copd_megatron.checkpoint.convert_cli", "mcore-to-hf", "--mcore-dir", ck,
                                   "--out", str(w / "occupied")], {}, "is not empty"),  # fmt: skip
    ]


def _run(case, cwd: Path) -> tuple[str, int, str]:
    name, argv, env, _ = case
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS")}
    full_env.update({"OMP_NUM_THREADS": "1", **env})
    out = subprocess.run([sys.executable, "-m", *argv], cwd=cwd, env=full_env, capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    return name, out.returncode, out.stderr


@pytest.mark.timeout(1200)  # ~1 min on an idle 2-core machine; generous for a loaded one
def test_every_bad_input_is_one_line_exit_2_and_changes_nothing(ws):
    cases = _cases(ws)
    assert len(cases) >= 30
    before = _checksums(ws), _checksums(ROOT / "configs")
    with ThreadPoolExecutor(max_workers=2) as pool:  # the CI machine has two cores
        results = list(pool.map(lambda c: _run(c, ROOT), cases))
    problems = []
    for (name, _, _, expected), (_, code, err) in zip(cases, results):
        lines = err.strip().splitlines()
        if code != 2 or len(lines) != 1 or expected not in lines[0] or "Traceback" in err:
            problems.append(f"{name}: exit {code}, stderr:\n{err[-1500:]}\n(expected one line with {expected!r})")
    assert not problems, "\n\n".join(problems)
    assert (_checksums(ws), _checksums(ROOT / "configs")) == before  # nothing written, nothing changed
    assert not (ws / "fresh_run").exists() and not (ws / "m").exists()


def test_make_base_refuses_a_non_empty_out(ws):
    before = _checksums(ws)
    out = subprocess.run([sys.executable, "tools/make_base.py", "--out", str(ws / "base")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and "is not empty; pass --force" in lines[0], out.stderr
    assert _checksums(ws) == before
