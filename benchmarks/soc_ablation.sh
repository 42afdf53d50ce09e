#!/usr/bin/env bash
# Equal-budget ablation of the SOC improvements on Fashion-MNIST (issue 4).
# Usage: bash benchmarks/soc_ablation.sh [BUDGET_SECONDS] [OUT_DIR]   (extra env: TRAIN_ARGS)
# Every variant: LipConvnet-5, base width 8, inputs in [0, 1] without scaling (std 1),
# offset cross-entropy (eps_train 1.0), Adam 1e-3, batch 128, full train / test sets;
# then `python benchmarks/soc_ablation_table.py OUT_DIR` prints the table.
set -euo pipefail
BUDGET=${1:-300}
OUT=${2:-runs/soc-ablation}
COMMON=(--data fashion-mnist --model soc-lipconvnet-5 --width 8 --model-arg std=1.0 --budget "$BUDGET"
        --loss offset-ce --eps-train 1.0 --lr 0.001 --batch-size 128 --eval-every 0 --no-progress ${TRAIN_ARGS:-})
run() {
  local name=$1; shift
  if [[ -f "$OUT/$name/report.json" ]]; then echo "skip $name (done)"; return; fi
  echo "== $name: $*"
  python3 -m liptorch train "${COMMON[@]}" --out "$OUT/$name" "$@"
}
run baseline
run lln --head lln
run cr --cr 0.5
run hh1 --activation hh1
run mlp-head --head mlp
run manifold-pool --pool manifold
run max-pool --pool max
run fast-backward --fast-backward
run circular --model-arg padding_mode=circular
