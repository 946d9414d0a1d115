# Two commands set everything up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: venv demo test test-slow lint bench

venv: $(VENV)/.installed

# torch and torchvision are pinned here (they lie on this machine's disk); pyproject keeps them open upward.
$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

demo: venv
	$(PY) -m readout.demo

lint: venv
	$(VENV)/bin/ruff check readout tests
	$(VENV)/bin/ruff format --check readout tests
	$(VENV)/bin/mypy readout

test: lint
	$(VENV)/bin/pytest -q -p no:cacheprovider

test-slow: venv
	$(VENV)/bin/pytest -q -m slow
