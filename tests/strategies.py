"""Hypothesis strategies and the float64 comparison shared by the forms and conv tests, and
the profiles of the state-machine tests (`machine_tests`).

`conv_geometries` draws a convolution's kernel, stride, padding, dilation and an
input size that yields at least one output position per axis; tensors are drawn
as a seed and made with `randn`, so every example is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

FLOAT64_RTOL = 1e-12

seeds = st.integers(min_value=0, max_value=2**31 - 1)
channels = st.integers(min_value=1, max_value=6)
ranks = st.integers(min_value=1, max_value=4)


@dataclass(frozen=True)
class ConvGeometry:
    """A convolution's per-axis geometry and an input size it accepts (all tuples of length D)."""

    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    input_size: tuple[int, ...]

    @property
    def spatial_dims(self) -> int:
        """D, the number of spatial axes."""
        return len(self.kernel)

    def axis(self, i: int) -> dict[str, tuple[int, ...]]:
        """Keyword arguments of a convolution acting along axis `i` only (identity elsewhere)."""

        def only(values: tuple[int, ...], rest: int) -> tuple[int, ...]:
            return tuple(v if j == i else rest for j, v in enumerate(values))

        return {
            "stride": only(self.stride, 1),
            "padding": only(self.padding, 0),
            "dilation": only(self.dilation, 1),
        }

    @property
    def conv_kwargs(self) -> dict[str, tuple[int, ...]]:
        """`stride`, `padding` and `dilation` as keyword arguments of `F.convNd`."""
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation}


@st.composite
def conv_geometries(
    draw: st.DrawFn, spatial_dims: int, *, max_kernel: int = 4, max_stride: int = 3
) -> ConvGeometry:
    """Kernels 1..max_kernel (odd and even), strides, paddings 0..2, dilations 1..2."""
    kernel, stride, padding, dilation, size = [], [], [], [], []
    for _ in range(spatial_dims):
        k = draw(st.integers(1, max_kernel))
        d = draw(st.integers(1, 2))
        p = draw(st.integers(0, 2))
        kernel.append(k)
        dilation.append(d)
        padding.append(p)
        stride.append(draw(st.integers(1, max_stride)))
        smallest = max(1, d * (k - 1) + 1 - 2 * p)
        size.append(smallest + draw(st.integers(0, 4)))
    return ConvGeometry(tuple(kernel), tuple(stride), tuple(padding), tuple(dilation), tuple(size))


def randn(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """A float64 standard-normal tensor drawn from `generator`."""
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (the absolute error when `ref` is zero); NaN stays NaN."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    diff = torch.linalg.vector_norm(out.double() - ref.double()).item()
    norm = torch.linalg.vector_norm(ref.double()).item()
    return diff / norm if norm > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = FLOAT64_RTOL) -> None:
    """Assert ‖out − ref‖ / ‖ref‖ ≤ rtol (fails on NaN, since NaN ≤ rtol is false)."""
    error = relative_error(out, ref)
    assert error <= rtol, f"relative error {error:.3e} > {rtol:.1e}"


def machine_tests(machine: type, examples: int, steps: int, long_steps: int):
    """`(TestCase, long_run)` of a hypothesis state machine: its `TestCase` with the default
    profile (`examples` sequences of `steps` rules, derandomized, so that the suite is
    reproducible) and a test of 400 sequences of `long_steps` rules, to be marked
    `exhaustive` where the module binds it."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    machine.TestCase.settings = settings(
        max_examples=examples,
        stateful_step_count=steps,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )

    def long_run() -> None:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=400,
                stateful_step_count=long_steps,
                deadline=None,
                suppress_health_check=list(HealthCheck),
            ),
        )

    return machine.TestCase, long_run
