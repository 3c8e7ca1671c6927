"""Stateless quantizer math and straight-through estimators (STE).

Everything here is a plain function of tensors. Methods (``lowbit.methods.*``) build their
quantizer modules from these pieces; they all share:

* the sign rule ``sign(x) = -1 if x < 0 else +1`` (so ``sign(0) = sign(-0.0) = +1`` and NaN -> +1);
* half-to-even rounding (``torch.round``);
* the granularity helpers (:func:`to_units`, :func:`from_units`, :func:`expand_scales`): a weight
  is cut into *units* (the whole tensor, one output channel, or one group of N) that each get
  one scale; per-unit statistics are computed on a padded ``(units, length)`` matrix, masked by
  each unit's true element count, so remainder groups are exact;
* :func:`dequantize`, the single expression that turns ``(codes, scales)`` into the float weight.
  Quantizer forwards and :meth:`lowbit.qtypes.QuantizedWeight.dequantize` both call it, which is
  why an exported weight reproduces the forward weight bit for bit;
* :func:`ste`, which returns a quantized value *exactly* while routing the gradient to the latent
  tensor (times an optional per-element gate or factor).

Paper references: BNN/QNN = Hubara et al. 1609.07061; TWN = Li & Liu 1605.04711;
LAQ = Hou & Kwok 1802.08635; DFP = Mellempudi et al. 1701.08978. Section numbers ``§`` refer to
``reference/papers.md``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowbit.qtypes import Granularity

__all__ = [
    "ap2",
    "binarize",
    "bwn",
    "dequantize",
    "dfp_exponent",
    "dfp_fake_quantize",
    "dfp_quantize",
    "expand_scales",
    "from_units",
    "hard_sigmoid",
    "kbit_linear",
    "kbit_log",
    "linear_fake_quantize",
    "linear_qrange",
    "log_fake_quantize",
    "log_quantize",
    "sign",
    "sign_ste",
    "ste",
    "ternarize",
    "to_units",
    "twn",
    "unit_max_abs",
    "unit_mean_abs",
]

GranularityLike = Granularity | str | None


def _gran(
    granularity: GranularityLike, group_size: int | None = None, group_axis: str | None = None
) -> Granularity:
    return Granularity.of(granularity, group_size, group_axis)


# ----------------------------------------------------------------------------------------------
# Sign, STE


def sign(x: torch.Tensor) -> torch.Tensor:
    """±1 in ``x``'s dtype with ``sign(0) = sign(-0.0) = +1`` and NaN -> +1 (the lowbit sign rule).

    Computed as ``sign(sign(x) + 1/2)`` (NaN mapped to +1): about 5x faster than ``torch.where``
    on the CPU, which matters because it runs on every weight at every training step.
    """
    if not x.is_floating_point():
        return torch.where(x < 0, -1, 1).to(x.dtype)
    if _sign_ops_apply(x):
        from lowbit import kernels

        return kernels.sign_pm1(x)
    return torch.sign(x).add_(0.5).sign_().nan_to_num_(1.0)


# Large contiguous CPU float32 tensors take the one-pass C++ sign (lowbit._la_solver, 3x faster
# than the four PyTorch passes); below this size the call overhead is not worth it. _SIGN_OPS
# caches whether the extension loads.
_SIGN_OPS_MIN = 1 << 14
_SIGN_OPS: list[bool] = []


def _sign_ops_apply(x: torch.Tensor) -> bool:
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() < _SIGN_OPS_MIN:
        return False
    if not x.is_contiguous() or (x.requires_grad and torch.is_grad_enabled()):
        return False
    if not _SIGN_OPS:
        from lowbit import kernels

        _SIGN_OPS.append(kernels.la_solver_available())
    return _SIGN_OPS[0]


class _KBitGate(torch.autograd.Function):
    """:func:`linear_fake_quantize` in one C++ pass each way (same values: PyTorch casts ``step``
    and the saturation bounds ``lo * step``, ``hi * step`` to float32 too)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, step: float, lo: int, hi: int) -> torch.Tensor:  # type: ignore[override]
        from lowbit import kernels

        out, gate = kernels.kbit_fake(x.detach(), step, lo, hi, lo * step, hi * step)
        ctx.save_for_backward(gate)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:  # type: ignore[override]
        from lowbit import kernels

        (gate,) = ctx.saved_tensors
        return kernels.gate_grad(g, gate), None, None, None


class _SignGate(torch.autograd.Function):
    """Deterministic gated :func:`binarize` in one C++ pass each way: the values of the PyTorch
    expression there (a gradient the gate zeroes may be -0.0 where PyTorch gives +0.0)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        from lowbit import kernels

        out, gate = kernels.sign_gate(x.detach())
        ctx.save_for_backward(gate)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        from lowbit import kernels

        (gate,) = ctx.saved_tensors
        return kernels.gate_grad(g, gate)


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``clip((x + 1) / 2, 0, 1)`` (BNN eq. 3, the probability of +1 in stochastic binarization)."""
    return ((x + 1) / 2).clamp(0, 1)


def ste(x: torch.Tensor, x_q: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Straight-through estimator: the value of ``x_q`` exactly, the gradient ``g * mask`` to ``x``.

    ``mask`` is a per-element factor for the gradient reaching ``x`` (a 0/1 saturation gate,
    TTQ's ``Wp / 1 / Wn`` scaling, ...); ``None`` means identity. Gradients into ``x_q``'s own
    graph (learned scales) flow unchanged, so callers build ``x_q`` from ``x.detach()``.
    ``x_q + 0`` is exact, so the forward value is bit-identical to ``x_q``; for non-finite ``x``
    (NaN, inf) ``x - x`` is NaN, so it is zeroed to keep the lowbit sign rule (NaN -> +1).
    """
    delta = torch.nan_to_num(x - x.detach(), nan=0.0)
    if mask is not None:
        delta = delta * mask
    return x_q + delta


def binarize(
    x: torch.Tensor,
    stochastic: bool = False,
    *,
    gate: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """±1 binarization (BNN eq. 1-2) with a straight-through gradient.

    Deterministic: ``sign(x)`` with ``sign(0) = +1``. Stochastic: +1 with probability
    ``hard_sigmoid(x)`` (BNN eq. 2-3), else -1. Backward (BNN eq. 4-5, the gradient of
    ``Htanh``): ``g * 1{|x| <= 1}`` when ``gate=True`` (activations); ``gate=False`` is the
    identity STE used for latent weights, which BNN clips to [-1, 1] after each step instead.
    """
    xd = x.detach()
    if not stochastic and gate and _sign_ops_apply(xd):
        return _SignGate.apply(x)
    if stochastic:
        u = torch.rand(xd.shape, generator=generator, dtype=xd.dtype, device=xd.device)
        one = torch.ones((), dtype=xd.dtype, device=xd.device)
        b = torch.where(u < hard_sigmoid(xd), one, -one)
    else:
        b = sign(xd)
    mask = (xd.abs() <= 1).to(x.dtype) if gate else None
    return ste(x, b, mask)


def sign_ste(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` forward, identity gradient: ``binarize(x, gate=False)`` (BNN weights, §2.2)."""
    return binarize(x, gate=False)


# ----------------------------------------------------------------------------------------------
# Granularity: cut a weight into units that each get one scale


def _rows(w: torch.Tensor) -> torch.Tensor:
    if w.dim() == 0:
        return w.reshape(1, 1)
    return w.reshape(w.shape[0], -1)


def to_units(
    w: torch.Tensor, granularity: GranularityLike = None, pad_value: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(units, counts)``: ``w`` as a padded ``(U, L)`` matrix, one row per scale, and each row's true length.

    Unit order matches the flattened scale tensor of :meth:`Granularity.scale_shape`. Padding
    (only for remainder groups) is ``pad_value``; mask it with ``arange(L) < counts[:, None]``.
    """
    g = _gran(granularity)
    if g.kind == "tensor":
        flat = w.reshape(1, -1)
        return flat, torch.tensor([flat.shape[1]], device=w.device)
    rows = _rows(w)
    out, k = rows.shape
    if g.kind == "channel":
        return rows, torch.full((out,), k, device=w.device)
    n = int(g.group_size)  # type: ignore[arg-type]
    if g.axis == "in":
        groups = -(-k // n)
        pad = groups * n - k
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad), value=pad_value)
        counts = torch.full((groups,), n, device=w.device)
        counts[-1] = k - (groups - 1) * n
        return rows.reshape(out * groups, n), counts.repeat(out)
    groups = -(-out // n)
    pad = groups * n - out
    if pad:
        rows = torch.nn.functional.pad(rows, (0, 0, 0, pad), value=pad_value)
    counts = torch.full((groups,), n * k, device=w.device)
    counts[-1] = (out - (groups - 1) * n) * k
    return rows.reshape(groups, n * k), counts


def from_units(
    units: torch.Tensor, shape: tuple[int, ...] | torch.Size, granularity: GranularityLike = None
) -> torch.Tensor:
    """Inverse of :func:`to_units` for per-element values: drop the padding, restore ``shape``."""
    g = _gran(granularity)
    shape = tuple(shape)
    if g.kind in ("tensor", "channel"):
        return units.reshape(shape)
    out = shape[0] if shape else 1
    k = math.prod(shape[1:]) if len(shape) > 1 else 1
    n = int(g.group_size)  # type: ignore[arg-type]
    if g.axis == "in":
        groups = -(-k // n)
        return units.reshape(out, groups * n)[:, :k].reshape(shape)
    return units.reshape(-1, k)[:out].reshape(shape)


def _unit_mask(units: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return torch.arange(units.shape[1], device=units.device) < counts[:, None]


def _to_scale_shape(per_unit: torch.Tensor, shape: tuple[int, ...], g: Granularity) -> torch.Tensor:
    return per_unit.reshape(g.scale_shape(shape))


def unit_mean_abs(w: torch.Tensor, granularity: GranularityLike = None) -> torch.Tensor:
    """``mean |w|`` per unit, in scale shape (BWN's alpha, TWN's threshold base)."""
    g = _gran(granularity)
    units, counts = to_units(w, g)
    return _to_scale_shape(units.abs().sum(1) / counts.to(w.dtype), tuple(w.shape), g)


def unit_max_abs(w: torch.Tensor, granularity: GranularityLike = None) -> torch.Tensor:
    """``max |w|`` per unit, in scale shape (padding is 0, which never wins a max of |w|)."""
    g = _gran(granularity)
    units, _ = to_units(w, g)
    return _to_scale_shape(units.abs().amax(1), tuple(w.shape), g)


def expand_scales(
    scales: torch.Tensor, shape: tuple[int, ...] | torch.Size, granularity: GranularityLike = None
) -> torch.Tensor:
    """Scales (symmetric, in :meth:`Granularity.scale_shape`) broadcast against a weight of ``shape``."""
    g = _gran(granularity)
    shape = tuple(shape)
    ndim = len(shape)
    if g.kind == "tensor":
        return scales.reshape([1] * ndim) if ndim else scales.reshape(())
    if g.kind == "channel":
        return scales.reshape(shape[0], *([1] * (ndim - 1)))
    n = int(g.group_size)  # type: ignore[arg-type]
    out = shape[0]
    if g.axis == "in":
        k = math.prod(shape[1:])
        return scales.repeat_interleave(n, dim=1)[:, :k].reshape(shape)
    return scales.repeat_interleave(n)[:out].reshape(out, *([1] * (ndim - 1)))


_LOG_TABLES: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _log_table(bits: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (bits, dtype, device)
    table = _LOG_TABLES.get(key)
    if table is None:
        n = 2 ** (bits - 1) - 1
        values = [
            0.0 if c == 0 else math.copysign(2.0 ** (abs(c) - n), c) for c in range(-n, n + 1)
        ]
        table = torch.tensor(values, dtype=dtype, device=device)
        _LOG_TABLES[key] = table
    return table


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    format: str,
    bits: int,
    granularity: GranularityLike,
    shape: tuple[int, ...] | torch.Size,
) -> torch.Tensor:
    """The float weight of ``(codes, scales)`` in ``format`` (layout in :mod:`lowbit.qtypes`).

    Differentiable with respect to ``scales`` (learned scales such as TTQ's Wp/Wn). This is the
    one expression shared by quantizer forwards and :meth:`QuantizedWeight.dequantize`.
    """
    g = _gran(granularity)
    dtype = scales.dtype
    if format == "float":
        return scales.reshape(tuple(shape))
    if format in ("binary", "ternary", "kbit_linear"):
        return codes.to(dtype) * expand_scales(scales, shape, g)
    if format == "ternary_asym":
        wp = expand_scales(scales[..., 0], shape, g)
        wn = expand_scales(scales[..., 1], shape, g)
        return wp * (codes > 0).to(dtype) - wn * (codes < 0).to(dtype)
    if format == "kbit_log":
        n = 2 ** (bits - 1) - 1
        mult = _log_table(bits, dtype, codes.device)[codes.long() + n]
        return mult * expand_scales(scales, shape, g)
    raise ValueError(f"unknown weight format {format!r}")


# ----------------------------------------------------------------------------------------------
# Binary and ternary weights


def bwn(
    w: torch.Tensor, granularity: GranularityLike = None, *, codes_dtype: torch.dtype = torch.int8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled binary weights (BWN / XNOR-Net, the LAB closed form with d = 1, §3.2).

    ``alpha = mean|w|`` per unit minimises ``||w - alpha * sign(w)||²`` for fixed signs.
    Returns ``(alpha, codes)``: alpha in scale shape, codes ±1 (sign(0) = +1) as
    ``codes_dtype`` (int8; quantizers ask for the float dtype to skip casts in training).
    """
    g = _gran(granularity)
    w = w.detach()
    if g.kind in ("tensor", "channel") and w.dim() > 0:
        rows = w.reshape(1, -1) if g.kind == "tensor" else _rows(w)
        # One pass, no |w| temporary (QAT step time).
        alpha = rows.abs().sum(1) / rows.shape[1]
        alpha = alpha.reshape(g.scale_shape(w.shape))
    else:
        alpha = unit_mean_abs(w, g)
    return alpha, sign(w).to(codes_dtype)


def ternarize(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Ternary codes (int8): ``sign(x)`` where ``|x| > threshold`` else 0 (TTQ §1.2, TWN).

    ``threshold`` is a number or a tensor broadcastable to ``x`` (e.g. :func:`expand_scales`
    of per-unit thresholds). ``|x| == threshold`` maps to 0; NaN maps to 0.
    """
    x = x.detach()
    # Two compares and a subtraction in int8: ~20x faster than sign * mask on the CPU.
    return (x > threshold).to(torch.int8) - (x < -threshold).to(torch.int8)


def twn(
    w: torch.Tensor,
    rule: str = "exact",
    granularity: GranularityLike = None,
    *,
    codes_dtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary weights ``alpha * codes`` minimising ``||w - alpha * codes||²`` per unit (TWN; §4.1).

    For a kept set I the optimum is ``codes = sign(w)`` on I and ``alpha = mean_{I} |w|``, so the
    problem is ``max_I (sum_I |w|)² / |I|`` over sets I = {|w| > Delta}.

    * ``rule="exact"``: sort ``|w|`` descending per unit and scan k (the thresholds between
      consecutive distinct magnitudes), O(n log n); this is LAT_e with d = 1 (§3.3). Short float64
      units on the CPU (FGQ's groups) run in C++, with the same result bit for bit.
    * ``rule="0.7"``: the TWN heuristic ``Delta = 0.7 * mean|w|`` (Li & Liu 2016, eq. 10),
      then ``alpha = mean`` of the kept ``|w|``.

    Returns ``(alpha, codes)``: alpha in scale shape (0 for an all-zero unit), codes in
    {-1, 0, 1} as ``codes_dtype`` (int8 by default).
    """
    g = _gran(granularity)
    w = w.detach()
    shape = tuple(w.shape)
    if rule not in ("exact", "0.7"):
        raise ValueError(f"unknown TWN rule {rule!r}: choose 'exact' or '0.7'")
    if w.numel() == 0:  # nothing to ternarize: zero scales, no codes
        alpha = torch.zeros(g.scale_shape(shape), dtype=w.dtype, device=w.device)
        return alpha, torch.zeros(shape, dtype=codes_dtype, device=w.device)
    if rule == "0.7" and g.kind in ("tensor", "channel") and w.dim() > 0:
        return _twn07_rows(w, g, codes_dtype)
    units, counts = to_units(w, g)
    if rule == "exact" and _twn_native(units):
        from lowbit import kernels

        alpha, codes_u = kernels.twn_exact_units(units.contiguous(), counts)
        codes = from_units(codes_u, shape, g).to(codes_dtype)
        return _to_scale_shape(alpha, shape, g), codes
    a = units.abs()
    if rule == "0.7":
        mean = a.sum(1) / counts.to(a.dtype)
        delta = 0.7 * mean
        kept = (a > delta[:, None]) & _unit_mask(a, counts)
        nkept = kept.sum(1)
        alpha = torch.where(kept, a, torch.zeros_like(a)).sum(1) / nkept.clamp(min=1).to(a.dtype)
    elif rule == "exact":
        s, _ = a.sort(dim=1, descending=True)
        cs = s.cumsum(1)
        k = torch.arange(1, a.shape[1] + 1, device=a.device)
        nxt = torch.cat([s[:, 1:], torch.full_like(s[:, :1], -1.0)], dim=1)
        last = k[None, :] == counts[:, None]
        # Candidate k is a threshold between distinct magnitudes: |w|_(k) > |w|_(k+1) (or k = n).
        valid = (k[None, :] <= counts[:, None]) & ((s > nxt) | last)
        nxt = torch.where(last, torch.full_like(nxt, -1.0), nxt)
        score = torch.where(valid, cs * cs / k.to(a.dtype), torch.full_like(cs, -1.0))
        best = score.argmax(dim=1, keepdim=True)
        alpha = (cs.gather(1, best) / (best + 1).to(a.dtype)).squeeze(1)
        delta = nxt.gather(1, best).squeeze(1)
        kept = a > delta[:, None]
    else:
        raise ValueError(f"unknown TWN rule {rule!r}: choose 'exact' or '0.7'")
    kept = kept & (alpha > 0)[:, None]
    codes_u = sign(units).mul_(kept)
    codes = from_units(codes_u, shape, g).to(codes_dtype)
    return _to_scale_shape(alpha, shape, g), codes


def _twn_native(units: torch.Tensor) -> bool:
    """The exact TWN search of short CPU float64 units (FGQ's groups) runs in C++
    (:func:`lowbit.kernels.twn_exact_units`, bit-identical); ``LOWBIT_LA_SOLVER=torch`` disables it."""
    if units.device.type != "cpu" or units.dtype != torch.float64 or units.shape[1] > 256:
        return False
    if units.numel() == 0 or units.requires_grad:
        return False
    from lowbit.methods import loss_aware

    return loss_aware.solver_backend() != "torch" and loss_aware._native_available(required=False)


def _twn07_rows(
    w: torch.Tensor, g: Granularity, codes_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    # The 0.7 rule per tensor / per channel with as few passes over the weight as eager PyTorch
    # allows: it runs on every training step.
    rows = w.reshape(1, -1) if g.kind == "tensor" else _rows(w)
    a = rows.abs()
    delta = a.mean(1, keepdim=True) * 0.7
    # kept = 1.0 where |w| > delta else 0.0, in float arithmetic: boolean masks (compare, cast,
    # multiply by bool) cost 4-10x more than float passes on the CPU.
    kept = (a - delta).sign_().relu_()
    nkept = kept.sum(1)
    alpha = a.mul_(kept).sum(1) / nkept.clamp(min=1)
    # Kept weights are nonzero, where torch.sign agrees with the lowbit sign rule.
    codes = torch.sign(rows).mul_(kept)
    return alpha.reshape(g.scale_shape(w.shape)), codes.reshape(w.shape).to(codes_dtype)


# ----------------------------------------------------------------------------------------------
# k-bit linear and logarithmic levels


def linear_qrange(bits: int, signed: bool = True, narrow: bool = True) -> tuple[int, int]:
    """Integer range of k-bit codes: signed narrow ``[-(2^(k-1)-1), 2^(k-1)-1]`` (symmetric, LAQ §3.5),
    signed full ``[-2^(k-1), 2^(k-1)-1]``, unsigned ``[0, 2^k - 1]``."""
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    if not signed:
        return 0, 2**bits - 1
    hi = 2 ** (bits - 1) - 1
    return (-hi if narrow else -hi - 1), hi


def kbit_linear(
    w: torch.Tensor,
    bits: int,
    granularity: GranularityLike = None,
    clip: torch.Tensor | float | None = None,
    *,
    codes_dtype: torch.dtype = torch.int8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric uniform k-bit weights (LAQ linear levels ``alpha * {0, ±1/q, ..., ±1}``, §3.5; QNN §2.7).

    ``q = 2^(k-1) - 1``; the range ``alpha`` is ``clip`` if given, else ``max|w|`` per unit.
    Returns ``(step, codes)`` with ``step = alpha / q`` in scale shape (1 for an all-zero unit)
    and int8 ``codes = clamp(round(w / step), -q, q)`` (half-to-even); value = ``codes * step``.
    """
    g = _gran(granularity)
    w = w.detach()
    q = 2 ** (bits - 1) - 1
    step = kbit_step(w, bits, g, clip)
    codes = torch.round(w / expand_scales(step, w.shape, g)).clamp(-q, q)
    return step, codes.to(codes_dtype)


def kbit_step(
    w: torch.Tensor,
    bits: int,
    granularity: GranularityLike = None,
    clip: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The step of :func:`kbit_linear`: ``alpha / q`` in scale shape, ``alpha = clip`` or
    ``max|w|`` per unit, 1 for an all-zero unit."""
    if not 2 <= bits <= 8:
        raise ValueError(f"kbit_linear supports 2..8 bits, got {bits}")
    g = _gran(granularity)
    w = w.detach()
    q = 2 ** (bits - 1) - 1
    if clip is None:
        alpha = unit_max_abs(w, g)
    else:
        alpha = (
            torch.as_tensor(clip, dtype=w.dtype, device=w.device)
            .expand(g.scale_shape(w.shape))
            .clone()
        )
    step = alpha / q
    return torch.where(step > 0, step, torch.ones_like(step))


def linear_fake_quantize(
    x: torch.Tensor, bits: int, clip: float = 1.0, signed: bool = True, narrow: bool = True
) -> torch.Tensor:
    """k-bit uniform quantization of activations with saturation: ``clamp(round(x/step)) * step``.

    ``step = clip / qmax``. Gradient: identity inside the clip range, 0 outside (the QNN
    "STE with saturation", §2.7, an interpretation flagged in papers.md).
    """
    lo, hi = linear_qrange(bits, signed, narrow)
    step = clip / hi
    xd = x.detach()
    if _sign_ops_apply(xd):
        return _KBitGate.apply(x, step, lo, hi)
    codes = torch.round(xd / step).clamp(lo, hi)
    mask = ((xd >= lo * step) & (xd <= hi * step)).to(x.dtype)
    return ste(x, codes * step, mask)


def log_quantize(x: torch.Tensor, bits: int, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Nearest-level codes on the log grid ``scale * {0, ±2^-(n-1), ..., ±1/2, ±1}``, n = 2^(k-1)-1 (LAQ log, §3.5).

    The decision thresholds are the *arithmetic* midpoints between neighbouring levels (what the
    official code's log-domain offset ``log2(1.5) - 0.5`` achieves): ``|x|/scale < 2^-n`` -> 0,
    ``[2^-n, 3/4 * 2^-(n-2))`` -> ``2^-(n-1)``, ..., ``>= 3/4`` -> 1 (saturating above 1).
    An exact midpoint goes to the larger magnitude. Computed with ``frexp`` (no log rounding).
    Returns int8 codes ``sign(x) * j`` for level ``2^(j - n)``, 0 for level 0.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"kbit_log supports 2..8 bits, got {bits}")
    n = 2 ** (bits - 1) - 1
    x = x.detach()
    r = x.abs() / scale
    mant, exp = torch.frexp(r)  # r = mant * 2^exp, mant in [0.5, 1)
    e = torch.where(mant >= 0.75, exp, exp - 1).clamp(-(n - 1), 0)
    mag = torch.where(r < 2.0**-n, torch.zeros_like(e), e + n)
    return (sign(x).to(torch.int32) * mag).to(torch.int8)


def kbit_log(
    w: torch.Tensor,
    bits: int,
    granularity: GranularityLike = None,
    scale: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logarithmic k-bit weights: ``(scale, codes)`` with ``scale = max|w|`` per unit unless given (§3.5)."""
    g = _gran(granularity)
    w = w.detach()
    if scale is None:
        s = unit_max_abs(w, g)
    else:
        s = (
            torch.as_tensor(scale, dtype=w.dtype, device=w.device)
            .expand(g.scale_shape(w.shape))
            .clone()
        )
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s, log_quantize(w, bits, expand_scales(s, w.shape, g))


def log_fake_quantize(x: torch.Tensor, bits: int, scale: float = 1.0) -> torch.Tensor:
    """Log-level quantization of activations (QNN LogQuant, §2.7), identity STE inside ``|x| <= scale``."""
    codes = log_quantize(x, bits, scale)
    n = 2 ** (bits - 1) - 1
    value = _log_table(bits, x.dtype, x.device)[codes.long() + n] * scale
    mask = (x.detach().abs() <= scale).to(x.dtype)
    return ste(x, value, mask)


# ----------------------------------------------------------------------------------------------
# Dynamic fixed point and approximate power of two


def _dfp_range(bits: int, signed: bool) -> tuple[int, int]:
    return linear_qrange(bits, signed, narrow=False)


DFP_MIN_EXPONENT = -126


def dfp_exponent(x: torch.Tensor, bits: int = 8, signed: bool = True) -> int:
    """The smallest exponent E such that ``round(max|x| * 2^-E)`` fits the k-bit range (DFP §4.2).

    Unsigned formats look at ``max(x)`` (negatives saturate to 0). An all-zero tensor gives 0.
    """
    _, hi = _dfp_range(bits, signed)
    if torch.jit.is_tracing() or torch.compiler.is_exporting():
        # A Python int from the example input would be frozen into the graph (jit.trace) or
        # refused as a data-dependent guard (export): say what to do instead.
        raise RuntimeError(
            "a DFP activation exponent picked per batch cannot be traced or exported: the graph "
            "would keep the example input's exponent for every input. Calibrate the exponents "
            "first (FGQ: act_mode='calibrated', then lowbit.ptq.calibrate(model, batches); "
            "lowbit.ptq.fgq does both), or run the model eager or under torch.compile"
        )
    xd = x.detach()
    if xd.numel() == 0:
        return 0
    m = float(xd.abs().max() if signed else xd.max().clamp(min=0))
    if not math.isfinite(m):
        raise ValueError("dfp_quantize got non-finite values (inf/NaN); check the layer's inputs")
    if m == 0.0:
        return 0
    e = math.ceil(math.log2(m / hi))
    # Fix float error in log2 and account for rounding up at the top of the range.
    while round(math.ldexp(m, -e)) > hi:
        e += 1
    while round(math.ldexp(m, -(e - 1))) <= hi:
        e -= 1
    # Not below fp32's smallest normal exponent (what the kernels take; maxima under ~2^-119
    # then quantize with the step 2^-126, as the fused kernels' own exponent search does).
    return max(int(e), DFP_MIN_EXPONENT)


def dfp_quantize(
    x: torch.Tensor, bits: int = 8, signed: bool = True, exponent: int | None = None
) -> tuple[torch.Tensor, int]:
    """Dynamic fixed point (DFP §4.2): ``x ≈ ints * 2**exponent`` with one shared exponent.

    The exponent comes from :func:`dfp_exponent` (the largest magnitude just fits) unless a
    calibrated ``exponent`` is given. ``ints = clamp(round(x * 2^-E), lo, hi)``: half-to-even,
    saturating (signed ``[-2^(k-1), 2^(k-1)-1]``, unsigned ``[0, 2^k-1]``). ``ints`` is int8 /
    uint8 for k <= 8, int16 for k <= 16, else int32.
    """
    lo, hi = _dfp_range(bits, signed)
    e = dfp_exponent(x, bits, signed) if exponent is None else int(exponent)
    v = torch.round(torch.ldexp(x.detach(), torch.tensor(-e, dtype=x.dtype, device=x.device)))
    v = v.clamp(lo, hi)
    if bits <= 8:
        dtype = torch.int8 if signed else torch.uint8
    elif bits <= 16:
        dtype = torch.int16
    else:
        dtype = torch.int32
    return v.to(dtype), e


def dfp_fake_quantize(
    x: torch.Tensor, bits: int = 8, signed: bool = True, exponent: int | None = None
) -> torch.Tensor:
    """``ints * 2**E`` from :func:`dfp_quantize`, gradient identity where not saturated, 0 where clipped."""
    lo, hi = _dfp_range(bits, signed)
    ints, e = dfp_quantize(x, bits, signed, exponent)
    step = math.ldexp(1.0, e)
    xd = x.detach()
    mask = ((xd >= lo * step) & (xd <= hi * step)).to(x.dtype)
    return ste(x, ints.to(x.dtype) * step, mask)


def ap2(x: torch.Tensor) -> torch.Tensor:
    """Approximate power of two ``AP2(x) = sign(x) * 2^round(log2|x|)`` (QNN shift-based BN/AdaMax, §2.4).

    ``AP2(0) = 0``; ``round`` of the float32 ``log2|x|`` (half-to-even). ``2^(k+1/2)`` is
    irrational, but ``log2`` rounds, so an ``|x|`` within a float32 ulp or so of ``2^(k+1/2)`` may
    go either way (``AP2(2.8284271) = 4``). No gradient (used on statistics, not on paths that
    need one).
    """
    xd = x.detach()
    e = torch.round(torch.log2(xd.abs()))
    out = torch.ldexp(sign(xd), e)
    return torch.where(xd == 0, torch.zeros_like(out), out)


def __getattr__(name: str) -> object:
    # ``lowbit.functional.ttq`` lives with its method (methods/ttq.py) and is re-exported lazily
    # here to avoid an import cycle (methods import this module).
    if name == "ttq":
        from lowbit.methods.ttq import ttq

        return ttq
    raise AttributeError(f"module 'lowbit.functional' has no attribute {name!r}")
