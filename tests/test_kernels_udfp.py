"""Unsigned 8-bit DFP activations (FGQ after a ReLU) on the grouped kernels: the C++ quantizer's
uint8 codes and the grouped GEMM, bit-exact against int64 NumPy references on every ISA path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit import kernels
from lowbit.pack import PackedLinear
from lowbit.qtypes import QuantizedWeight

N, K, E = 37, 203, -3  # N, K not multiples of 16; activations u * 2^E


def _inputs(m: int, seed: int) -> torch.Tensor:
    """Codes beyond [0, 255] (saturation), negatives (clamped to 0) and exact halves (ties)."""
    rng = np.random.default_rng(seed)
    u = rng.integers(-40, 300, size=(m, K)).astype(np.float64)
    u += rng.choice([0.0, 0.5, 0.25], size=(m, K))
    return torch.from_numpy(u * 2.0**E).float()


def _codes_reference(x: torch.Tensor) -> np.ndarray:
    t = x.double().numpy() * 2.0**-E
    return np.clip(np.round(t), 0, 255).astype(np.int64)  # np.round: half to even


@pytest.mark.parametrize("group", [0, 4, 8])
def test_udfp_quantizer_matches_reference(isa: str, group: int) -> None:
    x = _inputs(9, 1)
    q, a_inv, sums = kernels.quantize_activations(x, "udfp", exponent=E, group_size=group)
    u = _codes_reference(x)
    assert q.dtype == torch.uint8
    np.testing.assert_array_equal(q.numpy().astype(np.int64), u)
    assert torch.equal(a_inv, torch.full((9,), 2.0**E))
    g = group or K
    pad = np.zeros((9, -(-K // g) * g), dtype=np.int64)
    pad[:, :K] = u
    np.testing.assert_array_equal(sums.numpy(), pad.reshape(9, -1, g).sum(axis=2))


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group", [4, 8, 64])
@pytest.mark.parametrize("m", [1, 3, 8, 19])
def test_udfp_grouped_gemm_is_exact(isa: str, bits: int, group: int, m: int) -> None:
    rng = np.random.default_rng(bits * 1000 + group * 10 + m)
    lo, hi = (-1, 1) if bits == 2 else (-8, 7)
    codes = rng.integers(lo, hi + 1, size=(N, K)).astype(np.int8)
    groups = -(-K // group)
    # Power-of-two scales: every fp32 product and partial sum below is exact, so the kernel's
    # result must equal the int64 reference bit for bit whatever its summation order.
    scales = 2.0 ** rng.integers(-1, 3, size=(N, groups))
    tiles = (kernels.pack_ternary if bits == 2 else kernels.pack_int4)(torch.from_numpy(codes))
    scale, _ = kernels.pack_ternary_scales(torch.from_numpy(scales), N, K, group_size=group)
    x = _inputs(m, m)
    for relu in (False, True):
        y = kernels._ternary_linear_impl(
            x, tiles, scale, None, None, N, group, kernels.ACT_MODES["udfp"], E, relu, bits
        )
        u = _codes_reference(x)
        cp = np.zeros((N, groups * group), dtype=np.int64)
        cp[:, :K] = codes
        up = np.zeros((m, groups * group), dtype=np.int64)
        up[:, :K] = u
        d = np.einsum("mgk,ngk->mng", up.reshape(m, groups, group), cp.reshape(N, groups, group))
        # sum_g D_g * s_g * 2^E with s_g = 2^j: exact as a multiple of 2^(E-1) in int64.
        num = (d * np.rint(scales * 2)[None, :, :].astype(np.int64)).sum(axis=2)
        expected = num.astype(np.float64) * 2.0 ** (E - 1)
        if relu:
            expected = np.maximum(expected, 0.0)
        np.testing.assert_array_equal(y.double().numpy(), expected)


def test_udfp_refuses_per_row_layers() -> None:
    tiles = kernels.pack_ternary(torch.zeros(16, 32, dtype=torch.int8))
    scale, _ = kernels.pack_ternary_scales(torch.ones(16), 16, 32)
    with pytest.raises(ValueError, match="grouped kernel only"):
        kernels._ternary_linear_impl(
            torch.ones(2, 32), tiles, scale, None, None, 16, 0, kernels.ACT_MODES["udfp"], 0, False
        )
    with pytest.raises(ValueError, match="needs a fixed exponent"):
        kernels.quantize_activations(torch.ones(2, 32), "udfp")


@pytest.mark.parametrize("group", [4, 16])
def test_packed_fgq_layer_runs_fused_and_matches_the_simulation(isa: str, group: int) -> None:
    # FGQ layer with unsigned 8-bit DFP inputs at a calibrated exponent: fused C++ quantization
    # (no shift term) against the float64 simulation u * 2^E @ W.T + b.
    g = torch.Generator().manual_seed(group)
    codes = torch.randint(-1, 2, (N, K), generator=g).to(torch.int8)
    scales = torch.rand(N, -(-K // group), generator=g) + 0.1
    qw = QuantizedWeight(codes, scales, "ternary", 2, "group", group, "in")
    bias = torch.randn(N, generator=g)
    layer = PackedLinear(qw, bias, activations="dfp", exponent=E, act_bits=8, act_signed=False)
    assert layer._act_name() == "udfp"
    x = _inputs(7, 3)
    w = qw.dequantize().double().numpy()
    xq = _codes_reference(x).astype(np.float64) * 2.0**E
    expected = xq @ w.T + bias.double().numpy()
    got = layer(x).double().numpy()
    tol = 8 * np.finfo(np.float32).eps * (np.abs(xq) @ np.abs(w).T + np.abs(bias.numpy()) + 1)
    assert (np.abs(got - expected) <= tol).all()
    layer.relu = True
    layer._kernel = None
    assert (
        np.array_equal(layer(x).numpy(), np.maximum(got, 0).astype(np.float32))
        or (np.abs(layer(x).double().numpy() - np.maximum(expected, 0)) <= tol).all()
    )


# 8-bit fixed-point group scales (FGQ scale_bits=8): m_g * row_mult[n] with m_g in 0..255. The
# AVX2 kernel for groups of 4 accumulates sum_g m_g * D_g in int32; every other path reads the
# equal float scales.


def _fixed8_case(seed: int, n: int, k: int, m: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    mant = rng.integers(0, 256, size=(n, -(-k // 4)))
    e_row = rng.integers(-3, 2, size=n)
    return codes, mant, e_row, _inputs(m, seed)


def _fixed8_kernel(
    codes: np.ndarray, mant: np.ndarray, row_mult: np.ndarray, scale: torch.Tensor | None = None
) -> kernels.LinearKernel:
    n, k = codes.shape
    tiles = kernels.pack_ternary(torch.from_numpy(codes))
    if scale is None:
        scale, _ = kernels.pack_ternary_scales(
            torch.from_numpy(mant * row_mult[:, None]), n, k, group_size=4
        )
    pairs = kernels.pack_group_mantissas(
        torch.from_numpy(mant), torch.from_numpy(row_mult).float(), n, k, group_size=4
    )
    return kernels.LinearKernel(
        tiles, scale, out_features=n, group_size=4, act="udfp", exponent=E, group_mantissas=pairs
    )


def test_group_mantissas_layout_matches_the_float_scales() -> None:
    codes, mant, e_row, _ = _fixed8_case(0, N, K, 1)
    gi, row_mult = kernels.pack_group_mantissas(
        torch.from_numpy(mant), torch.from_numpy(2.0**e_row).float(), N, K, group_size=4
    )
    ref, _ = kernels.pack_ternary_scales(torch.from_numpy(mant).double(), N, K, group_size=4)
    assert gi.dtype == torch.int32 and gi.shape == ref.shape
    assert torch.equal((gi & 0xFFFF).double(), ref.double())  # the low int16 of the pair
    assert torch.equal((gi >> 16).double(), ref.double())  # and the high one
    assert torch.equal(row_mult[:N].double(), torch.from_numpy(2.0**e_row))
    assert row_mult.numel() == 16 * -(-N // 16) and not row_mult[N:].any()
    for bad in (mant + 256, mant - 256, mant + 0.5):
        with pytest.raises(ValueError, match="0..255"):
            kernels.pack_group_mantissas(torch.from_numpy(bad), row_mult[:N], N, K, group_size=4)
    with pytest.raises(ValueError, match="shape"):
        kernels.pack_group_mantissas(
            torch.from_numpy(mant[:, :-1]), row_mult[:N], N, K, group_size=4
        )


@pytest.mark.parametrize("m", [1, 5, 8])
def test_fixed8_group_scales_are_exact(isa: str, m: int) -> None:
    # |sum_g m_g * D_g| <= 203 * 255 * 255 < 2^24 and every multiplier a power of two: the int32
    # path (AVX2) and the float-scale path (the others) both give the int64 result bit for bit.
    codes, mant, e_row, x = _fixed8_case(m, N, K, m)
    y = _fixed8_kernel(codes, mant, 2.0**e_row)(x)
    u = _codes_reference(x)
    w = np.repeat(mant, 4, axis=1)[:, :K] * codes.astype(np.int64)  # m_g * code, per weight
    expected = (u @ w.T).astype(np.float64) * 2.0 ** (e_row[None, :] + E)
    np.testing.assert_array_equal(y.double().numpy(), expected)


@pytest.mark.parametrize("k", [32768, 33040])
def test_fixed8_worst_case_sums_do_not_overflow(isa: str, k: int) -> None:
    # All codes +1, all inputs 255, all mantissas 255: the int32 sum reaches k * 255^2, just
    # under 2^31 at k = 32768; at 33040 it would wrap, so the kernel takes the float-scale path.
    n = 16
    codes = np.ones((n, k), dtype=np.int8)
    mant = np.full((n, k // 4), 255)
    x = torch.full((2, k), 255.0 * 2.0**E)
    y = _fixed8_kernel(codes, mant, np.full(n, 2.0**-20))(x)
    expected = k * 255.0 * 255.0 * 2.0 ** (E - 20)
    # an overflow would wrap to a negative sum; the float-scale paths round once per group
    np.testing.assert_allclose(y.double().numpy(), expected, rtol=1e-4)


def test_avx2_groups_of_4_read_the_mantissas() -> None:
    # Float scales of zero beside the mantissas: only a kernel that reads the mantissas (AVX2,
    # groups of 4, unsigned inputs) gives a non-zero result, equal to the exact one.
    if "avx2" not in kernels.available_isas():
        pytest.skip("needs an AVX2 machine")
    codes, mant, e_row, x = _fixed8_case(3, N, K, 6)
    zeros = torch.zeros(16 * -(-N // 16) * (-(-K // 16) * 4))
    exact = _fixed8_kernel(codes, mant, 2.0**e_row)(x)
    with kernels.use_isa("avx2"):
        assert torch.equal(_fixed8_kernel(codes, mant, 2.0**e_row, scale=zeros)(x), exact)
    with kernels.use_isa("scalar"):
        assert not _fixed8_kernel(codes, mant, 2.0**e_row, scale=zeros)(x).any()
