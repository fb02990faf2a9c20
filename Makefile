# `make demo` and `make test` work on a fresh machine with Python 3.11: they create
# .venv if it is missing and install the pinned requirements into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m retrieval_jax.demo --out results/demo

test: $(STAMP)
	RETRIEVAL_JAX_NO_PROGRESS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

clean:
	rm -rf $(VENV) results .pytest_cache
