#!/usr/bin/env bash
# Reproduce the shape of the FlashBack paper's perplexity table on the embedded SmolLM2-135M,
# on the CPU (research/HISTORY.md, "Setup", explains the sizing).
# Usage: research/reproduce_table.sh [RUN_DIR]
# STEPS, LR and MARKER_LR override the training length and rates (run 2 of research/HISTORY.md
# used the defaults; run 1 used STEPS=250 LR=3e-4 MARKER_LR=3e-4).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/table}"
mkdir -p "$RUN"
FB=".venv/bin/flashback"
COMMON=(--corpus python-docs --budget 256 --passage-tokens 64 --stride 16 --query-tokens 32
        --eval-fraction 0.1 --max-train-examples 1200 --max-eval-examples 200 --seed 0)
STEPS="${STEPS:-350}"
TRAIN=(--steps "$STEPS" --batch-size 4 --lr "${LR:-1e-3}" --marker-lr "${MARKER_LR:-3e-2}"
       --lora-r 16 --lora-alpha 32 --save-steps "$((STEPS / 2))")
# the two adapters the goal compares come first
for spec in "append_markers:--layout append" "prepend:--layout prepend --no-markers" \
            "append:--layout append --no-markers"; do
  name="${spec%%:*}"; flags="${spec#*:}"
  if [ ! -f "$RUN/$name/flashback_run.json" ]; then
    echo "== train $name ($(date +%T))"
    # shellcheck disable=SC2086
    "$FB" train "${COMMON[@]}" "${TRAIN[@]}" $flags --out "$RUN/$name" --resume
  fi
done
echo "== eval ($(date +%T))"
ADAPTERS=()
for name in append_markers append prepend; do
  [ -f "$RUN/$name/flashback_run.json" ] && ADAPTERS+=(--adapter "$name=$RUN/$name")
done
"$FB" eval "${COMMON[@]}" "${ADAPTERS[@]}" --json "$RUN/table.json"
echo "== done ($(date +%T))"
