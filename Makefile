# Two commands do all the set-up on a fresh machine (Python 3.11 + PyPI/Debian only):
#   make demo   - create .venv, install trellis, train the tiny Llama on 2 CPU ranks
#   make test   - create .venv if needed and run the whole test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CPU torch pin for this machine class; GPU users install their own torch and skip it.
CONSTRAINTS := constraints-cpu.txt
# DeepSpeed JIT-builds C++ ops on first use: build once, into the project.
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.torch_extensions
export TOKENIZERS_PARALLELISM := false
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-distributed test-integration sysdeps venv bench clean

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

bench: venv
	$(BIN)/python bench/ddp_overhead.py

clean:
	rm -rf runs .pytest_cache
