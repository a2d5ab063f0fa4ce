# Two commands do all the set-up on a fresh machine:
#   make demo   -- the end-to-end job (corpus -> pretrain -> export -> extract -> probe)
#   make test   -- the test suite
# Both create (or reuse) the virtualenv at .venv in the repo root, with the exact
# versions in requirements/lock.txt. `make lock` rewrites that file after a change
# to setup.cfg or requirements/constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mert-installed
PIP := $(BIN)/python -m pip
CONSTRAINTS := requirements/constraints.txt
LOCK := requirements/lock.txt
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: venv lock demo test test-fast bench clean-venv

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml $(CONSTRAINTS) $(LOCK)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) pip setuptools wheel
	# torch first, pinned, so nothing later can replace the CPU build with a CUDA one.
	$(PIP) install -q -c $(CONSTRAINTS) -c $(LOCK) torch
	$(PIP) install -q -c $(CONSTRAINTS) -c $(LOCK) -e ".[all,dev]"
	# The corpus' SoundFont player: its wheel declares pyaudio (live playback only, no Linux
	# wheel, needs PortAudio headers to build), so it is installed without dependencies.
	$(PIP) install -q --no-deps -c $(CONSTRAINTS) tinysoundfont
	# Every package the project needs is pinned in the lock at the installed version.
	$(BIN)/python requirements/lock.py check
	# Let CUDA-linked torchaudio import on CPU torch (see _mert_torchaudio_shim.py).
	$(BIN)/python -m mert_plugin.compat install-pth
	$(BIN)/python -m mert_plugin.compat check
	@touch $@

# Resolve setup.cfg's [all,dev] + the constraints afresh (in a scratch venv, nothing installed).
lock:
	$(PYTHON) requirements/lock.py generate

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
