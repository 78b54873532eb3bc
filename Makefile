# oribus — developer entry points. Every target creates/uses .venv itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast test-typescript typescript-deps crash lint layers bench bench-full bench-deps soak spec system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev,otel,mcp,verify,testing]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/oribus demo

# Installs the Debian packages named in the shell variable $missing, without the packages they
# only recommend, and says so in one line; apt's output is shown only if it fails.
APT_INSTALL = \
	if [ -z "$$missing" ]; then echo "system packages present: $(1)"; exit 0; fi; \
	echo "installing$$missing ..."; log=$$(mktemp); \
	if (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing) >$$log 2>&1; then \
		rm -f $$log; echo "installed:$$missing"; \
	else cat $$log; rm -f $$log; echo "apt-get install$$missing failed"; exit 1; fi

# Debian packages the tests drive for real: etcd (cluster mode), headless Chromium
# (the dashboard's browser test) and the SPIN model checker (the protocol model).
system-deps:
	@missing=""; \
	command -v etcd >/dev/null || missing="$$missing etcd-server"; \
	command -v spin >/dev/null || missing="$$missing spin"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	$(call APT_INSTALL,etcd spin chromium chromedriver)

# The suite runs on TEST_WORKERS pytest-xdist workers (default 2, the cores of the smallest
# machine it runs on), a test file at a time per worker: most tests wait on processes they
# start, and the longest files (the crash sweep, the protocol model) then run side by side.
# The 30 longest tests are listed at the end: what to look at when the suite grows slow.
TEST_WORKERS ?= 2
test: $(STAMP) system-deps typescript-deps
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile --durations=30 tests

# The TypeScript SDK (clients/typescript) needs Node 20+ and npm; its locked dev dependencies
# (TypeScript) are installed when node_modules is missing. The suite runs its tests
# (tests/e2e/test_typescript_sdk.py: build, then npm test); test-typescript runs them alone.
TS_DIR := clients/typescript
typescript-deps:
	@if ! command -v npm >/dev/null; then echo "npm not found: the TypeScript SDK's tests will be skipped"; \
	elif [ -d $(TS_DIR)/node_modules ]; then echo "TypeScript SDK dependencies present"; \
	else cd $(TS_DIR) && npm ci --no-audit --no-fund; fi

test-typescript: $(STAMP) typescript-deps
	cd $(TS_DIR) && npm run build && ORIBUS_BIN=$(CURDIR)/$(VENV)/bin/oribus npm test

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m 'not slow' tests

# The crash tests alone (SIGKILL at every failpoint of the WAL, the commit protocol, snapshots,
# the history store and replication, then recovery checked), one process: the sweep's progress
# lines show while it runs.
crash: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests/crash

# Long fault-injection runs: SOAK_SEEDS seeds of the deterministic simulation, as many with
# replica groups of 3 (a quarter with groups of 5: oribus.sim.group), then the
# nemesis tests against an etcd cluster of real processes
# for SOAK_SECONDS each (default 30 minutes), histories checked by oribus check.
SOAK_SECONDS ?= 1800
SOAK_SEEDS ?= 300
soak: $(STAMP) system-deps
	$(PY) -m oribus.sim --seeds $(SOAK_SEEDS) --duration 4
	$(PY) -m oribus.sim --seeds $(SOAK_SEEDS) --duration 4 --replicas 3
	$(PY) -m oribus.sim --seeds $$(( $(SOAK_SEEDS) / 2 + 1 )) --duration 4 --replicas 3 --history-store lmdb
	$(PY) -m oribus.sim --seeds $$(( $(SOAK_SEEDS) / 4 + 1 )) --duration 4 --replicas 5
	ORIBUS_NEMESIS_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -q -s -p no:cacheprovider -o timeout=0 tests/e2e/test_nemesis.py

# The commit protocol model (specs/PROTOCOL.md): SPIN verifies specs/model/oribus.pml
# exhaustively and must find a counterexample in every specs/model/broken_*.pml.
spec:
	@missing=""; command -v spin >/dev/null || missing=" spin"; \
	$(call APT_INSTALL,spin)
	$(PYTHON) specs/model/check.py --cycles

# ruff, then mypy over oribus ([tool.mypy] in pyproject.toml: no error allowed), then the
# import layering (no client module imports the server, no shard the bus).
lint: $(STAMP)
	$(VENV)/bin/ruff check oribus tests benchmarks
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -p no:cacheprovider tests/unit/test_layering.py

# The import graph by package, bottom-up, with any cycle or upward import.
layers: $(STAMP)
	$(PY) tests/unit/test_layering.py

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q -e '.[bench]'
	touch $(BENCH_STAMP)

# The peers benchmarks/compare.py starts itself from Debian packages (Redis 7, PostgreSQL 15,
# etcd 3.4), installed here when missing -- only here, `make test` never needs them.
# Then oribus's own benchmarks, and the comparison's --quick preset (results in
# benchmarks/results/<UTC time>/; `make bench-full` or `oribus bench` runs the full one, about
# an hour: run it on a quiet machine).
bench: $(BENCH_STAMP) bench-deps
	$(PY) benchmarks/agent_step.py
	$(PY) benchmarks/agent_step_network.py
	$(PY) benchmarks/agent_step_http.py
	$(PY) benchmarks/recovery.py
	$(PY) benchmarks/delivery_log_memory.py
	$(PY) benchmarks/compare.py --quick

bench-full: $(BENCH_STAMP) bench-deps
	$(PY) benchmarks/recovery.py
	$(PY) benchmarks/delivery_log_memory.py
	$(PY) benchmarks/compare.py

bench-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	[ -x /usr/lib/postgresql/15/bin/postgres ] || missing="$$missing postgresql"; \
	command -v etcd >/dev/null || missing="$$missing etcd-server"; \
	$(call APT_INSTALL,redis-server postgresql etcd)

clean:
	rm -rf $(VENV) oribus-data .pytest_cache .hypothesis
