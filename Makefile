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

# The CPU op tests run once more on each narrower build of the CPU kernels (GPTEXT_CPU_ISA),
# so that a wide machine also tests what a narrower one runs.
CPU_ISAS    ?= baseline avx2
OP_TESTS    := tests/test_softmax.py tests/test_layernorm.py tests/test_rmsnorm.py tests/test_linear.py tests/test_rope.py tests/test_experts.py tests/test_attention.py

.PHONY: bench test native pytest pytest-isa clean

bench: $(VENV)/.gptext-installed
	$(PYTHON) -m bench $(BENCH_ARGS)
	$(PYTHON) -m gptext demo

test: native pytest pytest-isa

pytest: $(VENV)/.gptext-installed
	$(PYTHON) -m pytest -q

pytest-isa: $(VENV)/.gptext-installed
	@for isa in $(CPU_ISAS); do \
	  echo "== CPU op tests on the $$isa build (GPTEXT_CPU_ISA=$$isa)"; \
	  GPTEXT_CPU_ISA=$$isa $(PYTHON) -m pytest -q $(OP_TESTS) || exit 1; \
	done

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
