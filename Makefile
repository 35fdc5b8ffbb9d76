# Two commands matter: `make run` and `make test`. Both build the virtualenv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install browser tools run test test-fast lint bench chaos load matrix schema clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "jetcut needs Python 3.11+"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian's chromium + chromedriver for the dashboard's browser test (tests/test_dashboard.py).
# Idempotent: installs only when missing, and only as root with apt-get; otherwise says why
# (that test then installs nothing and is skipped with the same reason).
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium and chromium-driver (for tests/test_dashboard.py)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
			|| echo "warning: apt-get could not install chromium: the browser test will be skipped"; \
	else \
		echo "note: chromium/chromedriver missing and not root with apt-get: the dashboard's" \
		     "browser test will be skipped (apt-get install -y chromium chromium-driver)"; \
	fi

# promtool, from Debian's prometheus package, for the Prometheus rule unit tests and config
# checks (tests/test_infra_prometheus.py). Idempotent, like `browser`: installs only when
# missing, only as root with apt-get; otherwise says why (those tests then skip with the
# same reason). --no-install-recommends, and Debian does not start the prometheus service
# where policy-rc.d forbids it (containers); on a systemd host, `systemctl disable --now
# prometheus` if you do not want it running.
tools:
	@if command -v promtool >/dev/null 2>&1; then \
		:; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing prometheus (for promtool, tests/test_infra_prometheus.py)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus \
			|| echo "warning: apt-get could not install prometheus: the promtool tests will be skipped"; \
	else \
		echo "note: promtool missing and not root with apt-get: the Prometheus rule tests" \
		     "will be skipped (apt-get install -y prometheus)"; \
	fi

run: install
	$(VENV)/bin/jetcut dev

test: install browser tools
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check shared functions tests loadtests
	$(VENV)/bin/mypy

bench: install
	$(PY) -m loadtests

chaos: install
	$(PY) -m loadtests.chaos

# 10,000 no-op jobs and 1,000 tiny real encodes through every function as its own process,
# gateway HTTP included (loadtests/load.py); bounded, loopback only, stops by itself, and
# writes loadtests/reports/load-latest.md. `$(PY) -m loadtests.load --quick` for a smoke run.
load: install
	$(PY) -m loadtests.load

# Every recipe x every corpus item (tests/support/matrix.py), as real jobs; `make test` runs
# only the cells each property matters for (tests/test_matrix.py). Writes the committed table.
matrix: install
	$(PY) -m tests.support.matrix --report loadtests/reports/matrix.md

schema: install
	$(VENV)/bin/jetcut schema

clean:
	rm -rf $(VENV) .jetcut .pytest_cache
