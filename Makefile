# Two entry points for people (see README): `make run` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup run test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Runs the product on its embedded default (small SAM preset, bundled sample image).
run: setup
	$(VENV)/bin/alignsam demo --out run/demo

# The whole suite, slow / integration / e2e markers included (that is what CI runs).
test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not integration and not e2e"

lint: setup
	$(PY) -m ruff check .

bench: setup
	$(PY) -m benchmarks.bench_perception

clean:
	rm -rf $(VENV) run .pytest_cache .ruff_cache
