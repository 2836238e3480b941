#!/usr/bin/env bash
# The paper's comparison at CPU scale: base, single-domain experts, mixed RLVR, static OPD (both
# directions), MOPD and CoPD on two synthetic domains (count, sort), equal step budgets, several
# seeds; writes a Markdown table laid out like the paper's Table 1 and plots.
#
#   bash examples/reproduce_table_cpu.sh                  # 3 seeds, ~15 minutes on 2 CPU cores
#   SEEDS="1 2" ROOT=runs/table2 bash examples/reproduce_table_cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
SEEDS=${SEEDS:-"1 2 3"}
ROOT=${ROOT:-runs/table}
BASE=${BASE:-runs/demo/base}
CONFIG=${CONFIG:-configs/demo_cpu.yaml}

if [ ! -f "$BASE/base.json" ]; then
  "$PY" tools/make_base.py --out "$BASE" --families count sort --difficulty 4 --steps 400 \
    --model model.num_layers=4 model.hidden_size=128 model.ffn_hidden_size=352
fi

RECIPES=6
TOTAL=$(( $(echo "$SEEDS" | wc -w) * RECIPES ))
DONE=0 RAN=0 START=$(date +%s)

fmt() { printf '%dm%02ds' $(( $1 / 60 )) $(( $1 % 60 )); }

# One line per run: position, elapsed time and an ETA from the mean time of the runs done so far.
run() {
  local name=$1 seed=$2
  shift 2
  DONE=$((DONE + 1))
  if [ -f "$ROOT/$name/seed$seed/eval.json" ]; then  # resumable: finished runs are kept
    echo "[$DONE/$TOTAL] $name seed $seed: finished earlier, kept"
    return
  fi
  local elapsed=$(( $(date +%s) - START )) eta="?"
  if [ "$RAN" -gt 0 ]; then eta=$(fmt $(( elapsed / RAN * (TOTAL - DONE + 1) ))); fi
  echo "[$DONE/$TOTAL] $name seed $seed: running (log $ROOT/$name.seed$seed.log) | $(fmt "$elapsed") elapsed | ETA $eta"
  # --force: a run killed earlier left a partial run_dir; start that run over.
  "$PY" -m copd_megatron.cli "$CONFIG" seed="$seed" run_dir="$ROOT/$name/seed$seed" \
    tokenizer="$BASE/tokenizer.model" checkpoint.base="$BASE/checkpoint" "$@" --force > "$ROOT/$name.seed$seed.log" 2>&1
  RAN=$((RAN + 1))
}

mkdir -p "$ROOT"
for seed in $SEEDS; do
  run copd "$seed"
  run expert "$seed" schedule.mode=expert
  run mixed "$seed" schedule.mode=mixed
  run static_opd_s2c "$seed" schedule.mode=static_opd schedule.static_teacher=sort schedule.static_student=count
  run static_opd_c2s "$seed" schedule.mode=static_opd schedule.static_teacher=count schedule.static_student=sort
  run mopd "$seed" schedule.mode=mopd
done
echo "all $TOTAL runs done in $(fmt $(( $(date +%s) - START )))"
"$PY" tools/compare_runs.py "$ROOT" --out "$ROOT/table.md" --plot "$ROOT/accuracy.png"
"$PY" tools/plot_run.py "$ROOT/copd/seed$(echo "$SEEDS" | awk '{print $1}')" --out "$ROOT/plots"
cat "$ROOT/table.md"
