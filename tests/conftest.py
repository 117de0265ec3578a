"""Test set-up: Triton runs in its interpreter on CPU, and hypothesis has bounded profiles.

`TRITON_INTERPRET=1` must be set before `triton` is first imported, so it is set here,
at the top of the first module pytest loads.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    max_examples=20,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def persistent_calls(monkeypatch):
    """Force the persistent regime and record the `x` shape of each launch of its TMA kernel,
    so a test knows which GEMMs ran persistent rather than falling back to two-phase."""
    from lowrank.kernels import _lora_triton

    calls = []
    launch = _lora_triton._persistent_gemm

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return launch(*args, **kwargs)

    monkeypatch.setattr(_lora_triton, "_persistent_gemm", counted)
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "persistent")
    return calls
