# The two set-up commands: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3.12
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo smoke test test-all venv clean

venv: $(STAMP)

$(STAMP): setup.py
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.12 is required; megatron-core ships cp312 wheels only)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,plots,hf]"
	touch $(STAMP)

# The CPU demo on the testbed (docs/testbed.md): make the tiny base (tokenizer + SFT stopped
# mid-learning), run 2-branch CoPD at DEMO_SEEDS (each merges and evaluates itself), print the
# table over seeds (base vs merged CoPD, with the margin against the seed spread), plot seed 1.
# Finished pieces are kept: a second `make demo` only reprints.
DEMO_BASE  := runs/demo/base
DEMO_SEEDS := 1 2 3
demo: $(STAMP)
	test -f $(DEMO_BASE)/base.json || $(PY) tools/make_base.py --out $(DEMO_BASE) --preset testbed
	for s in $(DEMO_SEEDS); do \
		test -f runs/demo/copd/seed$$s/eval.json || $(PY) -m copd_megatron.cli configs/demo_cpu.yaml \
			seed=$$s run_dir=runs/demo/copd/seed$$s || exit 1; \
	done
	$(PY) tools/plot_run.py runs/demo/copd/seed1 --out runs/demo/plots
	$(PY) tools/compare_runs.py runs/demo --out runs/demo/table.md

# The smallest end-to-end job: a tiny GPTModel trained as a language model at TP=2 on 2 processes.
smoke: $(STAMP)
	$(VENV)/bin/torchrun --nproc-per-node 2 -m copd_megatron.cli configs/smoke_cpu.yaml parallel.tp=2

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
