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
