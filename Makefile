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

# ---- benchmarks (tests/benchmarks, pytest-benchmark; not part of `make test`) ----------------------
BENCH_DEPS ?= results/.bench-deps
BENCH_ARGS ?=
NIGHTLY    ?= results/nightly
ACCURACY_BASELINE ?= tests/benchmarks/baseline/mini-runs.csv
LAST_NIGHT  ?= .benchmarks/mini-runs.csv
BENCH_ENV   = PYTHONPATH=$(BENCH_DEPS) OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1}
BENCH_RUN   = $(BENCH_ENV) $(PY) -m pytest tests/benchmarks --benchmark-enable

$(BENCH_DEPS)/.installed:  # torchdistill for the peer benchmark, outside the venv (not a runtime dependency)
	$(PY) -m pip install -q --no-deps --target $(BENCH_DEPS) torchdistill==1.1.5 && touch $@ \
	  || echo "torchdistill 1.1.5 could not be installed: the peer benchmark will be skipped"

bench: setup $(BENCH_DEPS)/.installed  ## speed benchmarks only: throughput, harness overhead, peer, shared teacher
	$(BENCH_RUN) $(BENCH_ARGS)

# accuracy: `bench compare` of tonight's mini runs against $(ACCURACY_BASELINE) if committed, else against the last
# nightly's that passed ($(LAST_NIGHT)); speed: a median >10 % slower than the last saved run is re-measured once
nightly: setup $(BENCH_DEPS)/.installed  ## mini suite + all benchmarks vs the last run saved in .benchmarks/ -> $(NIGHTLY)/report.md
	rm -rf $(NIGHTLY) && mkdir -p $(NIGHTLY)
	OMP_NUM_THREADS=1 $(PY) -m bench run mini --results $(NIGHTLY)/mini --no-progress > $(NIGHTLY)/mini.log 2>&1; mini=$$?; \
	baseline=$(ACCURACY_BASELINE); [ -f $$baseline ] || baseline=$(LAST_NIGHT); accuracy=0; \
	if [ -f $$baseline ]; then $(PY) -m bench compare $$baseline $(NIGHTLY)/mini/mini/runs.csv \
	  --json $(NIGHTLY)/accuracy.json > $(NIGHTLY)/accuracy.md 2>&1; accuracy=$$?; \
	else echo "no accuracy baseline yet ($(ACCURACY_BASELINE) or $(LAST_NIGHT)): tonight's runs become it" \
	  > $(NIGHTLY)/accuracy.md; fi; \
	if [ $$mini -eq 0 ] && [ $$accuracy -eq 0 ]; then mkdir -p $(dir $(LAST_NIGHT)) && \
	  cp $(NIGHTLY)/mini/mini/runs.csv $(LAST_NIGHT); fi; \
	compare=; if ls .benchmarks/*/*.json >/dev/null 2>&1; then compare="--benchmark-compare"; fi; \
	$(BENCH_RUN) --benchmark-autosave $$compare --benchmark-json=$(NIGHTLY)/benchmarks.json $(BENCH_ARGS); status=$$?; \
	$(BENCH_ENV) $(PY) -m tests.benchmarks.regressions --json $(NIGHTLY)/benchmarks.json --out $(NIGHTLY)/speed.json; speed=$$?; \
	$(PY) -m tests.benchmarks.report --json $(NIGHTLY)/benchmarks.json --accuracy $(NIGHTLY)/accuracy.json \
	  --speed $(NIGHTLY)/speed.json --out $(NIGHTLY)/report.md --status $$status; \
	if [ $$mini -ne 0 ]; then echo "the mini suite failed: $(NIGHTLY)/mini.log"; exit 1; fi; \
	if [ $$accuracy -ne 0 ]; then echo "accuracy regressed or could not be compared: $(NIGHTLY)/accuracy.md"; exit 1; fi; \
	if [ $$speed -ne 0 ]; then echo "a benchmark was slower twice in a row: $(NIGHTLY)/report.md"; exit 1; fi; \
	exit $$status

clean:  ## remove run outputs (keeps .venv)
	rm -rf results/*/ results/mlflow.db results/mlartifacts
