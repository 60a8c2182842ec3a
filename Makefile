# Two commands do everything on a fresh machine:
#   make demo   set up .venv, build the extension, run the main job
#   make test   set up .venv, build the extension, run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.ext-built
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh')
# ninja and the venv's tools come first on PATH (torch's extension builder looks there)
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: all build test demo ops-demo bench-cpu clean

all: test

$(DEPS_STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: build
	$(PY) -m pytest python_tests -q

demo: build
	$(VENV)/bin/flashback demo

ops-demo: build
	$(PY) examples/ops_demo.py

bench-cpu: build
	$(PY) bench/kernels.py --device cpu

clean:
	rm -rf build *.egg-info flashback_ext/_C*.so $(BUILD_STAMP)
