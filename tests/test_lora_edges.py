"""lora_linear at the edges of its inputs: float16 results beyond float16's range, ZeroTensors.

Against float64 as float16 holds it (an overflow is the signed Inf, never NaN). The Triton
kernels run in the interpreter (conftest sets TRITON_INTERPRET=1) on CPU tensors; the
`cuda` parameters run them compiled (`TRITON_INTERPRET=0`, on a GPU).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from lowrank.kernels import _lora_triton, lora_dropout_mask, lora_linear
from test_lora_linear import INTERPRETING, KERNEL_DEVICES

REGIMES = ["fused", "two_phase", "persistent", "persistent_fused"]
HALF_TOL = 4e-3


def assert_float16_of(got: torch.Tensor, exact: torch.Tensor, size: torch.Tensor | None = None):
    """`got` (float16) is float64's `exact` as float16 holds it: the same ±Inf where `exact`
    overflows, no NaN, and finite entries within `HALF_TOL · size + 2⁻¹⁴` (`size` the sum of
    the terms' magnitudes, as float16 rounds each term; `|exact|` + 1 if not given). Entries
    within that error (and 1 %) of 65520, where the rounded sum may fall on either side, are
    left out."""
    got, exact = got.detach().cpu(), exact.detach().cpu()
    size = exact.abs() + 1 if size is None else size.detach().cpu()
    assert not torch.isnan(got).any()
    want = exact.to(torch.float16)  # ±Inf from 65520 on
    settled = (exact.abs() - 65520).abs() > HALF_TOL * size + 655.2
    inf = torch.isinf(want) & settled
    assert torch.equal(got[inf], want[inf])
    finite = torch.isfinite(want) & settled
    assert torch.isfinite(got[finite]).all()
    error = (got[finite].double() - exact[finite]).abs()
    assert (error <= HALF_TOL * size[finite] + 2.0**-14).all()  # 2⁻¹⁴: the subnormals' range


def tma_device() -> bool:
    return torch.cuda.get_device_capability()[0] >= 9


def needs_tma(regime: str, device: str) -> None:
    if regime.startswith("persistent") and device == "cuda" and not tma_device():
        pytest.skip("the persistent regimes need TMA (sm_90+)")


def overflowing_rows(device: str) -> tuple[torch.Tensor, ...]:
    """`(a, b, c, base)` for `base + c · a bᵀ`, `a (4, 2)` and `b (8, 2)` in float16: row 1 of
    `c · a` is `(2²⁴, −2²³)`, beyond float16 beside `b`'s entries of 2¹⁰ whatever power of two
    moves between them; its products against the rows of `b` are `2³³` (+Inf), `−8192` (a
    zero under the large rank), the base alone (zeros under both), `−3 · 2²¹` (−Inf), and
    `2³³` again. The other rows are small."""
    a = torch.tensor([[2.0**-10, 0.0], [2.0**14, -(2.0**13)], [0.0, 0.0], [2.0**-6, 2.0**-7]])
    b = torch.tensor([[2.0**10, 2.0**10], [0.0, 2.0**-10], [0.0, 0.0], [2.0**-3, 1.0]] * 2)
    base = torch.randn(4, 8, generator=torch.Generator().manual_seed(0)) * 8
    return (*(v.half().to(device) for v in (a, b)), 1024.0, base.half().to(device))


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("regime", REGIMES)
def test_a_float16_output_beyond_float16_is_the_signed_inf_of_float64(monkeypatch, regime, device):
    """A row of `c · t` (2²⁴ and −2²³) that no float16 power of two fits beside `up`'s 2¹⁰:
    its outputs are float64's as float16 holds them, +Inf, −8192, the base alone and −Inf,
    where the kernels gave NaN (the row's Inf operand against a zero of `up`, or against the
    −Inf of the other rank); the torch path agrees. The `dx` GEMM (`g = dy up` in the role of
    `t`, `down` in that of `up`) alike, separate and one-pass."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    needs_tma(regime, device)
    rows, cols, c, base = overflowing_rows(device)
    x = torch.zeros(4, 16, dtype=torch.float16, device=device)
    x[:, :2] = rows  # t = x downᵀ = rows
    down = torch.zeros(2, 16, dtype=torch.float16, device=device)
    down[:, :2] = torch.eye(2)
    weight = torch.zeros(8, 16, dtype=torch.float16, device=device)
    weight[:, 2] = 1.0
    x[:, 2] = base[:, 0]  # x Wᵀ: every column of a row is base[row, 0]
    exact = x.double() @ weight.double().t() + c * rows.double() @ cols.double().t()
    for backend in ("triton", "torch"):
        with torch.no_grad():
            y = lora_linear(x, weight, down, cols, scale=c, backend=backend)
        assert_float16_of(y, exact)
    # dx = dy W + c · (dy up) down: dy up = rows, and `down` holds cols' role
    dy = torch.zeros(4, 8, dtype=torch.float16, device=device)
    dy[:, :2] = rows
    up = torch.zeros(8, 2, dtype=torch.float16, device=device)
    up[:2] = torch.eye(2)
    weight = torch.zeros(8, 8, dtype=torch.float16, device=device)
    exact = c * rows.double() @ cols.double().t()
    for backward in ("separate", "one_pass") if regime == "fused" else ("separate",):
        monkeypatch.setenv(_lora_triton.BACKWARD_ENV, backward)
        xr = torch.zeros(4, 8, dtype=torch.float16, device=device, requires_grad=True)
        lora_linear(xr, weight, cols.t().contiguous(), up, scale=c).backward(dy)
        assert_float16_of(xr.grad, exact)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("backward", ["separate", "one_pass"])
def test_float16_weight_gradients_of_a_scale_beyond_float16_are_never_nan(
    monkeypatch, backward, device
):
    """Scale 2¹²⁶ with `t` and `g = dy up` (2¹⁷) beyond float16: `d_up = c dyᵀ t` and `d_down =
    c gᵀ x` overflow to ±Inf, except in the row of `d_up` whose `dy` column is zero and the
    column of `d_down` whose `x` column is zero, which are 0 as in float64. The kernels
    multiplied the sums by `c · 2^e` (2¹²⁹: Inf in float32), which made those zeros NaN."""
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, backward)
    x = torch.zeros(4, 16)
    x[:, 0] = 8.0
    down = torch.zeros(3, 16)
    down[:, 0] = 2.0**14  # t = 2¹⁷
    up = torch.full((8, 3), 2.0**-10)
    up[0] = 2.0**10  # g = dy up = 2¹⁷ from dy's column 0
    dy = torch.full((4, 8), 2.0**-6)
    dy[:, 0] = 2.0**7
    dy[:, 5] = 0.0
    half = [v.half().to(device) for v in (x, torch.zeros(8, 16), down, up, dy)]
    ours = [v.clone().requires_grad_(i != 1) for i, v in enumerate(half[:4])]
    c = 2.0**126
    lora_linear(*ours, scale=c).backward(half[4])
    x, _, down, up, dy = (v.double().cpu() for v in half)
    assert_float16_of(ours[0].grad, c * (dy @ up) @ down)  # Inf in column 0, else 0
    assert_float16_of(ours[3].grad, c * dy.t() @ (x @ down.t()))
    assert_float16_of(ours[2].grad, c * (dy @ up).t() @ x)
    assert torch.equal(ours[3].grad[5].cpu(), torch.zeros(3, dtype=torch.float16))
    assert torch.equal(ours[2].grad[:, 1:].cpu(), torch.zeros(3, 15, dtype=torch.float16))


@pytest.mark.skipif(not INTERPRETING, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
@given(
    seed=st.integers(0, 2**31 - 1),
    sizes=st.tuples(*[st.integers(1, 9)] * 4),
    exponents=st.tuples(*[st.integers(-4, 12)] * 5),
    scale=st.sampled_from([2.0**-8, -0.3, 1.0, -7.0, 3e3, -(2.0**20)]),
    p=st.sampled_from([0.0, 0.5]),
    regime=st.sampled_from(REGIMES),
    backward=st.sampled_from(["separate", "one_pass"]),
)
@settings(max_examples=12, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
def test_float16_results_beyond_float16_are_float64s_signed_inf(
    seed, sizes, exponents, scale, p, regime, backward
):
    """Operands of float16 magnitudes from 2⁻⁴ to 2¹² and scales to 2²⁰, so that outputs and
    gradients overflow float16 or not: the output, `dx`, `d_down` and `d_up` are float64's as
    float16 holds them (the signed Inf beyond it, never NaN), in every regime and backward.
    (No shrinking: in the interpreter it takes many minutes; a failure shows its example.)"""
    rows, fan_in, fan_out, rank = sizes
    gen = torch.Generator().manual_seed(seed)
    shapes = [(rows, fan_in), (fan_out, fan_in), (rank, fan_in), (fan_out, rank),
              (rows, fan_out)]  # fmt: skip
    half = [(torch.randn(shape, generator=gen) * 2.0**k).half()
            for shape, k in zip(shapes, exponents, strict=True)]  # fmt: skip
    ours = [v.clone().requires_grad_(i != 1) for i, v in enumerate(half[:4])]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(_lora_triton.REGIME_ENV, regime)
        patch.setenv(_lora_triton.BACKWARD_ENV, backward)
        y = lora_linear(*ours, scale=scale, dropout_p=p, seed=seed)
        y.backward(half[4])
    x, weight, down, up, dy = (v.double() for v in half)
    mask = lora_dropout_mask(half[0], p, seed).double() / (1 - p)
    c, xm = scale, x * mask
    g, t = dy @ up, xm @ down.t()
    exact = {"y": x @ weight.t() + c * t @ up.t(), "dx": dy @ weight + c * mask * (g @ down),
             "d_down": c * g.t() @ xm, "d_up": c * dy.t() @ t}  # fmt: skip
    x, weight, down, up, dy, xm, mask = (v.abs() for v in (x, weight, down, up, dy, xm, mask))
    # float16 rounds `t` and `g`: at least the error of a subnormal each (2⁻²⁵ < 4e-3 · 2⁻¹⁴)
    g, t, c = dy @ up + 2.0**-14, xm @ down.t() + 2.0**-14, abs(c)
    size = {"y": x @ weight.t() + c * t @ up.t(), "dx": dy @ weight + c * mask * (g @ down),
            "d_down": c * g.t() @ xm, "d_up": c * dy.t() @ t}  # fmt: skip
    got = {"y": y, "dx": ours[0].grad, "d_down": ours[2].grad, "d_up": ours[3].grad}
    for name, value in got.items():
        assert_float16_of(value, exact[name], size[name])


def test_the_gradient_through_sgn_is_a_zerotensor():
    """The premise of the tests below: autograd passes the gradient of `torch.sgn` back as a
    ZeroTensor, a tensor of zeros with no memory behind it."""
    probe = torch.ones(3, requires_grad=True)
    (grad,) = torch.autograd.grad(torch.sgn(probe).sum(), probe)
    assert grad._is_zerotensor()


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("backward", ["separate", "one_pass"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_a_zerotensor_output_gradient_gives_zero_gradients(monkeypatch, backward, dtype, device):
    """`torch.sgn(y)` passes a ZeroTensor back as `y`'s gradient: every gradient (`x`, both
    factors, the weight and the bias) is zero, as in float64, where the kernels raised a
    RuntimeError reading its data pointer."""
    monkeypatch.setenv(_lora_triton.BACKWARD_ENV, backward)
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 12), (7, 12), (3, 12), (7, 3), (7,)]
    ours = [torch.randn(s, generator=gen).to(dtype).to(device).requires_grad_() for s in shapes]
    torch.sgn(lora_linear(*ours[:4], scale=0.5, bias=ours[4])).sum().backward()
    for name, leaf in zip(("x", "weight", "down", "up", "bias"), ours, strict=True):
        assert torch.equal(leaf.grad, torch.zeros_like(leaf)), name


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("operand", range(5))
def test_zerotensor_operands_are_read_as_zeros(operand, device):
    """A ZeroTensor as any operand (`torch._efficientzerotensor`, which has no memory) gives
    the output of a tensor of zeros there, against float64, where the kernels raised."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 12), (7, 12), (3, 12), (7, 3), (7,)]
    operands = [torch.randn(s, generator=gen).to(device) for s in shapes]
    operands[operand] = torch._efficientzerotensor(shapes[operand], device=device)
    with torch.no_grad():
        y = lora_linear(*operands[:4], scale=0.5, bias=operands[4], backend="triton")
    x, weight, down, up, bias = (
        torch.zeros(v.shape, dtype=torch.float64) if v._is_zerotensor() else v.cpu().double()
        for v in operands
    )
    exact = x @ weight.t() + 0.5 * (x @ down.t()) @ up.t() + bias
    assert torch.allclose(y.cpu().double(), exact, rtol=1e-4, atol=1e-5)
