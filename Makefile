# Two commands do all set-up on a fresh machine with Python 3.11:
#   make demo   - create .venv, install the pinned requirements, run the embedded demo
#   make test   - same set-up (reusing .venv), then the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-requirements
PY := $(VENV)/bin/python

.PHONY: setup demo test bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) run_pipeline.py --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
