# Two set-up commands (README): `make bench` runs the main job, `make test` runs the tests.
# Each creates .venv on first use and installs what it needs; nothing is installed by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q --disable-pip-version-check

$(VENV)/.installed-%: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# prefer the CPU build of torch that ships on this machine kind; fall back to the index
	$(PY) -c "import torch" 2>/dev/null || $(PIP) "torch==2.13.0" || $(PIP) "torch>=2.6"
	$(PIP) -e ".[$*]"
	touch $@

.PHONY: test bench list readme
test: $(VENV)/.installed-test
	$(PY) -m pytest -q tests

bench: $(VENV)/.installed-bench,eval
	$(VENV)/bin/attnkit bench --quick

list: $(VENV)/.installed-test
	$(VENV)/bin/attnkit list

# regenerate the README's capability table from the registry
readme: $(VENV)/.installed-test
	$(PY) scripts/update_readme.py
