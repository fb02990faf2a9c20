# `make demo` and `make test` work on a fresh machine with Python 3.11: they create
# .venv if it is missing and install the pinned requirements into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.installed-runtime
DEV := $(VENV)/.installed-dev

.PHONY: demo test test-slow lint docs install install-dev bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# runtime only (no TensorFlow): what the demo and the library need
$(RUNTIME): $(PY) requirements.txt pyproject.toml
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# tests, notebooks and the optional TFDS extra
$(DEV): $(RUNTIME) requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(RUNTIME)
install-dev: $(DEV)

demo: $(RUNTIME)
	$(PY) -m retrieval_jax.demo --out results/demo

lint: $(DEV)
	$(VENV)/bin/ruff check .

# the suite without the end-to-end runs (tests marked slow: experiments/ scripts, notebooks,
# several processes, bench --quick), then those alone; CI runs both
# (tests/conftest.py starts the longest files first)
PYTEST := RETRIEVAL_JAX_NO_PROGRESS=1 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: $(DEV)
	$(PYTEST) -m "not slow" tests

test-slow: $(DEV)
	$(PYTEST) -m slow tests

# the documentation (docs/, mkdocs.yml; API reference from the docstrings): any warning fails
docs: $(DEV)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict -d results/site

bench: $(RUNTIME)
	$(PY) -m experiments.bench_diffusion --coil20

clean:
	rm -rf $(VENV) results .pytest_cache
