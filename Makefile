# gptext's two set-up commands (see README):
#   make bench   build everything, run the bench/ comparisons on this machine's device, then the GPT demo
#   make test    build everything, run the native kernel tests (CTest) and the Python tests
#
# Both create a virtual environment in .venv (PYTHON=... uses an existing interpreter
# instead, e.g. one that already has torch) and build gptext's extension into it: with the
# CUDA kernels when torch is a CUDA build and nvcc is found (GPTEXT_CUDA=0/1 forces it).

VENV        ?= .venv
TORCH_SPEC  ?= torch==2.14.1
BENCH_ARGS  ?= --quick
PYTHON      ?= $(VENV)/bin/python
NATIVE_DIR  ?= build/native
SOURCES     := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/* csrc/kernels/*)

.PHONY: bench test native pytest clean

bench: $(VENV)/.gptext-installed
	$(PYTHON) -m bench $(BENCH_ARGS)
	$(PYTHON) -m gptext demo

test: native pytest

pytest: $(VENV)/.gptext-installed
	$(PYTHON) -m pytest -q

native:
	cmake -S . -B $(NATIVE_DIR)
	cmake --build $(NATIVE_DIR) -j
	ctest --test-dir $(NATIVE_DIR) --output-on-failure

$(VENV)/.gptext-installed: $(SOURCES)
	@if [ "$(PYTHON)" = "$(VENV)/bin/python" ] && [ ! -x $(VENV)/bin/python ]; then python3 -m venv $(VENV); fi
	$(PYTHON) -m pip install -q --upgrade pip setuptools wheel ninja numpy
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install -q "$(TORCH_SPEC)"
	$(PYTHON) -m pip install -q --no-build-isolation -e ".[dev]"
	@mkdir -p $(VENV) && touch $@

clean:
	rm -rf build $(NATIVE_DIR) gptext/_C*.so *.egg-info
