"""FGQ / DFP: ternary (or k-bit) weights in groups of N with one scale per group, k-bit dynamic
fixed-point activations (method ``"fgq"``).

Papers: DFP = Mellempudi et al., "Mixed Low-precision Deep Learning Inference using Dynamic Fixed
Point", arXiv 1701.08978; FGQ = Mellempudi et al., "Ternary Neural Networks with Fine-Grained
Quantization", arXiv 1705.01462. ``§`` numbers refer to ``reference/papers.md`` (§4).

Pieces, from math to state:

* :func:`group_ternarize` — per group ``g``, ``min_{alpha_g, What_g} ||W_g - alpha_g What_g||²``
  (§4.1). ``rule="exact"`` scans the sorted magnitudes of every group at once (vectorised over
  groups: one padded ``(groups, N)`` matrix, one sort); ``rule="0.7"`` is the TWN heuristic
  ``Delta = 0.7 mean|W_g|``.
* :func:`group_kbit` — the 4-bit (k-bit) per-group variant of DFP §4.2: symmetric levels
  ``s_g * {-q..q}``, ``q = 2^(k-1) - 1``, with ``s_g`` from ``max|W_g|`` (``rule="max"``) or
  refined by alternating least squares (``rule="mse"``, never worse than ``max``).
* :class:`FGQTernaryWeight` / :class:`FGQKBitWeight` — the weight quantizers (straight-through
  gradient, so the same modules serve post-training quantization and low-precision fine-tuning,
  §4.3). Scales are rounded to float32 (what a ``.lowbit`` file stores) even in float64 models.
* :class:`DFPCalibratedAct` — k-bit DFP input activations (§4.2) with a calibrated
  (``max`` / ``percentile``) or per-batch dynamic power-of-two exponent, automatic
  signed/unsigned choice, and saturation statistics.

Grouping (``group_axis``): ``"in"`` — N consecutive weights of one output row's flattened
reduction dimension share ``alpha`` (FGQ's "groups of N weights": N ternary accumulations share one
multiply, multiplications drop by ``1 - 1/N``); ``"out"`` — clusters of N consecutive filters share
``alpha`` (DFP's "clusters of N filters"). A remainder group (N does not divide the axis) is a
shorter last group with its own optimal ``alpha``. ``group_size="layer"`` is one scale for the whole
tensor and ``"channel"`` one per output row.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn

from lowbit import functional as F
from lowbit.methods import Method, register
from lowbit.nn import ActQuantizer, WeightQuantizer, check_kbit_bits
from lowbit.qtypes import ActSpec, Granularity

__all__ = [
    "DFPCalibratedAct",
    "FGQKBitWeight",
    "FGQTernaryWeight",
    "fgq_granularity",
    "group_kbit",
    "group_ternarize",
    "make_fgq_weight",
    "scale_grid_exponents",
    "scales_on_grid",
]

GroupSize = int | str | Granularity | None


def fgq_granularity(group_size: GroupSize, axis: str | None = "in") -> Granularity:
    """The :class:`~lowbit.qtypes.Granularity` of FGQ groups of ``group_size`` along ``axis``.

    ``group_size`` is an int >= 1, ``"layer"`` (or ``"tensor"``/``None``: one scale for the whole
    weight) or ``"channel"`` (one scale per output row).
    """
    if isinstance(group_size, Granularity):
        return group_size
    if group_size is None or (isinstance(group_size, str) and group_size in ("layer", "tensor")):
        return Granularity("tensor")
    if isinstance(group_size, str):
        if group_size in ("channel", "row"):
            return Granularity("channel")
        if not group_size.isdigit():
            raise ValueError(
                f"group_size must be an int >= 1, 'layer' or 'channel', got {group_size!r}"
            )
        group_size = int(group_size)
    if int(group_size) < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    axis = axis or "in"
    if axis not in ("in", "out"):
        raise ValueError(f"group_axis must be 'in' or 'out', got {axis!r}")
    return Granularity("group", int(group_size), axis)


def group_ternarize(
    w: torch.Tensor,
    group_size: GroupSize,
    axis: str = "in",
    rule: str = "exact",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Ternary weights with one scale per group of ``group_size`` along ``axis`` (FGQ/DFP, §4.1).

    Per group ``G`` it solves ``min_{alpha > 0, What in {-1,0,1}^|G|} ||W_G - alpha What||²``.
    For a kept set ``I = {i : |W_i| > Delta}`` the optimum is ``What = sign(W)`` on ``I`` and
    ``alpha = mean_I |W_i|``, leaving ``Delta* = argmax (sum_I |W_i|)² / |I|`` (§4.1).

    * ``rule="exact"``: sort each group's ``|W|`` descending and scan every k (all groups at once
      on a padded ``(groups, N)`` matrix; thresholds only between distinct magnitudes), in
      float64 so near-ties are decided correctly. The global optimum of the L2 objective.
    * ``rule="0.7"``: ``Delta = 0.7 * mean_G |W|`` (TWN, Li & Liu 2016 eq. 10), then
      ``alpha = mean`` of the kept ``|W|``.

    Args:
        w: weight ``(out, in)`` or ``(out, in/groups, kh, kw)`` (any shape with outputs first).
        group_size: N (int >= 1), ``"layer"`` (one group) or ``"channel"``.
        axis: ``"in"`` (N consecutive weights of one output's flattened reduction dimension,
            ``(in, kh, kw)`` order) or ``"out"`` (clusters of N whole filters).
        rule: ``"exact"`` or ``"0.7"``.

    Returns:
        ``(codes, alphas)``: int8 codes in {-1, 0, 1} of ``w.shape``; alphas in ``w``'s dtype with
        the shape of :meth:`Granularity.scale_shape` (``(out, ceil(K/N))`` for ``"in"``,
        ``(ceil(out/N),)`` for ``"out"``), rounded to float32 values; 0 for an all-zero group.
    """
    if rule not in ("exact", "0.7"):
        raise ValueError(f"unknown ternarization rule {rule!r}: choose 'exact' or '0.7'")
    g = fgq_granularity(group_size, axis)
    wd = w.detach()
    alpha, codes = F.twn(wd.to(torch.float64), rule=rule, granularity=g)
    return codes, alpha.to(torch.float32).to(wd.dtype)


def group_kbit(
    w: torch.Tensor,
    group_size: GroupSize,
    axis: str = "in",
    bits: int = 4,
    rule: str = "mse",
    iters: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric k-bit weights with one step per group (DFP's 4-bit per-cluster variant, §4.2).

    Levels are ``s_g * {-q, ..., q}`` with ``q = 2^(k-1) - 1``; codes are
    ``clamp(round(W / s_g), -q, q)`` (half-to-even), the L2-optimal codes for a given step.

    * ``rule="max"``: ``s_g = max_G |W| / q`` (no clipping).
    * ``rule="mse"``: start from ``max`` and alternate ``codes <- round(W/s)``,
      ``s <- <W, codes> / <codes, codes>`` (the least-squares step for fixed codes). Each half step
      cannot increase ``||W_G - s_g codes_g||²``, so the result is never worse than ``max``.

    Returns ``(codes int8, steps)`` with steps in the granularity's scale shape (float32 values in
    ``w``'s dtype; 1 for an all-zero group).
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"k-bit FGQ weights support 2..8 bits, got {bits}")
    if rule not in ("max", "mse"):
        raise ValueError(f"unknown k-bit rule {rule!r}: choose 'mse' or 'max'")
    g = fgq_granularity(group_size, axis)
    wd = w.detach()
    w64 = wd.to(torch.float64)
    q = 2 ** (bits - 1) - 1
    units, _ = F.to_units(w64, g)  # zero padding: contributes 0 to <W, c> and <c, c>
    step = units.abs().amax(1) / q
    step = torch.where(step > 0, step, torch.ones_like(step))
    if rule == "mse":
        best_step = step
        best_err = _kbit_err(units, step, q)
        for _ in range(iters):
            c = torch.round(units / step[:, None]).clamp(-q, q)
            cc = (c * c).sum(1)
            new = torch.where(cc > 0, (units * c).sum(1) / cc.clamp(min=1), step)
            new = torch.where(new > 0, new, step)
            err = _kbit_err(units, new, q)
            better = err < best_err
            best_step = torch.where(better, new, best_step)
            best_err = torch.where(better, err, best_err)
            if torch.equal(new, step):
                break
            step = new
        step = best_step
    step32 = step.to(torch.float32).to(torch.float64)
    codes_u = torch.round(units / step32[:, None]).clamp(-q, q)
    codes = F.from_units(codes_u, tuple(wd.shape), g).to(torch.int8)
    scales = step32.reshape(g.scale_shape(tuple(wd.shape))).to(wd.dtype)
    return codes, scales


def _kbit_err(units: torch.Tensor, step: torch.Tensor, q: int) -> torch.Tensor:
    c = torch.round(units / step[:, None]).clamp(-q, q)
    return ((units - c * step[:, None]) ** 2).sum(1)


# ----------------------------------------------------------------------------------------------
# Fixed-point group scales (DFP §4.2: "alpha_g can itself be a DFP or fixed-point value")


def scale_grid_exponents(scales: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """The exponent ``E`` of the fixed-point grid ``m · 2^E``, ``m`` in ``0 .. 2^bits − 1``, that
    holds a scale tensor: one per row of a 2-D ``(out, groups)`` tensor (groups along K), one for
    the whole tensor otherwise. ``E`` is the smallest with ``max(row) <= (2^bits − 1) · 2^E``
    (so the largest scale keeps ``bits`` significant bits), clamped to ``[-149, 104]`` so every
    ``m · 2^E`` is an exact float32; 0 for an all-zero row. Returns int64 ``(rows,)``.
    """
    if not 2 <= bits <= 8:
        raise ValueError(f"fixed-point scales take 2..8 bits, got {bits}")
    s = scales.detach().to(torch.float64)
    rows = s.reshape(s.shape[0], -1) if s.dim() == 2 else s.reshape(1, -1)
    top = rows.amax(1) if rows.numel() else torch.zeros(rows.shape[0], dtype=torch.float64)
    mmax = float(2**bits - 1)
    pos = top > 0
    e = torch.ceil(torch.log2(torch.where(pos, top, torch.ones_like(top)) / mmax))
    # log2 is not exact: step E by one where the bound does not (yet) hold or holds one lower.
    e = torch.where(top > mmax * torch.exp2(e), e + 1, e)
    e = torch.where(top <= mmax * torch.exp2(e - 1), e - 1, e)
    return torch.where(pos, e, torch.zeros_like(e)).clamp(-149, 104).to(torch.int64)


def _unit_steps(exps: torch.Tensor, n_units: int) -> torch.Tensor:
    """``2^E`` per unit (units run row by row, as the flattened scale tensor)."""
    return torch.exp2(exps.to(torch.float64)).repeat_interleave(n_units // exps.numel())


def _ternary_codes_for(units: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The L2-optimal ternary codes for a fixed ``alpha``: keep ``|w| > alpha / 2``."""
    keep = (units.abs() > alpha[:, None] / 2) & (alpha[:, None] > 0)
    return torch.sign(units) * keep


def _kbit_codes_for(units: torch.Tensor, step: torch.Tensor, q: int) -> torch.Tensor:
    """The L2-optimal k-bit codes for a fixed ``step``: ``clamp(round(w / step), -q, q)``."""
    safe = torch.where(step > 0, step, torch.ones_like(step))
    return torch.round(units / safe[:, None]).clamp(-q, q) * (step[:, None] > 0)


def scales_on_grid(
    w: torch.Tensor,
    granularity: Granularity,
    scales: torch.Tensor,
    scale_bits: int = 8,
    levels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move every group scale onto its row's ``scale_bits``-bit fixed-point grid
    (:func:`scale_grid_exponents`) and re-fit the codes to it.

    For each group the candidates are the grid values ``m · 2^E`` with ``m`` = round, floor, ceil,
    floor − 1 and ceil + 1 of ``alpha / 2^E`` (clamped to ``0 .. 2^bits − 1``); for each, the codes
    are the L2-optimal ones for that fixed scale (ternary: ``|w| > alpha/2``; k-bit: rounding),
    and the candidate with the smallest ``||W_g − alpha What_g||²`` wins (ties: the earlier).
    ``levels=None`` means ternary, else the k-bit code bound ``q``. Returns ``(codes int8,
    scales in w's dtype — exact float32 values m · 2^E — and the int64 exponents)``.
    """
    w64 = w.detach().to(torch.float64)
    units, _ = F.to_units(w64, granularity)  # zero padding: no error, no kept code
    exps = scale_grid_exponents(scales, scale_bits)
    step = _unit_steps(exps, units.shape[0])
    ratio = scales.detach().to(torch.float64).reshape(-1) / step
    mmax = float(2**scale_bits - 1)
    best_err = torch.full((units.shape[0],), math.inf, dtype=torch.float64)
    best_alpha = torch.zeros_like(best_err)
    best_codes = torch.zeros_like(units)
    base = torch.floor(ratio)
    for m in (torch.round(ratio), base, base + 1, base - 1, base + 2):
        alpha = m.clamp(0, mmax) * step
        if levels is None:
            codes = _ternary_codes_for(units, alpha)
        else:
            codes = _kbit_codes_for(units, alpha, levels)
        err = ((units - codes * alpha[:, None]) ** 2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_alpha = torch.where(better, alpha, best_alpha)
        best_codes = torch.where(better[:, None], codes, best_codes)
    codes_w = F.from_units(best_codes, tuple(w.shape), granularity).to(torch.int8)
    out = best_alpha.reshape(granularity.scale_shape(tuple(w.shape))).to(w.dtype)
    return codes_w, out, exps


# ----------------------------------------------------------------------------------------------
# Weight quantizers


class _FGQWeight(WeightQuantizer):
    """Shared part: FGQ grouping, a solve cache for eval mode (post-training inference re-uses the
    codes while the latent weight is unchanged), identity straight-through gradient (§4.3)."""

    def __init__(
        self,
        *,
        bits: int,
        group_size: GroupSize = 4,
        group_axis: str | None = "in",
        rule: str,
        scale_bits: int | None = None,
    ) -> None:
        super().__init__(bits=bits, granularity=fgq_granularity(group_size, group_axis))
        if scale_bits is not None:
            scale_bits = int(scale_bits)
            if not 2 <= scale_bits <= 8:
                raise ValueError(
                    f"scale_bits must be 2..8 (fixed-point group scales, one byte each in a packed "
                    f"file) or None (float32 scales); got {scale_bits}"
                )
        self.group_size = group_size
        self.rule = rule
        self.scale_bits = scale_bits
        self._cache: tuple[Any, tuple[torch.Tensor, torch.Tensor]] | None = None

    def _solve(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _levels(self) -> int | None:
        """``None`` for ternary codes, else the k-bit code bound ``q``."""
        return None

    def _solve_on_grid(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, scales = self._solve(w)
        if self.scale_bits is None:
            return codes, scales
        codes, scales, _ = scales_on_grid(
            w, self.granularity, scales, self.scale_bits, self._levels()
        )
        return codes, scales

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training:
            self._cache = None
            return self._solve_on_grid(w)
        key = (w.data_ptr(), w._version, tuple(w.shape), w.dtype, w.device)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self._solve_on_grid(w))
        return self._cache[1]

    def extra_repr(self) -> str:
        grid = f", scale_bits={self.scale_bits}" if self.scale_bits is not None else ""
        return f"{super().extra_repr()}, rule={self.rule}{grid}"


class FGQTernaryWeight(_FGQWeight):
    """Ternary weights, one ``alpha`` per group (:func:`group_ternarize`; FGQ §4.1)."""

    format = "ternary"

    def __init__(
        self,
        group_size: GroupSize = 4,
        group_axis: str | None = "in",
        rule: str = "exact",
        scale_bits: int | None = None,
    ) -> None:
        super().__init__(
            bits=2, group_size=group_size, group_axis=group_axis, rule=rule, scale_bits=scale_bits
        )

    def _solve(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.granularity
        codes, alphas = group_ternarize(w, g, g.axis or "in", self.rule)  # type: ignore[arg-type]
        return codes, alphas


class FGQKBitWeight(_FGQWeight):
    """k-bit symmetric weights, one step per group (:func:`group_kbit`; DFP's 4-bit variant)."""

    format = "kbit_linear"

    def __init__(
        self,
        bits: int = 4,
        group_size: GroupSize = 4,
        group_axis: str | None = "in",
        rule: str = "mse",
        scale_bits: int | None = None,
    ) -> None:
        check_kbit_bits(bits, "FGQ's k-bit quantizer")
        super().__init__(
            bits=bits,
            group_size=group_size,
            group_axis=group_axis,
            rule=rule,
            scale_bits=scale_bits,
        )

    def _solve(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.granularity
        return group_kbit(w, g, g.axis or "in", self.bits, self.rule)  # type: ignore[arg-type]

    def _levels(self) -> int | None:
        return 2 ** (self.bits - 1) - 1


def make_fgq_weight(
    weight_bits: int = 2,
    group_size: GroupSize = 4,
    group_axis: str | None = "in",
    rule: str | None = None,
    scale_bits: int | None = None,
) -> _FGQWeight:
    """``weight_bits=2``: ternary (:class:`FGQTernaryWeight`, rule ``exact``/``0.7``);
    3..8: :class:`FGQKBitWeight` (rule ``mse``/``max``). ``scale_bits``: fixed-point group scales
    (:func:`scales_on_grid`; ``None`` keeps float32 scales)."""
    if int(weight_bits) == 2:
        return FGQTernaryWeight(group_size, group_axis, rule or "exact", scale_bits)
    return FGQKBitWeight(int(weight_bits), group_size, group_axis, rule or "mse", scale_bits)


# ----------------------------------------------------------------------------------------------
# DFP activations with calibration and saturation statistics


def _tracing(x: torch.Tensor) -> bool:
    from lowbit.pack import _tracing as tracing

    return tracing(x)


class DFPCalibratedAct(ActQuantizer):
    """k-bit dynamic fixed-point input activations (DFP §4.2): ``x ≈ ints * 2^E``, one E per tensor.

    ``ints = clamp(round(x * 2^-E), lo, hi)`` (half-to-even, saturating), signed
    ``[-2^(k-1), 2^(k-1)-1]`` or unsigned ``[0, 2^k - 1]`` (:func:`lowbit.functional.dfp_quantize`).

    Args:
        bits: k (8 or 4 in the papers; 2..16).
        signed: ``True``/``False``, or ``"auto"``: unsigned when every value seen while
            calibrating is >= 0 — the inputs of a layer after ReLU — which buys one bit of
            resolution. Without calibration (training) the first batch decides, and a later
            batch with negative values switches the layer to signed (with a warning).
        mode: ``"calibrated"`` — E fixed from calibration batches; ``"dynamic"`` — E chosen per
            batch from ``max|x|`` (:func:`~lowbit.functional.dfp_exponent`).
        calibration: ``"max"`` (E from the largest value seen: nothing saturates on the
            calibration data) or ``"percentile"`` (E from the ``percentile``-th percentile of
            ``|x|`` — of ``x`` when unsigned — over all calibration values, trading a few
            saturated outliers for resolution).

    Calibration protocol (driven by :func:`lowbit.ptq.calibrate`): :meth:`observe` -> forwards
    (values pass through unquantized and are recorded) -> :meth:`finish_calibration`. While
    ``track`` is on, quantizing forwards count saturated elements (the clamp changed the rounded
    value) and underflowed ones (nonzero ``x`` that became 0): :meth:`stats`.
    """

    MAX_SAMPLES = 1 << 24  # values kept per layer for the percentile (then 1-in-s subsampling)

    def __init__(
        self,
        bits: int = 8,
        signed: bool | str = "auto",
        mode: str = "calibrated",
        calibration: str = "max",
        percentile: float = 99.99,
    ) -> None:
        super().__init__()
        if mode not in ("calibrated", "dynamic"):
            raise ValueError(f"DFP activation mode must be 'calibrated' or 'dynamic', got {mode!r}")
        if calibration not in ("max", "percentile"):
            raise ValueError(f"DFP calibration must be 'max' or 'percentile', got {calibration!r}")
        if not 0.0 < float(percentile) <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if signed not in (True, False, "auto"):
            raise ValueError(f"signed must be True, False or 'auto', got {signed!r}")
        self.bits = int(bits)
        F.linear_qrange(self.bits)  # validates bits
        self.signed_option: bool | str = signed
        self.signed: bool | None = None if signed == "auto" else bool(signed)
        self.mode = mode
        self.calibration = calibration
        self.percentile = float(percentile)
        self.exponent: int | None = None
        self.last_exponent: int | None = None
        self._signed_from_batch = False  # "auto" decided unsigned on one batch, not calibrated
        self.track = False
        self._observing = False
        self.reset_stats()
        self._reset_observations()

    # -- calibration -------------------------------------------------------------------------
    def _reset_observations(self) -> None:
        self.seen_min = math.inf
        self.seen_max_abs = 0.0
        self.seen_max = -math.inf
        self.seen_count = 0
        self._samples: list[torch.Tensor] = []
        self._n_samples = 0

    def observe(self) -> None:
        """Start calibration: forwards now record their inputs and return them unquantized."""
        self._observing = True
        self._reset_observations()

    def _record(self, x: torch.Tensor) -> None:
        xd = x.detach()
        if xd.numel() == 0:
            return
        if not bool(torch.isfinite(xd).all()):
            raise ValueError(
                "DFP calibration saw inf/NaN activations; check the model and the calibration data"
            )
        self.seen_min = min(self.seen_min, float(xd.min()))
        self.seen_max = max(self.seen_max, float(xd.max()))
        self.seen_max_abs = max(self.seen_max_abs, float(xd.abs().max()))
        self.seen_count += xd.numel()
        if self.calibration == "percentile":
            flat = xd.reshape(-1).to(torch.float32)
            budget = self.MAX_SAMPLES - self._n_samples
            if budget <= 0:
                return
            if flat.numel() > budget:
                stride = -(-flat.numel() // budget)
                flat = flat[::stride]
            self._samples.append(flat.cpu())
            self._n_samples += flat.numel()

    def calibrated_threshold(self) -> float:
        """The magnitude the exponent is chosen for: max (or percentile) of ``|x|`` (signed) or of
        ``max(x, 0)`` (unsigned) over the calibration values."""
        signed = self._resolved_signed()
        if self.calibration == "max" or not self._samples:
            return self.seen_max_abs if signed else max(self.seen_max, 0.0)
        v = torch.cat(self._samples)
        v = v.abs() if signed else v.clamp(min=0)
        # The smallest value with at least `percentile`% of the values <= it (nearest rank).
        rank = max(1, math.ceil(self.percentile / 100.0 * v.numel()))
        return float(torch.kthvalue(v, rank).values)

    def _resolved_signed(self) -> bool:
        if self.signed is not None:
            return self.signed
        return not (self.seen_min < 0) if self.seen_count else True

    def finish_calibration(self) -> None:
        """Fix the signedness (``auto``) and, in ``calibrated`` mode, the exponent; stop observing."""
        self._observing = False
        if self.seen_count == 0:
            raise RuntimeError(
                "DFP activation saw no calibration data (the layer was never called); "
                "check that the calibration batches reach this layer"
            )
        if self.signed_option == "auto":
            self.signed = bool(self.seen_min < 0)
        self._signed_from_batch = False
        signed = self._resolved_signed()
        if self.mode == "calibrated":
            m = self.calibrated_threshold()
            self.exponent = F.dfp_exponent(
                torch.tensor([m], dtype=torch.float64), self.bits, signed
            )
        self._samples = []
        self._n_samples = 0

    # -- statistics --------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.n_total = 0
        self.n_saturated = 0
        self.n_underflow = 0
        self.exponents_seen: set[int] = set()

    def stats(self) -> dict[str, Any]:
        """Saturation statistics since the last :meth:`reset_stats` (while ``track`` was on)."""
        n = max(self.n_total, 1)
        return {
            "bits": self.bits,
            "signed": self.signed,
            "exponent": self.exponent,
            "exponents_seen": sorted(self.exponents_seen),
            "elements": self.n_total,
            "saturated": self.n_saturated,
            "saturation": self.n_saturated / n,
            "underflow": self.n_underflow,
            "underflow_rate": self.n_underflow / n,
        }

    # -- forward -----------------------------------------------------------------------------
    def current_exponent(self, x: torch.Tensor) -> tuple[int, bool]:
        """``(E, signed)`` this forward uses for ``x`` (calibrated, or dynamic from ``max|x|``)."""
        if self.signed is None:  # auto, never calibrated: decided on the first batch ...
            self.signed = bool((x.detach() < 0).any())
            self._signed_from_batch = not self.signed
        elif self._signed_from_batch and not _tracing(x) and bool((x.detach() < 0).any()):
            # ... and revised (once, to signed) when a later batch has negative inputs, which
            # unsigned codes would clamp to 0; calibration (lowbit.ptq) fixes it for good.
            self.signed = True
            self._signed_from_batch = False
            warnings.warn(
                "a DFP input quantizer chose unsigned codes from its first batch (all >= 0) and "
                "now sees negative inputs: switched to signed. Calibrate (lowbit.ptq.calibrate) "
                "or pass act_signed=True/False to fix the choice.",
                stacklevel=2,
            )
        signed = self.signed
        if self.mode == "calibrated" and self.exponent is not None:
            return self.exponent, signed
        return F.dfp_exponent(x, self.bits, signed), signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observing:
            self._record(x)
            return x
        e, signed = self.current_exponent(x)
        self.last_exponent = e
        if self.track:
            lo, hi = F.linear_qrange(self.bits, signed, narrow=False)
            xd = x.detach()
            v = torch.round(torch.ldexp(xd, torch.tensor(-e, dtype=xd.dtype, device=xd.device)))
            self.n_total += xd.numel()
            self.n_saturated += int(((v > hi) | (v < lo)).sum())
            self.n_underflow += int(((v == 0) & (xd != 0)).sum())
            self.exponents_seen.add(int(e))
        return F.dfp_fake_quantize(x, self.bits, signed, e)

    def spec(self) -> ActSpec:
        signed = True if self.signed is None else self.signed
        return ActSpec(
            "dfp", self.bits, signed, exponent=self.exponent if self.mode == "calibrated" else None
        )

    def describe(self) -> str:
        s = self.spec()
        sign = "" if s.signed else "u"
        e = f", E={s.exponent}" if s.exponent is not None else ", dynamic"
        return f"{sign}dfp{self.bits}{e}"

    # Calibrated state travels with state_dict() (plain types: loads with weights_only=True).
    def get_extra_state(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "signed": self.signed,
            "exponent": self.exponent,
            "mode": self.mode,
            "signed_from_batch": self._signed_from_batch,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bits = int(state["bits"])
        self.signed = state["signed"]
        self.exponent = state["exponent"]
        self.mode = state["mode"]
        self._signed_from_batch = bool(state.get("signed_from_batch", False))


# ----------------------------------------------------------------------------------------------
# The registered method (quantize-aware fine-tuning uses the same quantizers, §4.3)


def _act_quantizer(act_bits: Any, options: dict[str, Any]) -> DFPCalibratedAct | None:
    if act_bits in (None, 0, 32, "float", "fp32"):
        return None
    return DFPCalibratedAct(
        int(act_bits),
        signed=options.get("act_signed", "auto"),
        mode=options.get("act_mode", "dynamic"),
        calibration=options.get("act_calibration", "max"),
        percentile=options.get("percentile", 99.99),
    )


def _group_size(options: dict[str, Any]) -> GroupSize:
    # The common ``granularity`` option still works: "tensor"/"channel" override group_size.
    gran = options.get("granularity")
    if gran == "tensor":
        return "layer"
    if gran == "channel":
        return "channel"
    return options["group_size"]


class FGQMethod(Method):
    """``lowbit.quantize(model, "fgq", group_size=4, weight_bits=2, act_bits=8, ...)``.

    Options (beyond the common ones): ``weight_bits`` (2 = ternary, 3..8 = k-bit linear),
    ``group_size`` (int, ``"layer"`` or ``"channel"``), ``group_axis`` (``"in"``/``"out"``),
    ``rule`` (``exact``/``0.7`` for ternary, ``mse``/``max`` for k-bit), ``scale_bits`` (``None``:
    float32 group scales; 8: 8-bit fixed-point scales ``m · 2^E`` with one ``E`` per row, which
    ``lowbit.pack`` stores in one byte each), ``act_bits`` (DFP input
    bits, ``None`` for float inputs), ``act_mode`` (``dynamic`` — per-batch exponent, the default
    for training — or ``calibrated``), ``act_calibration``, ``percentile``, ``act_signed``.
    Training re-solves every group's threshold and alpha from the latent weights at each step
    (straight-through gradient), which is the fine-tuning of §4.3.
    """

    def __init__(self) -> None:
        super().__init__(
            "fgq",
            weight=lambda layer, **o: make_fgq_weight(
                o["weight_bits"], _group_size(o), o["group_axis"], o["rule"], o["scale_bits"]
            ),
            inputs=lambda layer, **o: _act_quantizer(o["act_bits"], o),
            options={
                "granularity": "group",
                "group_size": 4,
                "group_axis": "in",
                "weight_bits": 2,
                "rule": None,
                "scale_bits": None,
                "act_bits": 8,
                "act_mode": "dynamic",
                "act_calibration": "max",
                "percentile": 99.99,
                "act_signed": "auto",
            },
            description="FGQ/DFP: ternary or k-bit weights in groups of N with a shared scale, "
            "k-bit dynamic fixed-point activations",
            paper="arXiv 1705.01462 (FGQ), 1701.08978 (DFP)",
        )

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        """Per quantized layer: the share of zero codes (``<name>.sparsity``)."""
        out: dict[str, float] = {}
        for name, module in model.named_modules():
            q = getattr(module, "weight_quantizer", None)
            if isinstance(q, _FGQWeight) and hasattr(module, "quantized_weight"):
                with torch.no_grad():
                    out[f"{name}.sparsity"] = module.quantized_weight().sparsity()
        return out


register(FGQMethod())
