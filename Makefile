# convai-gateway: every command a developer or CI needs. Python tooling lives in .venv.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install system-deps web-deps dev test check lint format typecheck deploy-check bench bench-instructions profile clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The web example's packages (playwright-core, @elevenlabs/client) for the browser test, when npm exists.
WEB := deploy/examples/web
$(WEB)/node_modules/.package-lock.json: $(WEB)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then cd $(WEB) && npm ci --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the web example's browser test will not run (apt-get install nodejs npm)"; fi

install: $(STAMP)

# redis-server, redis-cli, Chromium and Node/npm from Debian's packages when missing (root), else what to run.
system-deps:
	bash .ci/system-deps

web-deps: $(WEB)/node_modules/.package-lock.json

dev: install
	$(VENV)/bin/convai-gateway dev

test: install system-deps web-deps
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: install
	$(VENV)/bin/mypy

deploy-check: install
	bash deploy/check.sh

check: lint typecheck deploy-check test

# The perf tools take their options through ARGS: make bench ARGS="--levers skeleton".
ARGS ?=

bench: install
	$(PY) -m tests.perf.bench $(ARGS)

bench-instructions: install
	$(PY) -m tests.perf.instructions $(ARGS)

profile: install
	$(PY) -m tests.perf.profile $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build dist
