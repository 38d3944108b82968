# Two entry points (see README): `make run` sets up and trains the default run; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup run test
setup: $(VENV)/.installed

# constraints.txt pins the tested torch build, so pip never drifts to a newer multi-GB one.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --constraint constraints.txt --editable ".[dev,slurm]"
	touch $@

run: setup
	$(BIN)/grokinterp train

test: setup
	$(BIN)/python -m pytest
