# Two commands do everything on a fresh machine:
#   make demo   set up .venv, build the extension, run the main job
#   make test   set up .venv (and .venv-vllm), build the extension, run the test suite (the vLLM
#               tests against a real vLLM), lint, then the install check (a fresh venv per
#               install route, the CLI offline; see .ci/install_check.sh)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ext-built
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
# ninja and the venv's tools come first on PATH (torch's extension builder looks there)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: all build lint test install-check demo ops-demo bench-cpu clean vllm-env

VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

all: test

$(DEPS_STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# the editable build also places the default model's GGUF in flashback_ext/_data/ (setup.py)
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

# vLLM in its own venv (it pins its own torch); pip also pulls CUDA builds of torchvision,
# torchaudio and torchcodec that break `import vllm` on the CPU, and vLLM needs them only for
# images and audio. About 2.5 min and 3.5 GB on a fresh machine.
$(VLLM_STAMP): requirements-vllm.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q -r requirements-vllm.txt
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	echo "$(CURDIR)" > $$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/flashback_ext_source.pth
	$(VLLM_VENV)/bin/python -c "import vllm, flashback_ext.serving.vllm_driver"
	touch $@

vllm-env: $(VLLM_STAMP)

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .

# the suite first (a lint finding does not hide test results), then lint, then the install check;
# the vLLM tests run against a real vLLM from .venv-vllm, and must not skip here
test: build vllm-env
	FLASHBACK_REQUIRE_VLLM=1 $(PY) -m pytest python_tests research/tests -q
	$(MAKE) lint
	$(MAKE) install-check

# pip install . and a wheel, each into a fresh venv with only torch (the local CPU wheel), then
# `flashback demo` offline with an empty model cache; about 3.5 min on an idle 2-core machine
install-check:
	PYTHON=$(PYTHON) bash .ci/install_check.sh

demo: build
	$(VENV)/bin/flashback demo

ops-demo: build
	$(PY) examples/ops_demo.py

bench-cpu: build
	$(PY) bench/kernels.py --device cpu

clean:
	rm -rf build *.egg-info flashback_ext/_C*.so $(BUILD_STAMP)
