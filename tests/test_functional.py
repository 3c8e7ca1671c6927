"""lowbit.functional against independent references: brute-force searches, loop-based grouping,
hand-derived gradients and float64 finite differences of each STE's surrogate function."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lowbit import functional as F
from lowbit import kernels
from lowbit.qtypes import Granularity

GRANS = [
    Granularity("tensor"),
    Granularity("channel"),
    Granularity("group", 3, "in"),  # 7 % 3 and 18 % 3 cover remainder and exact groups
    Granularity("group", 4, "in"),
    Granularity("group", 2, "out"),  # 5 output channels: a remainder cluster of 1
]
SHAPES = [(5, 7), (5, 2, 3, 3)]


# ----------------------------------------------------------------------------------------------
# Loop-based references for the granularity layout (independent of to_units / expand_scales)


def ref_units(w: torch.Tensor, g: Granularity) -> list[list[tuple[int, ...]]]:
    """Element index lists (multi-index into w) of every unit, in scale order."""
    shape = tuple(w.shape)
    out = shape[0]
    inner = list(itertools.product(*[range(s) for s in shape[1:]]))  # row-major (in, kh, kw)
    if g.kind == "tensor":
        return [[(o, *i) for o in range(out) for i in inner]]
    if g.kind == "channel":
        return [[(o, *i) for i in inner] for o in range(out)]
    n = g.group_size
    if g.axis == "in":
        return [
            [(o, *i) for i in inner[s : s + n]] for o in range(out) for s in range(0, len(inner), n)
        ]
    return [[(o, *i) for o in range(s, min(s + n, out)) for i in inner] for s in range(0, out, n)]


def ref_scale_shape(shape: tuple[int, ...], g: Granularity) -> tuple[int, ...]:
    out, k = shape[0], math.prod(shape[1:])
    return {
        "tensor": (1,),
        "channel": (out,),
        "group": (out, math.ceil(k / (g.group_size or 1)))
        if g.axis == "in"
        else (math.ceil(out / (g.group_size or 1)),),
    }[g.kind]


def ref_expand(scales: torch.Tensor, w: torch.Tensor, g: Granularity) -> torch.Tensor:
    full = torch.empty_like(w)
    flat = scales.reshape(-1)
    for u, idx in enumerate(ref_units(w, g)):
        for i in idx:
            full[i] = flat[u]
    return full


# ----------------------------------------------------------------------------------------------
# Sign and binarize


def test_sign_rule_zero_negzero_nan() -> None:
    x = torch.tensor(
        [0.0, -0.0, float("nan"), float("inf"), -float("inf"), -1e-45, 1e-45, -3.0, 2.0]
    )
    assert F.sign(x).tolist() == [1, 1, 1, 1, -1, -1, 1, -1, 1]


def test_binarize_values_and_gated_gradient() -> None:
    x = torch.tensor([-2.0, -1.0, -0.3, 0.0, -0.0, 0.7, 1.0, 1.5], requires_grad=True)
    y = F.binarize(x)
    assert y.tolist() == [-1, -1, -1, 1, 1, 1, 1, 1]
    g = torch.arange(1.0, 9.0)
    y.backward(g)
    # Hand-derived: g * 1{|x| <= 1}.
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 0.0]


def test_binarize_ungated_is_identity_gradient() -> None:
    x = torch.tensor([-5.0, -0.5, 0.0, 3.0], requires_grad=True)
    F.sign_ste(x).backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert x.grad.tolist() == [1.0, 2.0, 3.0, 4.0]
    x.grad = None
    F.binarize(x, gate=False).sum().backward()
    assert x.grad.tolist() == [1.0] * 4


def fd_grad(f, x: torch.Tensor, v: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central finite differences of sum(f(x) * v) in float64, one coordinate at a time."""
    x = x.detach().double()
    g = torch.empty_like(x)
    flat = x.reshape(-1)
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = eps
        g.reshape(-1)[i] = (
            (f((flat + e).reshape(x.shape)) - f((flat - e).reshape(x.shape))) * v
        ).sum() / (2 * eps)
    return g


def away_from(x: torch.Tensor, kinks: list[float], margin: float = 1e-3) -> torch.Tensor:
    for k in kinks:
        close = (x - k).abs() < margin
        x = torch.where(close, x + 3 * margin, x)
    return x


@pytest.mark.parametrize(
    "ste_fn, surrogate, kinks",
    [
        (lambda x: F.binarize(x), lambda x: x.clamp(-1, 1), [-1.0, 1.0]),
        (lambda x: F.binarize(x, gate=False), lambda x: x, []),
        (
            lambda x: F.linear_fake_quantize(x, 3, clip=1.5),
            lambda x: x.clamp(-1.5, 1.5),
            [-1.5, 1.5],
        ),
        (
            lambda x: F.linear_fake_quantize(x, 4, clip=1.0, signed=False),
            lambda x: x.clamp(0, 1),
            [0.0, 1.0],
        ),
        (lambda x: F.log_fake_quantize(x, 3, scale=1.2), lambda x: x.clamp(-1.2, 1.2), [-1.2, 1.2]),
        (
            lambda x: F.dfp_fake_quantize(x, 4, True, exponent=-2),
            lambda x: x.clamp(-8 / 4, 7 / 4),
            [-2.0, 1.75],
        ),
        (
            lambda x: F.dfp_fake_quantize(x, 4, False, exponent=-3),
            lambda x: x.clamp(0, 15 / 8),
            [0.0, 15 / 8],
        ),
    ],
    ids=["binarize", "sign_ste", "linear3", "ulinear4", "log3", "dfp4", "udfp4"],
)
def test_ste_gradient_equals_finite_differences_of_surrogate(ste_fn, surrogate, kinks) -> None:
    gen = torch.Generator().manual_seed(0)
    x = away_from(torch.randn(40, generator=gen, dtype=torch.float64) * 1.5, kinks).requires_grad_(
        True
    )
    v = torch.randn(40, generator=gen, dtype=torch.float64)
    (ste_fn(x) * v).sum().backward()
    torch.testing.assert_close(x.grad, fd_grad(surrogate, x, v), rtol=1e-6, atol=1e-6)


def test_stochastic_binarize_probability_is_hard_sigmoid() -> None:
    gen = torch.Generator().manual_seed(1)
    xs = torch.tensor([-1.5, -0.6, 0.0, 0.3, 0.9, 2.0])
    n = 20000
    y = F.binarize(xs.repeat(n, 1), stochastic=True, generator=gen)
    assert set(y.unique().tolist()) <= {-1.0, 1.0}
    p_hat = (y == 1).double().mean(0)
    p = ((xs.double() + 1) / 2).clamp(0, 1)
    sigma = (p * (1 - p) / n).sqrt()
    assert torch.all((p_hat - p).abs() <= 5 * sigma + 1e-12), (p_hat, p)


def test_stochastic_binarize_gradient_is_gated() -> None:
    x = torch.tensor([-1.5, -0.5, 0.5, 1.5], requires_grad=True)
    F.binarize(x, stochastic=True).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0]


def test_ste_value_is_exact_and_scale_gradient_flows() -> None:
    w = torch.randn(6, 5, requires_grad=True)
    s = torch.tensor([0.37], requires_grad=True)
    codes = torch.tensor([-1, 0, 1] * 10).reshape(6, 5).float()
    w_q = codes * s
    mask = (w.detach().abs() < 0.5).float()
    y = F.ste(w, w_q, mask)
    assert torch.equal(y, w_q)
    g = torch.randn(6, 5)
    y.backward(g)
    assert torch.equal(w.grad, g * mask)
    torch.testing.assert_close(s.grad, (g * codes).sum().reshape(1))


# ----------------------------------------------------------------------------------------------
# Granularity helpers


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("g", GRANS, ids=lambda g: g.describe())
def test_units_roundtrip_and_layout(shape, g) -> None:
    w = torch.randn(shape, dtype=torch.float64)
    units, counts = F.to_units(w, g)
    ref = ref_units(w, g)
    assert units.shape[0] == len(ref) == math.prod(ref_scale_shape(shape, g))
    assert counts.tolist() == [len(idx) for idx in ref]
    for u, idx in enumerate(ref):
        assert units[u, : len(idx)].tolist() == [w[i].item() for i in idx]
        assert torch.all(units[u, len(idx) :] == 0)
    assert torch.equal(F.from_units(units, shape, g), w)
    assert g.scale_shape(shape) == ref_scale_shape(shape, g)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("g", GRANS, ids=lambda g: g.describe())
def test_expand_scales_and_unit_stats_match_loops(shape, g) -> None:
    w = torch.randn(shape, dtype=torch.float64)
    scales = torch.rand(ref_scale_shape(shape, g), dtype=torch.float64) + 0.1
    full = F.expand_scales(scales, shape, g).expand(shape)
    assert torch.equal(full, ref_expand(scales, w, g))
    mean = torch.tensor(
        [sum(abs(w[i].item()) for i in idx) / len(idx) for idx in ref_units(w, g)],
        dtype=torch.float64,
    )
    mx = torch.tensor(
        [max(abs(w[i].item()) for i in idx) for idx in ref_units(w, g)], dtype=torch.float64
    )
    torch.testing.assert_close(F.unit_mean_abs(w, g).reshape(-1), mean, rtol=1e-12, atol=0)
    assert torch.equal(F.unit_max_abs(w, g).reshape(-1), mx)


def test_granularity_validation() -> None:
    with pytest.raises(ValueError, match="group_size"):
        Granularity("group")
    with pytest.raises(ValueError, match="group_axis"):
        Granularity("group", 4, "rows")
    with pytest.raises(ValueError, match="unknown granularity"):
        Granularity("layer")
    assert Granularity.of(None, 4) == Granularity("group", 4, "in")
    assert Granularity.of("channel", 4, "out") == Granularity("channel")


# ----------------------------------------------------------------------------------------------
# Binary / ternary weights


@pytest.mark.parametrize("g", GRANS, ids=lambda g: g.describe())
def test_bwn_alpha_is_mean_abs_and_codes_are_signs(g) -> None:
    w = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    w[0, 0, 0, 0] = 0.0
    alpha, codes = F.bwn(w, g)
    assert codes.dtype == torch.int8 and codes[0, 0, 0, 0] == 1
    assert torch.equal(codes, torch.where(w < 0, -1, 1).to(torch.int8))
    for u, idx in enumerate(ref_units(w, g)):
        ref = sum(abs(w[i].item()) for i in idx) / len(idx)
        assert alpha.reshape(-1)[u].item() == pytest.approx(ref, rel=1e-12)


def test_ternarize_threshold_rule() -> None:
    x = torch.tensor([-0.5, -0.2, 0.2, 0.3, 0.0, -0.0, float("nan")])
    assert F.ternarize(x, 0.2).tolist() == [-1, 0, 0, 1, 0, 0, 0]
    t = torch.tensor([[0.1], [1.0]])
    assert F.ternarize(torch.tensor([[0.5, -0.5], [0.5, -2.0]]), t).tolist() == [[1, -1], [0, -1]]
    assert F.ternarize(x, 0.2).dtype == torch.int8


def brute_force_ternary(vals: list[float]) -> tuple[float, float, list[int]]:
    """min over thresholds t of ||w - alpha * sign(w) 1{|w| > t}||², alpha = mean kept |w|."""
    best = (math.inf, 0.0, [0] * len(vals))
    for t in [-1.0] + sorted({abs(v) for v in vals}):
        kept = [abs(v) > t for v in vals]
        if not any(kept):
            continue
        alpha = sum(abs(v) for v, k in zip(vals, kept, strict=True) if k) / sum(kept)
        codes = [(1 if v >= 0 else -1) if k else 0 for v, k in zip(vals, kept, strict=True)]
        err = sum((v - alpha * c) ** 2 for v, c in zip(vals, codes, strict=True))
        if err < best[0] - 1e-15:
            best = (err, alpha, codes)
    return best


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("g", GRANS, ids=lambda g: g.describe())
def test_twn_exact_matches_brute_force(seed, g) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 2, 3, 3, generator=gen, dtype=torch.float64) * (
        1 + 3 * torch.rand(5, 1, 1, 1, generator=gen, dtype=torch.float64)
    )
    alpha, codes = F.twn(w, "exact", g)
    for u, idx in enumerate(ref_units(w, g)):
        vals = [w[i].item() for i in idx]
        err, ref_alpha, ref_codes = brute_force_ternary(vals)
        got_codes = [int(codes[i]) for i in idx]
        a = alpha.reshape(-1)[u].item()
        got_err = sum((v - a * c) ** 2 for v, c in zip(vals, got_codes, strict=True))
        assert got_err == pytest.approx(err, rel=1e-12, abs=1e-14)
        assert got_codes == ref_codes
        assert a == pytest.approx(ref_alpha, rel=1e-12)


def test_twn_exact_handles_ties_and_zeros() -> None:
    # Exact ties and zeros: the optimum keeps whole tie classes and never keeps zeros.
    w = torch.tensor(
        [
            [0.5, 0.5, 0.0, 0.0, -0.5, 0.1],
            [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            [0.3, -0.3, 0.3, -0.3, 0.3, -0.3],
        ]
    )
    alpha, codes = F.twn(w, "exact", "channel")
    assert codes.tolist() == [[1, 1, 0, 0, -1, 0], [0] * 6, [1, -1, 1, -1, 1, -1]]
    torch.testing.assert_close(alpha, torch.tensor([0.5, 0.0, 0.3]))
    for row in range(3):
        err, _, ref_codes = brute_force_ternary(w[row].tolist())
        if row != 1:
            assert codes[row].tolist() == ref_codes


@pytest.mark.parametrize("g", GRANS, ids=lambda g: g.describe())
def test_twn_07_rule_matches_loop_reference(g) -> None:
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alpha, codes = F.twn(w, "0.7", g)
    for u, idx in enumerate(ref_units(w, g)):
        vals = [w[i].item() for i in idx]
        delta = 0.7 * sum(abs(v) for v in vals) / len(vals)
        kept = [abs(v) > delta for v in vals]
        ref_alpha = sum(abs(v) for v, k in zip(vals, kept, strict=True) if k) / max(1, sum(kept))
        assert [int(codes[i]) for i in idx] == [
            (1 if v >= 0 else -1) if k else 0 for v, k in zip(vals, kept, strict=True)
        ]
        assert alpha.reshape(-1)[u].item() == pytest.approx(ref_alpha, rel=1e-12)


def test_twn_rejects_unknown_rule() -> None:
    with pytest.raises(ValueError, match="exact"):
        F.twn(torch.randn(3, 3), "0.5")


# ----------------------------------------------------------------------------------------------
# k-bit linear and logarithmic


def test_linear_quantize_is_nearest_level_with_half_to_even_and_saturation() -> None:
    # 3 bits: q = 3, clip 1.5 -> step 0.5, levels {0, ±0.5, ±1, ±1.5}.
    w = torch.tensor([[0.25, 0.75, 1.25, -0.25, -0.75, 0.26, 9.0, -9.0, 0.0]])
    step, codes = F.kbit_linear(w, 3, "tensor", clip=1.5)
    assert step.tolist() == [0.5]
    # Ties round half to even: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2; out of range saturates at ±3.
    assert codes.tolist() == [[0, 2, 2, 0, -2, 1, 3, -3, 0]]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("g", GRANS[:3], ids=lambda g: g.describe())
def test_kbit_linear_brute_force_nearest_level(bits, g) -> None:
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    step, codes = F.kbit_linear(w, bits, g)
    q = 2 ** (bits - 1) - 1
    assert int(codes.abs().max()) <= q
    for u, idx in enumerate(ref_units(w, g)):
        alpha = max(abs(w[i].item()) for i in idx)
        assert step.reshape(-1)[u].item() == pytest.approx(alpha / q, rel=1e-12)
        levels = [alpha * c / q for c in range(-q, q + 1)]
        for i in idx:
            nearest = min(range(2 * q + 1), key=lambda j: abs(levels[j] - w[i].item())) - q
            assert int(codes[i]) == nearest
        # the largest magnitude maps to the top level
        assert max(abs(int(codes[i])) for i in idx) == q


def test_log_quantize_papers_unit_check() -> None:
    """papers.md §5c: for a=1, 0.124/0.126/0.374/0.376/0.74/0.76 -> 0/0.25/0.25/0.5/0.5/1 (3 bits)."""
    x = torch.tensor([0.124, 0.126, 0.374, 0.376, 0.74, 0.76])
    codes = F.log_quantize(x, 3, 1.0)
    value = F.dequantize(codes, torch.ones(1), "kbit_log", 3, "tensor", x.shape)
    assert value.tolist() == [0.0, 0.25, 0.25, 0.5, 0.5, 1.0]
    assert F.dequantize(
        F.log_quantize(-x, 3, 1.0), torch.ones(1), "kbit_log", 3, "tensor", x.shape
    ).tolist() == [
        -0.0,
        -0.25,
        -0.25,
        -0.5,
        -0.5,
        -1.0,
    ]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_log_quantize_brute_force_nearest_level(bits) -> None:
    n = 2 ** (bits - 1) - 1
    scale = 0.8
    levels = [0.0] + [2.0 ** (j - n) for j in range(1, n + 1)]  # magnitudes for |code| = 0..n
    x = torch.randn(500, generator=torch.Generator().manual_seed(bits), dtype=torch.float64) * 0.6
    codes = F.log_quantize(x, bits, scale)
    for v, c in zip(x.tolist(), codes.tolist(), strict=True):
        r = abs(v) / scale
        j = min(range(n + 1), key=lambda j: (abs(levels[j] - r), -j))
        assert abs(c) == j and (c == 0 or (c < 0) == (v < 0)), (v, c, j)
    # saturation above the top level and exact midpoints (go to the larger level)
    assert F.log_quantize(torch.tensor([5.0, -5.0]), bits, 1.0).tolist() == [n, -n]
    if bits == 3:
        assert F.log_quantize(torch.tensor([0.125, 0.375, 0.75]), 3, 1.0).tolist() == [1, 2, 3]


def test_kbit_log_weights_scale_is_max_abs() -> None:
    w = torch.tensor([[0.1, -0.4, 0.8], [2.0, 0.0, -1.1]])
    scale, codes = F.kbit_log(w, 3, "channel")
    assert scale.tolist() == pytest.approx([0.8, 2.0])
    # row 0: r = 0.125, 0.5, 1 -> levels 1/4, 1/2, 1; row 1: r = 1, 0, 0.55 -> 1, 0, 1/2
    assert codes.tolist() == [[1, -2, 3], [3, 0, -2]]


# ----------------------------------------------------------------------------------------------
# DFP and AP2


def ref_dfp(x: list[float], bits: int, signed: bool) -> tuple[list[int], int]:
    """Smallest E with all round(x*2^-E) (half-to-even) inside the range, by scanning E."""
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    m = max(abs(v) for v in x) if signed else max(max(x), 0.0)
    if m == 0:
        return [0] * len(x), 0
    for e in range(-60, 60):
        if round(m / 2.0**e) <= hi:
            return [min(hi, max(lo, round(v / 2.0**e))) for v in x], e
    raise AssertionError


@pytest.mark.parametrize("bits, signed", [(8, True), (8, False), (4, True), (12, True)])
@pytest.mark.parametrize("seed", range(3))
def test_dfp_quantize_matches_int64_reference(bits, signed, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, generator=gen, dtype=torch.float64) * 10 ** (seed - 1)
    ints, e = F.dfp_quantize(x, bits, signed)
    ref_ints, ref_e = ref_dfp(x.tolist(), bits, signed)
    assert e == ref_e
    assert ints.to(torch.int64).tolist() == ref_ints
    assert ints.dtype == {(8, True): torch.int8, (8, False): torch.uint8}.get(
        (bits, signed), torch.int8 if bits <= 8 else torch.int16
    )
    inside = x if signed else x.clamp(min=0)
    assert torch.all((ints.double() * 2.0**e - inside).abs() <= 2.0 ** (e - 1))


def test_dfp_half_to_even_and_saturation_with_fixed_exponent() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 200.0, -200.0])
    ints, e = F.dfp_quantize(x, 8, True, exponent=0)
    assert e == 0 and ints.tolist() == [0, 2, 2, 0, -2, 127, -128]
    uints, _ = F.dfp_quantize(x, 8, False, exponent=0)
    assert uints.tolist() == [0, 2, 2, 0, 0, 200, 0]
    # The exponent is the smallest that fits: max 1.0 in 8 bits -> 64 * 2^-6 (128 would overflow).
    ints, e = F.dfp_quantize(torch.tensor([1.0, -0.5]), 8)
    assert (ints.tolist(), e) == ([64, -32], -6)
    assert F.dfp_quantize(torch.zeros(3))[1] == 0
    with pytest.raises(ValueError, match="non-finite"):
        F.dfp_quantize(torch.tensor([1.0, float("inf")]))


def test_ap2_nearest_power_of_two_in_log_domain() -> None:
    x = torch.randn(300, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 5
    y = F.ap2(x)
    for v, a in zip(x.tolist(), y.tolist(), strict=True):
        k = min(range(-60, 60), key=lambda k: abs(math.log2(abs(v)) - k))
        assert a == math.copysign(2.0**k, v)
    assert F.ap2(torch.tensor([0.0, -0.0, 1.0, 3.0, -0.7])).tolist() == [0.0, 0.0, 1.0, 4.0, -0.5]


# ----------------------------------------------------------------------------------------------
# dequantize


@pytest.mark.parametrize("g", GRANS, ids=lambda g: g.describe())
@pytest.mark.parametrize(
    "fmt, bits",
    [("binary", 1), ("ternary", 2), ("ternary_asym", 2), ("kbit_linear", 4), ("kbit_log", 3)],
)
def test_dequantize_matches_loop_reference_and_is_linear_in_scales(g, fmt, bits) -> None:
    gen = torch.Generator().manual_seed(7)
    shape = (5, 2, 3, 3)
    lo, hi = {
        "binary": (-1, 1),
        "ternary": (-1, 1),
        "ternary_asym": (-1, 1),
        "kbit_linear": (-7, 7),
        "kbit_log": (-3, 3),
    }[fmt]
    codes = torch.randint(lo, hi + 1, shape, generator=gen).to(torch.int8)
    if fmt == "binary":
        codes = torch.where(codes < 0, -1, 1).to(torch.int8)
    sshape = ref_scale_shape(shape, g) + ((2,) if fmt == "ternary_asym" else ())
    scales = (torch.rand(sshape, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    got = F.dequantize(codes, scales, fmt, bits, g, shape)
    ref = torch.empty(shape, dtype=torch.float64)
    flat = scales.detach().reshape(-1, 2) if fmt == "ternary_asym" else scales.detach().reshape(-1)
    for u, idx in enumerate(ref_units(ref, g)):
        for i in idx:
            c = int(codes[i])
            if fmt == "ternary_asym":
                ref[i] = flat[u, 0] if c > 0 else (-flat[u, 1] if c < 0 else 0.0)
            elif fmt == "kbit_log":
                ref[i] = 0.0 if c == 0 else math.copysign(2.0 ** (abs(c) - 3), c) * flat[u]
            else:
                ref[i] = c * flat[u]
    assert torch.equal(got.detach(), ref)
    # d/dscales: gradcheck in float64 (the dequantized weight is linear in the scales).
    assert torch.autograd.gradcheck(
        lambda s: F.dequantize(codes, s, fmt, bits, g, shape), (scales,)
    )


def test_functional_ttq_is_the_ttq_method_function() -> None:
    from lowbit.methods import ttq as ttq_module

    assert F.ttq is ttq_module.ttq
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = F.nope  # type: ignore[attr-defined]


def test_binarize_maps_nan_to_plus_one_in_forward() -> None:
    # The lowbit sign rule (NaN -> +1) must hold for the STE's forward value, not only for export.
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0], requires_grad=True)
    from lowbit import functional as F

    y = F.binarize(x, gate=False)
    assert y.tolist() == [1.0, 1.0, -1.0, 1.0, 1.0]


@pytest.mark.parametrize("n_threads", [1, 2])
def test_cpu_sign_ops_equal_the_pytorch_expressions(n_threads: int, monkeypatch) -> None:
    # Large CPU float32 tensors take lowbit._la_solver's one-pass sign / gated binarize; the
    # PyTorch expressions (forced by clearing the cache) are the reference, and the rule itself
    # is checked by hand on the special values.
    from lowbit import functional as Fn
    from lowbit import kernels

    if not kernels.la_solver_available():
        pytest.skip("lowbit._la_solver is not built")
    g = torch.Generator().manual_seed(n_threads)
    x0 = torch.randn(300, 1000, generator=g) * 1.5
    special = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1.0, -1.0, 1e-45, -1e-45]
    x0[0, : len(special)] = torch.tensor(special)
    grad = torch.randn(300, 1000, generator=g)
    calls = []
    for name in ("sign_pm1", "sign_gate", "gate_grad"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _f=real, _n=name: calls.append(_n) or _f(*a))
    results = {}
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        for native in (True, False):
            monkeypatch.setattr(Fn, "_SIGN_OPS", [native])
            s = Fn.sign(x0)
            x = x0.clone().requires_grad_()
            b = Fn.binarize(x)
            b.backward(grad)
            results[native] = (s, b.detach(), x.grad)
    finally:
        torch.set_num_threads(previous)
    assert calls == ["sign_pm1", "sign_gate", "gate_grad"]  # the C++ path ran (once)
    for a, c in zip(results[True], results[False], strict=True):
        assert torch.equal(a, c)
    s = results[True][0]
    assert s[0, : len(special)].tolist() == [1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
    expected_grad = grad * ((x0.abs() <= 1).float())  # BNN eq. 4: g * 1{|x| <= 1}
    assert torch.equal(results[True][2], expected_grad)


@pytest.mark.parametrize(
    ("bits", "signed", "clip"), [(4, True, 1.0), (2, False, 1.0), (8, True, 2.5), (3, False, 0.7)]
)
def test_cpu_kbit_fake_quantize_equals_the_pytorch_expression(
    bits, signed, clip, monkeypatch
) -> None:
    from lowbit import functional as Fn
    from lowbit import kernels

    if not kernels.la_solver_available():
        pytest.skip("lowbit._la_solver is not built")
    g = torch.Generator().manual_seed(bits)
    x0 = torch.randn(200, 500, generator=g) * clip
    lo, hi = Fn.linear_qrange(bits, signed)
    step = clip / hi
    ties = [(k + 0.5) * step for k in range(-3, 3)]  # exact half steps: half-to-even
    special = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), hi * step, lo * step, *ties]
    x0[0, : len(special)] = torch.tensor(special)
    grad = torch.randn(200, 500, generator=g)
    calls = []
    real = kernels.kbit_fake
    monkeypatch.setattr(kernels, "kbit_fake", lambda *a: calls.append(1) or real(*a))
    runs = {}
    for native in (True, False):
        monkeypatch.setattr(Fn, "_SIGN_OPS", [native])
        x = x0.clone().requires_grad_()
        y = Fn.linear_fake_quantize(x, bits, clip, signed)
        y.backward(grad)
        runs[native] = (y.detach(), x.grad)
    assert calls == [1]
    assert torch.equal(runs[True][0].nan_to_num(7.0), runs[False][0].nan_to_num(7.0))
    assert torch.isnan(runs[True][0][0, 2])
    assert torch.equal(runs[True][1], runs[False][1])


@pytest.mark.skipif(not kernels.la_solver_available(), reason="lowbit._la_solver is not built")
def test_twn_exact_short_units_in_cpp_equal_the_pytorch_search(monkeypatch) -> None:
    # Short float64 units on the CPU (FGQ's groups) run in C++ (kernels.twn_exact_units): the same
    # codes and alphas bit for bit as the PyTorch search, with ties, zeros, remainder groups and
    # all-zero groups; the brute-force tests above cover both paths' optimality.
    from lowbit.methods import loss_aware

    calls: list[int] = []
    native = kernels.twn_exact_units
    monkeypatch.setattr(kernels, "twn_exact_units", lambda *a: calls.append(1) or native(*a))
    gen = torch.Generator().manual_seed(3)
    for n, shape in [
        (1, (3, 5)),
        (2, (4, 9)),
        (4, (64, 130)),
        (5, (7, 23)),
        (16, (9, 70)),
        (33, (3, 100)),
        (256, (2, 600)),
    ]:
        w = torch.randn(shape, generator=gen, dtype=torch.float64)
        w[:, ::4] = 0.0
        w[:, 1::6] = w[:, 2::6][:, : w[:, 1::6].shape[1]].abs()  # equal magnitudes
        w[0, : min(n, shape[1])] = 0.0  # an all-zero group
        g = Granularity("group", n, "in")
        out = {}
        for backend in ("torch", "auto"):
            loss_aware.set_solver_backend(backend)
            try:
                out[backend] = F.twn(w, "exact", g)
            finally:
                loss_aware.set_solver_backend(None)
        assert torch.equal(out["torch"][0], out["auto"][0]), n
        assert torch.equal(out["torch"][1], out["auto"][1]), n
    assert len(calls) == 7  # the C++ search ran once per case (and never on the torch backend)
    with pytest.raises(ValueError, match="L <= 256"):
        native(torch.zeros(2, 300, dtype=torch.float64), torch.full((2,), 300))
    with pytest.raises(ValueError, match="float64"):
        native(torch.zeros(2, 4), torch.full((2,), 4))


def test_twn_of_an_empty_tensor_is_empty() -> None:
    for g in ("tensor", "channel"):
        for rule in ("exact", "0.7"):
            alpha, codes = F.twn(torch.zeros(0, 4), rule, g)
            assert codes.shape == (0, 4) and codes.dtype == torch.int8
            assert not alpha.any()
