# Set-up is part of every target: a fresh clone needs only `make test` or `make demo`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo setup clean

setup: $(STAMP)

# pip byte-compiles one file at a time: it installs without, and compileall compiles on every core,
# leaving out the packages' own test suites (set-up half a minute shorter on two cores)
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile $(TORCH)
	$(PY) -m pip install -q --no-compile -e ".[test]"
	$(PY) -m compileall -q -j 0 -x '/(tests?|testing/_internal)/' $(VENV)/lib \
	  || echo "compileall: the files above are compiled when imported instead (pip skips them too)"
	touch $(STAMP)

# the linter and the formatter's check first (pyproject.toml [tool.ruff]): a second, then the suite
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/carvana run pipelines/demo.yaml

clean:
	rm -rf $(VENV) outputs/demo data/sample
