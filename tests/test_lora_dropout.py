"""Dropout of lora_linear: reproducible masks, the kept fraction, and gradients on the same mask.

The mask is read back in two independent ways: from `lora_dropout_mask`, and from the output
of an identity layer (`weight = 0`, `down = up = I`, so `y = m ⊙ x / (1 − p)`). Forward and
every gradient are then checked against a float64 reference that applies that mask.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from lowrank.kernels import _lora_torch, _lora_triton, lora_dropout_mask, lora_linear
from test_lora_linear import (
    TOL,
    TRITON_CPU,
    compiled_cuda_only,
    interpreter_only,
    make,
    reference,
    rel,
)

BACKENDS = [TRITON_CPU, "torch"]


def identity_layer(width: int, dtype: torch.dtype):
    eye = torch.eye(width, dtype=dtype)
    return torch.zeros(width, width, dtype=dtype), eye, eye.clone()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_read_from_the_output_equals_the_mask_helper(backend):
    p = 0.4
    x = torch.rand(21, 48) + 0.5  # no zeros, so a zero output means a dropped entry
    weight, down, up = identity_layer(48, torch.float32)
    y = lora_linear(x, weight, down, up, dropout_p=p, seed=123, backend=backend)
    kept = y != 0
    assert torch.equal(kept, lora_dropout_mask(x, p, seed=123, backend=backend))
    assert torch.allclose(y[kept], x[kept] / (1 - p), rtol=1e-6)


WORD = 0xFFFFFFFF


def philox_reference(counter: tuple[int, ...], key: tuple[int, int]) -> list[int]:
    """Philox-4x32-10 on Python ints, one counter at a time (Salmon et al., SC 2011)."""
    c, (k0, k1) = list(counter), key
    for _ in range(10):
        product_a, product_b = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(product_b >> 32) ^ c[1] ^ k0, product_b & WORD,
             (product_a >> 32) ^ c[3] ^ k1, product_a & WORD]  # fmt: skip
        k0, k1 = (k0 + 0x9E3779B9) & WORD, (k1 + 0xBB67AE85) & WORD
    return c


def test_reference_philox_gives_the_known_answers():
    """Random123's known-answer vectors for philox4x32_10."""
    assert philox_reference((0, 0, 0, 0), (0, 0)) == [
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]  # fmt: skip
    assert philox_reference((WORD,) * 4, (WORD, WORD)) == [
        0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]  # fmt: skip
    assert philox_reference((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
                            (0xA4093822, 0x299F31D0)) == [
        0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]  # fmt: skip


def kept_by_reference(seed: int, p: float, row: int, col: int) -> bool:
    """Entry `(row, col)`: word `col mod 4` at counter `(col div 4, row, 0, 0)`, made uniform in
    float32 as Triton does (the int32 bit pattern, `~x` if negative, times 4.6566127342e-10)."""
    word = philox_reference((col // 4, row, 0, 0), (seed & WORD, seed >> 32))[col % 4]
    signed = word - (1 << 32) if word >> 31 else word
    uniform = np.float32(~signed if signed < 0 else signed) * np.float32(4.6566127342e-10)
    return bool(uniform >= np.float32(p))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 5, 5 + 2**32, 2**63 - 1])
def test_mask_is_the_documented_philox_draw(backend, seed):
    mask = lora_dropout_mask(torch.empty(6, 11), 0.3, seed, backend=backend)
    expected = [[kept_by_reference(seed, 0.3, m, j) for j in range(11)] for m in range(6)]
    assert mask.tolist() == expected


@interpreter_only
@pytest.mark.parametrize("p", [0.05, 0.5, 0.95])
def test_both_backends_draw_the_same_mask(p):
    x = torch.empty(37, 70)
    for seed in (1, 2**40 + 3):
        torch_mask = lora_dropout_mask(x, p, seed, backend="torch")
        assert torch.equal(torch_mask, lora_dropout_mask(x, p, seed, backend="triton"))


@given(p=st.floats(0.0, 1.0, exclude_max=True), magnitude=st.integers(0, 2**31 - 1))
def test_the_integer_keep_threshold_decides_as_the_uniform_float_would(p, magnitude):
    uniform = np.float32(magnitude) * np.float32(4.6566127342e-10)
    assert (magnitude >= _lora_torch.keep_threshold(p)) == bool(uniform >= np.float32(p))


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_seed_s_high_32_bits_change_the_mask(backend):
    x = torch.empty(16, 64)
    low = lora_dropout_mask(x, 0.5, 5, backend=backend)
    assert not torch.equal(low, lora_dropout_mask(x, 0.5, 5 + 2**32, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_is_one_minus_p(backend, p):
    x = torch.empty(96, 512)
    kept = lora_dropout_mask(x, p, seed=7, backend=backend).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / x.numel())
    assert abs(kept - (1 - p)) < 5 * sigma


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_output_other_seed_other_output(backend):
    x, weight, down, up, b = make((30,), 40, 24, 8, torch.float32)
    run = lambda seed: lora_linear(x, weight, down, up, 1.0, b, 0.3, seed, backend)  # noqa: E731
    assert torch.equal(run(5), run(5))
    assert not torch.allclose(run(5), run(6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_none_follows_torch_manual_seed(backend):
    x, weight, down, up, _ = make((30,), 40, 24, 8, torch.float32)
    torch.manual_seed(3)
    first = lora_linear(x, weight, down, up, dropout_p=0.3, backend=backend)
    torch.manual_seed(3)
    assert torch.equal(first, lora_linear(x, weight, down, up, dropout_p=0.3, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_probability_is_no_dropout(backend):
    x, weight, down, up, b = make((30,), 40, 24, 8, torch.float32)
    y = lora_linear(x, weight, down, up, 0.6, b, dropout_p=0.0, seed=9, backend=backend)
    assert rel(y, reference(x, weight, down, up, 0.6, b)) < TOL[torch.float32]


def check_masked_gradients(
    backend, dtype, rows, fan_in, fan_out, rank, p=0.3, seed=77, device="cpu"
):
    x, weight, down, up, b = (t.to(device) for t in make((rows,), fan_in, fan_out, rank, dtype))
    mask = lora_dropout_mask(x, p, seed, backend=backend)
    assert 0 < int(mask.sum()) < mask.numel()
    ours = [t.clone().requires_grad_() for t in (x, down, up)]
    y = lora_linear(ours[0], weight, ours[1], ours[2], 0.9, b, p, seed, backend)
    theirs = [t.double().requires_grad_() for t in (x, down, up)]
    y_ref = reference(theirs[0], weight, theirs[1], theirs[2], 0.9, b, mask=mask, p=p)
    assert rel(y, y_ref) < TOL[dtype]
    dy = torch.randn(y.shape, dtype=torch.float64, device=device)
    y.backward(dy.to(dtype))
    y_ref.backward(dy)
    for name, a, r in zip(("x", "down", "up"), ours, theirs, strict=True):
        assert rel(a.grad, r.grad) < TOL[dtype], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_use_the_forward_mask(backend):
    check_masked_gradients(backend, torch.float32, 37, 45, 29, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dropped_inf_adds_nothing_to_the_adapter_gradients(backend):
    """An Inf in `x` where the mask drops it is 0 in the branch (the kernels select, they do
    not multiply by 0, which would give NaN): `d_down` and `d_up` stay the finite gradients
    of the same `x` with that entry 0, on both backends."""
    x, weight, down, up, b = make((6,), 16, 8, 3, torch.float32)
    mask = lora_dropout_mask(x, 0.5, 5, backend=backend)
    row, col = (~mask).nonzero()[0].tolist()
    poisoned, cleaned = x.clone(), x.clone()
    poisoned[row, col], cleaned[row, col] = math.inf, 0.0
    grads = []
    for inputs in (poisoned, cleaned):
        leaves = [down.clone().requires_grad_(), up.clone().requires_grad_()]
        y = lora_linear(inputs, weight, *leaves, 0.9, b, 0.5, 5, backend)
        y[torch.arange(6) != row].sum().backward()  # row `row` of y is Inf through W
        grads.append([t.grad for t in leaves])
    for name, got, want in zip(("down", "up"), *grads, strict=True):
        assert torch.isfinite(got).all(), name
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name


@interpreter_only
@pytest.mark.parametrize("regime", ["two_phase", "fused", "persistent", "persistent_fused"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.exhaustive),
                                   torch.float16], ids=str)  # fmt: skip
def test_gradients_use_the_forward_mask_in_every_regime(monkeypatch, regime, dtype):
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    check_masked_gradients("triton", dtype, 40, 70, 33, 17)


@interpreter_only
@pytest.mark.parametrize("regime", ["persistent", "persistent_fused"])
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.exhaustive),
                                   torch.float16], ids=str)  # fmt: skip
def test_gradients_use_the_forward_mask_in_the_persistent_kernel(
    persistent_calls, monkeypatch, regime, dtype
):
    """in = 72, out = 32: TMA-aligned rows, so forward and dx both run the TMA kernel (with the
    mask on the fused shrink's input, or on the dx adapter term); r = 17, a ragged last item."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    check_masked_gradients("triton", dtype, 40, 72, 32, 17)
    assert len(persistent_calls) == 2


@interpreter_only
@pytest.mark.parametrize("regime", ["persistent", "persistent_fused"])
def test_gradients_use_the_forward_mask_in_the_flattened_persistent_loop(
    persistent_calls, flattened, monkeypatch, regime
):
    """The flattened configs' code with the mask on the fused shrink's input (forward) and on
    the dx adapter term after the K loop (the interpreter runs the loop unflattened)."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    check_masked_gradients("triton", torch.float32, 40, 72, 32, 17 if regime == "persistent_fused"
                           else 9)  # fmt: skip
    assert len(persistent_calls) == 2


@interpreter_only
def test_gradients_use_the_forward_mask_with_rank_slabs():
    check_masked_gradients("triton", torch.float32, 20, 36, 24, 140)


@interpreter_only
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, marks=pytest.mark.exhaustive),
                                   torch.float16], ids=str)  # fmt: skip
def test_weight_gradients_summed_over_row_splits(monkeypatch, dtype):
    """Splits of at least 32 rows in units of 32 (512 and 128 by default; any multiple of the
    interpreter's BLOCK_M of 16 is valid): 80 rows take three, the last ragged, and d_down and
    d_up come from float32 partial sums (fewer rows, as in every other test, are reduced
    straight into the gradients)."""
    monkeypatch.setattr(_lora_triton, "_MIN_ROWS_PER_SPLIT", 32)
    monkeypatch.setattr(_lora_triton, "_ROWS_PER_SPLIT_UNIT", 32)
    assert _lora_triton.row_splits(80) == (3, 32)
    check_masked_gradients("triton", dtype, 80, 24, 20, 5)


@compiled_cuda_only
@pytest.mark.parametrize("regime", ["two_phase", "fused", "persistent", "persistent_fused", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gradients_use_the_forward_mask_on_cuda(monkeypatch, regime, dtype):
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    check_masked_gradients("triton", dtype, 200, 700, 330, 64, device="cuda")


@compiled_cuda_only
@pytest.mark.parametrize("regime", ["persistent", "persistent_fused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gradients_use_the_forward_mask_in_the_persistent_kernel_on_cuda(
    persistent_calls, monkeypatch, regime, dtype
):
    """in = 704 and out = 320 give TMA-aligned rows: forward and dx both run persistent."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the persistent regimes need TMA (sm_90+)")
    monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
    check_masked_gradients("triton", dtype, 600, 704, 320, 64, device="cuda")
    assert len(persistent_calls) == 2


@compiled_cuda_only
def test_compiled_mask_keeps_one_minus_p_on_cuda():
    x = torch.empty(4096, 1024, device="cuda")
    kept = lora_dropout_mask(x, 0.25, seed=2**40 + 5).double().mean().item()
    assert abs(kept - 0.75) < 5 * math.sqrt(0.25 * 0.75 / x.numel())


def test_mask_helper_validates_its_arguments():
    with pytest.raises(ValueError, match="dropout_p"):
        lora_dropout_mask(torch.empty(3, 4), 1.5, seed=0)


@interpreter_only
def test_gradients_use_the_forward_mask_with_split_k_shrinks(monkeypatch):
    """Two-phase with 20 rows and K splits in units of 64 (256 by default; any multiple of the
    interpreter's BLOCK_K of 32 is valid): the shrinks of x (in = 150) and dy (out = 100) run
    three and two splits, the last ragged, the mask drawn at each split's own columns."""
    monkeypatch.setenv(_lora_triton.REGIME_ENV, "two_phase")
    monkeypatch.setattr(_lora_triton, "_K_PER_SPLIT_UNIT", 64)
    assert _lora_triton.k_splits(20, 150) == (3, 64) and _lora_triton.k_splits(20, 100) == (2, 64)
    check_masked_gradients("triton", torch.float16, 20, 150, 100, 9)


@interpreter_only
def test_the_two_phase_forward_gemm_takes_no_dropout_flag(monkeypatch):
    """In the two-phase regime the shrink kernel draws the input's mask, so the forward GEMM
    is launched without `DROP_IN` (with it, the same kernel ran under a second autotune key:
    compiled and tuned twice on a GPU); the fused regime's GEMM, which shrinks, takes it.
    The outputs still agree with the torch backend's draw."""
    launches = []
    launch = _lora_triton._launch

    def spy(kernel, grid, key, *args, **constexprs):
        launches.append((getattr(kernel, "__name__", str(kernel)), constexprs))
        return launch(kernel, grid, key, *args, **constexprs)

    monkeypatch.setattr(_lora_triton, "_launch", spy)
    for regime, flag in (("two_phase", False), ("fused", True)):
        monkeypatch.setenv(_lora_triton.REGIME_ENV, regime)
        launches.clear()
        layer = identity_layer(24, torch.float32)
        x = torch.randn(8, 24)
        y = lora_linear(x, *layer, dropout_p=0.5, seed=3, backend="triton")
        ref = lora_linear(x, *layer, dropout_p=0.5, seed=3, backend="torch")
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
        gemms = [flags for name, flags in launches if "DROP_IN" in flags and "SHRINK" in flags]
        assert gemms and all(flags["DROP_IN"] is flag for flags in gemms), (regime, launches)
