# eegfast developer commands. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.eegfast-installed
NATIVE_SOURCES := $(shell sed -e 's/\#.*//' -e 's/^cuda://' csrc/sources.txt) $(wildcard csrc/*/*.h)
CU_SOURCES := $(filter %.cu,$(NATIVE_SOURCES))
NVCC ?= $(shell command -v nvcc 2>/dev/null)
CUDA_CHECK_DIR := build/cuda-check
TIMM_VENV ?= build/venv-timm
TIMM_PY := $(TIMM_VENV)/bin/python
TIMM_STAMP := $(TIMM_VENV)/.eegfast-installed
TIMM_SRC := build/timm-check
TRITON_GPU_VERSION ?= 3.6.0
TRITON_GPU_VENV ?= build/venv-triton-$(TRITON_GPU_VERSION)
TRITON_GPU_PY := $(TRITON_GPU_VENV)/bin/python
TRITON_GPU_STAMP := $(TRITON_GPU_VENV)/.eegfast-installed

.PHONY: help install build demo test test-fast asan cuda-check cmake-check timm-check triton-gpu-check cuda-bind-check bench bench-gpu lint clean

help:
	@echo "make demo        build, then the whole recipe on the bundled EEG (eegfast quickstart, CPU, <10 min)"
	@echo "make test        build everything and run the whole test suite (what CI runs)"
	@echo "make asan        the C++ kernels built with AddressSanitizer, under the op and distributed tests"
	@echo "make cuda-check  compile every .cu file for sm_80 and sm_90 with nvcc (no GPU needed)"
	@echo "make timm-check  eegfast.nn.convert on real timm ViTs, in build/venv-timm (part of make test)"
	@echo "make triton-gpu-check  the Triton tests under the GPU machines' Triton $(TRITON_GPU_VERSION) (part of make test)"
	@echo "make cuda-bind-check  type-check the CUDA bindings against build/venv-timm's CUDA torch headers"
	@echo "make cmake-check build the extension with CMake (at -O1) and smoke-test it"
	@echo "make bench       CPU benchmarks (pytest-benchmark) and the CPU report"
	@echo "make bench-gpu   GPU benchmarks (needs a CUDA device)"
	@echo "make lint        ruff"

# A venv that sees system packages (a GPU machine's CUDA torch is used as it is); torch 2.13
# is installed only where no torch can be imported, from the index pip is configured with (a
# local wheel folder here; from PyPI that is the CUDA build, several GB: on a CPU-only machine
# pass TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu").
TORCH_PIP_ARGS ?=
# csrc/sources.txt itself too: a source dropped from it (or moved to or from the cuda: lines)
# changes what is built while no listed file is newer than the stamp.
$(STAMP): setup.py pyproject.toml csrc/sources.txt $(NATIVE_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0 $(TORCH_PIP_ARGS)
	$(PY) -m pip install setuptools wheel ninja
	$(PY) -m pip install --no-build-isolation -e ".[test,triton]"
	touch $@

install build: $(STAMP)

demo: $(STAMP)
	$(PY) -m eegfast doctor
	$(PY) -m eegfast quickstart --out runs/quickstart

test: $(STAMP) cuda-check cmake-check timm-check triton-gpu-check
	EEGFAST_REQUIRE_EXT=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	EEGFAST_REQUIRE_EXT=1 $(PY) -m pytest -q -x

# The CPU kernels built with AddressSanitizer (and libstdc++'s vector annotations) in a copy of
# the package, build/asan-src (its ../shared linked to ours: the spec and the sample EEG), then ASAN_TESTS run on that copy with the runtime preloaded (the
# Python and torch it runs are not instrumented; ASan still sees every access the kernels make,
# and the output pool poisons its headers, slack and cached blocks). Not part of `make test`: it
# takes ~13 min here. libstdc++ is preloaded too: ASan resolves its __cxa_throw interceptor at
# start-up, and a C++ exception (any TORCH_CHECK) aborts when libstdc++ was not loaded then. The
# page-fault test is left out: it counts page faults, and ASan's shadow memory adds some.
ASAN_TESTS ?= tests/ops tests/train/test_distributed_real.py tests/nn tests/models
ASAN_SRC := build/asan-src
asan: $(STAMP)
	rm -rf $(ASAN_SRC) && mkdir -p $(ASAN_SRC)
	cp -r eegfast tests benchmarks csrc setup.py pyproject.toml $(ASAN_SRC)/
	find $(ASAN_SRC) -name '*.so' -delete
	$(if $(wildcard ../shared),ln -sfn $(abspath ../shared) $(dir $(ASAN_SRC))shared)
	cd $(ASAN_SRC) && EEGFAST_CUDA=0 EEGFAST_CPU_OPT=1 \
	  CFLAGS="-fsanitize=address -fno-omit-frame-pointer -g -D_GLIBCXX_SANITIZE_VECTOR" \
	  LDFLAGS="-fsanitize=address" $(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(ASAN_SRC) && \
	  LD_PRELOAD="$$(g++ -print-file-name=libasan.so) $$(g++ -print-file-name=libstdc++.so)" \
	  ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1 \
	  EEGFAST_REQUIRE_EXT=1 PYTHONPATH=$(abspath $(ASAN_SRC)) \
	  $(abspath $(PY)) -m pytest -q -p no:cacheprovider -s -k "not fault_pages_in" $(ASAN_TESTS)

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

# At -O1 (EEGFAST_CPU_OPT): this checks the CMake build and its module, not the kernels' speed,
# and -O3 took ~4 of CI's 2-core minutes for the attention kernels alone.
cmake-check: $(STAMP)
	cmake -S . -B build-cmake -G Ninja -DPython3_EXECUTABLE=$(abspath $(PY)) -DEEGFAST_CPU_OPT=1
	cmake --build build-cmake -j 2
	$(PY) scripts/check_cmake_build.py build-cmake

# timm needs torchvision, and PyPI's torchvision does not import beside the torch 2.13 CPU wheel
# of the main venv. A second venv holds torch 2.14.1 + torchvision 0.29.1 (the pair on this
# machine kind's disk; a CUDA build that runs on the CPU) + timm and runs the convert tests on a
# copy of the package without the extension, which is built for the main venv's torch: there the
# converted models run the Triton kernels under the interpreter (the C++ kernels are tested with
# the reference-LaBraM models in the main venv). It is made only
# where make installs torch itself; a machine with its own torch skips it, and the main suite's
# timm tests say why they skip. EEGFAST_REQUIRE_TIMM=1 turns a missing timm into a failure.
# The same venv holds braindecode, for convert() on its real Labram and for loading its weights
# into eegfast's LaBraM (EEGFAST_REQUIRE_BRAINDECODE=1 likewise); its import chain needs
# mne, skorch, torchaudio & co. (~50 s of installs). No torchaudio is built for torch 2.14:
# 2.11.1 (torch>=2.11) imports beside it, and pinning torch keeps pip from moving torch.
$(TIMM_STAMP): pyproject.toml Makefile
	test -x $(TIMM_PY) || $(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(TIMM_PY) -m pip install "timm>=1.0" "pytest>=8" "hypothesis>=6.100" "numpy<2.4"
	$(TIMM_PY) -m pip install torch==2.14.1 "numpy<2.4" braindecode==1.8.1
	touch $@

timm-check:
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "timm-check: skipped, $(PYTHON) has its own torch (make installs no torch here)"; \
	else \
	  $(MAKE) --no-print-directory $(TIMM_STAMP) && rm -rf $(TIMM_SRC) && mkdir -p $(TIMM_SRC) && \
	  cp -r eegfast tests pyproject.toml $(TIMM_SRC)/ && find $(TIMM_SRC) -name '*.so' -delete && \
	  cd $(TIMM_SRC) && EEGFAST_REQUIRE_TIMM=1 EEGFAST_REQUIRE_BRAINDECODE=1 EEGFAST_REQUIRE_EXT=0 \
	    $(abspath $(TIMM_PY)) -m pytest -q -p no:cacheprovider tests/nn/test_convert.py \
	      tests/models/test_braindecode_weights.py && \
	  cd $(CURDIR) && $(MAKE) --no-print-directory cuda-bind-check; \
	fi

# The lent GPU machines run Triton $(TRITON_GPU_VERSION) (beside torch 2.11); the main venv gets the
# newest Triton. Their compilers differ: Triton 3.6's ptxas spilled registers in configs that
# 3.9's did not, and its interpreter broke on numpy 2.4. So the Triton tests (interpreted, and
# the sm_90 compiles with that Triton's own ptxas and its report) run again under it, on the
# package in place: a venv holding only that Triton, which sees the main venv's packages after
# its own (a .pth file naming the main venv's site directories, system ones included where it
# sees them), so torch and the extension built for it are the main venv's. Made only
# where make installs torch itself, like timm-check.
$(TRITON_GPU_STAMP): pyproject.toml $(STAMP)
	test -x $(TRITON_GPU_PY) || $(PYTHON) -m venv $(TRITON_GPU_VENV)
	$(TRITON_GPU_PY) -m pip install --no-compile triton==$(TRITON_GPU_VERSION)
	$(PY) -c "import site; print(*site.getsitepackages(), sep='\n')" > \
	  "$$($(TRITON_GPU_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/eegfast-main-venv.pth"
	touch $@

triton-gpu-check: $(STAMP)
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "triton-gpu-check: skipped, $(PYTHON) has its own torch (make installs no torch here)"; \
	else \
	  $(MAKE) --no-print-directory $(TRITON_GPU_STAMP) && \
	  $(TRITON_GPU_PY) -c "import triton; assert triton.__version__ == '$(TRITON_GPU_VERSION)', \
	    triton.__version__" && \
	  PYTHONPATH=$(CURDIR) EEGFAST_REQUIRE_EXT=1 \
	    $(TRITON_GPU_PY) -m pytest -q -p no:cacheprovider -m triton tests/ops; \
	fi

# The torch-side CUDA bindings (*_bind.cpp) are only compiled on GPU machines; the timm venv's
# torch is a CUDA build, so its headers (plus the CUDA headers pip put beside it) let g++ check
# that they compile, without a GPU and without the cost of a full CUDA build.
CUDA_BIND_SOURCES := $(filter %.cpp,$(shell sed -n -e 's/\#.*//' -e 's/^cuda://p' csrc/sources.txt))
cuda-bind-check: $(TIMM_STAMP)
	@inc=$$($(TIMM_PY) -c "import os, sysconfig, torch; t = os.path.dirname(torch.__file__); \
	  n = os.path.join(os.path.dirname(t), 'nvidia', 'cu13', 'include'); \
	  print(' '.join('-I' + p for p in (t + '/include', t + '/include/torch/csrc/api/include', \
	  n, sysconfig.get_paths()['include'])))"); \
	for src in $(CUDA_BIND_SOURCES); do echo "g++ -fsyntax-only $$src"; \
	  g++ -std=c++20 -fsyntax-only -Icsrc -I/usr/local/cuda/include $$inc $$src || exit 1; done

bench: $(STAMP)
	$(PY) -m pytest benchmarks/bench_vq.py --benchmark-only -q
	$(PY) -m pytest benchmarks/bench_moe.py --benchmark-only -q
	$(PY) -m benchmarks.report_cpu
	$(PY) -m benchmarks.bench_pretrain --cpu --cpu-train
	$(PY) -m benchmarks.bench_data
	$(PY) -m pytest benchmarks/bench_qk_norm_attention.py --benchmark-only -q
	$(PY) -m benchmarks.report_qk_norm_attention

bench-gpu: $(STAMP)
	$(PY) -m benchmarks.gpu

lint: $(STAMP)
	$(PY) -m ruff check eegfast tests benchmarks scripts setup.py
	$(PY) -m ruff format --check eegfast tests benchmarks scripts setup.py

clean:
	rm -rf build build-cmake dist *.egg-info eegfast/*.so
