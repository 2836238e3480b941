"""The CPU testbed learns: single-domain RLVR on the demo config raises its own domain's held-out
sampled pass@1 by a clear margin, at two seeds, driven through the CLIs as a user would.

Slow (about 2 minutes per seed plus a minute for the base on 2 cores): ``make test-all``.
The numbers it guards are in docs/testbed.md (the sweep that chose the settings).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARGIN = 0.15  # measured gains: see docs/testbed.md; the spread over seeds is a few points


@pytest.mark.slow
def test_single_domain_rlvr_raises_its_own_domain_on_the_demo_testbed(tmp_path):
    base = tmp_path / "base"
    subprocess.run([sys.executable, "tools/make_base.py", "--out", str(base), "--preset", "testbed"], cwd=ROOT,
                   check=True, capture_output=True, timeout=900)  # fmt: skip
    for seed in (1, 2):
        run = tmp_path / f"expert{seed}"
        subprocess.run([sys.executable, "-m", "copd_megatron.cli", "configs/demo_cpu.yaml", f"seed={seed}",
                        f"run_dir={run}", f"tokenizer={base / 'tokenizer.model'}", f"checkpoint.base={base / 'checkpoint'}",
                        "schedule.mode=expert", "eval.every=0"],
                       cwd=ROOT, check=True, capture_output=True, timeout=1800)  # fmt: skip
        table = json.loads((run / "eval.json").read_text())["table"]
        for domain in ("asc", "desc"):
            before, after = table["base"][domain]["mean@4"], table[domain][domain]["mean@4"]
            assert after >= before + MARGIN, f"seed {seed}: {domain} expert {before:.3f} -> {after:.3f} on {domain}"
