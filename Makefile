# `make demo` and `make test`: each creates .venv, installs the package and runs.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint docs bench bench-gpu compile-check compile-check-device clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_PIN)"
	$(PY) -m pip install -q --disable-pip-version-check -e ".[test,interop,plot,docs,demo]"
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
	$(PY) benchmarks/decompose.py
	$(PY) benchmarks/host_overhead.py
	$(PY) benchmarks/swap_drift.py
	$(PY) benchmarks/lora_conv.py

# On a CUDA machine: the compiled-kernel tests, then every benchmark (results/*-cuda.json).
bench-gpu: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m pytest -q tests/test_lora_linear.py tests/test_lora_dropout.py
	$(PY) benchmarks/recompose.py
	$(PY) benchmarks/lora_linear.py --resume
	$(PY) benchmarks/plot_lora_linear.py
	$(PY) benchmarks/lora_conv.py

compile-check: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -W ignore -m lowrank.kernels.compile_check --arch 90 \
		--out benchmarks/results/compile_check-sm90a.json

# The same check with the Triton the GPU image runs (its own venv beside .venv).
DEVICE_TRITON ?= 3.6.0
DEVICE_VENV := .venv-triton$(DEVICE_TRITON)
compile-check-device:
	test -x $(DEVICE_VENV)/bin/python || python3 -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q --disable-pip-version-check "$(TORCH_PIN)" \
		"triton==$(DEVICE_TRITON)" numpy
	$(DEVICE_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	TRITON_INTERPRET=0 $(DEVICE_VENV)/bin/python -W ignore -m lowrank.kernels.compile_check \
		--arch 90 --out benchmarks/results/compile_check-sm90a-triton$(DEVICE_TRITON).json

clean:
	rm -rf $(VENV) .venv-triton* site .pytest_cache .hypothesis
