# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create .venv (once), install pinned dependencies (once) and build the extension.
PYTHON ?= python3
SHELL  := /bin/bash
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP_DEPS  := $(VENV)/.deps-stamp
EXT_SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null) setup.py
STAMP_BUILD := $(VENV)/.build-stamp
BUILD_LOG   := $(VENV)/build.log
# extra pip arguments for torch, e.g. TORCH_PIP_ARGS="--index-url <PyTorch's CPU index>" (README)
TORCH_PIP_ARGS ?=

# The GPU machines' torch (Python 3.12 there; the extension's stable ABI lets this machine's Python build it).
PREBUILD_TORCH := 2.11.0
PREBUILD_CUDA  := 13
PREBUILD_ARCHS := 8.0;9.0
PREBUILD_VENV  := .gpu-prebuild-venv
PREBUILD_PY    := $(PREBUILD_VENV)/bin/python
PREBUILD_DIR   := prebuilt/torch-$(PREBUILD_TORCH)-cu$(PREBUILD_CUDA)
STAMP_PREBUILD_DEPS := $(PREBUILD_VENV)/.torch-$(PREBUILD_TORCH)-stamp

.PHONY: setup test demo bench report lint cuda-check gpu-model gpu-check gpu-dry-run gpu-prebuild clean

setup: $(STAMP_BUILD)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned; it is skipped when already importable. Which build the package index serves
# (CPU or CUDA) is the index's choice: README.md, "Two commands".
$(STAMP_DEPS): $(PY) requirements-dev.txt
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PIP) install -q -r requirements-dev.txt
	touch $@

# About 20 CPU-minutes of C++ (more with CUDA kernels): say so first, then show ninja's counter,
# with the whole output in $(BUILD_LOG) (its end is printed when the build fails).
$(STAMP_BUILD): $(STAMP_DEPS) $(EXT_SOURCES)
	@jobs=$${MAX_JOBS:-2}; echo "building the C++ extension: about $$(( (20 + jobs - 1) / jobs )) minutes here" \
		"with MAX_JOBS=$$jobs (more jobs: faster, on more cores); full log in $(BUILD_LOG)"
	@set -o pipefail; MAX_JOBS=$${MAX_JOBS:-2} $(PIP) install -v -e . --no-build-isolation --no-deps 2>&1 \
		| $(PY) tools/build_progress.py $(BUILD_LOG) || { tail -n 30 $(BUILD_LOG); exit 1; }
	touch $@

# Two workers (the suite's 3800 tests take half the time); test_distributed starts process groups
# and torchrun jobs of its own, so it runs alone, after.
test: setup
	$(PY) -m pytest -q -n 2 tests --ignore=tests/test_distributed.py
	$(PY) -m pytest -q tests/test_distributed.py

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

# The modelled H100 time of the hot CUDA kernels from their sm_90 SASS (docs/KERNELS.md); nvcc, no GPU.
gpu-model: $(STAMP_DEPS)
	$(PY) tools/gpu_model.py

# On a GPU machine, with the python3 whose torch has CUDA (no .venv, no install): build, GPU tests,
# compute-sanitizer, benchmarks; results in $(OUT). Stops at once without a GPU.
gpu-check:
	@test -n "$(OUT)" || { echo "gpu-check: give a folder for the results: make gpu-check OUT=<folder>"; exit 2; }
	$(PYTHON) tools/gpu_check.py "$(OUT)"

# gpu-check's steps on this machine's CPU (CUDA emulator, Triton interpreter, tiny sizes; the
# sanitizer and ncu commands printed): a typo in a step fails here, not on a GPU.
gpu-dry-run: setup
	$(PY) tools/gpu_check.py --dry-run "$(or $(OUT),build/gpu-dry-run)"

# Here, before a GPU machine starts: the CUDA extension for the GPU machines' torch, built in its own
# venv (torch $(PREBUILD_TORCH) with CUDA, 4.7 GB, once) into $(PREBUILD_DIR) (rebuilt when csrc changes),
# then loaded and run on CPU tensors. Then carry prebuilt/ to the GPU machine: DEVELOPERS.md, "on a GPU".
gpu-prebuild: $(PREBUILD_DIR)/manifest.json
	$(PREBUILD_PY) tools/prebuilt_check.py $(PREBUILD_DIR)

$(STAMP_PREBUILD_DEPS):
	$(PYTHON) tools/gpu_prebuild.py venv $(PREBUILD_VENV) --torch $(PREBUILD_TORCH)
	touch $@

$(PREBUILD_DIR)/manifest.json: $(STAMP_PREBUILD_DEPS) $(EXT_SOURCES) tools/gpu_prebuild.py
	$(PREBUILD_PY) tools/gpu_prebuild.py build $(PREBUILD_DIR) --archs "$(PREBUILD_ARCHS)"

clean:
	rm -rf build *.egg-info incseg_fast/*.so prebuilt $(STAMP_BUILD)
