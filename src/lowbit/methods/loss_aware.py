"""Loss-aware weight quantization: LAB, LAT, LAT2 and LAQ (proximal Newton with Adam's curvature).

Papers: Hou, Yao & Kwok, "Loss-aware Binarization of Deep Networks", ICLR 2017 (arXiv 1611.01600),
and Hou & Kwok, "Loss-aware Weight Quantization of Deep Networks", ICLR 2018 (arXiv 1802.08635).
Section numbers (§3.x) refer to ``reference/papers.md``, which digests both papers and the official
Theano code (houlu369/Loss-aware-weight-quantization, houlu369/Loss-aware-Binarization).

The idea (§3.1): at every step minimise the second-order model of the loss subject to the weights
lying on a scaled level set. With ``D = Diag(d)`` the curvature estimate that Adam already keeps
(``d = sqrt(v) + 1e-8``, ``v`` = ``exp_avg_sq`` *without* bias correction), the problem separates by
layer (or by output channel / group) and becomes a weighted projection::

    w_hat = argmin_{alpha > 0, b in Q^n}  sum_i d_i (alpha * b_i - w_i)^2              (proximal step, §3.1)

where ``w`` is the full-precision latent weight updated by Adam from the gradient taken at
``w_hat`` (straight-through), then clipped to [-1, 1]. :func:`solve` is that projection for every
scheme of the two papers:

==============  ===================================  =========================================
scheme          level set (times alpha)              solver
==============  ===================================  =========================================
``lab``         {-1, +1}                             closed form (§3.2): exact
``lat_e``       {-1, 0, +1}                          sorted search over top-k supports: exact
``lat_a``       {-1, 0, +1}                          alternating closed forms, warm start
``lat2_e``      {-alpha_n, 0, +alpha_p}              sorted search on each sign: exact
``lat2_a``      {-alpha_n, 0, +alpha_p}              alternating on each sign, warm start
``laq_linear``  {0, ±1/k, ..., ±1}, k = 2^(m-1)-1    alternating (nearest level <-> scale)
``laq_log``     {0, ±2^-(k-1), ..., ±1/2, ±1}        alternating (nearest level <-> scale)
==============  ===================================  =========================================

Speed: the alternating solvers re-run after every optimizer step. In PyTorch one round of them is
several full passes over the weight (a level pattern, a product, two reductions, the masked
updates), which made a LAT/LAQ optimizer step about 4x the cost of a float Adam step on the CPU.
On CPU float32 tensors they therefore run in C++ (``lowbit._la_solver``, wrapped by
:func:`lowbit.kernels.la_support_solve` / :func:`lowbit.kernels.la_laq_solve`): the levels are
recomputed on the fly and the sums accumulated in double, so a round costs at most one pass over
``(w, d)``; in units longer than ``la_chunk()`` (32768) elements the rounds after a unit's first
rescan only the elements near a decision threshold, since alpha moves little from round to round.
Results are bit-identical for any thread count. It is the same computation as the PyTorch
functions below (same start, level rule, stop rule and iteration counts; the levels of a given
alpha come from the same float32 operations; only the sums differ: double there, float32 here, so
scales agree to the rounding of long float32 sums), which remain the reference and the path for
float64 and GPU tensors. ``LOWBIT_LA_SOLVER=torch|native|auto`` (default ``auto``) or
:func:`set_solver_backend` picks the path; see :func:`solver_backend`.

Training wiring (:class:`LossAwareWeight`, :class:`LossAwareMethod`, registered as ``"lab"``,
``"lat"``, ``"lat2"`` and ``"laq"``) lives below the solvers; the optimizer side (Adam step, clip,
re-solve with the fresh ``exp_avg_sq``) is :class:`lowbit.optim.LossAwareOptimizer`.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Any

import torch
from torch import nn

from lowbit import functional as F
from lowbit.methods import Method, register
from lowbit.nn import WeightQuantizer
from lowbit.qtypes import Granularity

__all__ = [
    "SCHEMES",
    "nearest_levels",
    "LossAwareMethod",
    "LossAwareWeight",
    "initial_codes",
    "objective",
    "scheme_format",
    "set_solver_backend",
    "solve",
    "solver_backend",
    "wrap_optimizer",
]

SCHEMES = ("lab", "lat_e", "lat_a", "lat2_e", "lat2_a", "laq_linear", "laq_log")
ALPHA_RULES = ("ls", "official")

GranularityLike = Granularity | str | None


def scheme_format(scheme: str, bits: int | None = None) -> tuple[str, int]:
    """The :class:`~lowbit.qtypes.QuantizedWeight` ``(format, bits)`` a scheme exports to."""
    if scheme == "lab":
        return "binary", 1
    if scheme in ("lat_e", "lat_a"):
        return "ternary", 2
    if scheme in ("lat2_e", "lat2_a"):
        return "ternary_asym", 2
    if scheme in ("laq_linear", "laq_log"):
        m = 3 if bits is None else int(bits)
        if not 2 <= m <= 8:
            raise ValueError(f"{scheme} supports 2..8 bits, got bits={bits}")
        return ("kbit_linear" if scheme == "laq_linear" else "kbit_log"), m
    raise ValueError(f"unknown loss-aware scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")


# ----------------------------------------------------------------------------------------------
# Level tables and helpers (everything below works on "units": a (U, L) matrix, one row per scale)


def nearest_levels(
    w: torch.Tensor, alpha: torch.Tensor, fmt: str, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest level of each row of ``w`` (``(U, L)``) for its scale ``alpha`` (``(U,)``, > 0).

    Returns ``(codes, multipliers)`` as floats: integer codes of the :mod:`lowbit.qtypes` format
    and the multiple of alpha each stands for (for ``kbit_linear`` the multiplier is the code
    itself: the solver works with the step ``alpha / k``). For fixed alpha the weighted problem
    separates per element and ``d_i > 0`` drops out, so the nearest level is optimal whatever d is
    (§3.3, first bullet).

    * ternary: ``sign(w) * 1[|w| > alpha / 2]`` (§3.3).
    * linear: ``round(clip(w / alpha, -1, 1) * k)`` (half-to-even; a tie costs the same either way).
    * log: levels ``2^-j``, ``j < k``, with thresholds at 3/4 of each level (the arithmetic
      midpoints, which is what the official code's log-domain offset ``log2(1.5) - 0.5`` does,
      §3.5) and 0 below ``2^-k``: ``exponent = clamp(floor(log2(|w| / (0.75 alpha))), -(k-1), 0)``
      (the floor taken exactly from the float's exponent).
    """
    a = alpha[:, None]
    if fmt in ("ternary", "ternary_asym"):
        c = torch.where(w.abs() > a / 2, F.sign(w), torch.zeros_like(w))
        return c, c
    k = 2 ** (bits - 1) - 1
    if fmt == "kbit_linear":
        c = torch.round(w / (a / k)).clamp_(-k, k)
        return c, c
    r = w.abs() / (a * 0.75)
    keep = (r >= 2.0**-k / 0.75).to(w.dtype).mul_(F.sign(w))
    # floor(log2 r) exactly, from the binary exponent: torch.log2 rounds r one ulp below 2^-j
    # (j >= 2) up to -j, which picked the level above a threshold the value had not reached (and
    # would differ from the C++ solver). NaN (0/0) and inf (alpha underflowing) are mapped first.
    r.nan_to_num_(nan=0.0, posinf=torch.finfo(r.dtype).max)
    e = torch.frexp(r)[1].to(w.dtype).sub_(1).clamp_(-(k - 1), 0)
    m = torch.exp2(e).mul_(keep)
    return e.add_(k).mul_(keep), m


def _topk_exact(
    a: torch.Tensor, d: torch.Tensor, eligible: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``min_{alpha, S} sum_{i in S} d_i (alpha - a_i)^2 + sum_{i not in S} d_i a_i^2`` per row.

    ``a >= 0`` on eligible entries. For fixed alpha the best S is ``{a_i > alpha/2}`` whatever
    d > 0 is, so the optimal S is a top-k set of ``a``; for a top-k set the best alpha is
    ``cumDA_k / cumD_k`` and the objective drops by ``cumDA_k^2 / cumD_k``. Sort descending, take
    cumulative sums and pick the best k (LAT_e, §3.3; the official ``findalpha`` scores
    ``c_k^2 cumD_k`` over self-consistent k, which is the same maximiser). O(n log n).

    Returns ``(alpha, kept)``: alpha per row (0 where nothing is eligible) and the support mask.
    Cumulative sums are taken in float64 so the argmax is not decided by rounding. On CPU float32
    units the same computation runs in C++ (:func:`lowbit.kernels.la_topk_exact`).
    """
    key = torch.where(eligible, a, torch.full_like(a, -1.0))
    # stable: equal keys keep their index order, so the C++ solver (kernels.la_topk_exact) can
    # reproduce the cumulative sums and the support exactly
    s, order = key.sort(dim=1, descending=True, stable=True)
    ds = torch.where(s >= 0, d.gather(1, order), torch.zeros_like(s)).double()
    sa = s.clamp(min=0).double()
    cum_da = (ds * sa).cumsum(1)
    cum_d = ds.cumsum(1)
    n_ok = eligible.sum(1)
    k = torch.arange(1, a.shape[1] + 1, device=a.device)
    valid = (k[None, :] <= n_ok[:, None]) & (cum_d > 0)
    score = torch.where(
        valid,
        cum_da * cum_da / torch.where(valid, cum_d, torch.ones_like(cum_d)),
        torch.full_like(cum_d, -1.0),
    )
    best = score.argmax(dim=1, keepdim=True)
    has = n_ok > 0
    alpha = (cum_da.gather(1, best) / cum_d.gather(1, best).clamp(min=1e-300)).squeeze(1)
    alpha = torch.where(has & (alpha > 0), alpha, torch.zeros_like(alpha)).to(a.dtype)
    # the top (best + 1) keys (entries before the first positive d, whose d is 0, change nothing)
    kept_sorted = (k[None, :] <= (best + 1)) & (alpha > 0)[:, None]
    kept = torch.zeros_like(eligible).scatter(1, order, kept_sorted)
    return alpha, kept


def objective(
    w: torch.Tensor, d: torch.Tensor, w_hat: torch.Tensor, granularity: GranularityLike = None
) -> torch.Tensor:
    """``sum d (w_hat - w)^2`` per unit (scale shape): the quantity every scheme minimises (§3.1)."""
    g = Granularity.of(granularity)
    units, _ = F.to_units((d * (w_hat - w) ** 2).detach(), g)
    return units.sum(1).reshape(g.scale_shape(tuple(w.shape)))


def initial_codes(
    w: torch.Tensor, scheme: str, bits: int | None = None, granularity: GranularityLike = None
) -> torch.Tensor:
    """The step-0 warm start: TWN's ``0.7 * mean|w|`` ternary pattern (official ``initialize_b``, §3.3).

    The official code starts from ``±2 * thres`` with ``thres = 0.7 mean|w|``; for multi-bit
    schemes that pattern sits on the top level, so the ternary codes are multiplied by the top code.
    """
    fmt, m = scheme_format(scheme, bits)
    _, codes = F.twn(w.detach(), "0.7", granularity)
    if fmt == "binary":
        return F.sign(w.detach()).to(torch.int8)
    top = 1 if fmt in ("ternary", "ternary_asym") else 2 ** (m - 1) - 1
    return (codes.to(torch.int16) * top).to(torch.int8)


# ----------------------------------------------------------------------------------------------
# The solvers


def _mult(c: torch.Tensor, fmt: str, bits: int) -> torch.Tensor:
    """Level multipliers of integer codes ``c`` (float): ``c``, ``c / k`` or ``sign(c) 2^(|c| - k)``."""
    if fmt in ("ternary", "ternary_asym"):
        return c
    k = 2 ** (bits - 1) - 1
    if fmt == "kbit_linear":
        return c / k
    return torch.where(c == 0, torch.zeros_like(c), torch.sign(c) * torch.exp2(c.abs() - k))


def _rdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two ``(U, L)`` matrices in one pass (no temporary)."""
    if a.shape[0] == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(1)
    return torch.einsum("ul,ul->u", a, b)


def _ratio(num: torch.Tensor, den: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), fallback).clamp(min=0)


def _converged(
    new: torch.Tensor, old: torch.Tensor, done: torch.Tensor, tol: float
) -> torch.Tensor:
    return done | ((new - old).abs() < tol)


def _sync_free(t: torch.Tensor) -> bool:
    """True where reading a tensor's value on the host is costly (a GPU): loops then run on."""
    return t.is_cuda


def _all_done(done: torch.Tensor) -> bool:
    """Early exit of the alternating loops, on the CPU only.

    On a GPU, ``bool(done.all())`` waits for the device every round (and every layer, every
    step): that made LAT_a/LAT2_a/LAQ runs several times slower than LAT_e on an H100. Units that
    converged are masked, so the remaining rounds change nothing and skipping the test there
    gives the same result.
    """
    return not _sync_free(done) and bool(done.all())


def _support_alternate(
    a: torch.Tensor, d: torch.Tensor, kept0: torch.Tensor, max_iter: int, tol: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-scale ternary alternation on magnitudes ``a`` (LAT_a §3.3; one sign of LAT2_a §3.4).

    ``alpha = sum_S d a / sum_S d`` (the LS scale of a 0/1 support, §3.3) and
    ``S = {a > alpha / 2}`` (nearest level, §3.3), starting from the support ``kept0``
    (an empty one restarts from ``alpha = max a``). Both half-steps are exact minimisations, so the
    objective never increases. Stops per unit when alpha moves less than ``tol``, after at most
    ``max_iter`` rounds. Returns ``(alpha, kept, iterations)``.
    """
    dt = a.dtype
    # Both sums of a round in one pass: [sum_S d a, sum_S d] = [d a; d] @ 1_S.
    d2 = torch.stack([d * a, d], dim=1)  # (U, 2, L)
    kf = (kept0 & (a > 0)).to(dt)  # a level of the wrong sign is never part of a good start

    def sums(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = torch.bmm(d2, k.unsqueeze(2)).squeeze(2)
        return r[:, 0], r[:, 1]

    alpha = _ratio(*sums(kf), a.amax(1))
    done = alpha <= 0
    iters = torch.zeros_like(alpha, dtype=torch.int64)
    zero = torch.zeros_like(alpha)
    for _ in range(max_iter):
        if _all_done(done):
            break
        torch.gt(a, (alpha / 2)[:, None], out=kf)
        new = _ratio(*sums(kf), zero)
        iters += (~done).long()
        active = ~done
        done = _converged(new, alpha, done, tol)
        alpha = torch.where(active, new, alpha)
    # The support is the nearest-level one for the returned alpha (a consistent pair).
    kept = (a > (alpha / 2)[:, None]) & (alpha > 0)[:, None]
    return alpha, kept, iters


def _laq_alternate(
    wu: torch.Tensor,
    du: torch.Tensor,
    codes0: torch.Tensor,
    fmt: str,
    bits: int,
    rule: str,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """m-bit alternation ``alpha <- alpha(codes)``, ``codes <- nearest(alpha)`` (LAQ, §3.5).

    Starts from ``codes0`` with their signs set to ``sign(w)`` (a level of the wrong sign is never
    better than its mirror when alpha > 0). With ``rule="ls"`` (§3.5) both half-steps are
    exact minimisations and the objective never increases; ``rule="official"`` is the code's
    ``||b ⊙ d ⊙ w||_1 / ||b ⊙ d||_1``, whose first alpha also counts every nonzero previous level
    as 1 (the code starts from ``sign(Wb)``). Stops per unit when alpha moves less than ``tol``.
    Returns ``(alpha, codes, iterations)``; the codes are the nearest levels for that alpha.
    Linear levels work on integer codes and the step ``s = alpha / k`` (fewer passes).
    """
    k = 2 ** (bits - 1) - 1
    sw = F.sign(wu)
    aw = wu.abs()
    dw = du * wu
    fallback = aw.amax(1)
    linear = fmt == "kbit_linear"

    def alpha_of(c: torch.Tensor, m: torch.Tensor, first: bool = False) -> torch.Tensor:
        # m: the level multipliers of c (for linear levels: c itself, the scale is the step)
        if rule == "official":
            am = (c != 0).to(wu.dtype) if first else m.abs()
            return _ratio(_rdot(du * aw, am), _rdot(du, am), fallback)
        scale = _ratio(_rdot(dw, m), _rdot(du * m, m), fallback / k if linear else fallback)
        return scale * k if linear else scale

    def codes_of(alpha: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = alpha > 0
        c, m = nearest_levels(wu, torch.where(pos, alpha, torch.ones_like(alpha)), fmt, bits)
        if _sync_free(pos) or not bool(pos.all()):
            c = torch.where(pos[:, None], c, torch.zeros_like(c))
            m = torch.where(pos[:, None], m, torch.zeros_like(m))
        return c, m

    c0 = codes0.to(wu.dtype).abs() * sw
    alpha = alpha_of(c0, c0 if linear else _mult(c0, fmt, bits), first=True)
    c, m = codes_of(alpha)
    done = alpha <= 0
    iters = torch.zeros_like(alpha, dtype=torch.int64)
    single = wu.shape[0] == 1
    for _ in range(max_iter):
        if _all_done(done):
            break
        new = alpha_of(c, m)
        c_new, m_new = codes_of(new)
        iters += (~done).long()
        if single and not _sync_free(wu):
            # one unit that is not done yet: no masking needed (the loop ends when it is done)
            done = _converged(new, alpha, done, tol)
            alpha, c, m = new, c_new, m_new
            continue
        active = ~done
        done = _converged(new, alpha, done, tol)
        alpha = torch.where(active, new, alpha)
        c = torch.where(active[:, None], c_new, c)
        m = torch.where(active[:, None], m_new, m)
    return alpha, c, iters


def _laq_exact(wu: torch.Tensor, du: torch.Tensor, fmt: str, bits: int) -> torch.Tensor:
    """Exact m-bit scale by a sweep over alpha's breakpoints (an extension; the paper's LAQ alternates).

    For fixed alpha every element takes its nearest level, so the codes only change where
    ``|w_i| / alpha`` crosses a decision threshold ``mu_j`` between consecutive level magnitudes,
    i.e. at ``alpha = |w_i| / mu_j``. Between consecutive breakpoints the codes are fixed and the
    objective is the quadratic ``sum d w^2 - 2 alpha A + alpha^2 B`` (``A = sum d m |w|``,
    ``B = sum d m^2``). Sorting the n*k breakpoints (descending alpha) and accumulating ``A`` and
    ``B`` gives every interval's quadratic; its minimiser clamped into the interval, minimised over
    the intervals, is the global optimum. O(nk log nk). Returns alpha per unit row.
    """
    k = 2 ** (bits - 1) - 1
    if fmt == "kbit_linear":
        mags = [j / k for j in range(k + 1)]  # 0, 1/k, ..., 1
    else:
        mags = [0.0] + [2.0 ** (-j) for j in range(k - 1, -1, -1)]  # 0, 2^-(k-1), ..., 1
    lo = torch.tensor(mags[:-1], dtype=torch.float64, device=wu.device)
    hi = torch.tensor(mags[1:], dtype=torch.float64, device=wu.device)
    mu = (lo + hi) / 2  # decision thresholds on |w| / alpha
    a = wu.abs().double()
    d = du.double()
    u = a.shape[0]
    beta = (a[:, :, None] / mu).reshape(u, -1)  # alpha at which element i moves up to level j+1
    da = (d * a)[:, :, None] * (hi - lo)
    db = d[:, :, None] * (hi * hi - lo * lo)
    beta, order = beta.sort(dim=1, descending=True)
    cum_a = da.reshape(u, -1).gather(1, order).cumsum(1)
    cum_b = db.reshape(u, -1).gather(1, order).cumsum(1)
    nxt = torch.cat([beta[:, 1:], torch.zeros_like(beta[:, :1])], dim=1)
    ok = cum_b > 0
    cand = torch.where(
        ok, cum_a / torch.where(ok, cum_b, torch.ones_like(cum_b)), torch.zeros_like(cum_b)
    )
    cand = torch.minimum(torch.maximum(cand, nxt), beta)
    value = torch.where(ok, cand * (cand * cum_b - 2 * cum_a), torch.zeros_like(cand))
    best = value.argmin(dim=1, keepdim=True)
    alpha = cand.gather(1, best).squeeze(1)
    return torch.where(value.gather(1, best).squeeze(1) < 0, alpha, torch.zeros_like(alpha)).to(
        wu.dtype
    )


# ----------------------------------------------------------------------------------------------
# Which implementation runs the solvers (LAT_e, LAT2_e, and the alternating LAT_a, LAT2_a, LAQ)

SOLVER_BACKENDS = ("auto", "native", "torch")
_ALTERNATING = ("lat_a", "lat2_a", "laq_linear", "laq_log")
_NATIVE = (*_ALTERNATING, "lat_e", "lat2_e")
_backend_override: str | None = None
_native_loaded: bool | None = None


def _check_backend(backend: str) -> str:
    b = str(backend).strip().lower()
    if b not in SOLVER_BACKENDS:
        raise ValueError(
            f"loss-aware solver backend must be one of {', '.join(SOLVER_BACKENDS)}, got {backend!r}"
        )
    return b


def set_solver_backend(backend: str | None) -> None:
    """Pick the implementation of the alternating solvers for this process (``None``: back to the
    ``LOWBIT_LA_SOLVER`` environment variable, default ``"auto"``).

    * ``"auto"``: the C++ solver on CPU float32 tensors when the extension loads, PyTorch otherwise;
    * ``"native"``: the C++ solver on CPU float32 tensors, an error if the extension is missing;
    * ``"torch"``: always the PyTorch reference.

    Float64 and GPU tensors, LAB and LAQ's exact search always run in PyTorch.
    """
    global _backend_override
    _backend_override = None if backend is None else _check_backend(backend)


def solver_backend() -> str:
    """The selected backend: :func:`set_solver_backend`'s, else ``LOWBIT_LA_SOLVER``, else ``"auto"``."""
    if _backend_override is not None:
        return _backend_override
    return _check_backend(os.environ.get("LOWBIT_LA_SOLVER", "").strip() or "auto")


def _native_available(required: bool) -> bool:
    global _native_loaded
    if _native_loaded is None:
        try:
            from lowbit import kernels

            _native_loaded = kernels.la_solver_available()
        except ImportError:  # KernelBuildError: lowbit._kernels itself is missing
            _native_loaded = False
    if required and not _native_loaded:
        from lowbit.kernels import _la_ext  # raises the KernelBuildError that explains why

        _la_ext()
    return _native_loaded


def _use_native(wu: torch.Tensor, du: torch.Tensor, scheme: str, laq_exact: bool) -> bool:
    """True where the C++ solver runs: CPU float32 units of LAT_e, LAT2_e or an alternating
    scheme, not disabled."""
    if scheme not in _NATIVE or (laq_exact and scheme.startswith("laq")):
        return False
    backend = solver_backend()
    if backend == "torch":
        return False
    if wu.device.type != "cpu" or wu.dtype != torch.float32 or du.dtype != torch.float32:
        return False
    if wu.numel() == 0:
        return False
    return _native_available(required=backend == "native")


def _solve_native(
    wu: torch.Tensor,
    du: torch.Tensor,
    scheme: str,
    fmt: str,
    m: int,
    prev: Any,
    alpha_rule: str,
    max_iter: int,
    tol: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_solve_units` by the C++ solvers (int8 codes, the same scales); ``prev()`` gives the
    alternating schemes' warm-start codes (the exact ones need none)."""
    from lowbit import kernels

    if scheme in ("lat_e", "lat2_e"):
        codes, alpha = kernels.la_topk_exact(
            wu.contiguous(), du.contiguous(), two_sided=scheme == "lat2_e"
        )
        return codes, alpha, torch.zeros(wu.shape[0], dtype=torch.int64)
    wu, du, codes0 = wu.contiguous(), du.contiguous(), prev().contiguous()
    if scheme in ("lat_a", "lat2_a"):
        return kernels.la_support_solve(
            wu,
            du,
            codes0,
            two_sided=scheme == "lat2_a",
            max_iter=max_iter,
            tol=tol,
        )
    codes, alpha, iters = kernels.la_laq_solve(
        wu,
        du,
        codes0,
        bits=m,
        log_levels=fmt == "kbit_log",
        official=alpha_rule == "official",
        max_iter=max_iter,
        tol=tol,
    )
    return codes, (alpha / (2 ** (m - 1) - 1) if fmt == "kbit_linear" else alpha), iters


def _solve_units(
    wu: torch.Tensor,
    du: torch.Tensor,
    scheme: str,
    fmt: str,
    m: int,
    prev: Any,
    alpha_rule: str,
    max_iter: int,
    tol: float,
    laq_exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes (unit layout; float, or int8 from the C++ solver) and per-unit scales (``(U,)``,
    ``(U, 2)`` for LAT2) of one scheme.

    Padding of remainder groups is 0 in both ``wu`` and ``du``, so it never enters a sum and always
    gets code 0 (it is dropped by ``from_units`` anyway). ``prev()`` gives the warm-start codes
    (int8 units). LAT_e, LAT2_e and the alternating schemes run in C++ on CPU float32 units
    (:func:`_use_native`).
    """
    if _use_native(wu, du, scheme, laq_exact):
        return _solve_native(wu, du, scheme, fmt, m, prev, alpha_rule, max_iter, tol)
    iters = torch.zeros(wu.shape[0], dtype=torch.int64, device=wu.device)
    if scheme == "lab":
        alpha = _ratio(
            _rdot(du, wu.abs()),
            du.sum(1),
            torch.zeros(wu.shape[0], dtype=wu.dtype, device=wu.device),
        )
        return F.sign(wu), alpha, iters
    if scheme == "lat_e":
        alpha, kept = _topk_exact(wu.abs(), du, wu != 0)
        return torch.where(kept, F.sign(wu), torch.zeros_like(wu)), alpha, iters
    if scheme == "lat2_e":
        ap, kp = _topk_exact(wu, du, wu > 0)
        an, kn = _topk_exact(-wu, du, wu < 0)
        return kp.to(wu.dtype) - kn.to(wu.dtype), torch.stack([ap, an], dim=-1), iters
    if scheme == "lat_a":
        alpha, kept, iters = _support_alternate(wu.abs(), du, prev() != 0, max_iter, tol)
        return torch.where(kept, F.sign(wu), torch.zeros_like(wu)), alpha, iters
    if scheme == "lat2_a":
        # Each sign alternates on its own; stop when BOTH scales moved less than tol (the official
        # stop rule joins the two tests with Python ``and`` on Theano tensors, which in effect
        # checks only the negative side, §3.4).
        c0 = prev()
        ap, kp, ip = _support_alternate(wu, du, c0 > 0, max_iter, tol)
        an, kn, i_n = _support_alternate(-wu, du, c0 < 0, max_iter, tol)
        return (
            kp.to(wu.dtype) - kn.to(wu.dtype),
            torch.stack([ap, an], dim=-1),
            torch.maximum(ip, i_n),
        )
    if laq_exact:
        alpha = _laq_exact(wu, du, fmt, m)
        pos = alpha > 0
        c, _ = nearest_levels(wu, torch.where(pos, alpha, torch.ones_like(alpha)), fmt, m)
        c = torch.where(pos[:, None], c, torch.zeros_like(c))
    else:
        alpha, c, iters = _laq_alternate(wu, du, prev(), fmt, m, alpha_rule, max_iter, tol)
    return c, (alpha / (2 ** (m - 1) - 1) if fmt == "kbit_linear" else alpha), iters


def _prepare(
    w: torch.Tensor, d: torch.Tensor | None, g: Granularity
) -> tuple[torch.Tensor, torch.Tensor]:
    if not w.is_floating_point():
        raise TypeError(f"solve() needs a floating-point weight, got {w.dtype}")
    if d is None:
        d = torch.ones_like(w)
    elif tuple(d.shape) != tuple(w.shape):
        raise ValueError(f"curvature d has shape {tuple(d.shape)}, the weight {tuple(w.shape)}")
    wu, _ = F.to_units(w, g)
    du, _ = F.to_units(d.detach().to(w.dtype), g)
    return wu, du


def _solve_codes(
    w: torch.Tensor,
    d: torch.Tensor | None,
    scheme: str,
    bits: int | None,
    prev_codes: torch.Tensor | None,
    g: Granularity,
    alpha_rule: str,
    max_iter: int,
    tol: float,
    laq_exact: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`solve` without ``w_hat``: ``(codes int8, scales, iterations per unit)``."""
    fmt, m = scheme_format(scheme, bits)
    if alpha_rule not in ALPHA_RULES:
        raise ValueError(f"alpha_rule must be one of {', '.join(ALPHA_RULES)}, got {alpha_rule!r}")
    w = w.detach()
    shape = tuple(w.shape)
    wu, du = _prepare(w, d, g)

    def prev() -> torch.Tensor:
        c = prev_codes if prev_codes is not None else initial_codes(w, scheme, m, g)
        if tuple(c.shape) != shape:
            raise ValueError(f"prev_codes has shape {tuple(c.shape)}, the weight {shape}")
        # int8 as stored (the C++ solver reads them directly; the PyTorch one converts)
        return F.to_units(c.to(device=w.device, dtype=torch.int8), g)[0]

    cu, su, iters = _solve_units(wu, du, scheme, fmt, m, prev, alpha_rule, max_iter, tol, laq_exact)
    codes = F.from_units(cu, shape, g).to(torch.int8)
    scale_shape = g.scale_shape(shape)
    scales = su.reshape(*scale_shape, 2) if fmt == "ternary_asym" else su.reshape(scale_shape)
    return codes, scales.to(w.dtype).contiguous(), iters


def solve(
    w: torch.Tensor,
    d: torch.Tensor | None,
    scheme: str,
    bits: int | None = None,
    prev_codes: torch.Tensor | None = None,
    *,
    granularity: GranularityLike = None,
    group_size: int | None = None,
    group_axis: str | None = None,
    alpha_rule: str = "ls",
    max_iter: int = 10,
    tol: float = 1e-6,
    laq_exact: bool = False,
    return_info: bool = False,
) -> Any:
    """The loss-aware projection ``argmin sum d (w_hat - w)^2`` over the scheme's level set (§3.1-§3.5).

    Args:
        w: latent full-precision weight (any shape; Linear ``(out, in)``, Conv ``(out, in, kh, kw)``).
        d: positive curvature of the same shape (``sqrt(exp_avg_sq) + 1e-8``); ``None`` means 1,
            which turns every scheme into its unweighted form (LAB -> BWN, LAT_e -> exact TWN).
        scheme: one of :data:`SCHEMES` (see the module docstring).
        bits: m for ``laq_*`` (default 3; k = 2^(m-1) - 1 levels per sign); ignored otherwise.
        prev_codes: the previous step's int8 codes (same format) for the alternating solvers'
            warm start (other dtypes are converted to int8); ``None`` uses :func:`initial_codes`
            (TWN 0.7 pattern, the official init). The exact schemes and LAB ignore it.
        granularity, group_size, group_axis: one scale per tensor (default, as in the papers),
            per output channel (``"channel"``) or per group (see :mod:`lowbit.qtypes`).
        alpha_rule: ``laq_*`` scale update: ``"ls"`` (weighted least squares, §3.5, default) or
            ``"official"`` (the code's ``||b⊙d⊙w||_1 / ||b⊙d||_1``, §3.5). Ternary: identical.
        max_iter, tol: alternating solvers' limits (official: 10 and 1e-6 on alpha). On CPU
            float32 tensors the alternating schemes run in C++ (module docstring,
            :func:`set_solver_backend`); float64 and GPU tensors run the PyTorch reference.
        laq_exact: ``laq_*`` only: the exact optimum by a sweep over alpha's breakpoints
            (O(nk log nk); an extension, the papers alternate). Ignores ``prev_codes``.
        return_info: also return a dict with per-unit ``iterations``.

    Returns:
        ``(w_hat, codes, scales)``: ``w_hat`` equals
        ``lowbit.functional.dequantize(codes, scales, format, bits, granularity, w.shape)``
        exactly (``format, bits = scheme_format(scheme, bits)``); codes int8; scales in the
        :mod:`lowbit.qtypes` layout: alpha for binary/ternary/kbit_log, the step ``alpha / k``
        for kbit_linear, ``[..., 0] = alpha_p, [..., 1] = alpha_n`` for ternary_asym.

    Scheme details:
        * ``lab``: ``b = sign(w)``, ``alpha = ||d ⊙ w||_1 / ||d||_1`` (LAB, §3.2; exact).
        * ``lat_e``: exact, sorted search over top-k supports (LAT_e, §3.3, ``findalpha``).
        * ``lat_a``: ``b = sign(w) 1[|w| > alpha/2]`` <-> ``alpha = sum_S d|w| / sum_S d``,
          warm-started from ``prev_codes`` (official ``LATa``).
        * ``lat2_e``: the exact search run on the positive and on the negative weights separately.
          The official ``findalpha2`` picks the negative threshold with the *positive* side's
          ``c1`` array (``c2[mask2][argmax(c1[mask2]**2 * cum_D2[mask2])]``); this implementation
          uses the negative side's own values, which is the exact minimiser (§3.4).
        * ``lat2_a``: alternating per sign (§3.4), both scales must converge.
        * ``laq_linear`` / ``laq_log``: alternating nearest level <-> alpha (LAQ, §3.5).
    """
    g = Granularity.of(granularity, group_size, group_axis)
    codes, scales, iters = _solve_codes(
        w, d, scheme, bits, prev_codes, g, alpha_rule, max_iter, tol, laq_exact
    )
    fmt, m = scheme_format(scheme, bits)
    w_hat = F.dequantize(codes, scales, fmt, m, g, tuple(w.shape))
    if return_info:
        return w_hat, codes, scales, {"iterations": iters}
    return w_hat, codes, scales


# ----------------------------------------------------------------------------------------------
# Training: the weight quantizer (holds D, the warm start and the current w_hat)


def _normalise_solver(solver: str) -> str:
    s = str(solver).lower()
    if s in ("e", "exact"):
        return "e"
    if s in ("a", "approx", "approximate", "alternating"):
        return "a"
    raise ValueError(f"solver must be 'exact' or 'approx', got {solver!r}")


class LossAwareWeight(WeightQuantizer):
    """Weight quantizer of the loss-aware schemes: the forward weight is ``w_hat = Prox_D(w)`` (§3.6).

    State (buffers, saved with the model so a checkpoint reloads to the same ``w_hat``):
    ``curvature`` (``d``, the weight's shape; ones until the first optimizer step, which makes
    step 0 the unweighted problem warm-started from the TWN pattern, as the official code does with
    ``D = sqrt(0) + 1e-8``), ``codes`` and ``scales`` (the current solution, also the next warm
    start) and ``solves`` (how many times it was solved).

    :class:`lowbit.optim.LossAwareOptimizer` calls :meth:`prox_update` after every optimizer step
    with the freshly clipped latent weight and ``d = sqrt(exp_avg_sq) + eps``. The forward pass
    reuses that solution as long as the latent weight is unchanged (same storage and version
    counter, handed over by the layer after ``load_state_dict``, a deepcopy or unpickling, so a
    reloaded, copied or packed model is the trained one); if the weight changed some other way (a
    manual edit, a step by an unwrapped optimizer, a load without these buffers) it re-solves with
    the stored ``d`` and warm start, exactly as the
    official code recomputes ``Wb`` from ``W`` in every forward. The gradient reaches the latent
    weight unchanged (identity straight-through, no mask; the clip to [-1, 1] keeps it bounded).
    """

    curvature: torch.Tensor
    codes: torch.Tensor
    scales: torch.Tensor
    solves: torch.Tensor

    def __init__(
        self,
        shape: tuple[int, ...] | torch.Size,
        scheme: str,
        bits: int | None = None,
        *,
        granularity: GranularityLike = None,
        group_size: int | None = None,
        group_axis: str | None = None,
        alpha_rule: str = "ls",
        max_iter: int = 10,
        tol: float = 1e-6,
        eps: float = 1e-8,
        clip: float | None = 1.0,
        laq_exact: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        fmt, m = scheme_format(scheme, bits)
        super().__init__(
            bits=m, granularity=granularity, group_size=group_size, group_axis=group_axis
        )
        if alpha_rule not in ALPHA_RULES:
            raise ValueError(
                f"alpha_rule must be one of {', '.join(ALPHA_RULES)}, got {alpha_rule!r}"
            )
        self.format = fmt
        self.scheme = scheme
        self.alpha_rule = alpha_rule
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.eps = float(eps)
        self.clip = None if clip is None else float(clip)
        self.laq_exact = bool(laq_exact)
        shape = tuple(int(s) for s in shape)
        dtype = dtype if dtype is not None and dtype.is_floating_point else torch.float32
        scale_shape = self.granularity.scale_shape(shape)
        if fmt == "ternary_asym":
            scale_shape = (*scale_shape, 2)
        self.register_buffer("curvature", torch.ones(shape, dtype=dtype, device=device))
        self.register_buffer("codes", torch.zeros(shape, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.zeros(scale_shape, dtype=dtype, device=device))
        self.register_buffer("solves", torch.zeros((), dtype=torch.int64, device=device))
        self.__dict__["_key"] = None
        self.__dict__["_attached"] = False
        self.__dict__["_warned"] = False
        self.__dict__["_solved"] = False  # mirrors solves > 0 without a device sync per forward
        self.__dict__["_iters"] = None

    @property
    def last_iterations(self) -> float:
        """Mean alternating-solver rounds per unit in the last solve (0 for the exact schemes)."""
        iters = self.__dict__["_iters"]
        return 0.0 if iters is None else float(iters.float().mean())

    @staticmethod
    def _key_of(w: torch.Tensor) -> tuple[Any, ...]:
        return (w.data_ptr(), w._version, tuple(w.shape), str(w.device))

    def _solve(self, w: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.__dict__["_solved"] is None:  # after load_state_dict
            self.__dict__["_solved"] = bool(int(self.solves) > 0)
        prev = self.codes if self.__dict__["_solved"] else None
        codes, scales, iters = _solve_codes(
            w,
            d,
            self.scheme,
            self.bits,
            prev,
            self.granularity,
            self.alpha_rule,
            self.max_iter,
            self.tol,
            self.laq_exact,
        )
        self.__dict__["_iters"] = iters
        return codes, scales.to(self.scales.dtype)

    def _store(self, w: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> None:
        self.codes.copy_(codes)
        self.scales.copy_(scales)
        self.solves.add_(1)
        self.__dict__["_solved"] = True
        self.__dict__["_key"] = self._key_of(w)

    @torch.no_grad()
    def prox_update(self, w: torch.Tensor, d: torch.Tensor) -> None:
        """Store ``d`` and re-solve ``w_hat`` for the (already clipped) latent weight ``w`` (§3.6 step 1)."""
        self.curvature.copy_(d)
        codes, scales = self._solve(w.detach(), self.curvature)
        self._store(w, codes, scales)

    @torch.no_grad()
    def prox_update_moment(self, w: torch.Tensor, v: torch.Tensor) -> None:
        """:meth:`prox_update` with ``d = sqrt(v) + eps`` written straight into the ``curvature`` buffer."""
        torch.sqrt(v, out=self.curvature)
        self.curvature.add_(self.eps)
        codes, scales = self._solve(w.detach(), self.curvature)
        self._store(w, codes, scales)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.__dict__["_key"] == self._key_of(w):
            return self.codes, self.scales
        key = self.__dict__["_key"]
        stepped_in_place = key is not None and key[0] == w.data_ptr() and key[1] != w._version
        if (
            self.training
            and stepped_in_place
            and not self.__dict__["_attached"]
            and not self.__dict__["_warned"]
        ):
            self.__dict__["_warned"] = True
            warnings.warn(
                f"loss-aware weight ({self.scheme}) changed without a loss-aware optimizer step: D stays at its "
                "last value and latents are not clipped. Wrap the optimizer: "
                "opt = lowbit.methods.get(<method>).wrap_optimizer(model, opt)",
                stacklevel=3,
            )
        with torch.no_grad():
            codes, scales = self._solve(w, self.curvature)
            if torch.is_inference_mode_enabled():
                return codes, scales
            self._store(w, codes, scales)
        return self.codes, self.scales

    def dequantized(self, w: torch.Tensor) -> torch.Tensor:
        """The forward weight: one C++ pass over the int8 codes on CPU float32 weights with one
        scale per tensor or per output channel (the several PyTorch passes of
        ``functional.dequantize`` were a fifth of a LAT2 training step); bit-identical to it."""
        codes, scales = self.quantize(w)
        g = self.granularity
        if (
            g.kind in ("tensor", "channel")
            and codes.dtype == torch.int8
            and scales.dtype == torch.float32
            and codes.device.type == "cpu"
            and w.dim() > 0
            and solver_backend() != "torch"
            and _native_available(required=False)
        ):
            from lowbit import kernels

            units = 1 if g.kind == "tensor" else w.shape[0]
            per_unit = (
                scales.reshape(units, 2) if self.format == "ternary_asym" else scales.reshape(units)
            )
            out = kernels.la_dequantize(codes.reshape(units, -1), per_unit, self.format, self.bits)
            return out.reshape(w.shape)
        return F.dequantize(codes, scales, self.format, self.bits, g, w.shape)

    def _load_from_state_dict(
        self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Loaded weights/buffers: the cached solution no longer belongs to a known weight version
        # until the layer hands over its loaded weight (adopt_loaded, after the whole load).
        self.__dict__["_key"] = None
        self.__dict__["_solved"] = None
        self.__dict__["_loaded"] = all(
            prefix + name in state_dict for name in ("codes", "scales", "solves")
        )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def solved_for(self, w: torch.Tensor) -> bool:
        """True when the stored solution is that of the latent weight ``w`` as it is now."""
        return self.__dict__["_key"] == self._key_of(w)

    def adopt_loaded(self, w: torch.Tensor) -> None:
        """After ``load_state_dict`` (called by the layer): a solution loaded together with the
        weight is that weight's solution (both were saved from one consistent state), so the
        forward keeps it instead of re-solving from the warm start."""
        if self.__dict__.pop("_loaded", False) and int(self.solves) > 0:
            self.__dict__["_key"] = self._key_of(w)
            self.__dict__["_solved"] = True

    def adopt_copied(self, w: torch.Tensor) -> None:
        """After a deepcopy, unpickling, cast or move of the layer whose weight this solution was for."""
        self.__dict__["_key"] = self._key_of(w)

    def describe(self) -> str:
        return f"{self.scheme}{'' if self.format in ('binary', 'ternary', 'ternary_asym') else self.bits}/{self.granularity.describe()}"

    def extra_repr(self) -> str:
        return f"scheme={self.scheme}, {super().extra_repr()}"


# ----------------------------------------------------------------------------------------------
# Methods


def wrap_optimizer(
    model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any
) -> torch.optim.Optimizer:
    """``LossAwareOptimizer.from_model(model, optimizer)``: Adam step, clip, re-solve (§3.6)."""
    from lowbit.optim import LossAwareOptimizer

    return LossAwareOptimizer.from_model(model, optimizer, **kwargs)


_COMMON_LA = {"eps": 1e-8, "clip": 1.0, "init": "keep"}


def _glorot_init_(layer: Any) -> None:
    """The official FNN init ``U(-g, g)``, ``g = sqrt(1.5 / (fan_in + fan_out))``, conv fans times k*k (§3.6).

    Applied to Linear / Conv2d weights only; LSTM gate blocks keep their weights (the official
    LSTMs use U(-0.08, 0.08), which ``lowbit.models`` ``char_lstm`` already does).
    """
    w = getattr(layer, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() < 2:
        return
    rf = math.prod(w.shape[2:]) if w.dim() > 2 else 1
    fan_in, fan_out = w.shape[1] * rf, w.shape[0] * rf
    g = math.sqrt(1.5 / (fan_in + fan_out))
    with torch.no_grad():
        w.uniform_(-g, g)


_ALT = {"max_iter": 10, "tol": 1e-6}


class LossAwareMethod(Method):
    """A registered loss-aware method; ``family`` is ``lab``, ``lat``, ``lat2`` or ``laq``."""

    def __init__(self, family: str, options: dict[str, Any], description: str, paper: str) -> None:
        super().__init__(family, options=options, description=description, paper=paper)
        self.family = family

    def scheme(self, options: dict[str, Any]) -> tuple[str, int | None]:
        """The :func:`solve` scheme and bits selected by the method options."""
        if self.family == "lab":
            return "lab", None
        if self.family in ("lat", "lat2"):
            return f"{self.family}_{_normalise_solver(options.get('solver', 'approx'))}", None
        levels = str(options.get("levels", "linear")).lower()
        if levels not in ("linear", "log"):
            raise ValueError(f"laq levels must be 'linear' or 'log', got {levels!r}")
        return f"laq_{levels}", int(options.get("bits", 3))

    def make_weight_quantizer(self, layer: Any, **options: Any) -> nn.Module:
        opts = self.resolve_options(options)
        scheme, bits = self.scheme(opts)
        init = opts.get("init", "keep")
        if init not in ("keep", "glorot"):
            raise ValueError(
                f"init must be 'keep' (the layer's weights) or 'glorot' (the official U(-g, g)), got {init!r}"
            )
        if init == "glorot":
            _glorot_init_(layer)
        w = layer.weight
        return LossAwareWeight(
            tuple(w.shape),
            scheme,
            bits,
            granularity=opts.get("granularity"),
            group_size=opts.get("group_size"),
            group_axis=opts.get("group_axis"),
            alpha_rule=opts.get("alpha_rule", "ls"),
            laq_exact=self.family == "laq"
            and _normalise_solver(opts.get("solver", "approx")) == "e",
            max_iter=opts.get("max_iter", 10),
            tol=opts.get("tol", 1e-6),
            eps=opts["eps"],
            clip=opts["clip"],
            device=w.device if w.device.type != "meta" else None,
            dtype=w.dtype,
        )

    def wrap_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> torch.optim.Optimizer:
        return wrap_optimizer(model, optimizer)

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        """Per quantized weight: mean scale (``alpha``; ``alpha_p``/``alpha_n`` for LAT2), fraction of
        zero codes, and the alternating solver's mean iteration count of the last solve."""
        out: dict[str, float] = {}
        for name, q in model.named_modules():
            if not isinstance(q, LossAwareWeight):
                continue
            prefix = name.replace(".weight_quantizer", "")
            s = q.scales.float()
            if q.format == "ternary_asym":
                out[f"{prefix}.alpha_p"] = float(s[..., 0].mean())
                out[f"{prefix}.alpha_n"] = float(s[..., 1].mean())
            else:
                k = 2 ** (q.bits - 1) - 1 if q.format == "kbit_linear" else 1
                out[f"{prefix}.alpha"] = float(s.mean()) * k
            if q.format != "binary":
                out[f"{prefix}.zeros"] = float((q.codes == 0).float().mean())
            if q.scheme.endswith("_a") or q.scheme.startswith("laq"):
                out[f"{prefix}.iters"] = q.last_iterations
        return out


_PAPER = "Hou & Kwok, Loss-aware Weight Quantization, arXiv 1802.08635 (ICLR 2018)"

register(
    LossAwareMethod(
        "lab",
        dict(_COMMON_LA),
        "loss-aware binarization: w_hat = alpha*sign(w), alpha = ||d*w||_1/||d||_1, D from Adam",
        "Hou, Yao & Kwok, Loss-aware Binarization, arXiv 1611.01600 (ICLR 2017)",
    )
)
register(
    LossAwareMethod(
        "lat",
        {**_COMMON_LA, **_ALT, "solver": "approx"},
        "loss-aware ternarization, one scale: solver='exact' (sorted search) or 'approx' (alternating)",
        _PAPER,
    )
)
register(
    LossAwareMethod(
        "lat2",
        {**_COMMON_LA, **_ALT, "solver": "approx"},
        "loss-aware ternarization with separate positive/negative scales (exports ternary_asym)",
        _PAPER,
    )
)
register(
    LossAwareMethod(
        "laq",
        {
            **_COMMON_LA,
            **_ALT,
            "bits": 3,
            "levels": "linear",
            "alpha_rule": "ls",
            "solver": "approx",
        },
        "loss-aware m-bit quantization, linear or logarithmic levels (alternating solver; 'exact' sweeps alpha)",
        _PAPER,
    )
)
