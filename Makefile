# inferswarm — the two commands: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test bench clean

# Install once into .venv; re-run when the dependencies change.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The whole stack on this machine (embedded PostgreSQL, DHT bootstrap, services).
run: install
	$(BIN)/inferswarm up

# Every test, against real PostgreSQL, ZeroMQ and DHT nodes started by the tests.
test: install
	$(BIN)/python -m pytest

# Benchmarks print their figures and end with one line of JSON each.
bench: install
	$(BIN)/python bench/rpc.py
	$(BIN)/python bench/dht.py

clean:
	rm -rf $(VENV) .data
