#!/usr/bin/env bash
# The one script to run on the GPU machine (H100/H200; see ../shared/ENVIRONMENT.md):
#   build with the machine's own python3, CUDA tests, compute-sanitizer, kernel benchmark.
# Everything it produces goes under $OUT (default: bench/results/device). Budget: < 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/device}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
step() { echo "== $1 ($(date +%T))" | tee -a "$OUT/summary.txt"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"

step "build (ptxas register/spill report in build.log)"
rm -rf build flashback_ext/_C*.so
if ! FLASHBACK_PTXAS_VERBOSE=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED" | tee -a "$OUT/summary.txt"; exit 1
fi
grep -E "registers|spill" "$OUT/build.log" | sort | uniq -c > "$OUT/ptxas.txt"
"$PY" -c "import flashback_ext as f; print('cpu ops', f.has_cpu_ops(), 'cuda ops', f.has_cuda_ops())" | tee -a "$OUT/summary.txt"

step "CUDA tests"
timeout 240 "$PY" -m pytest python_tests/test_cuda.py python_tests/test_opcheck.py -q -x \
  --junitxml="$OUT/cuda_tests.xml" > "$OUT/cuda_tests.log" 2>&1 || status=1
tail -5 "$OUT/cuda_tests.log" | tee -a "$OUT/summary.txt"

step "compute-sanitizer memcheck + racecheck"
for tool in memcheck racecheck; do
  timeout 120 compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" bench/sanitize_case.py \
    > "$OUT/sanitizer_$tool.log" 2>&1 || status=1
  tail -3 "$OUT/sanitizer_$tool.log" | tee -a "$OUT/summary.txt"
done

step "kernel benchmark"
timeout 240 "$PY" bench/kernels.py --device cuda --quick --out "$OUT/kernels_cuda.json" \
  > "$OUT/kernels_cuda.txt" 2>&1 || status=1
cat "$OUT/kernels_cuda.txt"

step "done, status $status"
exit $status
