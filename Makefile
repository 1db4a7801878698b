# Fresh machine: `make demo` runs the main job, `make test` runs the test suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is the CPU build on these machines.
TORCH_VERSION := 2.13.0

.PHONY: test demo lint bench gpu-check docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-$(TORCH_VERSION): | $(BIN)/python
	$(BIN)/pip install "torch==$(TORCH_VERSION)"
	touch $@

$(VENV)/.dev-installed: pyproject.toml $(VENV)/.torch-$(TORCH_VERSION)
	$(BIN)/pip install -e ".[dev]"
	touch $@

$(VENV)/.docs-installed: pyproject.toml $(VENV)/.torch-$(TORCH_VERSION)
	$(BIN)/pip install -e ".[docs]"
	touch $@

$(VENV)/.compare-installed: pyproject.toml $(VENV)/.torch-$(TORCH_VERSION)
	$(BIN)/pip install -e ".[compare]"
	touch $@

lint: $(VENV)/.dev-installed
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

test: lint
	$(BIN)/python -m pytest -n 2

demo: $(VENV)/.compare-installed
	$(BIN)/danlu compare

# The documentation site (mkdocs.yml) into site/; --strict turns every warning into an error.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

bench: $(VENV)/.dev-installed
	$(BIN)/python benchmarks/step_bench.py

# On a CUDA machine (about 8 minutes on one H200): the CUDA tests, every Triton kernel against
# the single-tensor path at 1B-LLaMA sizes, and the step benchmark against torch's fused AdamW
# → benchmarks/RESULTS-cuda.md; exits 2 without a CUDA device. GPU_PYTHON=python3 uses that
# interpreter and its own CUDA build of torch instead of the venv (no install).
GPU_PYTHON ?= $(BIN)/python
gpu-check: $(if $(filter $(BIN)/python,$(GPU_PYTHON)),$(VENV)/.dev-installed)
	PYTHONPATH=src $(GPU_PYTHON) benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) build dist site src/*.egg-info
