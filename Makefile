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

# Runs the product on its embedded default: embedded Redis (or REDIS_URL), one worker (small SAM preset unless
# SAM_PRESET/SAM_CHECKPOINT are set) and the backend on port 9090, until Ctrl-C. The offline method demo is
# `.venv/bin/alignsam demo --out run/demo`.
run: setup
	$(VENV)/bin/alignsam-run

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
