# convai-gateway: every command a developer or CI needs. Python tooling lives in .venv.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install dev test check lint format typecheck deploy-check bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall whenever pyproject.toml changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

dev: install
	$(VENV)/bin/convai-gateway dev

test: install
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

bench: install
	$(PY) -m tests.perf.bench

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache build dist
