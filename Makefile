# Two commands: `make demo` and `make test`. Both create .venv from the repo's files if missing.
PY := .venv/bin/python
PIP := .venv/bin/pip
DEMO_DIR ?= runs/demo

.PHONY: demo test repro bench clean

.venv/stamp: requirements.txt requirements-dev.txt
	python3 -m venv .venv
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	touch $@

venv: .venv/stamp

# Miniature pipeline on CPU (synthetic data): MAE pre-training -> methods -> kNN table.
demo: .venv/stamp
	$(PY) benchmarks/mini_repro.py --preset demo --output-dir $(DEMO_DIR)

# The test suite (CPU, about 8 minutes on 2 cores).
test: .venv/stamp
	$(PY) -m pytest -q tests

# The papers' claims in miniature (all methods; 23 minutes on 2 cores).
repro: .venv/stamp
	$(PY) benchmarks/mini_repro.py --preset full --output-dir results

bench: .venv/stamp
	$(PY) benchmarks/bench_vit.py

clean:
	rm -rf runs .pytest_cache
