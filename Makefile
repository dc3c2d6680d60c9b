# Two commands: `make demo` and `make test`. Both create .venv on first use.
# pip -qq: errors only (this machine's pip config and setuptools' editable-install notice are not for users).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fxpress-installed
# The CPU build of torch lies on this machine's disk; any other version pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
DEMO_QAT ?= 400,200

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -qq --upgrade pip
	$(BIN)/python -m pip install -qq $(TORCH)
	$(BIN)/python -m pip install -qq -e '.[dev,mobile]'
	touch $(STAMP)

setup: $(STAMP)

# The trained digits testbed UNet at 1.99 bits with two-stage QAT, then FP32 and compressed samples side by side.
demo: setup
	$(BIN)/fxpress compress testbed-digits-unet --recipe bitsfusion --target-bits 1.99 --sensitivity hybrid --qat $(DEMO_QAT) --out artifacts/digits-1.99bit --overwrite
	$(BIN)/fxpress inspect artifacts/digits-1.99bit
	$(BIN)/fxpress bench quality testbed-digits-unet artifacts/digits-1.99bit --png artifacts/digits-samples.png

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
