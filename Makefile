# Every target sets up .venv itself (scripts/setup-venv.sh; a second run skips it).
.PHONY: demo test test-fast bench lint format setup clean

VENV ?= .venv
PY := $(VENV)/bin/python

setup:
	@./scripts/setup-venv.sh

demo: setup
	$(VENV)/bin/tdiag demo

test: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q

test-fast: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -m "not slow and not browser"

bench: setup
	$(PY) bench/bench_reference.py
	$(PY) bench/bench_check.py
	$(PY) bench/bench_monitor.py
	$(PY) bench/bench_report.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
