# The two commands a newcomer runs: `make demo` and `make test`.
# Both create .venv when it is missing and install the package into it first, with
# the exact tested versions from constraints.txt (pyproject.toml only declares ranges).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -c constraints.txt
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default (digits, ResNet-18); replaces its own previous run.
demo: $(STAMP)
	$(VENV)/bin/edrop-ray prune --out runs/demo --overwrite

# Ray's throwaway test clusters run on 127.0.0.1 without token auth (see tests/conftest.py).
test: $(STAMP)
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check edrop_ray tests benchmarks scripts examples
	$(VENV)/bin/ruff format --check edrop_ray tests benchmarks scripts examples

bench: $(STAMP)
	$(PY) benchmarks/bench_energy.py
	$(PY) benchmarks/bench_run.py
	$(PY) benchmarks/bench_slim.py

clean:
	rm -rf $(VENV) runs .pytest_cache
