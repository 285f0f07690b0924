# Extra Balance — developer entry points. `make demo` and `make test` are the two
# commands a newcomer needs; the rest are the longer runs the docs describe.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

HOUR_CHECKS ?= tests/bench/test_e2e_short.py
# `make test` runs the suite on this many pytest-xdist workers, one test file per worker
# at a time (`--dist loadfile`: a file's module fixtures are set up once). The suite
# mostly waits (nodes starting, brokers restarting, timers), so more workers than cores
# pay; TEST_WORKERS=0 runs it in one process, as plain `pytest` does.
TEST_WORKERS ?= 4
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

.PHONY: demo demo-cluster test test-hours test-all wire-tools browser-test chaos chaos-cluster fuzz soak bench bench-e2e bench-cluster mutate mutation lint audit clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

# Debian packages the tests use when present: Mosquitto (broker restart tests), tshark
# (wire conformance) and faketime (the suite at a chosen hour). Installed only when we
# are root and they are missing.
wire-tools:
	@if [ "$$(id -u)" = "0" ]; then \
	  missing=""; \
	  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing="$$missing mosquitto"; \
	  command -v tshark >/dev/null 2>&1 || missing="$$missing tshark"; \
	  command -v faketime >/dev/null 2>&1 || missing="$$missing faketime"; \
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

# Two nodes on one PostgreSQL ledger ($$EB_DEMO_PG_URL, default the local server): one
# is killed mid-dialog and the other finishes the story (docs/scale-out.md).
demo-cluster: $(STAMP)
	$(PY) -m extrabalance demo --nodes 2

test: $(STAMP) wire-tools
	$(PY) -m pytest $(XDIST)
	@$(MAKE) --no-print-directory test-hours

# The checks whose outcome depends on the hour (ads' quiet hours 22:00-08:00 in the
# shipped [node].timezone) again with the whole process clock at 23:30 and at 12:00
# Cairo time (Debian `faketime`): the tests set the node's own clock, so they pass at
# any hour the machine says. Both hours run at once (each run has its own ports, broker
# and ledger); the output of each hour is shown when both have ended.
test-hours: $(STAMP)
	@if ! command -v faketime >/dev/null 2>&1; then \
	  echo "test-hours: skipped: faketime is not installed (apt-get install faketime)"; \
	else \
	  day=$$(TZ=Africa/Cairo date +%F); out=$$(mktemp -d); pids=""; \
	  for hm in 23:30 12:00; do \
	    at=$$(date -u -d "TZ=\"Africa/Cairo\" $$day $$hm" "+%F %T"); \
	    log="$$out/$${hm%:*}.log"; \
	    echo "test-hours: $(HOUR_CHECKS) at $$hm Africa/Cairo ($$at UTC)" > "$$log"; \
	    TZ=UTC faketime -f "@$$at" $(PY) -m pytest -q -p no:cacheprovider $(HOUR_CHECKS) \
	      >> "$$log" 2>&1 & \
	    pids="$$pids $$!"; \
	  done; \
	  status=0; for pid in $$pids; do wait $$pid || status=1; done; \
	  cat "$$out"/*.log; rm -rf "$$out"; exit $$status; \
	fi

test-all: $(STAMP) wire-tools
	$(PY) -m pytest -m ''

chaos: $(STAMP) wire-tools
	$(PY) -m extrabalance chaos

# Two nodes on one PostgreSQL ledger, a cluster of the run's own (initdb/pg_ctl on a
# free loopback port): node 2 killed again and again, then for good; PostgreSQL stopped
# fast and crashed once each; node 1 carries on (docs/scale-out.md). The PostgreSQL
# restart test on its own: tests/reliability/test_postgres_restart.py (default suite).
chaos-cluster: $(STAMP) wire-tools
	$(PY) -m extrabalance chaos --nodes 2 --storage postgresql

fuzz: $(STAMP)
	$(PY) -m extrabalance fuzz

soak: $(STAMP) wire-tools
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) -m extrabalance bench codecs

bench-e2e: $(STAMP)
	$(PY) -m extrabalance bench e2e

# One node, then two, on one PostgreSQL ledger ($$EB_BENCH_PG_DSN, default the local
# server; each run a schema of its own, dropped after): docs/scale-out.md.
bench-cluster: $(STAMP) wire-tools
	for n in 1 2; do $(PY) -m extrabalance bench e2e --nodes $$n --storage postgresql \
		--max --duration 20 --subscribers 20000 --json || exit 1; done

# Mutation run over core/ and the ledger's money functions (docs/reliability.md,
# "Mutation testing"): a long run of its own, not part of `make test`. Cached in
# var/mutation/; MUTATE_ARGS="--jobs 1 --keep-killed" for a quicker re-run.
mutate: $(STAMP)
	nice -n 10 $(PY) -m bench.mutation --min-score 95 $(MUTATE_ARGS)

mutation: mutate

lint: $(STAMP)
	$(PY) -m pip install --quiet -e '.[lint]'
	$(PY) -m ruff check extrabalance simulators tests bench
	$(PY) -m mypy

# Known vulnerabilities of the installed dependencies, from PyPI's advisories alone;
# tools/dependency_audit.py says what it covers and what it cannot.
audit: $(STAMP)
	$(PY) -m pip install --quiet pip-audit
	$(PY) tools/dependency_audit.py

clean:
	rm -rf .audit-cache $(VENV) build *.egg-info .pytest_cache
