# oribus — developer entry points. Every target creates/uses .venv itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast crash lint bench system-deps clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/oribus demo

# Debian packages the tests drive for real: etcd (cluster mode) and headless Chromium
# (the dashboard's browser test).
system-deps:
	@missing=""; \
	command -v etcd >/dev/null || missing="$$missing etcd-server"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
		echo "installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

test: $(STAMP) system-deps
	$(PY) -m pytest -q -p no:cacheprovider tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -x -m 'not slow' tests

lint: $(STAMP)
	$(VENV)/bin/ruff check oribus tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/agent_step.py
	$(PY) benchmarks/agent_step_network.py
	$(PY) benchmarks/agent_step_http.py
	$(PY) benchmarks/recovery.py
	$(PY) benchmarks/delivery_log_memory.py

clean:
	rm -rf $(VENV) oribus-data .pytest_cache .hypothesis
