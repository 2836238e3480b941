#!/usr/bin/env bash
# The paper's comparison at CPU scale on the testbed of configs/demo_cpu.yaml (docs/testbed.md):
# base, single-domain experts, mixed RLVR, static OPD (both directions), MOPD, Param-Merge of the
# experts (average, TIES, DARE-TIES), CoPD (merged and each branch alone) and CoPD with beta = 0,
# equal per-branch budgets, several seeds. Writes runs/table/table.md (mean ± std), accuracy.png
# and figures/{transfer,overlap,merge}.png; prints progress with an ETA; resumable.
#
#   bash examples/reproduce_table_cpu.sh                        # 3 seeds (see docs/testbed.md for the time)
#   SEEDS="1 2" ROOT=runs/table2 bash examples/reproduce_table_cpu.sh optimizer.lr=2e-4
#   NICE=5 bash examples/reproduce_table_cpu.sh                  # on a shared machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# shellcheck disable=SC2086  # SEEDS is a list
exec "$PY" tools/reproduce_table.py --root "${ROOT:-runs/table}" --base "${BASE:-runs/demo/base}" \
  --config "${CONFIG:-configs/demo_cpu.yaml}" --seeds ${SEEDS:-1 2 3} --nice "${NICE:-0}" "$@"
