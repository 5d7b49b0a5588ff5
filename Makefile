# blockd: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test test-unit deps venv bench clean

demo: deps venv
	$(PY) -m blockd demo

test: deps venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

deps:
	@bash scripts/deps.sh

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $@

bench: deps venv
	$(PY) bench/compile.py
	$(PY) bench/kernel.py
	$(PY) bench/dns.py
	$(PY) bench/rpz_fleet.py
	$(PY) bench/scaleout.py
	$(PY) bench/scale.py
	$(PY) bench/memory.py
	$(PY) bench/pass_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
