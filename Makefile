# Two entry points for users: `make demo` (the main job: dvc repro on the embedded default)
# and `make test` (the test suite). Both create the virtual environment first if needed.
# Python 3.11 or 3.12 (pyproject.toml): the first one found, or PYTHON=... to choose
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# the tested versions of every dependency (pyproject.toml keeps the supported ranges)
CONSTRAINTS := constraints.txt

.PHONY: setup test test-all demo lint bench browser clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) $(TORCH_PINS)
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ''

demo: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python bench/model.py

# the distribution's Chromium and its driver for the web demo's browser test (tests/test_app.py skips without them;
# Debian/Ubuntu package names; root or sudo)
browser:
	@if command -v chromedriver >/dev/null && { command -v chromium || command -v chromium-browser; } >/dev/null; then \
	  echo "chromium and chromedriver: installed"; \
	else \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver; \
	fi

clean:
	rm -rf build .pytest_cache
