# Two commands: `make demo` and `make test`. Every target creates .venv from the repo's files if missing.
PY := .venv/bin/python
DEMO_DIR ?= runs/demo

.PHONY: demo test repro bench lab-test clean

.venv/stamp: requirements.txt requirements-dev.txt .ci/make_venv.sh .ci/torchvision_cpu_compat.py
	bash .ci/make_venv.sh
	touch $@

venv: .venv/stamp

# Miniature pipeline on CPU (synthetic data): MAE pre-training -> MIM-Refiner -> kNN table, seeds 0 1 2
# (mean +- std), written to $(DEMO_DIR)/README.md; under 10 minutes on 2 cores.
demo: .venv/stamp
	$(PY) miniature/mini_repro.py --preset demo --output-dir $(DEMO_DIR)

# The test suite (CPU, about 10 minutes on 2 cores: two pytest workers, pytest-xdist).
test: .venv/stamp
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests

# The papers' claims in miniature (all methods, seeds 0 1 2, mean +- std, fine-tuning included; about 2 hours on 2 cores). With checkouts
# of the official LUT / ConMIM code at these paths, their rows are added (miniature/official_miniature.py).
OFFICIAL_LUT ?= ../official/lut
OFFICIAL_CONMIM ?= ../official/ConMIM
repro: .venv/stamp
	$(PY) miniature/mini_repro.py --preset full --output-dir results --official-lut $(OFFICIAL_LUT) \
		--official-conmim $(OFFICIAL_CONMIM)

# Our ViT against timm's, forward + backward images/s (benchmarks/: also bench_train.py, gpu_check.py, mem_plan.py).
bench: .venv/stamp
	$(PY) benchmarks/bench_vit.py

# The tests of the one-off diagnosis scripts in lab/ (not part of `make test`).
lab-test: .venv/stamp
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 lab

clean:
	rm -rf runs .pytest_cache
