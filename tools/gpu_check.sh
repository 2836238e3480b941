#!/usr/bin/env bash
# The GPU check: one command on a machine with one H100/H200 (or any CUDA GPU), Python 3.12 and a
# CUDA PyTorch, no network needed. Planned to finish within 10 minutes.
#
#   bash tools/gpu_check.sh [--wheels DIR] [--report-dir DIR] [--dry-run]      (also: make gpu-check)
#
# 1. checks Python 3.12 and the wheel folder (default .wheels/gpu, git-ignored; fill it on a machine
#    with network with `python3 tools/fetch_gpu_wheels.py [--with-te]` and copy it over);
# 2. installs the wheels into a private target folder (COPD_GPU_SITE, default runs/gpu_check_site;
#    nothing outside the checkout changes);
#    Transformer Engine too when its wheels are there (its PyTorch extension is compiled from the
#    source archive within COPD_TE_BUILD_TIMEOUT seconds, default 300), or when it is already
#    importable; otherwise the report says TE was absent and everything else still runs;
# 3. runs `pytest -m gpu tests/gpu` (train step vs the CPU/fp32 reference, the CoPD tiny config end
#    to end, TE vs local logits, FP8 vs bf16, tokens/s and MFU of a ~1B Llama-style step, peak memory
#    per phase, rollout tokens/s of the Megatron engine vs transformers generate) and writes <report-dir>/report.md (default runs/gpu_check) with device, date, commit,
#    next to records.jsonl, pytest.log and install.log (four files, nothing else).
# --dry-run: steps 1 and the plan only (no GPU needed; the CPU test suite runs it).
# Exit codes: 0 all GPU tests passed, 1 a test failed, 2 the machine or the wheel folder is not ready.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
WHEELS=${COPD_GPU_WHEELS:-.wheels/gpu}
REPORT=${COPD_GPU_REPORT_DIR:-runs/gpu_check}
DRY=0
ARGS="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS=$2; shift 2 ;;
    --report-dir) REPORT=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    *) echo "gpu_check: error: unknown argument '$1' (expected --wheels DIR, --report-dir DIR, --dry-run)" >&2; exit 2 ;;
  esac
done
die() { echo "gpu_check: error: $*" >&2; exit 2; }

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found (set PYTHON=/path/to/python3.12)"
PYV=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$PYV" = "3.12" ] || die "$PYTHON is Python $PYV; megatron-core 0.19.2 ships cp312 wheels only (set PYTHON=/path/to/python3.12)"

# The core wheel set (tools/fetch_gpu_wheels.py CORE); one line naming the first missing one.
[ -d "$WHEELS" ] || die "wheel folder $WHEELS does not exist; on a machine with network run: python3 tools/fetch_gpu_wheels.py --out $WHEELS (then copy it here)"
for pattern in "megatron_core-0.19.2-cp312-*.whl" "math_verify-*.whl" "latex2sympy2_extended-*.whl" "antlr4_python3_runtime-*.whl"; do
  compgen -G "$WHEELS/$pattern" >/dev/null || die "$WHEELS has no $pattern; on a machine with network run: python3 tools/fetch_gpu_wheels.py --out $WHEELS"
done
TE_WHEELS=0
compgen -G "$WHEELS/transformer_engine_cu13-*.whl" >/dev/null && TE_WHEELS=1

if [ "$DRY" = 1 ]; then
  echo "gpu_check: dry run: Python $PYV, wheels in $WHEELS ($(ls "$WHEELS" | wc -l) files, Transformer Engine wheels: $([ $TE_WHEELS = 1 ] && echo yes || echo no))"
  echo "gpu_check: would install into ${COPD_GPU_SITE:-runs/gpu_check_site}, run: $PYTHON -m pytest -m gpu tests/gpu, write $REPORT/report.md"
  exit 0
fi

"$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' \
  || die "torch $("$PYTHON" -c 'import torch; print(torch.__version__)') sees no CUDA device (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1))"

mkdir -p "$REPORT"
REPORT=$(cd "$REPORT" && pwd)
SITE=${COPD_GPU_SITE:-$ROOT/runs/gpu_check_site}  # outside the report folder: that one holds only the report
rm -rf "$SITE" && mkdir -p "$SITE"
LOG=$REPORT/install.log
: >"$LOG"
echo "gpu_check: installing the core wheels into $SITE"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  "$WHEELS"/megatron_core-*.whl "$WHEELS"/math_verify-*.whl "$WHEELS"/latex2sympy2_extended-*.whl \
  "$WHEELS"/antlr4_python3_runtime-*.whl >>"$LOG" 2>&1 || die "installing the core wheels failed (see $LOG)"
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"

TE_STATUS="absent: no Transformer Engine wheels in $WHEELS and none installed"
if "$PYTHON" -c 'import transformer_engine.pytorch' >/dev/null 2>&1; then
  TE_STATUS="present (already installed: $("$PYTHON" -c 'import transformer_engine as t; print(t.__version__)' 2>/dev/null))"
elif [ $TE_WHEELS = 1 ]; then
  echo "gpu_check: installing Transformer Engine (the PyTorch extension compiles; at most ${COPD_TE_BUILD_TIMEOUT:-300} s)"
  others=$(ls "$WHEELS"/*.whl | grep -v -e megatron_core- -e math_verify- -e latex2sympy2_extended- -e antlr4_python3_runtime- || true)
  sdist=$(ls "$WHEELS"/transformer_engine_torch-*.tar.gz 2>/dev/null | head -1 || true)
  # shellcheck disable=SC2086
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $others >>"$LOG" 2>&1 \
     && { [ -z "$sdist" ] || NVTE_FRAMEWORK=pytorch MAX_JOBS=${MAX_JOBS:-16} timeout "${COPD_TE_BUILD_TIMEOUT:-300}" \
          "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" "$sdist" >>"$LOG" 2>&1; } \
     && "$PYTHON" -c 'import transformer_engine.pytorch' >>"$LOG" 2>&1; then
    TE_STATUS="present (installed from $WHEELS)"
  else
    TE_STATUS="absent: installing it from $WHEELS failed or ran past ${COPD_TE_BUILD_TIMEOUT:-300} s (see $LOG)"
  fi
fi
echo "gpu_check: Transformer Engine $TE_STATUS"

export COPD_GPU_REPORT="$REPORT/records.jsonl" COPD_TE_STATUS="$TE_STATUS"
: >"$COPD_GPU_REPORT"
set +e
"$PYTHON" -m pytest -q -m gpu -rs -p no:cacheprovider tests/gpu 2>&1 | tee "$REPORT/pytest.log"
rc=${PIPESTATUS[0]}
set -e
"$PYTHON" tools/gpu_report.py "$REPORT" --command "bash tools/gpu_check.sh $ARGS" || rc=1
echo "gpu_check: report in $REPORT/report.md (pytest exit $rc)"
[ "$rc" = 0 ] && exit 0 || exit 1
