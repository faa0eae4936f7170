# Entry points for people (see README): `make run`, `make test`, and `make demo` for a first look.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup run demo test test-fast lint bench clean

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

# The fastest way to see the product: `make run` plus a Label Studio 1.23.2 on 127.0.0.1:8080 (installed into
# .venv-ls on first use, data in run/label-studio) with a demo project connected to the backend; prints the URL,
# user and password, until Ctrl-C.
demo: setup
	$(VENV)/bin/alignsam-run --with-label-studio

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
	rm -rf $(VENV) .venv-ls run .pytest_cache .ruff_cache
