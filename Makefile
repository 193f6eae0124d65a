# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (once), install pinned dependencies (once) and build the extension.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP_DEPS  := $(VENV)/.deps-stamp
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null) setup.py
STAMP_BUILD := $(VENV)/.build-stamp

.PHONY: setup test demo bench report lint cuda-check gpu-check gpu-dry-run clean

setup: $(STAMP_BUILD)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned (an open range would pull the CUDA build); it is skipped when already importable.
$(STAMP_DEPS): $(PY) requirements-dev.txt
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -r requirements-dev.txt
	touch $@

$(STAMP_BUILD): $(STAMP_DEPS) $(EXT_SOURCES)
	MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -q -e . --no-build-isolation --no-deps
	touch $@

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) -m incseg_fast demo

bench: setup
	$(PY) -m pytest -q benchmarks --benchmark-only

report: setup
	$(PY) -m incseg_fast.bench

# ruff (lint and format) on the Python, clang-format on the C++ and CUDA; fails on any violation.
lint: $(STAMP_DEPS)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/clang-format --dry-run --Werror $$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh')

# The CUDA code checked without a GPU: nvcc -Werror, ptxas registers/spills, the glue's CUDA half;
# then the Triton kernels compiled for sm_90: unrounded float32 products in their PTX, ptxas registers/spills.
cuda-check: $(STAMP_DEPS)
	$(PY) tools/cuda_check.py
	$(PY) tools/triton_check.py

# On a GPU machine, with the python3 whose torch has CUDA (no .venv, no install): build, GPU tests,
# compute-sanitizer, benchmarks; results in $(OUT). Stops at once without a GPU.
gpu-check:
	@test -n "$(OUT)" || { echo "gpu-check: give a folder for the results: make gpu-check OUT=<folder>"; exit 2; }
	$(PYTHON) tools/gpu_check.py "$(OUT)"

# gpu-check's steps on this machine's CPU (CUDA emulator, Triton interpreter, tiny sizes; the
# sanitizer and ncu commands printed): a typo in a step fails here, not on a GPU.
gpu-dry-run: setup
	$(PY) tools/gpu_check.py --dry-run "$(or $(OUT),build/gpu-dry-run)"

clean:
	rm -rf build *.egg-info incseg_fast/*.so $(STAMP_BUILD)
