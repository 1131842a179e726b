# Everything runs from a local virtual environment that `make` creates and keeps up to date.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint proto proto-check bench clean

$(STAMP): pyproject.toml clients/python/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e clients/python -e '.[dev]'
	touch $@

install: $(STAMP)

## Serve on 127.0.0.1:50051; embedded PostgreSQL in .data/ unless TWOFACTOR_DATABASE_URL is set.
run: install
	$(VENV)/bin/twofactor serve

## The whole suite against a real server and a real PostgreSQL.
test: install
	$(PY) -m pytest

proto: install
	$(PY) scripts/generate_protos.py

proto-check: install
	$(PY) scripts/generate_protos.py --check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
