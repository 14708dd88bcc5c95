# Two commands on a fresh machine: `make demo` (the main job: the paper's synthetic experiment (a),
# searched end to end, tree printed and drawn) and `make test` (the test suite).
# Each creates the virtual environment $(VENV), installs torch (CPU build by default), the tools and
# l2b_fast with its compiled extension, then runs.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.l2b-built
CSRC := $(wildcard csrc/*.* csrc/*/*.*)

.PHONY: demo op-demo test bench cuda-check lint cmake-test ci clean

$(DEPS): requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -r requirements-dev.txt
	touch $@

$(BUILT): $(DEPS) setup.py pyproject.toml $(CSRC)
	MAX_JOBS=2 $(BIN)/python -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

# MKL_CBWR / ATEN_CPU_CAPABILITY: the same BLAS and PyTorch kernels on AVX2 and AVX-512 CPUs (AMD EPYC,
# Intel Xeon), so the run does not depend on the machine's vector width (docs/design.md, section 5).
DEMO_ENV := MKL_CBWR=AVX2 ATEN_CPU_CAPABILITY=avx2

demo: $(BUILT)
	$(DEMO_ENV) $(BIN)/l2b search --preset synthetic-a --seed 0 --out runs/synthetic-a --threads 1 --overwrite

op-demo: $(BUILT)
	$(BIN)/python -m l2b_fast.demo

test: $(BUILT)
	$(BIN)/python -m pytest tests

bench: $(BUILT)
	$(BIN)/python -m l2b_fast.bench --out benchmarks/results

cuda-check: $(DEPS)
	$(BIN)/python tools/nvcc_compile_check.py --arch 90 --arch 80

# Lint and formatting (ruff, configured in pyproject.toml): fails on any finding or unformatted file.
lint: $(DEPS)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# The wheels the GPU image lacks (expecttest, webdataset, braceexpand, pyspng), for its Python 3.12 on x86-64
# Linux, into gpu-wheels/: run here, where the package index is; the GPU run installs them offline from there.
.PHONY: gpu-wheels
gpu-wheels:
	$(PYTHON) tools/gpu_validate.py --download-wheels gpu-wheels

cmake-test: $(DEPS)
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" -DPython3_EXECUTABLE=$(abspath $(BIN)/python)
	cmake --build build/cmake
	ctest --test-dir build/cmake --output-on-failure

clean:
	rm -rf build $(VENV) l2b_fast/*.so *.egg-info
