# The two commands of the README: `make run` starts the system, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run stop status test bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

# run/stop/status: the whole process group in the background (app/supervision/local_run.py, docs/operations.md).
run: install
	VENV=$(VENV) bin/pipeline start

stop:
	VENV=$(VENV) bin/pipeline stop

# `bin/pipeline status` exits 3 when the group is not running: an answer, not a failure of make.
status:
	@VENV=$(VENV) bin/pipeline status || [ $$? -eq 3 ]

# PYTEST_ARGS: more options for pytest (CI passes --durations to name the slowest tests).
test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)
