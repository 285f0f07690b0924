# Extra Balance — developer entry points. `make demo` and `make test` are the two
# commands a newcomer needs; the rest are the longer runs the docs describe.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: demo test test-all wire-tools browser-test chaos fuzz soak bench bench-e2e lint audit clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Debian packages the tests use when present: Mosquitto (broker restart tests) and
# tshark (wire conformance). Installed only when we are root and they are missing.
wire-tools:
	@if [ "$$(id -u)" = "0" ]; then \
	  missing=""; \
	  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	  command -v tshark >/dev/null 2>&1 || missing="$$missing tshark"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing:$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "could not install$$missing; the tests that need them will say so and skip"; \
	  fi; \
	fi

# The status page read by headless Chromium (Debian `chromium`); installed when root.
browser-test: $(STAMP)
	@if [ "$$(id -u)" = "0" ] && ! command -v chromium >/dev/null 2>&1; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "chromium not installed; the test will skip and say why"; \
	fi
	$(PY) -m pytest tests/admin/test_status_page_browser.py

demo: $(STAMP)
	$(PY) -m extrabalance demo

test: $(STAMP) wire-tools
	$(PY) -m pytest

test-all: $(STAMP) wire-tools
	$(PY) -m pytest -m ''

chaos: $(STAMP) wire-tools
	$(PY) -m extrabalance chaos

fuzz: $(STAMP)
	$(PY) -m extrabalance fuzz

soak: $(STAMP) wire-tools
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) -m extrabalance bench codecs

bench-e2e: $(STAMP)
	$(PY) -m extrabalance bench e2e

lint: $(STAMP)
	$(PY) -m pip install --quiet ruff mypy
	$(PY) -m ruff check extrabalance simulators tests bench
	$(PY) -m mypy

# Known vulnerabilities of the installed dependencies, from PyPI's advisories alone;
# tools/dependency_audit.py says what it covers and what it cannot.
audit: $(STAMP)
	$(PY) -m pip install --quiet pip-audit
	$(PY) tools/dependency_audit.py

clean:
	rm -rf .audit-cache $(VENV) build *.egg-info .pytest_cache
