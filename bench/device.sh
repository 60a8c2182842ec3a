#!/usr/bin/env bash
# The one script to run on the GPU machine (H100/H200; see ../shared/ENVIRONMENT.md):
#   build with the machine's own python3, CUDA tests (ops + CUDA-graph decode), compute-sanitizer,
#   kernel benchmark, then the end-to-end benchmark (Llama-2-7B shape, random bf16 weights).
# Everything it produces goes under $OUT (default: bench/results/device). Budget: < 10 minutes;
# SKIP_KERNELS=1 skips the kernel benchmark, SKIP_E2E=1 the end-to-end one, E2E_CONTEXTS picks the sweep.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/device}"
# the device tool brings back at most 8 files: logs travel as one archive, results as JSON/PNG
LOGS="$(mktemp -d)"
mkdir -p "$OUT"
trap 'tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null' EXIT
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/summary.txt"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$LOGS/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$LOGS/gpu.txt"

step "build (ptxas register/spill report in build.log)"
rm -rf build flashback_ext/_C*.so
if ! FLASHBACK_PTXAS_VERBOSE=1 "$PY" setup.py build_ext --inplace > "$LOGS/build.log" 2>&1; then
  tail -40 "$LOGS/build.log"; echo "BUILD FAILED" | tee -a "$OUT/summary.txt"; exit 1
fi
grep -E "registers|spill" "$LOGS/build.log" | sort | uniq -c > "$LOGS/ptxas.txt"
"$PY" -c "import flashback_ext as f; print('cpu ops', f.has_cpu_ops(), 'cuda ops', f.has_cuda_ops())" | tee -a "$OUT/summary.txt"

step "CUDA tests"
timeout 240 "$PY" -m pytest python_tests/test_cuda.py python_tests/test_opcheck.py \
  python_tests/test_cuda_graph.py -q -x \
  --junitxml="$LOGS/cuda_tests.xml" > "$LOGS/cuda_tests.log" 2>&1 || status=1
tail -5 "$LOGS/cuda_tests.log" | tee -a "$OUT/summary.txt"

step "compute-sanitizer memcheck + racecheck"
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" bench/sanitize_case.py \
    > "$LOGS/sanitizer_$tool.log" 2>&1 || status=1
  tail -3 "$LOGS/sanitizer_$tool.log" | tee -a "$OUT/summary.txt"
done

if [ "${SKIP_KERNELS:-0}" != 1 ]; then
  step "kernel benchmark"
  timeout 240 "$PY" bench/kernels.py --device cuda --quick --out "$OUT/kernels_cuda.json" \
    > "$LOGS/kernels_cuda.txt" 2>&1 || status=1
  cat "$LOGS/kernels_cuda.txt"
fi

if [ "${SKIP_E2E:-0}" != 1 ]; then
  step "end-to-end benchmark (engine vs HF eager, append vs prepend, graphs on/off, batch 8)"
  PYTHONUNBUFFERED=1 timeout 300 "$PY" bench/ralm_e2e.py --device cuda --model llama2-7b-shape \
    --contexts "${E2E_CONTEXTS:-1024,4096,8192,16384,32768}" --cycles 2 --batch 8 \
    --out "$OUT/ralm_e2e_cuda.json" > "$LOGS/ralm_e2e_cuda.txt" 2>&1 || status=1
  tail -20 "$LOGS/ralm_e2e_cuda.txt"
fi

step "done, status $status"
exit $status
