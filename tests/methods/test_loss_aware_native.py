"""The C++ alternating solvers (``lowbit._la_solver``) against the PyTorch path and independent checks.

On CPU float32 tensors ``loss_aware.solve`` runs LAT_a / LAT2_a / LAQ alternation in C++; the
PyTorch functions stay the reference. References used here:
* the PyTorch path itself (float32 sums, so scales agree to float32 rounding of long sums);
* a re-derivation of the alternation in this file with float64 sums (the C++ solver's sums are
  double too): same codes, scales and iteration counts bit for bit, also on units long enough for
  the C++ band rounds (more than ``la_chunk()`` elements);
* fixed-point and nearest-level properties, thread-count invariance, exhaustive search (tiny n).
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import kernels
from lowbit.methods import loss_aware as la
from lowbit.qtypes import Granularity

pytestmark = pytest.mark.skipif(
    not kernels.la_solver_available(), reason="lowbit._la_solver is not built"
)

ALT = [
    ("lat_a", None, "ls"),
    ("lat2_a", None, "ls"),
    ("laq_linear", 3, "ls"),
    ("laq_log", 3, "ls"),
    ("laq_linear", 4, "official"),
    ("laq_log", 4, "official"),
    ("laq_linear", 2, "ls"),
    ("laq_log", 2, "official"),
    ("laq_linear", 5, "ls"),
    ("laq_log", 8, "ls"),
]
IDS = [f"{s}-{b}-{r}" for s, b, r in ALT]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
    la.set_solver_backend(None)


def _chunk() -> int:
    return int(kernels._la_ext().la_chunk())


def _solve(backend: str, *args, **kw):
    la.set_solver_backend(backend)
    try:
        return la.solve(*args, return_info=True, **kw)
    finally:
        la.set_solver_backend(None)


def _top(fmt: str, m: int) -> int:
    return 1 if fmt.startswith("ternary") else 2 ** (m - 1) - 1


def _problem(seed: int, rows: int, n: int, *, kind: int | None = None):
    """Weights with zeros, one all-positive and one all-negative row, d over 8 orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, n, generator=g) * 0.05
    kind = seed % 4 if kind is None else kind
    if kind == 1:
        w[0] = w[0].abs()
        w[-1] = -w[-1].abs()
    elif kind == 2:
        w[:, ::3] = 0.0
    elif kind == 3:
        w = torch.empty(rows, n).uniform_(-1, 1, generator=g)  # a clipped latent weight
    d = torch.exp(torch.empty(rows, n).uniform_(-9, 9, generator=g))
    return w, d, g


def _codes0(g, shape, fmt, m, zero: bool) -> torch.Tensor:
    if zero:
        return torch.zeros(shape, dtype=torch.int8)
    top = _top(fmt, m)
    return torch.randint(-top, top + 1, shape, generator=g).to(torch.int8)


# ----------------------------------------------------------------------------------------------
# An independent transcription of the alternation with float64 sums (loss_aware.py semantics)


def _ratio(num, den, fallback):
    ok = den > 0
    v = torch.where(ok, (num / torch.where(ok, den, torch.ones_like(den))).float(), fallback)
    return v.clamp(min=0)


def _ref_support(w, d, c0, two_sided, max_iter, tol):
    tol32 = torch.tensor(tol, dtype=torch.float32)
    sides = [(w, c0 > 0), (-w, c0 < 0)] if two_sided else [(w.abs(), c0 != 0)]
    out = []
    for a, k0 in sides:
        dd, ad = d.double(), a.double()
        k = (k0 & (a > 0)).double()
        alpha = _ratio((dd * ad * k).sum(1), (dd * k).sum(1), a.amax(1))
        done = alpha <= 0
        it = torch.zeros(a.shape[0], dtype=torch.int64)
        for _ in range(max_iter):
            if bool(done.all()):
                break
            k = (a > (alpha / 2)[:, None]).double()
            new = _ratio((dd * ad * k).sum(1), (dd * k).sum(1), torch.zeros_like(alpha))
            it += (~done).long()
            active = ~done
            done = done | ((new - alpha).abs() < tol32)
            alpha = torch.where(active, new, alpha)
        kept = (a > (alpha / 2)[:, None]) & (alpha > 0)[:, None]
        out.append((alpha, kept, it))
    if two_sided:
        (ap, kp, ip), (an, kn, i_n) = out
        return (
            kp.to(torch.int8) - kn.to(torch.int8),
            torch.stack([ap, an], -1),
            torch.maximum(ip, i_n),
        )
    alpha, kept, it = out[0]
    sgn = torch.where(w < 0, -1, 1).to(torch.int8)
    return torch.where(kept, sgn, torch.zeros_like(sgn)), alpha, it


def _ref_laq(w, d, c0, fmt, bits, rule, max_iter, tol):
    k = 2 ** (bits - 1) - 1
    lin = fmt == "kbit_linear"
    tol32 = torch.tensor(tol, dtype=torch.float32)
    dd, aw = d.double(), w.abs().double()
    fb = w.abs().amax(1)

    def alpha_of(mabs):  # |multipliers| (linear: |integer codes|), float64
        if rule == "official":
            return _ratio((dd * aw * mabs).sum(1), (dd * mabs).sum(1), fb)
        s = _ratio((dd * aw * mabs).sum(1), (dd * mabs * mabs).sum(1), fb / k if lin else fb)
        return s * k if lin else s

    def codes_of(alpha):
        pos = alpha > 0
        c, m = la.nearest_levels(w, torch.where(pos, alpha, torch.ones_like(alpha)), fmt, bits)
        c = torch.where(pos[:, None], c, torch.zeros_like(c))
        m = torch.where(pos[:, None], m, torch.zeros_like(m))
        return c, (c if lin else m).abs().double()

    ca = c0.double().abs()
    if rule == "official":
        m0 = (ca != 0).double()
    elif lin:
        m0 = ca
    else:
        m0 = torch.where(ca == 0, torch.zeros_like(ca), torch.exp2(ca - k))
    alpha = alpha_of(m0)
    c, m = codes_of(alpha)
    done = alpha <= 0
    it = torch.zeros(w.shape[0], dtype=torch.int64)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        new = alpha_of(m)
        cn, mn = codes_of(new)
        it += (~done).long()
        active = ~done
        done = done | ((new - alpha).abs() < tol32)
        alpha = torch.where(active, new, alpha)
        c = torch.where(active[:, None], cn, c)
        m = torch.where(active[:, None], mn, m)
    return c.to(torch.int8), (alpha / k if lin else alpha), it


def _native_units(w, d, c0, scheme, fmt, m, rule, max_iter=10, tol=1e-6):
    if scheme.startswith("lat"):
        return kernels.la_support_solve(
            w, d, c0, two_sided=scheme == "lat2_a", max_iter=max_iter, tol=tol
        )
    c, a, it = kernels.la_laq_solve(
        w,
        d,
        c0,
        bits=m,
        log_levels=fmt == "kbit_log",
        official=rule == "official",
        max_iter=max_iter,
        tol=tol,
    )
    return c, (a / (2 ** (m - 1) - 1) if fmt == "kbit_linear" else a), it


def _ref_units(w, d, c0, scheme, fmt, m, rule, max_iter=10, tol=1e-6):
    if scheme.startswith("lat"):
        return _ref_support(w, d, c0, scheme == "lat2_a", max_iter, tol)
    return _ref_laq(w, d, c0, fmt, m, rule, max_iter, tol)


# ----------------------------------------------------------------------------------------------
# Bit-exact agreement with the float64-sum transcription (short units and banded long units)


@pytest.mark.parametrize("scheme,bits,rule", ALT, ids=IDS)
def test_equals_the_alternation_with_double_sums(scheme: str, bits, rule: str) -> None:
    fmt, m = la.scheme_format(scheme, bits)
    long = _chunk() + 4321  # two chunks, the second partial: the band rounds and their fallbacks
    for seed, (rows, n) in enumerate([(1, 37), (5, 1000), (3, 4099), (1, long), (2, long + 5)]):
        w, d, g = _problem(100 + seed, rows, n)
        c0 = _codes0(g, w.shape, fmt, m, zero=seed == 2)
        for max_iter, tol in ((10, 1e-6), (3, 1e-6), (40, 1e-12)):
            got = _native_units(w, d, c0, scheme, fmt, m, rule, max_iter, tol)
            ref = _ref_units(w, d, c0, scheme, fmt, m, rule, max_iter, tol)
            assert torch.equal(got[0], ref[0]), (seed, max_iter, int((got[0] != ref[0]).sum()))
            assert torch.equal(got[1], ref[1]), (seed, max_iter, got[1], ref[1])
            assert torch.equal(got[2], ref[2]), (seed, max_iter, got[2], ref[2])


def test_long_units_use_bands_and_their_fallbacks() -> None:
    # The band machinery is an optimisation of long units: check it runs (so the test above
    # covers it), including chunks whose band overflows (many levels: 5-bit linear on uniform w).
    stats = kernels._la_ext().la_stats
    n = 3 * _chunk() + 17
    w, d, g = _problem(7, 2, n, kind=0)
    c0 = _codes0(g, w.shape, "ternary", 2, zero=False)
    first = kernels.la_support_solve(w, d, c0, two_sided=False, max_iter=10, tol=1e-9)
    s = stats()
    assert s["builds"] >= 2 and s["band_rounds"] >= 2 and s["patched"] == 2
    # warm-started from its own solution (a training step with little change): one build per unit
    kernels.la_support_solve(w, d, first[0], two_sided=False, max_iter=10, tol=1e-9)
    s = stats()
    assert s["builds"] == 2 and s["overflowed_chunks"] == 0 and s["full_rounds"] == 0
    assert 0 < s["band_elements"] < 0.1 * w.numel()
    w, d, g = _problem(8, 2, n, kind=3)
    c0 = _codes0(g, w.shape, "kbit_linear", 5, zero=False)
    got = kernels.la_laq_solve(w, d, c0, bits=5, log_levels=False, max_iter=10, tol=1e-9)
    assert stats()["overflowed_chunks"] > 0
    ref = _ref_laq(w, d, c0, "kbit_linear", 5, "ls", 10, 1e-9)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[1] / 15, ref[1]) and torch.equal(got[2], ref[2])


# ----------------------------------------------------------------------------------------------
# The PyTorch path (float32 sums)


def _borderline_ok(codes_a, codes_b, scales_a, scales_b) -> None:
    """Codes may differ only at a few elements sitting on a decision threshold.

    Both paths return the nearest levels of their own scales (checked for the C++ path by
    test_fixed_point_and_nearest_levels, for PyTorch in test_loss_aware.py), so a differing element
    lies between the thresholds of two nearly equal scales; a float32 sum that rounds the other
    way there moves the later rounds a little (hence the loose scale bound for that case).
    """
    diff = codes_a != codes_b
    if not bool(diff.any()):
        return
    assert int(diff.sum()) <= max(2, diff.numel() // 1000), int(diff.sum())
    assert float(((scales_a - scales_b).abs() / scales_a.abs().clamp(min=1e-30)).max()) < 1e-3


@pytest.mark.parametrize("scheme,bits,rule", ALT, ids=IDS)
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_matches_the_pytorch_path(scheme: str, bits, rule: str, granularity: str) -> None:
    fmt, m = la.scheme_format(scheme, bits)
    for seed in range(6):
        rows, n = [(4, 33), (3, 250), (6, 129), (2, 1001), (1, 64), (5, 7)][seed]
        w, d, g = _problem(seed, rows, n)
        prev = None if seed % 3 == 0 else _codes0(g, w.shape, fmt, m, zero=seed % 3 == 2)
        kw = {"granularity": granularity, "alpha_rule": rule}
        if granularity == "group":
            kw["group_size"] = 48  # remainder groups: padded units
        a = _solve("torch", w, d, scheme, bits, prev, **kw)
        b = _solve("native", w, d, scheme, bits, prev, **kw)
        assert b[1].dtype == torch.int8 and b[2].dtype == torch.float32
        assert b[2].shape == a[2].shape and b[3]["iterations"].shape == a[3]["iterations"].shape
        _borderline_ok(a[1], b[1], a[2], b[2])
        if torch.equal(a[1], b[1]):
            torch.testing.assert_close(b[2], a[2], rtol=1e-5, atol=1e-12)
            # w_hat is the dequantized export on both paths
            torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-12)
        gran = Granularity.of(granularity, kw.get("group_size"))
        # The objective (of the exact dequantization: float32 w_hat rounds at ~1e-6 of it) is
        # stationary in alpha at a converged LS solution, so there float32 sums barely show; the
        # official rule's alpha (not a minimiser) and unconverged rounds carry the PyTorch path's
        # float32 summation error (~1e-6 relative) into it.
        wd, dd = w.double(), d.double()
        oa, ob = (
            la.objective(
                wd,
                dd,
                lowbit.functional.dequantize(r[1], r[2].double(), fmt, m, gran, w.shape),
                gran,
            )
            for r in (a, b)
        )
        converged = bool((a[3]["iterations"] < 10).all() and (b[3]["iterations"] < 10).all())
        rtol = 1e-6 if rule == "ls" and converged else 5e-5
        torch.testing.assert_close(ob, oa, rtol=rtol, atol=1e-12)


def test_large_tensor_objective_matches_pytorch() -> None:
    # a long per-tensor unit (band rounds): float32 sums on the PyTorch side differ from double
    # ones by up to ~1e-4 relative here, so compare the objective (stationary in alpha)
    w, d, g = _problem(3, 1, 3 * _chunk() + 1000, kind=0)
    for scheme, bits, _rule in ALT[:4]:
        prev = la.initial_codes(w, scheme, bits)
        a = _solve("torch", w, d, scheme, bits, prev)
        b = _solve("native", w, d, scheme, bits, prev)
        oa, ob = float(la.objective(w, d, a[0])), float(la.objective(w, d, b[0]))
        assert ob == pytest.approx(oa, rel=1e-5)
        assert float((a[1] != b[1]).float().mean()) < 1e-3


# ----------------------------------------------------------------------------------------------
# Independent properties


def _levels(fmt: str, m: int) -> torch.Tensor:
    k = 2 ** (m - 1) - 1
    if fmt.startswith("ternary"):
        return torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    if fmt == "kbit_linear":
        return torch.arange(-k, k + 1, dtype=torch.float64) / k
    mags = [2.0**-j for j in range(k)]
    return torch.tensor(sorted([0.0] + mags + [-x for x in mags]), dtype=torch.float64)


def _mult(codes: torch.Tensor, fmt: str, m: int) -> torch.Tensor:
    c = codes.double()
    k = 2 ** (m - 1) - 1
    if fmt.startswith("ternary"):
        return c
    if fmt == "kbit_linear":
        return c / k
    return torch.where(c == 0, torch.zeros_like(c), torch.sign(c) * torch.exp2(c.abs() - k))


@pytest.mark.parametrize("scheme,bits,rule", ALT, ids=IDS)
def test_fixed_point_and_nearest_levels(scheme: str, bits, rule: str) -> None:
    fmt, m = la.scheme_format(scheme, bits)
    lv = _levels(fmt, m)
    for seed, (rows, n) in enumerate([(1, 300), (4, 257), (1, _chunk() + 999)]):
        w, d, g = _problem(40 + seed, rows, n)
        prev = _codes0(g, w.shape, fmt, m, zero=False)
        _, codes, scales, info = _solve(
            "native", w, d, scheme, bits, prev, granularity="channel", alpha_rule=rule,
            max_iter=200, tol=1e-12,
        )  # fmt: skip
        assert bool((info["iterations"] < 200).all())  # converged: alpha stopped moving
        wd, dd = w.double(), d.double()
        sides = [(1.0, 0), (-1.0, 1)] if scheme == "lat2_a" else [(None, None)]
        for sgn, col in sides:
            mult = _mult(codes, fmt, m)
            alpha = (scales[:, col] if col is not None else scales).double()
            if fmt == "kbit_linear":
                alpha = alpha * (2 ** (m - 1) - 1)
            if sgn is not None:  # LAT2: the side's own support, multipliers +-1
                mult = (codes.double() * sgn > 0).double() * sgn
            # the fixed point: alpha is the scale rule applied to its own codes
            num = (dd * wd * mult).sum(1)
            den = (dd * mult.abs()).sum(1) if rule == "official" else (dd * mult * mult).sum(1)
            if rule == "official":
                num = (dd * wd.abs() * mult.abs()).sum(1)
            expect = torch.where(den > 0, num / den.clamp(min=1e-300), torch.zeros_like(num))
            torch.testing.assert_close(alpha, expect, rtol=2e-6, atol=1e-30)
        # nearest levels (ties either way): no element gets closer on another level
        if scheme == "lat2_a":
            ap, an = scales[:, 0].double(), scales[:, 1].double()
            recon = torch.where(codes > 0, ap[:, None], torch.where(codes < 0, -an[:, None], 0.0))
            best = torch.minimum(
                (wd - ap[:, None]).abs(), torch.minimum(wd.abs(), (wd + an[:, None]).abs())
            )
        else:
            a = scales.double() * ((2 ** (m - 1) - 1) if fmt == "kbit_linear" else 1)
            recon = a[:, None] * _mult(codes, fmt, m)
            best = (a[:, None, None] * lv - wd[:, :, None]).abs().min(-1).values
        slack = 1e-6 * float(scales.abs().max())
        assert bool(((recon - wd).abs() <= best + slack).all())
        # and exactly the codes of the shared rounding rule (nearest_levels) for that scale
        if scheme != "lat2_a":
            a32 = scales * ((2 ** (m - 1) - 1) if fmt == "kbit_linear" else 1)
            pos = a32 > 0
            c, _ = la.nearest_levels(w, torch.where(pos, a32, torch.ones_like(a32)), fmt, m)
            c = torch.where(pos[:, None], c, torch.zeros_like(c))
            assert torch.equal(c.to(torch.int8), codes)


@pytest.mark.parametrize("scheme,bits,rule", ALT, ids=IDS)
def test_thread_count_does_not_change_the_result(scheme: str, bits, rule: str) -> None:
    fmt, m = la.scheme_format(scheme, bits)
    for rows, n in [(64, 300), (3, 2 * _chunk() + 77)]:
        w, d, g = _problem(rows + n, rows, n)
        c0 = _codes0(g, w.shape, fmt, m, zero=False)
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(_native_units(w, d, c0, scheme, fmt, m, rule))
        for o in outs[1:]:
            for x, y in zip(outs[0], o, strict=True):
                assert torch.equal(x, y)


def _brute_min(w: np.ndarray, d: np.ndarray, scheme: str, bits) -> tuple[float, np.ndarray]:
    """Minimum of sum d (alpha b - w)^2 over every level pattern b with its best alpha >= 0 (one
    scale per sign for LAT2), and a minimising code pattern."""
    fmt, m = la.scheme_format(scheme, bits)
    top = _top(fmt, m)
    codes = np.array(list(itertools.product(range(-top, top + 1), repeat=len(w))), dtype=np.float64)
    if scheme == "lat2_a":
        val = (d * (codes == 0) * w**2).sum(1)
        for s in (1.0, -1.0):
            b = (codes * s > 0).astype(np.float64)
            den = (d * b).sum(1)
            a = np.where(
                den > 0, np.maximum((d * b * w * s).sum(1), 0) / np.where(den > 0, den, 1), 0
            )
            val = val + (d * b * (a[:, None] - s * w) ** 2).sum(1)
    else:
        mult = _mult(torch.from_numpy(codes), fmt, m).numpy()
        den = (d * mult * mult).sum(1)
        a = np.where(den > 0, np.maximum((d * mult * w).sum(1), 0) / np.where(den > 0, den, 1), 0)
        val = (d * (a[:, None] * mult - w) ** 2).sum(1)
    i = int(val.argmin())
    return float(val[i]), codes[i]


@pytest.mark.parametrize(
    "scheme,bits", [("lat_a", None), ("lat2_a", None), ("laq_linear", 3), ("laq_log", 3)]
)
def test_brute_force_minimum(scheme: str, bits) -> None:
    # Never below the exhaustive optimum; started from an optimal pattern, the alternation stays
    # on it (an optimum is a fixed point of both half-steps of the LS rule).
    for seed in range(8):
        g = torch.Generator().manual_seed(900 + seed)
        n = 6 if scheme.startswith("lat") else 5
        w = torch.randn(n, generator=g)
        d = torch.exp(torch.empty(n).uniform_(-2, 2, generator=g))
        best, arg = _brute_min(w.double().numpy(), d.double().numpy(), scheme, bits)
        w_hat, *_ = _solve("native", w, d, scheme, bits, None)
        assert (
            float(la.objective(w.double(), d.double(), w_hat.double())) >= best * (1 - 1e-6) - 1e-12
        )
        start = torch.from_numpy(arg).to(torch.int8)
        w_hat, *_ = _solve("native", w, d, scheme, bits, start, max_iter=50, tol=1e-12)
        got = float(la.objective(w.double(), d.double(), w_hat.double()))
        assert got == pytest.approx(best, rel=1e-5, abs=1e-9)


# ----------------------------------------------------------------------------------------------
# The exact solvers LAT_e / LAT2_e in C++ (kernels.la_topk_exact)


def _exact_reference(w: torch.Tensor, d: torch.Tensor, two_sided: bool):
    """A NumPy transcription of the sorted search (float64 cumulative sums in stable descending
    key order, the first maximum of cumDA^2 / cumD, the top keys kept): codes and alphas."""
    w64, d64 = w.double().numpy(), d.double().numpy()
    codes = np.zeros(w64.shape, dtype=np.int8)
    alphas = np.zeros((w64.shape[0], 2 if two_sided else 1))
    for u in range(w64.shape[0]):
        sides = (
            [(w64[u], w64[u] > 0, 1), (-w64[u], w64[u] < 0, -1)]
            if two_sided
            else [(np.abs(w64[u]), w64[u] != 0, 0)]
        )
        for j, (key, ok, code) in enumerate(sides):
            idx = np.flatnonzero(ok)
            if idx.size == 0:
                continue
            order = idx[np.argsort(-key[idx], kind="stable")]
            cd, cda = np.cumsum(d64[u, order]), np.cumsum(d64[u, order] * key[order])
            score = np.where(cd > 0, cda * cda / np.where(cd > 0, cd, 1.0), -1.0)
            best = int(np.argmax(score))
            alpha = cda[best] / max(cd[best], 1e-300) if score[best] >= 0 else 0.0
            if alpha > 0:
                alphas[u, j] = np.float32(alpha)
                kept = order[: best + 1]
                codes[u, kept] = np.sign(w64[u, kept]) if code == 0 else code
    return codes, alphas


def _exact_problem(seed: int, rows: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped latent weights with ties, exact zeros and entries at +-1, d over 6 decades."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, n, generator=g) * 0.4).clamp(-1, 1)
    w[:, 1::7] = w[:, ::7][:, : w[:, 1::7].shape[1]]  # equal keys (with different d)
    w[:, 2::11] = 0.0
    w[:, 3::13] = -w[:, 3::13].sign()  # exactly +-1
    d = torch.exp(torch.empty(rows, n).uniform_(-7, 7, generator=g))
    return w, d


@pytest.mark.parametrize("two_sided", [False, True], ids=["lat_e", "lat2_e"])
def test_exact_solver_equals_the_sorted_search(two_sided: bool) -> None:
    # Short units (sorted in full) and long ones (bucketed search, >= 65536 entries) against an
    # independent NumPy transcription; ties, zeros and +-1 entries included.
    for seed, (rows, n) in enumerate(
        [(1, 1), (3, 7), (5, 300), (2, 5000), (1, 65536), (2, 150_001)]
    ):
        w, d = _exact_problem(seed, rows, n)
        codes, alpha = kernels.la_topk_exact(w, d, two_sided=two_sided)
        ref_codes, ref_alpha = _exact_reference(w, d, two_sided)
        assert np.array_equal(codes.numpy(), ref_codes), (seed, rows, n)
        got = alpha.numpy().reshape(rows, -1)
        if n < 65536:  # the same additions in the same order: bit for bit
            assert np.array_equal(got, ref_alpha.astype(np.float32)), (seed, rows, n)
        else:  # bucket sums are added in another order: equal to double rounding
            np.testing.assert_allclose(got, ref_alpha, rtol=1e-7)


@pytest.mark.parametrize("scheme", ["lat_e", "lat2_e"])
def test_exact_solver_matches_pytorch_path(scheme: str) -> None:
    # solve() on CPU float32 runs the C++ solver; the PyTorch reference gives the same codes and
    # (short units) the same scales bit for bit, per tensor, per channel and per group.
    for seed, (shape, gran) in enumerate(
        [((64, 48), "tensor"), ((64, 48), "channel"), ((32, 40), "group"), ((300, 300), "tensor")]
    ):
        w, d = _exact_problem(40 + seed, 1, shape[0] * shape[1])
        w, d = w.reshape(shape), d.reshape(shape)
        kw = {"group_size": 8} if gran == "group" else {"granularity": gran}
        w_n, c_n, s_n, _ = _solve("native", w, d, scheme, None, None, **kw)
        w_t, c_t, s_t, _ = _solve("torch", w, d, scheme, None, None, **kw)
        assert torch.equal(c_n, c_t), (scheme, gran)
        assert torch.equal(s_n, s_t), (scheme, gran)
        assert torch.equal(w_n, w_t), (scheme, gran)


def test_exact_solver_brute_force_and_degenerate_units() -> None:
    # Exhaustive search over every ternary pattern (n <= 8), both schemes.
    for seed in range(40):
        g = torch.Generator().manual_seed(700 + seed)
        n = 1 + seed % 8
        w = torch.randn(n, generator=g)
        d = torch.exp(torch.empty(n).uniform_(-3, 3, generator=g))
        for scheme in ("lat_e", "lat2_e"):
            best, _ = _brute_min(
                w.double().numpy(), d.double().numpy(), scheme.replace("_e", "_a"), None
            )
            w_hat, *_ = _solve("native", w, d, scheme, None, None)
            got = float(la.objective(w.double(), d.double(), w_hat.double()))
            assert got == pytest.approx(best, rel=1e-6, abs=1e-12), (seed, scheme)
    # one big tie (every weight clipped to +1): everything kept at alpha = 1, short and long
    for n in (100, 70000):
        codes, alpha = kernels.la_topk_exact(
            torch.ones(1, n), torch.rand(1, n) + 0.5, two_sided=False
        )
        assert bool((codes == 1).all()) and float(alpha[0]) == 1.0
    # an all-zero unit and a one-signed unit under LAT2_e: zero scales, nothing kept
    w = torch.zeros(2, 70000)
    w[1] = torch.rand(70000) + 0.1
    codes, alpha = kernels.la_topk_exact(w, torch.ones(2, 70000), two_sided=True)
    assert (
        torch.equal(alpha[0], torch.zeros(2))
        and float(alpha[1, 1]) == 0.0
        and float(alpha[1, 0]) > 0
    )
    assert bool((codes[0] == 0).all()) and bool((codes[1] >= 0).all())


def test_exact_solver_thread_count_and_bad_input() -> None:
    w, d = _exact_problem(5, 6, 70000)
    torch.set_num_threads(1)
    one = kernels.la_topk_exact(w, d, two_sided=True)
    torch.set_num_threads(3)
    three = kernels.la_topk_exact(w, d, two_sided=True)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    with pytest.raises(ValueError, match="one shape"):
        kernels.la_topk_exact(w, d[:, :10], two_sided=False)
    with pytest.raises(TypeError, match="float32"):
        kernels.la_topk_exact(w.double(), d.double(), two_sided=False)


def test_extension_checks_its_arrays() -> None:
    """The C++ entry points check shapes themselves (the Python wrappers allocate matching
    outputs, so only a direct call can reach these errors)."""
    ext = kernels._la_ext()
    w = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="2-D .units, length. of one shape"):
        ext.la_topk_exact(w, w, False, np.zeros((2, 7), np.int8), np.zeros(2, np.float32), 1)
    with pytest.raises(ValueError, match="2-D .units, length. of one shape"):
        ext.la_topk_exact(
            w.reshape(-1), w.reshape(-1), False, np.zeros(16, np.int8), np.zeros(2, np.float32), 1
        )
    with pytest.raises(ValueError, match="two .LAT2_e. scales"):
        ext.la_topk_exact(w, w, True, np.zeros((2, 8), np.int8), np.zeros(2, np.float32), 1)
    with pytest.raises(ValueError, match="twn_exact_units .w, codes.: arrays must be 2-D"):
        ext.twn_exact_units(
            np.zeros((2, 4)), np.zeros(2, np.int64), np.zeros(2), np.zeros((3, 4), np.int8), 1
        )
    with pytest.raises(ValueError, match="sign ops: all arrays must have the same number"):
        ext.sign_pm1(np.zeros(5, np.float32), np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="ttq ops: all arrays must have the same number"):
        ext.ttq_forward(
            np.zeros(5, np.float32), 1.0, 1.0, 0.1, np.zeros(5, np.int8), np.zeros(6, np.float32), 1
        )


# ----------------------------------------------------------------------------------------------
# Dispatch, edge cases, training


def test_backend_switch_and_dispatch(monkeypatch) -> None:
    assert la.solver_backend() == "auto"
    monkeypatch.setenv("LOWBIT_LA_SOLVER", "torch")
    assert la.solver_backend() == "torch"
    monkeypatch.setenv("LOWBIT_LA_SOLVER", "bogus")
    with pytest.raises(ValueError, match="LA|backend"):
        la.solver_backend()
    monkeypatch.delenv("LOWBIT_LA_SOLVER")
    with pytest.raises(ValueError):
        la.set_solver_backend("gpu")
    w32, d32 = torch.randn(4, 8), torch.rand(4, 8) + 0.1
    assert la._use_native(w32, d32, "lat_a", False)
    assert la._use_native(w32, d32, "laq_log", False)
    assert not la._use_native(w32, d32, "laq_log", True)  # laq_exact stays in PyTorch
    assert la._use_native(w32, d32, "lat_e", False)
    assert la._use_native(w32, d32, "lat2_e", False)
    assert not la._use_native(w32, d32, "lab", False)
    assert not la._use_native(w32.double(), d32.double(), "lat_a", False)
    la.set_solver_backend("torch")
    assert not la._use_native(w32, d32, "lat_a", False)
    la.set_solver_backend(None)
    # the C++ path is what solve() runs on CPU float32 by default
    calls = []
    orig = kernels.la_support_solve
    monkeypatch.setattr(
        kernels, "la_support_solve", lambda *a, **k: calls.append(1) or orig(*a, **k)
    )
    la.solve(w32, d32, "lat2_a")
    assert calls == [1]
    la.solve(w32.double(), d32.double(), "lat2_a")
    assert calls == [1]
    exact = []
    orig_e = kernels.la_topk_exact
    monkeypatch.setattr(
        kernels, "la_topk_exact", lambda *a, **k: exact.append(1) or orig_e(*a, **k)
    )
    la.solve(w32, d32, "lat_e")
    la.solve(w32.double(), d32.double(), "lat_e")
    assert exact == [1]


@pytest.mark.parametrize("scheme,bits,rule", ALT, ids=IDS)
def test_edge_cases_match_pytorch(scheme: str, bits, rule: str) -> None:
    fmt, m = la.scheme_format(scheme, bits)
    cases = [
        (torch.zeros(3, 5), None, None),  # no weight at all: scale 0, codes 0
        (torch.full((2, 4), 0.25), torch.ones(2, 4), None),  # ties everywhere
        # a wrong-sign start on the top level (a low log level of 8 bits, 2^-126, squares to 0 in
        # the float32 sums of the PyTorch path, which then restarts from max|w|)
        (-torch.rand(3, 9) - 0.1, None, torch.full((3, 9), _top(fmt, m), dtype=torch.int8)),
        (torch.randn(1, 1), None, None),
        (torch.randn(2, 6), None, torch.zeros(2, 6)),  # float warm-start codes
    ]
    for w, d, prev in cases:
        for kw in ({}, {"max_iter": 0}, {"max_iter": 1, "tol": 10.0}):
            a = _solve(
                "torch", w, d, scheme, bits, prev, alpha_rule=rule, granularity="channel", **kw
            )
            b = _solve(
                "native", w, d, scheme, bits, prev, alpha_rule=rule, granularity="channel", **kw
            )
            assert torch.equal(a[1], b[1])
            torch.testing.assert_close(b[2], a[2], rtol=1e-6, atol=0.0)
            assert torch.equal(a[3]["iterations"], b[3]["iterations"])
    # empty weights go to the PyTorch path: whatever it does, the "native" setting does the same
    e = torch.zeros(0, 4)
    outcome = []
    for backend in ("torch", "native"):
        try:
            outcome.append(_solve(backend, e, None, scheme, bits)[1].shape)
        except Exception as exc:  # compared below, not swallowed
            outcome.append(type(exc))
    assert outcome[0] == outcome[1]


def test_log_levels_are_exact_at_powers_of_two() -> None:
    # nearest_levels takes floor(log2 r) from r's exponent: torch.log2 rounds r one ulp below
    # 2^-j up to -j, which would pick the level above a threshold r has not reached.
    alpha = torch.tensor([4.0])  # alpha * 0.75 = 3 exactly
    r = torch.tensor([2.0**-j for j in range(0, 7)])
    below = torch.nextafter(r, torch.zeros_like(r))
    w = torch.cat([below, r]) * 3.0
    r32 = w.abs() / (alpha * 0.75)
    keep = r32 >= 2.0**-7 / 0.75
    expect = torch.tensor([math.frexp(float(x))[1] - 1 for x in r32]).clamp(-(7 - 1), 0) + 7
    expect = torch.where(keep, expect, torch.zeros_like(expect))
    codes, _ = la.nearest_levels(w[None, :], alpha, "kbit_log", 4)
    assert codes[0].tolist() == expect.tolist()
    # the C++ solver uses the same rule, computed directly (short units) or by comparisons with
    # bisected thresholds (units of 4096 elements or more)
    for reps in (1, 300):
        wl = w.repeat(reps)[None, :]
        c0 = la.nearest_levels(wl, alpha, "kbit_log", 4)[0].to(torch.int8)
        out = kernels.la_laq_solve(wl, torch.ones_like(wl), c0, bits=4, log_levels=True, max_iter=0)
        c2, _ = la.nearest_levels(wl, out[1], "kbit_log", 4)
        assert torch.equal(out[0], c2.to(torch.int8))


@pytest.mark.parametrize(
    "method,opts",
    [
        ("lat", {"solver": "approx"}),
        ("lat2", {"solver": "approx"}),
        ("laq", {"bits": 3}),
        ("laq", {"bits": 3, "levels": "log", "alpha_rule": "official"}),
        ("lat", {"solver": "approx", "granularity": "channel"}),
    ],
)
def test_training_gives_the_same_codes_on_both_paths(method: str, opts: dict) -> None:
    def run(backend: str) -> list[torch.Tensor]:
        la.set_solver_backend(backend)
        try:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 10))
            model = lowbit.quantize(model, method, keep=(), **opts)
            opt = lowbit.methods.get(method).wrap_optimizer(
                model, torch.optim.Adam(model.parameters(), lr=0.01)
            )
            g = torch.Generator().manual_seed(1)
            for _ in range(6):
                x = torch.randn(32, 24, generator=g)
                y = torch.randint(0, 10, (32,), generator=g)
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            return [
                t.clone()
                for q in model.modules()
                if isinstance(q, la.LossAwareWeight)
                for t in (q.codes, q.scales)
            ]
        finally:
            la.set_solver_backend(None)

    a, b = run("torch"), run("native")
    for x, y in zip(a, b, strict=True):
        if x.dtype == torch.int8:
            assert float((x != y).float().mean()) <= 0.01  # equal but for borderline elements
        else:
            torch.testing.assert_close(y, x, rtol=1e-3, atol=1e-7)


@pytest.mark.parametrize(
    ("fmt", "bits"),
    [
        ("binary", 1),
        ("ternary", 2),
        ("ternary_asym", 2),
        ("kbit_linear", 3),
        ("kbit_linear", 8),
        ("kbit_log", 3),
        ("kbit_log", 8),
    ],
)
@pytest.mark.parametrize("units", [1, 7])
def test_dequantize_kernel_is_bit_identical_to_functional_dequantize(
    fmt: str, bits: int, units: int
) -> None:
    from lowbit import functional as F

    g = torch.Generator().manual_seed(units * 10 + bits)
    top = 1 if fmt in ("binary", "ternary", "ternary_asym") else 2 ** (bits - 1) - 1
    length = 1000
    codes = torch.randint(-top, top + 1, (units, length), generator=g).to(torch.int8)
    if fmt == "binary":
        codes[codes == 0] = 1
    codes[0, :3] = torch.tensor([top, -top, 0 if fmt != "binary" else 1], dtype=torch.int8)
    scales = torch.exp(
        torch.empty(units, 2 if fmt == "ternary_asym" else 1).uniform_(-30, 30, generator=g)
    )
    scales[0] = 0.0  # a unit whose scale collapsed
    per_unit = scales if fmt == "ternary_asym" else scales[:, 0].contiguous()
    got = kernels.la_dequantize(codes, per_unit, fmt, bits)
    # the reference: lowbit.functional.dequantize with one scale per output row ("channel")
    ref = F.dequantize(codes, per_unit, fmt, bits, Granularity.of("channel"), codes.shape)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))  # same bits, signs of zero too


@pytest.mark.parametrize("method", ["lab", "lat", "lat2", "laq"])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_layer_forward_uses_the_kernel_and_equals_the_export(
    method: str, granularity: str, monkeypatch
) -> None:
    calls = []
    real = kernels.la_dequantize

    def counting(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "la_dequantize", counting)
    torch.manual_seed(0)
    net = lowbit.quantize(
        nn.Sequential(nn.Linear(40, 30), nn.Linear(30, 5)), method, keep=(), granularity=granularity
    )
    opt = lowbit.methods.get(method).wrap_optimizer(
        net, torch.optim.Adam(net.parameters(), lr=0.01)
    )
    x = torch.randn(8, 40)
    for _ in range(2):
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()
    for layer in (net[0], net[1]):
        q = layer.weight_quantizer
        fast = q.dequantized(layer.weight.detach())
        la.set_solver_backend("torch")
        slow = q.dequantized(layer.weight.detach())
        la.set_solver_backend(None)
        assert torch.equal(fast, slow)
        assert torch.equal(fast, layer.quantized_weight().dequantize())
    assert len(calls) >= 4 and set(calls) == {net[0].weight_quantizer.format}  # forwards, checks
