# Two commands do all the set-up on a fresh machine:
#   make demo   -- the end-to-end job (corpus -> pretrain -> export -> extract -> probe)
#   make test   -- the test suite
# Both create (or reuse) the virtualenv at .venv in the repo root.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mert-installed
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv demo test test-fast bench clean-venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" "setuptools>=70" wheel
	# torch first, pinned, so nothing later can replace the CPU build with a CUDA one.
	$(PIP) install -q -c $(CONSTRAINTS) "torch==2.13.0"
	$(PIP) install -q -c $(CONSTRAINTS) -e ".[all,dev]"
	# Let CUDA-linked torchaudio import on CPU torch (see _mert_torchaudio_shim.py).
	$(BIN)/python -m mert_plugin.compat install-pth
	$(BIN)/python -m mert_plugin.compat check
	@touch $@

demo: $(STAMP)
	$(BIN)/python -m mert_plugin.demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/encoder_speed.py

clean-venv:
	rm -rf $(VENV)
