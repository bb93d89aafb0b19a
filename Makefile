# Two commands do all the set-up on a fresh machine (Python 3.11 + PyPI/Debian only):
#   make demo   - create .venv, install trellis, train the tiny Llama on 2 CPU ranks
#   make test   - create .venv if needed and run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The pinned test environment (exact versions of everything, CPU torch): what CI installs and tests.
# GPU users install their own torch and skip it. `make lock` refreshes it; `make test-latest` ignores it.
CONSTRAINTS := constraints-cpu.txt
TORCH_PIN := $(shell grep -m1 '^torch==' $(CONSTRAINTS))
# DeepSpeed JIT-builds C++ ops on first use: build once, into the project.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-distributed test-integration test-isa test-latest lock sysdeps venv bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# PIP_CONSTRAINT also reaches isolated build environments (DeepSpeed builds from an sdist).
	PIP_CONSTRAINT=$(CURDIR)/$(CONSTRAINTS) $(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e ".[all,test]"
	touch $@

demo: venv
	$(BIN)/trellis train configs/tiny-llama.toml

# System packages the integration tier uses (Open MPI for mpirun, libaio for DeepSpeed NVMe offload).
# Installed only when missing and only as root; otherwise those tests say what to install and skip.
sysdeps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v mpirun >/dev/null || missing="$$missing openmpi-bin libopenmpi-dev"; \
	  [ -e /usr/include/libaio.h ] || missing="$$missing libaio-dev"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "warning: could not install$$missing; the tests that need them will skip"; \
	  fi; \
	fi

# pytest exit code 5 (no tests collected) is not a failure of the suite.
define run_pytest
	$(BIN)/python -m pytest $(1) $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc
endef

test: venv sysdeps
	$(call run_pytest,tests)

test-fast: venv
	$(call run_pytest,-m "not distributed and not integration" tests)

test-distributed: venv
	$(call run_pytest,-m distributed tests)

test-integration: venv sysdeps
	$(call run_pytest,-m integration tests)

# The numerics tiers (unit + distributed) with torch, oneDNN and MKL limited to AVX2: on an AVX-512 / AMX
# machine this checks that no bound depends on the CPU's vector kernels (developers' CPUs differ).
ISA_ENV := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
test-isa: venv
	$(ISA_ENV) $(BIN)/python -c "import torch; print('torch CPU capability:', torch.backends.cpu.get_cpu_capability())"
	$(ISA_ENV) $(call run_pytest,-m "not integration" tests)

# The suite against the newest versions pyproject.toml allows (only torch stays at the lock's CPU wheel):
# run it before refreshing the lock or when a dependency releases. Not part of CI.
LATEST := .venv-latest
test-latest: sysdeps
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	echo "$(TORCH_PIN)" > $(LATEST)/torch-pin.txt
	PIP_CONSTRAINT=$(CURDIR)/$(LATEST)/torch-pin.txt $(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[all,test]"
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|tokenizers|peft|bitsandbytes|deepspeed) '
	$(LATEST)/bin/python -m pytest tests $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# Rewrite the lock from a scratch venv with the newest allowed versions (torch kept at its pin).
lock:
	rm -rf .venv-lock && $(PY) -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q --upgrade pip
	echo "$(TORCH_PIN)" > .venv-lock/torch-pin.txt
	PIP_CONSTRAINT=$(CURDIR)/.venv-lock/torch-pin.txt .venv-lock/bin/python -m pip install -q ".[all,test]"
	{ sed -n '/^#/p' $(CONSTRAINTS); echo "$(TORCH_PIN)"; \
	  .venv-lock/bin/python -m pip freeze --exclude trellis-train | grep -v '^torch=='; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS) && rm -rf .venv-lock
	@echo "wrote $(CONSTRAINTS); now run make test and make test-isa"

bench: venv
	$(BIN)/python bench/ddp_overhead.py

clean:
	rm -rf runs .pytest_cache
