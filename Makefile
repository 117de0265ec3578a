# `make demo` and `make test`: each creates .venv, installs the package and runs.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint docs bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,interop,plot,docs]"
	touch $@

demo: $(STAMP)
	$(PY) -m lowrank.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir $(VENV)/site

test: lint docs
	TRITON_INTERPRET=1 $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/recompose.py

clean:
	rm -rf $(VENV) site .pytest_cache .hypothesis
