"""Trained Ternary Quantization (TTQ): Zhu, Han, Mao & Dally, ICLR 2017, arXiv 1612.01064.

Each quantized layer keeps its latent float weights ``w`` and two learned positive scalars
``Wp`` and ``Wn``. The forward pass uses (paper eq. 1, ``reference/papers.md`` §1.2)::

    w_t = +Wp  where w >  Delta
           0   where |w| <= Delta
          -Wn  where w < -Delta

with ``Delta = t * max|w|`` (``t = 0.05``, recomputed every forward on the raw latent weights,
as the official code does; the paper's normalisation by ``max|w|`` gives the same assignment)
or, the paper's alternative, a fixed sparsity ``r``: the ``round(r * n)`` smallest magnitudes
become 0 (``Delta`` = that order statistic).

Backward, exactly as the official TensorFlow code (``examples/Ternary-Net/ternary.py``, §1.3):

* latent gradient, paper eq. 3 (a *scaled* straight-through estimator, no clipping, no
  saturation mask): ``dL/dw = Wp * g`` on the positive set ``I_p``, ``g`` on the zero set,
  ``Wn * g`` on the negative set ``I_n`` (``g = dL/dw_t``);
* scale gradients, paper eq. 2: ``dL/dWp = sum_{I_p} g`` and ``dL/dWn = -sum_{I_n} g``.
  The paper prints ``dL/dWn = +sum_{I_n} g``; that is a sign typo (the negative level is
  ``-Wn``), the official code computes the true gradient with the minus sign, and so do we
  (third-party ports that copied the paper's sign, e.g. TropComplique's, train ``Wn`` the
  wrong way; see TropComplique/trained-ternary-quantization issue #6);
* ``Delta`` is a constant (``stop_gradient`` in the official code).

Pieces, from stateless to stateful:

* :func:`ttq_threshold`, :func:`ttq_codes` — ``Delta`` and the ternary assignment;
* :class:`TTQFunction` / :func:`ttq` — the autograd function (``lowbit.functional.ttq``);
* :class:`TTQWeight` — the weight quantizer holding ``wp``/``wn`` (``nn.Parameter``), exporting a
  ``ternary_asym`` :class:`~lowbit.qtypes.QuantizedWeight` (``scales[..., 0] = Wp``,
  ``scales[..., 1] = Wn``) whose ``dequantize()`` is bit-identical to the forward weight;
* :class:`TTQMethod`, registered as ``"ttq"`` — training hooks: scales kept positive after every
  optimizer step, weight decay on/off for the scales (parameter groups), per-layer epoch
  metrics (``Wp``, ``Wn``, sparsity, positive/negative shares: the paper's Fig. 3 and 4).

Method options (``lowbit.quantize(model, "ttq", **options)``):

``t`` (0.05)
    threshold factor, ``Delta = t * max|w|`` per layer (per unit for other granularities).
``sparsity`` (None)
    fixed sparsity ``r`` in [0, 1) instead of ``t`` (the paper's alternative scheme).
``init`` ("one")
    scale initialisation: ``"one"`` (``Wp = Wn = 1``, the official code), ``"mean"`` (the
    mean ``|w|`` of the initial weights over ``I_p`` resp. ``I_n``: the least-squares fit of
    each side, a good start when fine-tuning a float model without a BatchNorm after the layer),
    or a positive number.
``scale_weight_decay`` (True)
    whether weight decay also applies to ``Wp``/``Wn``; the official CIFAR code decays them
    (its ``.*/W`` regex matches ``Wp`` and ``Wn``). See :meth:`TTQMethod.param_groups`.
``keep_positive`` (True)
    clamp ``Wp``, ``Wn`` to at least :data:`SCALE_FLOOR` after every optimizer step (scales
    have been seen to go negative, czhu95/ternarynet issue #7).

Which layers stay float is ``lowbit.quantize``'s ``keep=`` argument: the paper keeps the first
conv float; the CIFAR code ternarizes the last FC (``keep=["first"]``), the ImageNet AlexNet keeps
it float (``keep=["first", "last"]``, lowbit's default). Flows: *fine-tune* — quantize a trained
float model (the latent weights start from the float weights; CIFAR protocol) — or *from
scratch* — quantize a freshly initialised model (AlexNet protocol).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit import functional as F
from lowbit.methods import Method, register
from lowbit.nn import QuantModule, WeightQuantizer
from lowbit.qtypes import Granularity

__all__ = [
    "SCALE_FLOOR",
    "TTQFunction",
    "TTQMethod",
    "TTQWeight",
    "scale_parameters",
    "ttq",
    "ttq_codes",
    "ttq_quantizers",
    "ttq_stats",
    "ttq_threshold",
]

# Smallest value the positivity clamp leaves in Wp / Wn (strictly positive, so the latent
# gradient on that side, which is scaled by the scale itself, never vanishes for good).
SCALE_FLOOR = 1e-6

GranularityLike = Granularity | str | None


def _gran(granularity: GranularityLike) -> Granularity:
    return Granularity.of(granularity)


# ----------------------------------------------------------------------------------------------
# Pure functions


def ttq_threshold(
    w: torch.Tensor,
    t: float = 0.05,
    sparsity: float | None = None,
    granularity: GranularityLike = None,
) -> torch.Tensor:
    """The threshold ``Delta`` per unit (scale shape of ``granularity``; ``(1,)`` per tensor).

    * ``sparsity is None``: ``Delta = t * max|w|`` (TTQ §3, the official ``tw_ternarize``).
    * ``sparsity = r``: ``Delta`` is the k-th smallest ``|w|`` with ``k = round(r * n)`` (n the
      unit's size), so at least k weights (exactly k when magnitudes are distinct) satisfy
      ``|w| <= Delta`` and become 0; ``k = 0`` gives ``Delta = 0`` (only exact zeros are 0).

    Computed on ``w.detach()``: ``Delta`` is a constant for autograd.
    """
    g = _gran(granularity)
    w = w.detach()
    if sparsity is None:
        if not 0.0 <= float(t) < 1.0:
            raise ValueError(f"TTQ threshold factor t must be in [0, 1), got {t}")
        return F.unit_max_abs(w, g) * t
    r = float(sparsity)
    if not 0.0 <= r < 1.0:
        raise ValueError(f"TTQ sparsity must be in [0, 1), got {sparsity}")
    units, counts = F.to_units(w.abs(), g, pad_value=float("inf"))
    srt, _ = units.sort(dim=1)
    k = torch.round(counts.to(torch.float64) * r).to(torch.int64)
    picked = srt.gather(1, (k - 1).clamp(min=0)[:, None]).squeeze(1)
    delta = torch.where(k > 0, picked, torch.zeros_like(picked))
    return delta.reshape(g.scale_shape(w.shape))


def _masks(
    w: torch.Tensor, delta: torch.Tensor, g: Granularity
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean ``(P, N) = (w > Delta, w < -Delta)`` with per-unit ``delta`` (NaN is in neither)."""
    d = F.expand_scales(delta.to(w.dtype), w.shape, g)
    return w > d, w < -d


def ttq_codes(
    w: torch.Tensor,
    t: float = 0.05,
    sparsity: float | None = None,
    granularity: GranularityLike = None,
) -> torch.Tensor:
    """Ternary codes (int8): +1 where ``w > Delta``, -1 where ``w < -Delta``, else 0 (TTQ eq. 1).

    A weight exactly at ``±Delta`` is 0 (the paper's ``|w| <= Delta`` rule; the official code's
    masks would give it ``sign(w)`` without a scale, a measure-zero quirk not reproduced).
    """
    g = _gran(granularity)
    w = w.detach()
    pos, neg = _masks(w, ttq_threshold(w, t, sparsity, g), g)
    return pos.to(torch.int8) - neg.to(torch.int8)


def _unit_sum(x: torch.Tensor, g: Granularity) -> torch.Tensor:
    """Sum of ``x`` over each unit, in scale shape (padding of remainder groups is 0)."""
    units, _ = F.to_units(x, g)
    return units.sum(1).reshape(g.scale_shape(x.shape))


_NATIVE: list[bool] = []  # whether lowbit._la_solver (which holds the TTQ ops) loads; cached


def _native_ok(w: torch.Tensor, g: Granularity) -> bool:
    """Whether the C++ TTQ ops apply: one scale pair per tensor, contiguous CPU float32."""
    if g.kind != "tensor" or w.dtype != torch.float32 or w.device.type != "cpu":
        return False
    if not w.is_contiguous() or w.numel() == 0:
        return False
    if not _NATIVE:
        from lowbit import kernels

        _NATIVE.append(kernels.la_solver_available())
    return _NATIVE[0]


class TTQFunction(torch.autograd.Function):
    """``w_t = Wp * [w > Delta] - Wn * [w < -Delta]`` with TTQ's gradients (paper eqs. 1-3).

    ``apply(w, wp, wn, delta, granularity)``: ``w`` latent weights; ``wp``/``wn`` positive scales
    and ``delta`` thresholds, each with one element per unit of ``granularity`` (any shape, e.g.
    ``()`` or ``(1,)`` per tensor); ``delta`` is a constant. The forward value is computed with
    the expression of :func:`lowbit.functional.dequantize` for ``ternary_asym``
    (``Wp * [code > 0] - Wn * [code < 0]``), so an exported weight dequantizes to it bit for bit.

    Backward (``g = dL/dw_t``, ``P = [w > Delta]``, ``N = [w < -Delta]``, ``Z = 1 - P - N``):
    ``dL/dw = g * (Wp P + Wn N + Z)`` (eq. 3), ``dL/dWp = sum g P`` (eq. 2),
    ``dL/dWn = -sum g N`` (eq. 2 with the sign the paper drops; the official code's value).

    Implementation note: only comparisons and multiply-adds, no ``torch.where`` (an order of
    magnitude slower on CPU builds seen here); per-tensor scale gradients are two dot products.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        w: torch.Tensor,
        wp: torch.Tensor,
        wn: torch.Tensor,
        delta: torch.Tensor,
        granularity: Granularity,
    ) -> torch.Tensor:
        g = granularity
        ctx.granularity = g
        ctx.shapes = (wp.shape, wn.shape)
        if _native_ok(w, g):
            # One scale pair per tensor on the CPU: one C++ pass each way, same values.
            from lowbit import kernels

            sp, sn = float(wp.detach().reshape(())), float(wn.detach().reshape(()))
            codes, out = kernels.ttq_forward(w.detach(), sp, sn, float(delta.reshape(())))
            ctx.native = (sp, sn)
            ctx.save_for_backward(codes)
            return out.reshape(w.shape)
        ctx.native = None
        sshape = g.scale_shape(w.shape)
        pos, neg = _masks(w.detach(), delta.reshape(sshape), g)
        p = pos.to(w.dtype)
        n = neg.to(w.dtype)
        wp_e = F.expand_scales(wp.detach().reshape(sshape).to(w.dtype), w.shape, g)
        wn_e = F.expand_scales(wn.detach().reshape(sshape).to(w.dtype), w.shape, g)
        ctx.save_for_backward(p, n, wp_e, wn_e)
        return wp_e * p - wn_e * n

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        if ctx.native is not None:
            from lowbit import kernels

            (codes,) = ctx.saved_tensors
            gw_, dwp, dwn = kernels.ttq_backward(grad, codes, *ctx.native)
            need_wp, need_wn = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
            return (
                gw_ if ctx.needs_input_grad[0] else None,
                torch.full(ctx.shapes[0], dwp, dtype=grad.dtype) if need_wp else None,
                torch.full(ctx.shapes[1], dwn, dtype=grad.dtype) if need_wn else None,
                None,
                None,
            )
        p, n, wp_e, wn_e = ctx.saved_tensors
        g: Granularity = ctx.granularity
        gw = gwp = gwn = None
        if ctx.needs_input_grad[0]:
            zero_set = 1 - p - n  # exact: p, n are 0/1 and disjoint
            gw = grad * torch.addcmul(torch.addcmul(zero_set, p, wp_e), n, wn_e)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            if g.kind == "tensor":
                flat = grad.reshape(-1)
                sp = torch.dot(flat, p.reshape(-1)).reshape(1)
                sn = torch.dot(flat, n.reshape(-1)).reshape(1)
            else:
                sp, sn = _unit_sum(grad * p, g), _unit_sum(grad * n, g)
            gwp = sp.reshape(ctx.shapes[0])
            gwn = (-sn).reshape(ctx.shapes[1])
        return gw, gwp, gwn, None, None


def ttq(
    w: torch.Tensor,
    wp: torch.Tensor | float,
    wn: torch.Tensor | float,
    t: float = 0.05,
    *,
    sparsity: float | None = None,
    granularity: GranularityLike = None,
) -> torch.Tensor:
    """TTQ ternary weight ``{+Wp, 0, -Wn}`` of ``w`` with TTQ's gradients to ``w``, ``wp``, ``wn``.

    ``Delta = t * max|w|`` (or the ``sparsity`` quantile, see :func:`ttq_threshold`); forward
    paper eq. 1, backward eqs. 2-3 as in the official code (see :class:`TTQFunction`). ``wp``
    and ``wn`` are tensors with one element per unit of ``granularity`` (one per tensor by
    default); plain numbers are accepted and get no gradient.

    >>> w = torch.tensor([0.9, -0.5, 0.01, -1.0], requires_grad=True)
    >>> wp = torch.tensor(0.7, requires_grad=True); wn = torch.tensor(0.4, requires_grad=True)
    >>> ttq(w, wp, wn)
    tensor([ 0.7000, -0.4000,  0.0000, -0.4000], grad_fn=<TTQFunctionBackward>)
    """
    g = _gran(granularity)
    wp_t = torch.as_tensor(wp, dtype=w.dtype, device=w.device)
    wn_t = torch.as_tensor(wn, dtype=w.dtype, device=w.device)
    nunits = int(torch.Size(g.scale_shape(w.shape)).numel())
    for name, s in (("wp", wp_t), ("wn", wn_t)):
        if s.numel() != nunits:
            raise ValueError(
                f"ttq(): {name} has {s.numel()} element(s) but granularity {g.describe()} of a "
                f"weight {tuple(w.shape)} has {nunits} unit(s) (scale shape {g.scale_shape(w.shape)})"
            )
    delta = ttq_threshold(w, t, sparsity, g)
    return TTQFunction.apply(w, wp_t, wn_t, delta, g)


# ----------------------------------------------------------------------------------------------
# Quantizer module


class TTQWeight(WeightQuantizer):
    """TTQ weight quantizer: learned ``wp``, ``wn`` (``nn.Parameter``, positive) per unit.

    Args:
        weight: the layer's initial (float) weight; used for ``init="mean"`` and for the shape,
            device and dtype of the scales.
        t, sparsity: threshold rule (:func:`ttq_threshold`); ``t`` defaults to 0.05 and cannot
            be given together with ``sparsity``.
        init: ``"one"``, ``"mean"`` or a positive number (see the module docstring).
        scale_weight_decay: whether weight decay should hit ``wp``/``wn``
            (read by :meth:`TTQMethod.param_groups`).
        keep_positive: clamp the scales to ``>= SCALE_FLOOR`` in :meth:`clamp_scales`
            (called by :meth:`TTQMethod.after_step`).
        granularity, group_size, group_axis: one scale pair per tensor (the paper) or per
            output channel / group (an extension; the format supports it).
    """

    format = "ternary_asym"

    def __init__(
        self,
        weight: torch.Tensor,
        t: float | None = None,
        sparsity: float | None = None,
        init: str | float = "one",
        scale_weight_decay: bool = True,
        keep_positive: bool = True,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        if t is not None and sparsity is not None:  # sparsity replaces t: one would be ignored
            raise ValueError(
                f"give TTQ's threshold as t (a fraction of max|w|) or as sparsity, not both "
                f"(got t={t}, sparsity={sparsity})"
            )
        t = 0.05 if t is None else t  # the paper's (and the official code's) t
        for name, flag in (
            ("scale_weight_decay", scale_weight_decay),
            ("keep_positive", keep_positive),
        ):
            if not isinstance(flag, bool):  # "no" would count as true
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        # Validate the threshold rule once, up front.
        ttq_threshold(torch.zeros(1), t, sparsity)
        self.t = float(t)
        self.sparsity = None if sparsity is None else float(sparsity)
        self.scale_weight_decay = bool(scale_weight_decay)
        self.keep_positive = bool(keep_positive)
        self.init = init
        wp0, wn0 = self.initial_scales(weight.detach(), init)
        self.wp = nn.Parameter(wp0)
        self.wn = nn.Parameter(wn0)

    def initial_scales(
        self, w: torch.Tensor, init: str | float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial ``(Wp, Wn)`` in scale shape for the weight ``w``."""
        shape = self.granularity.scale_shape(w.shape)
        if isinstance(init, str) and init == "one":
            init = 1.0
        if not isinstance(init, str):
            value = float(init)
            if not value > 0:
                raise ValueError(f"TTQ init must be positive, got {init}")
            full = torch.full(shape, value, dtype=w.dtype, device=w.device)
            return full, full.clone()
        if init != "mean":
            raise ValueError(f"unknown TTQ init {init!r}: use 'one', 'mean' or a positive number")
        # Mean |w| over each side's set: the least-squares value of that side for fixed sets.
        g = self.granularity
        codes = ttq_codes(w, self.t, self.sparsity, g)
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        fallback = F.unit_mean_abs(w, g)
        fallback = torch.where(fallback > 0, fallback, torch.ones_like(fallback))
        out = []
        for mask in (codes > 0, codes < 0):
            total = _unit_sum(torch.where(mask, w.abs(), zero), g)
            count = _unit_sum(mask.to(w.dtype), g)
            out.append(torch.where(count > 0, total / count.clamp(min=1), fallback))
        return out[0], out[1]

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """The ternary assignment of ``w`` (int8), :func:`ttq_codes` with this layer's rule."""
        return ttq_codes(w, self.t, self.sparsity, self.granularity)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes(w), torch.stack([self.wp, self.wn], dim=-1)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        self.__dict__["_last_weight"] = w
        delta = ttq_threshold(w, self.t, self.sparsity, self.granularity)
        return TTQFunction.apply(w, self.wp, self.wn, delta, self.granularity)

    @torch.no_grad()
    def clamp_scales(self) -> None:
        """Keep ``Wp``, ``Wn`` >= :data:`SCALE_FLOOR` (no-op when ``keep_positive`` is False)."""
        if self.keep_positive:
            self.wp.clamp_(min=SCALE_FLOOR)
            self.wn.clamp_(min=SCALE_FLOOR)

    def extra_repr(self) -> str:
        rule = f"t={self.t}" if self.sparsity is None else f"sparsity={self.sparsity}"
        return f"{super().extra_repr()}, {rule}, init={self.init}"


# ----------------------------------------------------------------------------------------------
# Model-level helpers and the method


def ttq_quantizers(model: nn.Module) -> dict[str, TTQWeight]:
    """Every :class:`TTQWeight` in ``model`` by a readable layer name.

    ``"net.fc1"`` for a Linear/Conv layer's quantizer, ``"lstm.ih_l0.2"`` for an LSTM gate block.
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, TTQWeight):
            out[name.replace(".weight_quantizer", "")] = module
    return out


def scale_parameters(model: nn.Module) -> list[nn.Parameter]:
    """All ``wp``/``wn`` parameters of the TTQ quantizers in ``model``."""
    return [p for q in ttq_quantizers(model).values() for p in (q.wp, q.wn)]


def _layer_weights(model: nn.Module) -> dict[str, tuple[TTQWeight, torch.Tensor]]:
    """Layer name -> (quantizer, latent weight) for every TTQ-quantized weight."""
    out: dict[str, tuple[TTQWeight, torch.Tensor]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantModule):
            continue
        wq = getattr(module, "weight_quantizer", None)
        if isinstance(wq, TTQWeight):
            out[name] = (wq, module.weight)  # type: ignore[attr-defined]
        elif isinstance(wq, nn.ModuleDict):  # QuantLSTM: 4 gate blocks per matrix
            h = module.hidden_size  # type: ignore[attr-defined]
            for key, blocks in wq.items():
                w = getattr(module, f"weight_{key}")
                q: nn.Module
                for j, q in enumerate(blocks.children()):
                    if isinstance(q, TTQWeight):
                        out[f"{name}.{key}.{'ifgo'[j]}"] = (q, w[j * h : (j + 1) * h])
    return out


@torch.no_grad()
def ttq_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per TTQ layer: ``wp``, ``wn`` (means over units for non-tensor granularity), ``sparsity``
    (share of zero codes), ``pos`` and ``neg`` (shares of +1 and -1 codes), ``delta`` (mean
    threshold) — the quantities of the paper's Fig. 3 (scales and sparsity over training)."""
    stats = {}
    for name, (q, w) in _layer_weights(model).items():
        codes = q.codes(w.detach())
        n = max(codes.numel(), 1)
        stats[name] = {
            "wp": float(q.wp.mean()),
            "wn": float(q.wn.mean()),
            "sparsity": float((codes == 0).sum()) / n,
            "pos": float((codes > 0).sum()) / n,
            "neg": float((codes < 0).sum()) / n,
            "delta": float(ttq_threshold(w, q.t, q.sparsity, q.granularity).mean()),
        }
    return stats


class TTQMethod(Method):
    """The ``"ttq"`` method: :class:`TTQWeight` quantizers plus TTQ's training hooks."""

    def __init__(self) -> None:
        super().__init__(
            "ttq",
            weight=self._make_weight,
            options={
                "t": None,  # 0.05 unless sparsity is given
                "sparsity": None,
                "init": "one",
                "scale_weight_decay": True,
                "keep_positive": True,
            },
            description="ternary weights {+Wp, 0, -Wn} with both scales learned per layer",
            paper="Zhu, Han, Mao & Dally, Trained Ternary Quantization, ICLR 2017, arXiv 1612.01064",
        )

    @staticmethod
    def _make_weight(layer: Any, **o: Any) -> TTQWeight:
        return TTQWeight(
            layer.weight,
            t=o["t"],
            sparsity=o["sparsity"],
            init=o["init"],
            scale_weight_decay=o["scale_weight_decay"],
            keep_positive=o["keep_positive"],
            granularity=o["granularity"],
            group_size=o["group_size"],
            group_axis=o["group_axis"],
        )

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]] | None:
        """One group of every trainable parameter unless some layer has
        ``scale_weight_decay=False``: then two groups, everything else, and those layers'
        ``wp``/``wn`` with ``weight_decay=0``."""
        no_decay = [
            p
            for q in ttq_quantizers(model).values()
            if not q.scale_weight_decay
            for p in (q.wp, q.wn)
        ]
        if not no_decay:
            return super().param_groups(model, lr)
        ids = {id(p) for p in no_decay}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest, "lr": lr}, {"params": no_decay, "lr": lr, "weight_decay": 0.0}]

    def after_step(self, model: nn.Module) -> None:
        """Clamp every layer's ``Wp``/``Wn`` to ``>= SCALE_FLOOR`` (layers with ``keep_positive``)."""
        for q in ttq_quantizers(model).values():
            q.clamp_scales()

    def epoch_metrics(self, model: nn.Module) -> dict[str, float]:
        """``{"ttq/<layer>/<stat>": value}`` for the stats of :func:`ttq_stats`."""
        return {
            f"ttq/{layer}/{key}": value
            for layer, stats in ttq_stats(model).items()
            for key, value in stats.items()
        }


register(TTQMethod())
