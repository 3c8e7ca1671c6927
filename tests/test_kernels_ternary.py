"""Ternary (2-bit) weights x int8 activations: packing, activation quantization, integer GEMM
(bit-exact against int64 references) and the fused fp32 linear (within a few ulp of float64),
on every ISA path this CPU has."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit import kernels

EPS32 = float(np.finfo(np.float32).eps)


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _codes(rng: np.random.Generator, n: int, k: int, p_zero: float = 1 / 3) -> np.ndarray:
    signs = rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, k))
    return np.where(rng.random((n, k)) < p_zero, 0, signs).astype(np.int8)


def _acts(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    return rng.integers(-128, 128, size=(m, k), dtype=np.int16).astype(np.int8)


# ---- packing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "k"), [(1, 1), (16, 16), (17, 15), (5, 33), (40, 100), (33, 4097)])
def test_pack_matches_numpy_layout_and_roundtrips(n: int, k: int) -> None:
    codes = _codes(np.random.default_rng(n * 1000 + k), n, k)
    tiles = kernels.pack_ternary(torch.from_numpy(codes))
    assert tuple(tiles.shape) == kernels.ternary_tiles_shape(n, k)
    np.testing.assert_array_equal(tiles.numpy(), kernels.pack_ternary_reference(codes))
    np.testing.assert_array_equal(kernels.unpack_ternary(tiles, n, k).numpy(), codes)


def test_pack_layout_of_one_weight() -> None:
    # Row 16 + 3 (block 1, r = 3), k = 16 * 2 + 4 * 1 + 2 (tile 2, plane 1, j = 2) set to +1:
    # byte 4 * 3 + 2 of tile (1, 2) holds code 2 in bits 2..3; everything else is code 1 (0x55).
    codes = np.zeros((20, 40), dtype=np.int8)
    codes[19, 38] = 1
    tiles = kernels.pack_ternary(torch.from_numpy(codes)).numpy()
    expected = np.full(tiles.shape, 0x55, dtype=np.uint8)
    expected[1, 2, 14] = 0x55 & ~(3 << 2) | (2 << 2)
    np.testing.assert_array_equal(tiles, expected)


def test_pack_rejects_non_ternary_codes() -> None:
    codes = torch.zeros(3, 5, dtype=torch.int8)
    codes[2, 4] = 2
    with pytest.raises(ValueError, match="row 2 has 2 at column 4"):
        kernels.pack_ternary(codes)


# ---- activation quantization ---------------------------------------------------------------------


@pytest.mark.parametrize("act", ["absmax", "dfp", "dfp_tensor", "fixed"])
@pytest.mark.parametrize("k", [1, 15, 16, 17, 31, 32, 33, 100, 4097])
def test_quantize_matches_torch_reference(isa: str, act: str, k: int) -> None:
    rng = np.random.default_rng(k)
    x = torch.from_numpy(
        (rng.standard_normal((6, k)) * rng.choice([1e-3, 1.0, 300.0], size=(6, 1))).astype(
            np.float32
        )
    )
    x[1] = 0.0  # all-zero token: finite scale, zero codes
    x[2] *= 1e-30  # below the 1e-5 absmax floor
    exponent = -3 if act == "fixed" else None
    name = "dfp" if act == "fixed" else act
    q, a_inv, sums = kernels.quantize_activations(x, name, exponent=exponent)
    q_ref, a_inv_ref = kernels.quantize_activations_reference(x, name, exponent=exponent)
    np.testing.assert_array_equal(q.numpy(), q_ref.numpy())
    np.testing.assert_array_equal(a_inv.numpy(), a_inv_ref.numpy())
    np.testing.assert_array_equal(sums[:, 0].numpy(), q_ref.to(torch.int64).sum(1).numpy())


def test_quantize_rounds_half_to_even(isa: str) -> None:
    # max|x| = 127 gives s = 1, so x * s hits exact .5 ties: half-to-even, not half-away.
    ties = [127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5, 3.49999976]
    x = torch.tensor([ties * 4], dtype=torch.float32)  # 40 values: SIMD body and tail
    q, a_inv, _ = kernels.quantize_activations(x)
    expected = [127, 0, 2, 2, 0, -2, -2, 126, -126, 3] * 4
    assert q[0].tolist() == expected and a_inv.item() == 1.0


def test_dfp_exponent_rule_and_saturation(isa: str) -> None:
    # Smallest E with round(max|x| * 2**-E) <= 127: 127.49 -> 0, 127.5 -> 1 (rounds to 128),
    # 0.25 -> -8 (0.25 * 512 = 128 > 127).
    x = torch.tensor([[127.49, -3.0], [127.5, 1.0], [0.25, 0.0], [0.0, 0.0]], dtype=torch.float32)
    _, a_inv, _ = kernels.quantize_activations(x, "dfp")
    assert a_inv.tolist() == [1.0, 2.0, 2.0**-8, 1.0]
    q, _, _ = kernels.quantize_activations(x * torch.tensor([1.0, -1.0]), "dfp", exponent=-1)
    assert q[0].tolist() == [127, 6] and q[1].tolist() == [127, -2] and q[2].tolist() == [0, 0]
    q, _, _ = kernels.quantize_activations(-x, "dfp", exponent=-1)  # saturates at -128 (full int8)
    assert q[0].tolist() == [-128, 6]
    qt, a_inv_t, _ = kernels.quantize_activations(x, "dfp_tensor")
    assert a_inv_t.tolist() == [2.0] * 4 and qt[0].tolist() == [64, -2]


def test_dfp_matches_functional_dfp_quantize(isa: str) -> None:
    # The packed path's "dfp_tensor" must reproduce the simulation's dfp_quantize exactly.
    functional = pytest.importorskip("lowbit.functional")
    rng = np.random.default_rng(5)
    for scale in (1e-3, 1.0, 127.5, 3e4):
        x = torch.from_numpy((rng.standard_normal((7, 300)) * scale).astype(np.float32))
        ints, e = functional.dfp_quantize(x, bits=8)
        q, a_inv, _ = kernels.quantize_activations(x, "dfp_tensor")
        assert torch.equal(q, ints) and (a_inv == 2.0**e).all()
        q, _, _ = kernels.quantize_activations(x, "dfp", exponent=e - 1)
        assert torch.equal(q, functional.dfp_quantize(x, bits=8, exponent=e - 1)[0])


@pytest.mark.parametrize("group", [4, 8, 12, 64])
def test_quantize_group_sums(isa: str, group: int) -> None:
    x = torch.randn(5, 203)
    q, _, sums = kernels.quantize_activations(x, group_size=group)
    groups = -(-203 // group)
    padded = torch.zeros(5, groups * group, dtype=torch.int64)
    padded[:, :203] = q.to(torch.int64)
    np.testing.assert_array_equal(sums.numpy(), padded.reshape(5, groups, group).sum(2).numpy())


def test_quantize_noncontiguous_input(isa: str) -> None:
    x = torch.randn(30, 300)[::4, 3:260]
    q, a_inv, _ = kernels.quantize_activations(x)
    q_ref, a_ref = kernels.quantize_activations_reference(x)
    assert torch.equal(q, q_ref) and torch.equal(a_inv, a_ref)


# ---- integer GEMM --------------------------------------------------------------------------------


def _check_gemm(a: np.ndarray, codes: np.ndarray, msg: str = "") -> None:
    tiles = kernels.pack_ternary(torch.from_numpy(codes))
    n = codes.shape[0]
    d, p = kernels.ternary_gemm(torch.from_numpy(a), tiles, n, asym=True)
    np.testing.assert_array_equal(
        d.numpy(), kernels.ternary_matmul_reference(a, codes), err_msg=msg
    )
    np.testing.assert_array_equal(
        p.numpy(), kernels.ternary_matmul_reference(a, codes == 1), err_msg=msg
    )
    d_only = kernels.ternary_gemm(torch.from_numpy(a), tiles, n)
    np.testing.assert_array_equal(d_only.numpy(), d.numpy(), err_msg=msg)


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 20),
    n=st.integers(1, 70),
    k=st.integers(1, 1000),
    seed=st.integers(0, 2**31 - 1),
)
def test_gemm_matches_int64_reference(m: int, n: int, k: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, codes = _acts(rng, m, k), _codes(rng, n, k, p_zero=rng.random())
    for isa in kernels.available_isas():
        with kernels.use_isa(isa):
            _check_gemm(a, codes, f"isa={isa}")


@pytest.mark.parametrize("k", [4095, 4096, 4097])
@pytest.mark.parametrize("m", [1, 3, 4, 5, 7, 8, 9, 64])
def test_gemm_long_k_and_token_tails(isa: str, k: int, m: int) -> None:
    # m covers each path's token block (AVX-512 8 / AVX2 4) and its neighbours; n = 37 is not a
    # multiple of the 16-row tile.
    rng = np.random.default_rng(k * 100 + m)
    _check_gemm(_acts(rng, m, k), _codes(rng, 37, k))


@pytest.mark.parametrize("value", [127, -127, -128])
def test_gemm_adversarial_extremes(isa: str, value: int) -> None:
    # Constant ±127 activations against all +1 / all -1 rows reach |D| = 127 * K: the case that
    # overflows 16-bit accumulation (bitnet.cpp's I2_S); zero rows and zero tokens give 0.
    k = 4097
    codes = np.ones((35, k), dtype=np.int8)
    codes[1] = -1
    codes[2] = 0
    codes[3, ::2] = -1
    a = np.full((4, k), value, dtype=np.int8)
    a[1] = 0
    a[2, ::3] = -value if value != -128 else 127
    _check_gemm(a, codes)
    d = kernels.ternary_gemm(torch.from_numpy(a), kernels.pack_ternary(torch.from_numpy(codes)), 35)
    assert d[0, 0] == value * k and d[0, 1] == -value * k and d[0, 2] == 0 and (d[1] == 0).all()


@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize(("m", "n"), [(1, 600), (64, 203), (40, 20)])
def test_gemm_thread_splits(isa: str, n_threads: int, m: int, n: int) -> None:
    # Large enough to cross the threading threshold; (40, 20) has too few rows and splits tokens.
    rng = np.random.default_rng(n_threads * 7 + m)
    k = 4097 if m < 40 else 2500
    with threads(n_threads):
        _check_gemm(_acts(rng, m, k), _codes(rng, n, k))


def test_gemm_noncontiguous_activations(isa: str) -> None:
    rng = np.random.default_rng(3)
    a = torch.from_numpy(_acts(rng, 20, 300))[::2, 7:250]
    codes = _codes(rng, 21, 243)
    d = kernels.ternary_gemm(a, kernels.pack_ternary(torch.from_numpy(codes)), 21)
    np.testing.assert_array_equal(d.numpy(), kernels.ternary_matmul_reference(a.numpy(), codes))


def test_gemm_rejects_mismatched_weights() -> None:
    tiles = kernels.pack_ternary(torch.zeros(20, 40, dtype=torch.int8))
    with pytest.raises(ValueError, match="do not fit out_features=20, in_features=50"):
        kernels.ternary_gemm(torch.zeros(2, 50, dtype=torch.int8), tiles, 20)
    with pytest.raises(ValueError, match="do not fit out_features=40"):
        kernels.ternary_gemm(torch.zeros(2, 40, dtype=torch.int8), tiles, 40)


# ---- fused fp32 linear ---------------------------------------------------------------------------


def _reference_linear(
    x: torch.Tensor,
    codes: np.ndarray,
    kind: str,
    scales: np.ndarray,
    bias: np.ndarray | None,
    group: int,
    act: str,
    relu: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """float64 output and the bound |y - y64| must stay under (a few fp32 roundings)."""
    q, a_inv = kernels.quantize_activations_reference(x, act)
    q64, ai = q.numpy().astype(np.int64), a_inv.numpy().astype(np.float64)[:, None]
    c64 = codes.astype(np.int64)
    if kind == "asym":
        wp, wn = scales[:, 0].astype(np.float64), scales[:, 1].astype(np.float64)
        pos, neg = q64 @ (c64 == 1).T, q64 @ (c64 == -1).T
        terms = np.abs(pos * wp) + np.abs(neg * wn) + np.abs(pos * (wp - wn))
        y, mag = (pos * wp - neg * wn) * ai, terms * ai
        rounds = 5
    elif kind == "group":
        k = x.shape[1]
        groups = scales.shape[1]
        y, mag = np.zeros((x.shape[0], codes.shape[0])), np.zeros((x.shape[0], codes.shape[0]))
        for g in range(groups):
            sl = slice(g * group, min(k, (g + 1) * group))
            part = (q64[:, sl] @ c64[:, sl].T) * scales[:, g].astype(np.float64)
            y, mag = y + part, mag + np.abs(part)
        y, mag = y * ai, mag * ai
        rounds = groups + 3
    else:
        y = (q64 @ c64.T) * scales.astype(np.float64) * ai
        mag, rounds = np.abs(y), 4
    if bias is not None:
        y, mag = y + bias, mag + np.abs(bias)
    if relu:
        y = np.maximum(y, 0.0)
    return y, rounds * EPS32 * mag + 1e-37


@pytest.mark.parametrize("act", ["absmax", "dfp"])
@pytest.mark.parametrize(
    ("kind", "group"),
    [
        ("tensor", 0),
        ("row", 0),
        ("asym", 0),
        ("asym_tensor", 0),
        ("group", 4),
        ("group", 12),
        ("group", 64),
    ],
)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 100), (9, 17, 257), (64, 33, 4097)])
def test_linear_matches_float64_reference(
    isa: str, act: str, kind: str, group: int, m: int, n: int, k: int
) -> None:
    rng = np.random.default_rng(m + n + k + group)
    codes = _codes(rng, n, k)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    bias = rng.standard_normal(n).astype(np.float32) if m != 9 else None
    relu = m == 9
    if kind in ("asym", "asym_tensor"):
        scales = rng.uniform(0.05, 2.0, size=(n, 2) if kind == "asym" else (1, 2)).astype(
            np.float32
        )
        packed = kernels.pack_ternary_scales(
            torch.from_numpy(scales.reshape(-1) if kind == "asym_tensor" else scales),
            n,
            k,
            asym=True,
        )
        scales = np.broadcast_to(scales, (n, 2))
        kind = "asym"
    elif kind == "group":
        scales = rng.uniform(0.05, 2.0, size=(n, -(-k // group))).astype(np.float32)
        packed = kernels.pack_ternary_scales(torch.from_numpy(scales), n, k, group_size=group)
    else:
        scales = rng.uniform(0.05, 2.0, size=n if kind == "row" else 1).astype(np.float32)
        packed = kernels.pack_ternary_scales(torch.from_numpy(scales), n, k)
        scales = np.broadcast_to(scales, (n,))
    got = kernels.ternary_linear(
        x,
        kernels.pack_ternary(torch.from_numpy(codes)),
        packed[0],
        packed[1],
        kernels.pad_bias(None if bias is None else torch.from_numpy(bias), n),
        out_features=n,
        group_size=group,
        act=act,
        relu=relu,
    )
    expected, tol = _reference_linear(x, codes, kind, scales, bias, group, act, relu)
    assert got.shape == (m, n) and got.dtype == torch.float32
    err = np.abs(got.numpy().astype(np.float64) - expected)
    assert (err <= tol).all(), (
        f"max excess {np.max(err - tol)} at {np.unravel_index(np.argmax(err - tol), err.shape)}"
    )


def test_linear_batch_dims_and_zero_tokens(isa: str) -> None:
    codes = _codes(np.random.default_rng(0), 24, 48)
    tiles = kernels.pack_ternary(torch.from_numpy(codes))
    scale, _ = kernels.pack_ternary_scales(torch.tensor(0.5), 24, 48)
    x = torch.randn(2, 3, 48)
    x[1, 2] = 0.0
    y = kernels.ternary_linear(x, tiles, scale, out_features=24)
    assert y.shape == (2, 3, 24)
    assert (y[1, 2] == 0).all()
    flat = kernels.ternary_linear(x.reshape(6, 48), tiles, scale, out_features=24)
    assert torch.equal(y.reshape(6, 24), flat)
    empty = kernels.ternary_linear(torch.zeros(0, 48), tiles, scale, out_features=24)
    assert empty.shape == (0, 24)


@pytest.mark.parametrize("k", [7, 48, 100])
def test_linear_nan_tokens_give_nan_rows(isa: str, k: int) -> None:
    # A NaN anywhere in a token (SIMD body or tail) makes that token's absmax, and so its whole
    # output row, NaN (as the PyTorch per-token reference); the other tokens are unchanged.
    codes = _codes(np.random.default_rng(k), 24, k)
    tiles = kernels.pack_ternary(torch.from_numpy(codes))
    scale, _ = kernels.pack_ternary_scales(torch.tensor(0.5), 24, k)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(k))
    clean = kernels.ternary_linear(x, tiles, scale, out_features=24)
    x[1, 0] = float("nan")
    x[3, k - 1] = float("nan")
    y = kernels.ternary_linear(x, tiles, scale, out_features=24)
    assert bool(y[[1, 3]].isnan().all())
    assert torch.equal(y[[0, 2, 4]], clean[[0, 2, 4]])
    # the fused ReLU keeps them NaN, as torch.relu does (maxps returns its second operand on
    # NaN: ReLU as max(y, 0) gave 0 on the SIMD paths)
    relu_scales = {
        "row": kernels.pack_ternary_scales(torch.tensor(0.5), 24, k),
        "asym": kernels.pack_ternary_scales(torch.tensor([0.7, 0.4]), 24, k, asym=True),
        "group": kernels.pack_ternary_scales(torch.rand(24, -(-k // 4)) + 0.1, 24, k, group_size=4),
    }
    for name, (sc, sc2) in relu_scales.items():
        g = 4 if name == "group" else 0
        for act in ("absmax", "float"):
            out = kernels.ternary_linear(
                x, tiles, sc, sc2, out_features=24, group_size=g, act=act, relu=True
            )
            assert bool(out[[1, 3]].isnan().all()), (name, act)
            assert not out[[0, 2, 4]].isnan().any() and (out[[0, 2, 4]] >= 0).all()


def test_linear_rejects_bad_scales() -> None:
    tiles = kernels.pack_ternary(torch.zeros(20, 40, dtype=torch.int8))
    with pytest.raises(ValueError, match="scale must hold 32 floats"):
        kernels.ternary_linear(torch.randn(1, 40), tiles, torch.ones(20), out_features=20)
    with pytest.raises(ValueError, match="multiple of 4"):
        kernels.pack_ternary_scales(torch.ones(20, 7), 20, 40, group_size=6)
    with pytest.raises(ValueError, match="asymmetric scales must be"):
        kernels.pack_ternary_scales(torch.ones(3, 2), 20, 40, asym=True)


# ---- torch.library ops ---------------------------------------------------------------------------


class _TinyTernary(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        codes = _codes(np.random.default_rng(1), 10, 24)
        self.register_buffer("tiles", kernels.pack_ternary(torch.from_numpy(codes)))
        scale, _ = kernels.pack_ternary_scales(torch.linspace(0.1, 1.0, 10), 10, 24)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", kernels.pad_bias(torch.arange(10.0), 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.lowbit.ternary_linear(
            x, self.tiles, self.scale, None, self.bias, 10, 0, 0, 0, True
        )
        return y * 2.0


def test_custom_op_matches_direct_call_and_exports() -> None:
    module = _TinyTernary()
    x = torch.randn(3, 24)
    direct = (
        kernels.ternary_linear(
            x, module.tiles, module.scale, None, module.bias, out_features=10, relu=True
        )
        * 2.0
    )
    assert torch.equal(module(x), direct)
    torch.library.opcheck(
        torch.ops.lowbit.ternary_linear,
        (x, module.tiles, module.scale, None, module.bias, 10, 0, 0, 0, True),
    )
    program = torch.export.export(module, (x,))
    assert any("lowbit.ternary_linear" in str(node.target) for node in program.graph.nodes)
    assert torch.equal(program.module()(x), direct)
    compiled = torch.compile(module, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), direct)


def test_gemv_beyond_the_masked_plane_limit(isa: str) -> None:
    # K past 2^19 makes the AVX-512 GEMV leave its scaled-plane accumulators (int32 headroom)
    # for the shift-and-mask kernel; both must stay exact at the extremes (|D| = 127 * K).
    k = (1 << 19) + 40
    codes = np.ones((17, k), dtype=np.int8)
    codes[1] = -1
    _check_gemm(np.full((1, k), 127, dtype=np.int8), codes)


@pytest.mark.parametrize(("kind", "group"), [("row", 0), ("asym", 0), ("group", 4), ("group", 12)])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 100), (9, 17, 257), (13, 33, 4097)])
def test_exact_float_path_matches_float64(
    isa: str, kind: str, group: int, m: int, n: int, k: int
) -> None:
    # act="float": fp32 activations, no quantization; only the summation order differs from
    # float64, so the bound is K-scaled: (rounds + K) * eps * sum |x * w|.
    rng = np.random.default_rng(m * n + k + group)
    codes = _codes(rng, n, k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    c64, x64 = codes.astype(np.float64), x.astype(np.float64)
    if kind == "asym":
        sc = rng.uniform(0.05, 2.0, size=(n, 2)).astype(np.float32)
        scale, scale2 = kernels.pack_ternary_scales(torch.from_numpy(sc), n, k, asym=True)
        w = np.where(codes == 1, sc[:, :1], np.where(codes == -1, -sc[:, 1:], 0.0))
    elif kind == "group":
        sc = rng.uniform(0.05, 2.0, size=(n, -(-k // group))).astype(np.float32)
        scale, scale2 = kernels.pack_ternary_scales(torch.from_numpy(sc), n, k, group_size=group)
        w = c64 * np.repeat(sc, group, axis=1)[:, :k]
    else:
        sc = rng.uniform(0.05, 2.0, size=n).astype(np.float32)
        scale, scale2 = kernels.pack_ternary_scales(torch.from_numpy(sc), n, k)
        w = c64 * sc[:, None]
    got = kernels.ternary_linear(
        torch.from_numpy(x),
        kernels.pack_ternary(torch.from_numpy(codes)),
        scale,
        scale2,
        kernels.pad_bias(torch.from_numpy(bias), n),
        out_features=n,
        group_size=group,
        act="float",
    )
    expected = x64 @ w.T + bias
    tol = (k + 8) * EPS32 * (np.abs(x64) @ np.abs(w).T * 2 + np.abs(bias))
    assert (np.abs(got.numpy() - expected) <= tol).all()
    if kind == "row":  # int4 weights on the same path: codes -1..1 are valid 4-bit codes
        got4 = kernels.int4_linear(
            torch.from_numpy(x),
            kernels.pack_int4(torch.from_numpy(codes)),
            scale,
            kernels.pad_bias(torch.from_numpy(bias), n),
            out_features=n,
            act="float",
        )
        assert (np.abs(got4.numpy() - expected) <= tol).all()
