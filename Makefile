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
	$(PY) -m pip install --quiet -e ".[test,plots]"
	touch $(STAMP)

# Until the CoPD demo lands (issue 5) this runs the smallest end-to-end job there is:
# a tiny Llama-style Megatron GPTModel trained for a few steps at TP=2 over 2 CPU processes.
demo: $(STAMP)
	$(VENV)/bin/torchrun --nproc-per-node 2 -m copd_megatron.cli train configs/smoke_cpu.yaml parallel.tp=2

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
