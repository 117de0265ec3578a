"""Test set-up: Triton runs in its interpreter on CPU, hypothesis has bounded profiles, and
the objects collection and earlier modules made are frozen out of the garbage collector's
reach (`gc.freeze`), so that its passes and lowrank's search for tied weights cover what
each module's tests make.

`TRITON_INTERPRET=1` must be set before `triton` is first imported, so it is set here,
at the top of the first module pytest loads.
"""

import gc
import json
import logging
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist each worker gets its share of the cores for torch's (and BLAS') threads:
# two workers on two cores with two threads each spin against each other (test_decompose.py
# alone took 7x longer so beside another worker). Set before torch is imported; subprocesses
# the tests start inherit it.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _share = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_variable, str(_share))

import fast_interpreter
import pytest
from hypothesis import HealthCheck, settings

fast_interpreter.install()

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=20,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

TEST_LOG_ENV = "LOWRANK_TEST_LOG"
"""A path: one JSON line per test outcome is appended as it arrives (a run cut short by a time
limit still leaves what it saw; under xdist the controller writes it)."""

CUDA_BROKEN_EXIT = 70
"""Exit status of a pytest process whose CUDA context a test broke (an illegal address, say):
every later CUDA call in that process would fail too, so the process ends at once. Under
pytest-xdist the worker is replaced and the other tests still run; without it the run ends
there, with the test named on stderr and in the per-test log."""


@pytest.hookimpl(wrapper=True)
def pytest_collection(session: pytest.Session):
    """Collect without the garbage collector, then freeze what collection made (`gc.freeze`).

    Collection imports torch, transformers, diffusers and every test module: half a million
    objects, which the collector walked again and again as they came (5 of a worker's 20
    CPU-seconds of collection). Frozen, they are left out of its later passes and of
    `gc.get_objects()`, which lowrank's search for ties outside a model walks on each merge
    of a layer something else holds (`lowrank.nn.ties`: 0.2 s a search over that many): both
    cover what the tests make. A module a test module builds at import is then invisible to
    that search; none is tied to a test's model."""
    gc.disable()
    try:
        return (yield)
    finally:
        gc.collect()
        gc.freeze()
        gc.enable()


_FROZEN_BEFORE: list[str] = []  # the module whose first test last froze the heap


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before a module's first test, collect and freeze again what earlier modules' tests
    imported (torch's compiler, transformers' and diffusers' models: a worker's unfrozen heap
    grew past 300,000 objects), so that each module's searches cover what its own tests
    make."""
    module = item.nodeid.split("::")[0]
    if _FROZEN_BEFORE[-1:] != [module]:
        _FROZEN_BEFORE[:] = [module]
        gc.collect()
        gc.freeze()


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Give the frozen objects back to the collector, so that the process ends as without the
    freeze (nanobind, Triton's bindings, reports objects left uncollected at exit)."""
    gc.unfreeze()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the modules marked `long` first (each module stays together, in its own order):
    pytest-xdist hands out modules in this order (the Makefile turns its reordering off), and
    a long module handed out last would keep one worker busy while the others idle."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    path = os.environ.get(TEST_LOG_ENV)
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):  # the controller writes xdist's
        return
    skipped_at_setup = report.when == "setup" and report.skipped
    if report.when != "call" and not (report.failed or skipped_at_setup):
        return
    line = {"test": report.nodeid, "when": report.when, "outcome": report.outcome,
            "seconds": round(report.duration, 3)}  # fmt: skip
    if report.failed:
        line["error"] = str(report.longrepr)[-2000:]
    with open(path, "a") as log:
        log.write(json.dumps(line) + "\n")


def pytest_runtest_teardown(item: pytest.Item) -> None:
    """After a test that used CUDA, end the process if its CUDA context no longer works."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except RuntimeError as err:
        sys.stderr.write(f"\n{item.nodeid} left CUDA broken ({err}); ending this process\n")
        sys.stderr.flush()
        os._exit(CUDA_BROKEN_EXIT)


@pytest.fixture(autouse=True)
def fused_shrink_for_every_weight(request, monkeypatch):
    """In the interpreter, offer every weight to the kernels that compute the shrink in their K
    loop: `shrink_fusable` keeps N-major weights with row strides off 16 elements (most sizes
    the tests use) from them on a GPU, for a compiler fault the interpreter does not have, and
    their math must stay tested at every size. Tests of that guard are marked `guarded`."""
    kernels = sys.modules.get("lowrank.kernels._lora_triton")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if kernels is not None and interpreting and "guarded" not in request.keywords:
        monkeypatch.setattr(kernels, "shrink_fusable", lambda w: True)


@pytest.fixture
def persistent_calls(monkeypatch):
    """Force the persistent regime, with the expand in the epilogue (the default, the expand
    first, has tests/test_lora_expand_first.py), and the separate backward (so that `dx` is a
    GEMM at any row count); record the `x` shape of each launch of its TMA kernel, so a test
    knows which GEMMs ran persistent rather than two-phase."""
    from lowrank.kernels import _lora_triton

    calls = []
    launch = _lora_triton._persistent_gemm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(_lora_triton, "_persistent_gemm", counted)
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "persistent")
    monkeypatch.setenv(_lora_triton.EXPAND_ENV, "epilogue")
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, "separate")
    return calls


@pytest.fixture
def tma_constexprs(monkeypatch):
    """The constexprs of each launch of the persistent TMA kernel, as the test runs them (so a
    silent fallback, to another regime or store, shows)."""
    from lowrank.kernels import _lora_gemm_tma, _lora_triton

    seen = []
    launch = _lora_triton._launch

    def recorded(kernel, grid, key, *args, **constexprs):
        if kernel is _lora_gemm_tma.lora_gemm_tma_kernel:
            seen.append(constexprs)
        return launch(kernel, grid, key, *args, **constexprs)

    monkeypatch.setattr(_lora_triton, "_launch", recorded)
    return seen


@pytest.fixture
def flattened(monkeypatch):
    """Run `lora_gemm_tma_kernel` with one flattened interpreter config (`FLATTEN`, one N tile
    per item): with a single config the autotuner launches it as it is, without pruning."""
    from lowrank.kernels import _lora_gemm_tma

    kernel = _lora_gemm_tma.lora_gemm_tma_kernel
    monkeypatch.setattr(kernel, "configs", [_lora_gemm_tma._config(16, 32, 32, 2, 4, 1, True)])
    monkeypatch.setattr(kernel, "cache", {})
    return kernel


@pytest.fixture
def lycoris(monkeypatch):
    """The lycoris package, quiet, with its class-level preset (`apply_preset`) restored
    after the test."""
    module = pytest.importorskip("lycoris")
    for name in ("TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "ENABLE_CONV"):
        monkeypatch.setattr(module.LycorisNetwork, name, getattr(module.LycorisNetwork, name))
    logging.getLogger("LyCORIS").setLevel(logging.ERROR)
    return module
