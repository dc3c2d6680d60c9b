# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxpress-installed
# The CPU build of torch lies on this machine's disk; any other version pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev,mobile]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fxpress compress tiny-unet --recipe bitsfusion --target-bits 1.99 --sensitivity hybrid --out artifacts/tiny-unet --overwrite
	$(BIN)/fxpress inspect artifacts/tiny-unet

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python benchmarks/entropy_coders.py
	$(BIN)/python benchmarks/sensitivity_correlation.py
	$(BIN)/python benchmarks/compress_sd15.py

clean:
	rm -rf artifacts .pytest_cache .hypothesis
