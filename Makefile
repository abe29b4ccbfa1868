# Two set-up commands on a fresh machine: `make demo` (a small end-to-end run) and `make test`.
# TORCH is installed first so CPU-only machines get the small build that lies on disk here; on a GPU
# cluster set TORCH="torch" (or any CUDA build) instead: `make demo TORCH=torch`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install

$(BIN)/dyf: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(BIN)/dyf

install: $(BIN)/dyf

demo: $(BIN)/dyf
	bash scripts/demo.sh demo

test: $(BIN)/dyf
	$(BIN)/python -m pytest -q -n 2
