# `make demo` and `make test`: each creates .venv, installs the package and runs.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-all lint docs bench bench-gpu gpu-check test-image-torch compile-check \
	compile-check-device clean

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

# One pytest worker per CPU (at most 4), each test file on one worker (its module fixtures
# run once): 1.65x faster than one process on 2 cores. Files go out in the suite's order,
# those marked `long` first (tests/conftest.py), so no worker is left with one at the end.
PYTEST := TRITON_INTERPRET=1 $(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

test: lint docs
	$(PYTEST)

# The same, with the grids marked `exhaustive` too.
test-all: lint docs
	$(PYTEST) -m ""

bench: $(STAMP)
	$(PY) benchmarks/recompose.py
	$(PY) benchmarks/decompose.py
	$(PY) benchmarks/host_overhead.py
	$(PY) benchmarks/launch_overhead.py
	$(PY) benchmarks/swap_drift.py
	$(PY) benchmarks/lora_conv.py

# On a CUDA machine: the compiled-kernel tests, then every benchmark (results/*-cuda.json).
bench-gpu: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -m pytest -q tests/test_lora_linear.py tests/test_lora_dropout.py \
		tests/test_lora_one_pass.py tests/test_lora_expand_first.py tests/test_lora_edges.py
	$(PY) benchmarks/recompose.py
	$(PY) benchmarks/lora_linear.py --resume
	$(PY) benchmarks/plot_lora_linear.py
	$(PY) benchmarks/lora_conv.py

# On a lent GPU, in one call: the compiled-kernel tests and the anchor points within BUDGET_S,
# with the machine's own Python (torch and triton already there); results under RESULTS.
GPU_PY ?= python3
RESULTS ?= benchmarks/results/gpu-check
BUDGET_S ?= 540
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --out "$(RESULTS)" --budget-s $(BUDGET_S)

compile-check: $(STAMP)
	TRITON_INTERPRET=0 $(PY) -W ignore benchmarks/compile_check.py --arch 90 \
		--out benchmarks/results/compile_check-sm90a.json

# The same check with the Triton the GPU image runs (its own venv beside .venv).
DEVICE_TRITON ?= 3.6.0
DEVICE_VENV := .venv-triton$(DEVICE_TRITON)
compile-check-device:
	test -x $(DEVICE_VENV)/bin/python || python3 -m venv $(DEVICE_VENV)
	$(DEVICE_VENV)/bin/python -m pip install -q --disable-pip-version-check "$(TORCH_PIN)" \
		"triton==$(DEVICE_TRITON)" numpy safetensors tqdm
	$(DEVICE_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	TRITON_INTERPRET=0 $(DEVICE_VENV)/bin/python -W ignore benchmarks/compile_check.py \
		--arch 90 --out benchmarks/results/compile_check-sm90a-triton$(DEVICE_TRITON).json

# The kernel tests (interpreter, torch.compile) under the torch and Triton of the GPU image
# (torch 2.11 brings Triton 3.6; PyPI's build of it is the CUDA one, which also runs on CPU).
IMAGE_TORCH ?= torch==2.11.0
IMAGE_VENV := .venv-image
test-image-torch:
	test -x $(IMAGE_VENV)/bin/python || python3 -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q --disable-pip-version-check "$(IMAGE_TORCH)" \
		"numpy<2.4" safetensors pytest hypothesis
	$(IMAGE_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e .
	TRITON_INTERPRET=1 $(IMAGE_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/test_lora_linear.py tests/test_lora_dropout.py tests/test_lora_one_pass.py \
		tests/test_lora_expand_first.py tests/test_lora_compile.py tests/test_lora_transforms.py \
		tests/test_lora_edges.py

clean:
	rm -rf $(VENV) .venv-triton* $(IMAGE_VENV) site .pytest_cache .hypothesis
