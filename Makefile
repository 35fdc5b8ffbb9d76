# Two commands matter: `make run` and `make test`. Both build the virtualenv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-fast lint bench chaos schema clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "jetcut needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/jetcut dev

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check shared functions tests loadtests
	$(VENV)/bin/mypy

bench: install
	$(PY) -m loadtests

chaos: install
	$(PY) -m loadtests.chaos

schema: install
	$(VENV)/bin/jetcut schema

clean:
	rm -rf $(VENV) .jetcut .pytest_cache
