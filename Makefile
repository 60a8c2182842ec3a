# Two commands do everything on a fresh machine:
#   make demo   set up .venv, build the extension, run the main job
#   make test   set up .venv, build the extension, run the test suite, lint, then the install
#               check (a fresh venv per install route, the CLI offline; see .ci/install_check.sh)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ext-built
SOURCES := setup.py pyproject.toml $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
# ninja and the venv's tools come first on PATH (torch's extension builder looks there)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: all build lint test install-check demo ops-demo bench-cpu clean

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

lint: $(DEPS_STAMP)
	$(VENV)/bin/ruff check .

# the suite first (a lint finding does not hide test results), then lint, then the install check
test: build
	$(PY) -m pytest python_tests research/tests -q
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
