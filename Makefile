# wordlm: `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
TORCH  := torch==2.13.0

.PHONY: install demo test test-slow lint bench clean

# Create .venv: the pinned CPU torch first (a bare `torch` could pull a multi-GB CUDA build), then wordlm.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)  ## set up .venv only

# Train the demo model on the shipped corpus, evaluate it on the test split, and generate from it.
demo: $(STAMP)
	$(BIN)/wordlm train --config configs/demo.toml --out runs/demo --overwrite
	$(BIN)/wordlm eval runs/demo --split test
	$(BIN)/wordlm generate runs/demo --prompt "why do we need" --max-tokens 40 --seed 1
	$(BIN)/wordlm score runs/demo "why do we need a recurrent neural network" "neural why recurrent need we network do"

# The default test suite (a few minutes on 2 cores).
test: $(STAMP)
	$(BIN)/python -m pytest -q

# The long tests (marked slow).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# Style checks.
lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks scripts

# Throughput benchmarks against a plain PyTorch loop (prints a table of ratios).
bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py

# Remove the virtual environment and demo runs.
clean:
	rm -rf $(VENV) runs .pytest_cache
