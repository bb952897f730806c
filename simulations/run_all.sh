#!/usr/bin/env bash
# Reproduce the committed 1000-node results and the scale curve (simulations/README.md).
# Long: run it niced on a shared machine. Usage: simulations/run_all.sh [results-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results}
SIM=(nice -n 10 .venv/bin/pqcnet sim)
for s in directive scale formation adversaries partition churn churn-30; do
  "${SIM[@]}" run "simulations/scenarios/$s.yaml" --nodes 1000 --seed 1 --out "$OUT" --no-progress
done
# the verify-once cache switched off (every receiver pays its ML-DSA verifications)
"${SIM[@]}" run simulations/scenarios/directive.yaml --nodes 1000 --seed 1 \
  --no-verify-cache --set name=directive-nocache --out "$OUT" --no-progress
# the scale curve (each size one process; --jobs 1 keeps the 2-core machine usable)
"${SIM[@]}" sweep simulations/scenarios/scale.yaml --nodes 100,300,3000,10000 --seeds 1 \
  --jobs 1 --out "$OUT"
"${SIM[@]}" report "$OUT"
