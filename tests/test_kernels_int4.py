"""4-bit (and 3-bit in the 4-bit container) weights x int8 activations: packing, exact integer
GEMM against int64 references and the fused fp32 linear, on every ISA path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import kernels

EPS32 = float(np.finfo(np.float32).eps)


def _codes(rng: np.random.Generator, n: int, k: int, bits: int = 4) -> np.ndarray:
    half = 1 << (bits - 1)
    return rng.integers(-half, half, size=(n, k)).astype(np.int8)


def _acts(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return rng.integers(-128, 128, size=(m, k), dtype=np.int16).astype(np.int8)


def _check(a: np.ndarray, codes: np.ndarray, msg: str = "") -> None:
    tiles = kernels.pack_int4(torch.from_numpy(codes))
    got = kernels.int4_gemm(torch.from_numpy(a), tiles, codes.shape[0])
    np.testing.assert_array_equal(
        got.numpy(), kernels.ternary_matmul_reference(a, codes), err_msg=msg
    )


@pytest.mark.parametrize(("n", "k"), [(1, 1), (16, 8), (17, 15), (5, 33), (40, 100), (33, 4097)])
def test_pack_matches_numpy_layout_and_roundtrips(n: int, k: int) -> None:
    codes = _codes(np.random.default_rng(n + k), n, k)
    tiles = kernels.pack_int4(torch.from_numpy(codes))
    assert tuple(tiles.shape) == kernels.int4_tiles_shape(n, k)
    np.testing.assert_array_equal(tiles.numpy(), kernels.pack_int4_reference(codes))
    np.testing.assert_array_equal(kernels.unpack_int4(tiles, n, k).numpy(), codes)


def test_pack_layout_of_one_weight() -> None:
    # Row 16 + 2, k = 8 * 3 + 4 + 1 (tile 3, high nibble, j = 1) set to -3: code 5.
    codes = np.zeros((20, 40), dtype=np.int8)
    codes[18, 29] = -3
    tiles = kernels.pack_int4(torch.from_numpy(codes)).numpy()
    expected = np.full(tiles.shape, 0x88, dtype=np.uint8)
    expected[1, 3, 4 * 2 + 1] = 0x58
    np.testing.assert_array_equal(tiles, expected)


def test_pack_rejects_out_of_range_codes() -> None:
    codes = torch.zeros(2, 3, dtype=torch.int8)
    codes[1, 0] = 8
    with pytest.raises(ValueError, match=r"in \[-8, 7\]; row 1 has 8 at column 0"):
        kernels.pack_int4(codes)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 70),
    k=st.integers(1, 1000),
    bits=st.sampled_from([3, 4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_gemm_matches_int64_reference(m: int, n: int, k: int, bits: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, codes = _acts(rng, m, k), _codes(rng, n, k, bits)
    for isa in kernels.available_isas():
        with kernels.use_isa(isa):
            _check(a, codes, f"isa={isa}")


@pytest.mark.parametrize("k", [4095, 4096, 4097])
@pytest.mark.parametrize("m", [1, 4, 5, 8, 9, 64])
def test_gemm_long_k_and_token_tails(isa: str, k: int, m: int) -> None:
    rng = np.random.default_rng(k + m)
    _check(_acts(rng, m, k), _codes(rng, 37, k))


@pytest.mark.parametrize("value", [127, -128])
def test_gemm_adversarial_extremes(isa: str, value: int) -> None:
    # |D| = 128 * 8 * K at the extremes: fine in int32, far beyond int16.
    k = 4097
    codes = np.full((20, k), -8, dtype=np.int8)
    codes[1] = 7
    codes[2] = 0
    a = np.full((3, k), value, dtype=np.int8)
    a[1] = 0
    _check(a, codes)
    d = kernels.int4_gemm(torch.from_numpy(a), kernels.pack_int4(torch.from_numpy(codes)), 20)
    assert d[0, 0] == -8 * value * k and d[0, 1] == 7 * value * k and d[0, 2] == 0


def test_gemv_beyond_the_masked_plane_limit(isa: str) -> None:
    # K past 2^17 makes the AVX-512 GEMV leave its scaled-plane accumulators (int32 headroom)
    # for the shift-and-mask kernel; both must stay exact at the extremes.
    k = (1 << 17) + 40
    codes = np.full((17, k), 7, dtype=np.int8)
    codes[1] = -8
    a = np.full((1, k), 127, dtype=np.int8)
    _check(a, codes)


@pytest.mark.parametrize("group", [0, 8, 32])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 100), (64, 33, 1027)])
def test_linear_matches_float64_reference(isa: str, group: int, m: int, n: int, k: int) -> None:
    rng = np.random.default_rng(m + n + k + group)
    codes = _codes(rng, n, k)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    bias = rng.standard_normal(n).astype(np.float32)
    groups = -(-k // group) if group else 1
    scales = rng.uniform(0.01, 0.2, size=(n, groups) if group else n).astype(np.float32)
    scale, _ = kernels.pack_ternary_scales(torch.from_numpy(scales), n, k, group_size=group)
    got = kernels.int4_linear(
        x,
        kernels.pack_int4(torch.from_numpy(codes)),
        scale,
        kernels.pad_bias(torch.from_numpy(bias), n),
        out_features=n,
        group_size=group,
    )
    q, a_inv = kernels.quantize_activations_reference(x)
    q64, ai = q.numpy().astype(np.int64), a_inv.numpy().astype(np.float64)[:, None]
    y, mag = np.zeros((m, n)), np.zeros((m, n))
    for g in range(groups):
        sl = slice(g * group, min(k, (g + 1) * group)) if group else slice(0, k)
        part = (q64[:, sl] @ codes[:, sl].astype(np.int64).T) * (scales[:, g] if group else scales)
        y, mag = y + part, mag + np.abs(part)
    y, mag = y * ai + bias, mag * ai + np.abs(bias)
    err = np.abs(got.numpy().astype(np.float64) - y)
    assert (err <= (groups + 4) * EPS32 * mag + 1e-37).all()


def test_int4_custom_op_exports() -> None:
    codes = _codes(np.random.default_rng(2), 12, 40)
    tiles = kernels.pack_int4(torch.from_numpy(codes))
    scale, _ = kernels.pack_ternary_scales(torch.full((12,), 0.1), 12, 40)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("tiles", tiles)
            self.register_buffer("scale", scale)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ops.lowbit.int4_linear(x, self.tiles, self.scale, None, 12, 0, 0, 0, False)

    x = torch.randn(2, 40)
    expected = kernels.int4_linear(x, tiles, scale, out_features=12)
    program = torch.export.export(Tiny(), (x,))
    assert torch.equal(program.module()(x), expected)
