#!/usr/bin/env bash
# Reproduce the shape of the FlashBack paper's perplexity table on the embedded SmolLM2-135M,
# on the CPU (docs/RESULTS.md explains the sizing). Usage: bench/reproduce_table.sh [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN="${1:-runs/table}"
mkdir -p "$RUN"
FB=".venv/bin/flashback"
COMMON=(--corpus python-docs --budget 256 --passage-tokens 64 --stride 16 --query-tokens 32
        --eval-fraction 0.1 --max-train-examples 1200 --max-eval-examples 200 --seed 0)
TRAIN=(--steps 250 --batch-size 4 --lr 3e-4 --lora-r 16 --lora-alpha 32 --save-steps 125)
for spec in "append_markers:--layout append" "append:--layout append --no-markers" \
            "prepend:--layout prepend --no-markers"; do
  name="${spec%%:*}"; flags="${spec#*:}"
  if [ ! -f "$RUN/$name/flashback_run.json" ]; then
    echo "== train $name ($(date +%T))"
    # shellcheck disable=SC2086
    "$FB" train "${COMMON[@]}" "${TRAIN[@]}" $flags --out "$RUN/$name" --resume
  fi
done
echo "== eval ($(date +%T))"
"$FB" eval "${COMMON[@]}" --adapter "append_markers=$RUN/append_markers" \
  --adapter "append=$RUN/append" --adapter "prepend=$RUN/prepend" --json "$RUN/table.json"
echo "== done ($(date +%T))"
