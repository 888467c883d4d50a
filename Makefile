# Two commands do everything on a fresh machine with Python 3.11:
#   make demo   - create .venv, install the locked versions, run the demo
#   make test   - create .venv, install the locked versions, lint (make lint), run the whole test suite
# Both install exactly requirements/test.lock (see README, "Tested versions").
PYTHON ?= $(shell command -v python3.11 2>/dev/null || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements/test.lock
# torch for the environments built from ranges (lock, test-latest, test-versions): the CPU wheel
# 2.13.0 lies on disk here; a newer torch from the registry is a CUDA build of several GB.
TORCH ?= 2.13.0
# pytest-xdist workers: one per core, each with one compute thread (two torch processes with a
# thread per core each slow each other down many times over on 2 cores).
JOBS ?= auto
PYTEST_ARGS ?=
# $(call pytest,VENV) runs the suite with VENV's Python.
pytest = OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 $(1)/bin/python -m pytest -n $(JOBS) $(PYTEST_ARGS)

.PHONY: demo lint test test-fast test-latest test-versions lock bench-compile fuzz gpu-deps clean

# The lock installs with --no-deps: what it lists is what the venv gets, nothing resolved anew.
# pip and setuptools are pinned too (the editable install builds without isolation).
$(STAMP): pyproject.toml $(LOCK) requirements/data.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $$(grep -E '^(pip|setuptools)==' $(LOCK))
	$(BIN)/python -m pip install --quiet --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python tools/requirements.py check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# ruff's rules are in pyproject.toml ([tool.ruff]); `make test` runs them first.
lint: $(STAMP)
	$(BIN)/ruff check hscompile tests benchmarks examples tools

test: $(STAMP) lint
	$(call pytest,$(VENV))

# Everything but the tests that compile with Inductor.
test-fast: $(STAMP)
	$(call pytest,$(VENV)) -m "not inductor"

# The newest release of every dependency the registry offers (torch: $(TORCH)), ignoring the
# lock and the upper bounds in pyproject.toml: breakage by a new release shows up here first.
test-latest:
	rm -rf .venv-latest
	$(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install --quiet --upgrade pip setuptools
	.venv-latest/bin/python -m pip install --quiet torch==$(TORCH)
	.venv-latest/bin/python -m pip install --quiet --upgrade $$(.venv-latest/bin/python tools/requirements.py latest)
	.venv-latest/bin/python -m pip install --quiet --no-deps --upgrade $$(.venv-latest/bin/python tools/requirements.py data)
	.venv-latest/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	.venv-latest/bin/python -m pip list | grep -iE '^(torch|transformers|pytest|hypothesis) '
	$(call pytest,.venv-latest)

# One point of the tested range: make test-versions TORCH=2.11.0 TRANSFORMERS=5.17.0
# (torch other than 2.13.0 comes from the registry as a CUDA build of several GB).
TRANSFORMERS ?= 5.17.0
VERSIONS_VENV := .venv-torch$(TORCH)-transformers$(TRANSFORMERS)
test-versions:
	test -x $(VERSIONS_VENV)/bin/python || $(PYTHON) -m venv $(VERSIONS_VENV)
	$(VERSIONS_VENV)/bin/python -m pip install --quiet $$(grep -E '^pip==' $(LOCK))
	# setuptools as the chosen torch allows (2.11 wants < 82), new enough for the build (>= 77)
	$(VERSIONS_VENV)/bin/python -m pip install --quiet torch==$(TORCH) transformers==$(TRANSFORMERS) 'setuptools>=77'
	$(VERSIONS_VENV)/bin/python -m pip install --quiet --no-build-isolation -e '.[test]' \
		torch==$(TORCH) transformers==$(TRANSFORMERS) 'setuptools>=77'
	$(VERSIONS_VENV)/bin/python -m pip install --quiet --no-deps $$($(VERSIONS_VENV)/bin/python tools/requirements.py data)
	$(VERSIONS_VENV)/bin/python -m pip list | grep -iE '^(torch|transformers) '
	$(call pytest,$(VERSIONS_VENV))

# Regenerate requirements/test.lock from the ranges in pyproject.toml (the newest releases they
# admit, torch $(TORCH)); run `make test` on the result before committing it.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip setuptools
	.venv-lock/bin/python -m pip install --quiet torch==$(TORCH)
	.venv-lock/bin/python -m pip install --quiet --no-build-isolation -e '.[test]'
	.venv-lock/bin/python -m pip install --quiet --no-deps $$(.venv-lock/bin/python tools/requirements.py data)
	.venv-lock/bin/python tools/requirements.py freeze > $(LOCK)
	rm -rf .venv-lock
	@echo "wrote $(LOCK)"

bench-compile: $(STAMP)
	$(BIN)/python benchmarks/compile_time.py

# N drawn cases of greedy generation against transformers' (tests/fuzzing.py, as tests/e2e/test_fuzz.py
# draws them, seed FUZZ_SEED); writes benchmarks/results/fuzz.{json,md}: counts, and a replay line per failure.
N ?= 200
FUZZ_SEED ?= 0
fuzz: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/fuzz.py --n $(N) --seed $(FUZZ_SEED)

# What the GPU machine lacks (it has torch and transformers, no registry): the pure-Python
# dependencies at their locked versions, in .gpu-deps/ for benchmarks/gpu_check.sh to carry.
GPU_DEPS := networkx rich pygments markdown-it-py mdurl pytest pluggy iniconfig packaging
gpu-deps: $(STAMP)
	rm -rf .gpu-deps
	$(BIN)/python -m pip install --quiet --no-deps --target .gpu-deps \
		$$(for p in $(GPU_DEPS); do grep -iE "^$$p==" $(LOCK); done)

clean:
	rm -rf $(VENV) .venv-latest .venv-lock .venv-torch* .gpu-deps build *.egg-info .pytest_cache
