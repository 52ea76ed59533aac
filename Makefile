# Two commands from a fresh clone: `make run` starts a node, `make test` runs lint + tests.
VENV := .venv
ARGS ?=

.PHONY: setup run test test-quick lint bench proto

setup:
	@scripts/bootstrap.sh

run: setup
	$(VENV)/bin/exo run $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy exo_core
	$(VENV)/bin/pytest tests plugins

test-quick: setup
	$(VENV)/bin/pytest tests plugins -m 'not heavy and not manual'

proto: setup
	$(VENV)/bin/python -m exo_core.networking.proto_gen
