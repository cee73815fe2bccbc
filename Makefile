# eegfast developer commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.eegfast-installed
NATIVE_SOURCES := $(shell sed -e 's/\#.*//' -e 's/^cuda://' csrc/sources.txt) $(wildcard csrc/*/*.h)
CU_SOURCES := $(filter %.cu,$(NATIVE_SOURCES))
NVCC ?= $(shell command -v nvcc 2>/dev/null)
CUDA_CHECK_DIR := build/cuda-check

.PHONY: help install build demo test test-fast cuda-check cmake-check bench bench-gpu lint clean

help:
	@echo "make demo        build, then the whole recipe on the bundled EEG (eegfast quickstart, CPU, <10 min)"
	@echo "make test        build everything and run the whole test suite (what CI runs)"
	@echo "make cuda-check  compile every .cu file for sm_80 and sm_90 with nvcc (no GPU needed)"
	@echo "make cmake-check build the extension with CMake and smoke-test it"
	@echo "make bench       CPU benchmarks (pytest-benchmark) and the CPU report"
	@echo "make bench-gpu   GPU benchmarks (needs a CUDA device)"
	@echo "make lint        ruff"

# A venv that sees system packages (a GPU machine's CUDA torch is used as it is); torch 2.13
# (CPU) is installed only where no torch can be imported.
$(STAMP): setup.py pyproject.toml $(NATIVE_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install setuptools wheel ninja
	$(PY) -m pip install --no-build-isolation -e ".[test,triton]"
	touch $@

install build: $(STAMP)

demo: $(STAMP)
	$(PY) -m eegfast doctor
	$(PY) -m eegfast quickstart --out runs/quickstart

test: $(STAMP) cuda-check cmake-check
	EEGFAST_REQUIRE_EXT=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	EEGFAST_REQUIRE_EXT=1 $(PY) -m pytest -q -x

cuda-check:
ifeq ($(NVCC),)
	@echo "cuda-check: nvcc not found, CUDA sources not compiled"
else
	@mkdir -p $(CUDA_CHECK_DIR)
	@for src in $(CU_SOURCES); do for arch in 80 90; do \
	  echo "nvcc sm_$$arch $$src"; \
	  $(NVCC) -std=c++17 -O3 -Werror all-warnings -arch=sm_$$arch -Icsrc -c $$src \
	    -o $(CUDA_CHECK_DIR)/$$(basename $$src .cu).sm_$$arch.o || exit 1; \
	done; done
endif

cmake-check: $(STAMP)
	cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY))
	cmake --build build-cmake -j 2
	$(PY) scripts/check_cmake_build.py build-cmake

bench: $(STAMP)
	$(PY) -m pytest benchmarks/bench_vq.py --benchmark-only -q
	$(PY) -m pytest benchmarks/bench_moe.py --benchmark-only -q
	$(PY) -m benchmarks.report_cpu
	$(PY) -m benchmarks.bench_data

bench-gpu: $(STAMP)
	$(PY) -m benchmarks.gpu

lint: $(STAMP)
	$(PY) -m ruff check eegfast tests benchmarks scripts setup.py
	$(PY) -m ruff format --check eegfast tests benchmarks scripts setup.py

clean:
	rm -rf build build-cmake dist *.egg-info eegfast/*.so
