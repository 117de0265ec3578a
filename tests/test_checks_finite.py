"""`all_finite` (min/max based) agrees with `isfinite(...).all()` wherever the bad value is, in
every floating dtype a file may hold (float8 included); `overflow_bound` is where a cast stops
rounding to a finite value."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank import _checks
from lowrank._checks import all_finite, overflow_bound, require_finite
from lowrank.errors import NonFiniteError

dtypes = st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64])
bad = st.sampled_from([float("nan"), float("inf"), float("-inf"), None])


@given(size=st.integers(0, 3000), where=st.integers(0, 2999), value=bad, dtype=dtypes)
def test_all_finite_matches_isfinite(size, where, value, dtype):
    tensor = torch.randn(size).to(dtype)
    if value is not None and size:
        tensor[where % size] = value
    assert all_finite(tensor) == bool(torch.isfinite(tensor).all())


def test_integer_and_bool_tensors_are_finite():
    assert all_finite(torch.arange(5)) and all_finite(torch.ones(3, dtype=torch.bool))


def test_a_parameter_is_checked_without_an_autograd_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all_finite(torch.nn.Parameter(torch.ones(3)))


float8 = st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2])


@given(size=st.integers(0, 300), where=st.integers(0, 299), value=bad, dtype=float8)
def test_all_finite_reads_float8_chunk_by_chunk(size, where, value, dtype):
    """In chunks of 7 here, so that a bad value lands in any chunk (e4m3fn has no Inf: it
    stores ±Inf as NaN)."""
    tensor = torch.randn(size).to(dtype)
    if value is not None and size:
        tensor[where % size] = value
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_checks, "_FP8_CHUNK", 7)
        found = all_finite(tensor)
    assert found == bool(torch.isfinite(tensor.to(torch.float32)).all())
    if not found:
        with pytest.raises(NonFiniteError, match="holds 1 NaN/Inf"):
            require_finite("t", tensor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e5m2])
def test_overflow_bound_is_where_a_cast_turns_to_inf(dtype):
    """The float32 value just below the bound rounds to the dtype's largest, the bound itself
    to Inf (ties away from the odd largest value)."""
    bound = torch.tensor(overflow_bound(dtype), dtype=torch.float32)
    below = bound.nextafter(torch.tensor(0.0))
    assert float(below.to(dtype)) == torch.finfo(dtype).max
    assert torch.isinf(bound.to(dtype))


def test_overflow_bound_of_the_saturating_float8():
    """float8_e4m3fn clips instead of overflowing: 448 is its largest, 32 apart from the next
    below (416), so values from 464 up no longer round to it."""
    assert overflow_bound(torch.float8_e4m3fn) == 464.0
    assert float(torch.tensor(1e6).to(torch.float8_e4m3fn)) == 448.0  # clipped, not Inf
    assert overflow_bound(torch.float32) == float(torch.finfo(torch.float32).max) + 2.0**103
    assert overflow_bound(torch.float64) == float("inf")
