# Two commands set everything up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= postroom.toml

.PHONY: run test lint typecheck pytest bench clean

$(BIN)/postroom: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test-extras: $(BIN)/postroom
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

# Dev run: config ./postroom.toml, data ./var, SMTP 127.0.0.1:2525, API 127.0.0.1:8025;
# --dev accepts mail from sending domains that were never added (policy.allow_unconfigured_domains).
run: $(BIN)/postroom
	$(BIN)/postroom --config $(CONFIG) init --dev --data-dir var
	$(BIN)/postroom --config $(CONFIG) serve

lint: $(VENV)/.test-extras
	$(BIN)/ruff check relay api store config tests bench

typecheck: $(VENV)/.test-extras
	$(BIN)/mypy

# One pytest process per core (`-n auto`); `make test PYTEST_WORKERS=0` runs the suite in one.
PYTEST_WORKERS ?= auto

# The suite starts hundreds of Python processes (workers, the CLI, `postroom serve`): compile the
# sources once, so that none compiles them again where PYTHONDONTWRITEBYTECODE is set.
pytest: $(VENV)/.test-extras
	$(BIN)/python -m compileall -q relay api store config tests
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS)

test: lint typecheck pytest

bench: $(BIN)/postroom
	$(BIN)/python bench/accept_http.py
	$(BIN)/python bench/accept_smtp.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
