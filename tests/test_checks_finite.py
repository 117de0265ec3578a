"""`all_finite` (min/max based) agrees with `isfinite(...).all()` wherever the bad value is."""

from __future__ import annotations

import warnings

import torch
from hypothesis import given
from hypothesis import strategies as st

from lowrank._checks import all_finite

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
