# kdbench — the two commands a user needs: `make reproduce-tables` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY      = $(VENV)/bin/python
SUITE  ?= mini
ARGS   ?=

.PHONY: setup reproduce-tables test bench nightly clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

setup: $(VENV)/.installed  ## create .venv with the pinned dependencies

reproduce-tables: setup  ## run SUITE (default mini) and write results/$(SUITE)/{runs.csv,tables.md,convergence.png}
	$(PY) -m bench run $(SUITE) $(ARGS)

test: setup  ## the test suite (what CI runs)
	$(PY) -m pytest tests

clean:  ## remove run outputs (keeps .venv)
	rm -rf results/*/ results/mlflow.db results/mlartifacts
