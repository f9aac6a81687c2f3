# The two commands of the README: `make run` starts the system, `make test` runs the tests.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install run stop test bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

run: install
	$(PY) -m app.apid

test: install
	$(PY) -m pytest -q
