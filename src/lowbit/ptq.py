"""Post-training quantization: FGQ / DFP (``lowbit.ptq.fgq``) and its integer reference pipeline.

Papers: DFP = Mellempudi et al. arXiv 1701.08978; FGQ = Mellempudi et al. arXiv 1705.01462
(``reference/papers.md`` §4). No official code exists; the open choices of §4.5 and what lowbit
picks by default:

=========================== ======================================================================
choice                      default (and why)
=========================== ======================================================================
grouping axis               ``"in"``: N consecutive weights of one output's reduction dimension
                            share alpha. It is what makes FGQ's "1 - 1/N multiplications removed"
                            true (N ternary accumulations per multiply) and what the kernels
                            accumulate per group. ``"out"`` (DFP's clusters of N filters) is an
                            option.
remainder group             a shorter last group with its own optimal alpha (no padding bias).
threshold rule              ``"exact"``: the sorted search is the global L2 optimum per group and,
                            vectorised, as cheap as the 0.7 rule for small N. ``"0.7"`` (TWN) is
                            the ablation. 4-bit weights: ``"mse"`` (alternating least squares from
                            the max-scaled start, never worse than ``"max"``).
alpha / Delta in fine-tune  re-solved from the latent weights at every step (as TWN training).
BatchNorm                   folded into the preceding conv/linear *before* ternarization, so the
                            quantized weight is the one inference uses (BN scales would otherwise
                            multiply the per-group alphas in float after the integer accumulation).
activation exponent         calibrated once (``act_mode="calibrated"``) from the calibration
                            batches' ``max`` — a fixed exponent is what integer inference can use
                            without a max-reduction per tensor; ``"dynamic"`` (per batch) and the
                            ``"percentile"`` threshold are options. Rounding: half-to-even.
signed / unsigned           ``"auto"``: unsigned when every calibration value is >= 0 (inputs
                            after ReLU), which doubles the resolution of 8-bit (4-bit) codes.
first / last layers         kept float (``keep=("first", "last")``, the library-wide rule and the
                            papers' practice); ``keep=()`` quantizes every layer.
residual additions          not quantized separately: each quantized layer re-quantizes its own
                            input, so an add's result is DFP-quantized where it is consumed.
=========================== ======================================================================

The integer pipeline (:func:`integer_forward`): for every quantized layer, ``x_int, E_x =
dfp_quantize(x)``; per output and group ``acc_g = sum_{i in g} What_i * x_int_i`` (integers, an
int32 accumulator suffices: ``|acc| <= N * max|code| * 2^k``); ``y = (sum_g alpha_g * acc_g) *
2^E_x + bias`` in float64; BN is already in ``bias``/``alpha``; ReLU and max-pooling then act on
``y`` and the next layer re-quantizes it to DFP. (Re-quantizing after ReLU/max-pool equals
applying them to the DFP integers: both are monotone and commute with rounding and clamping.)
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as TF
from torch import nn

from lowbit import functional as F
from lowbit.methods.fgq import DFPCalibratedAct, _FGQWeight
from lowbit.nn import DFPAct, QuantConv2d, QuantLinear, QuantModule
from lowbit.qtypes import QuantizedWeight

__all__ = [
    "FGQ_DEFAULTS",
    "LayerReport",
    "accuracy",
    "calibrate",
    "fgq",
    "finetune",
    "fold_batchnorm",
    "format_report",
    "integer_forward",
    "integer_layer",
    "float_run_info",
    "load_data",
    "load_float_model",
    "is_quantized_file",
    "load_quantized",
    "report",
    "save_quantized",
    "track_saturation",
]

log = logging.getLogger("lowbit.ptq")

FGQ_DEFAULTS: dict[str, Any] = {
    "group_axis": "in",
    "rule": None,
    "scale_bits": None,
    "act_mode": "calibrated",
    "act_calibration": "max",
    "percentile": 99.99,
    "act_signed": "auto",
    "keep": ("first", "last"),
    "include": None,
    "exclude": None,
    "overrides": None,
    "fold_bn": True,
    "max_batches": None,
    "inplace": True,
}


# ----------------------------------------------------------------------------------------------
# BatchNorm folding


_FOLDABLE = (nn.Linear, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _bn_pairs_fx(model: nn.Module) -> list[tuple[str, str]] | None:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception:
        return None
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(gm.get_submodule(str(node.target)), _BN):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module":
            continue
        if not isinstance(gm.get_submodule(str(src.target)), _FOLDABLE):
            continue
        # Fold only when the layer's output feeds nothing but this BN and both run once.
        if len(src.users) == 1 and calls[str(src.target)] == 1 and calls[str(node.target)] == 1:
            pairs.append((str(src.target), str(node.target)))
    return pairs


def _bn_pairs_sequential(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            children = list(module.named_children())
            for (a, ma), (b, mb) in zip(children, children[1:], strict=False):
                if isinstance(ma, _FOLDABLE) and isinstance(mb, _BN):
                    prefix = f"{name}." if name else ""
                    pairs.append((prefix + a, prefix + b))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Fold every BatchNorm that directly follows an nn.Linear / nn.Conv2d into it, in place.

    With ``s = gamma / sqrt(running_var + eps)``: ``W' = s * W`` (per output channel) and
    ``b' = s * (b - running_mean) + beta``; the BN is replaced by ``nn.Identity``. The folded model
    in eval mode computes what the original computed in eval mode (to float rounding; the fold is
    done in float64). Pairs are found with ``torch.fx`` (a layer whose only consumer is the BN);
    models fx cannot trace fall back to adjacent pairs inside ``nn.Sequential``. BNs without
    running statistics are left alone. Returns the ``(layer, bn)`` names folded.
    """
    pairs = _bn_pairs_fx(model)
    if pairs is None:
        pairs = _bn_pairs_sequential(model)
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():
            if child is not None:
                places.setdefault(id(child), []).append((parent, child_name))
    folded = []
    for layer_name, bn_name in pairs:
        layer: Any = model.get_submodule(layer_name)
        bn = model.get_submodule(bn_name)
        assert isinstance(bn, _BN)
        if bn.running_mean is None or bn.running_var is None:
            log.warning("BatchNorm %s has no running statistics; not folded", bn_name)
            continue
        w = layer.weight
        if bn.num_features != w.shape[0]:
            continue
        s = torch.rsqrt(bn.running_var.double() + bn.eps)
        beta = torch.zeros_like(s)
        if bn.affine:
            s = s * bn.weight.double()
            beta = bn.bias.double()
        b = layer.bias.double() if layer.bias is not None else torch.zeros_like(s)
        new_b = (b - bn.running_mean.double()) * s + beta
        w.copy_((w.double() * s.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)
        else:
            layer.bias.copy_(new_b.to(layer.bias.dtype))
        for parent, attr in places.get(id(bn), []):
            setattr(parent, attr, nn.Identity())
        folded.append((layer_name, bn_name))
    return folded


# ----------------------------------------------------------------------------------------------
# Calibration


def _first(item: Any) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], torch.Tensor):
        return item[0]
    if isinstance(item, dict) and isinstance(item.get("x"), torch.Tensor):
        return item["x"]
    raise TypeError(
        f"calibration batches must be tensors or (x, y, ...) tuples, got {type(item).__name__}"
    )


def _calibration_batches(
    calibration: Any, max_batches: int | None, batch_size: int = 256
) -> list[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        items: Iterable[Any] = [calibration]
    elif hasattr(calibration, "batches") and hasattr(calibration, "x"):  # lowbit.data.ArrayDataset
        items = calibration.batches(batch_size)
    else:
        items = calibration
    out = []
    for i, item in enumerate(items):
        if max_batches is not None and i >= max_batches:
            break
        batch = _first(item)
        if isinstance(batch, torch.Tensor) and batch.dim() and batch.shape[0] == 0:
            continue  # an empty batch calibrates nothing
        out.append(batch)
    if not out:
        raise ValueError(
            "calibration data is empty (no batches, or batches of 0 samples): pass a tensor, "
            "a dataset or an iterable of batches with at least one sample"
        )
    return out


def _dfp_acts(model: nn.Module) -> dict[str, DFPCalibratedAct]:
    return {n: m for n, m in model.named_modules() if isinstance(m, DFPCalibratedAct)}


@contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def calibrate(
    model: nn.Module, calibration: Any, max_batches: int | None = None
) -> dict[str, dict[str, Any]]:
    """Calibrate every :class:`~lowbit.methods.fgq.DFPCalibratedAct` of ``model`` (DFP §4.2).

    Pass 1 runs the batches with the activation quantizers observing (values pass through
    unquantized, weights already quantized) and fixes each layer's signedness and exponent
    (``max`` or ``percentile``). Pass 2 runs the fully quantized model on the same batches and
    counts saturated / underflowed elements per layer. Returns ``{layer name: stats}``.
    """
    acts = _dfp_acts(model)
    if not acts:
        return {}
    batches = _calibration_batches(calibration, max_batches)
    device = _device_of(model)
    with _eval_no_grad(model):
        for a in acts.values():
            a.observe()
        try:
            for x in batches:
                model(x.to(device))
        finally:
            for a in acts.values():
                a._observing = False
        for a in acts.values():
            a.finish_calibration()
        for a in acts.values():
            a.reset_stats()
            a.track = True
        try:
            for x in batches:
                model(x.to(device))
        finally:
            for a in acts.values():
                a.track = False
    return {_layer_name(n): a.stats() for n, a in acts.items()}


def _layer_name(quantizer_name: str) -> str:
    return quantizer_name.rsplit(".input_quantizer", 1)[0]


# ----------------------------------------------------------------------------------------------
# Report


@dataclass
class LayerReport:
    """One quantized layer after FGQ: weights and input activations."""

    name: str
    weight: str  # e.g. "ternary group4/in"
    shape: tuple[int, ...]
    alphas: int  # number of scales
    sparsity: float  # share of zero codes
    mults_replaced: float | None  # share of MACs that became adds (ternary), None for k-bit
    act: str  # "udfp8 E=-5", "fp32", ...
    exponent: int | None
    saturation: float | None
    underflow: float | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mults_replaced(qw: QuantizedWeight, layer: nn.Module) -> float | None:
    if qw.format != "ternary":
        return None
    k = math.prod(qw.shape[1:])
    g = qw.granularity_spec
    per_output = -(-k // int(g.group_size or 1)) if g.kind == "group" and g.axis == "in" else 1
    return 1.0 - per_output / k


def report(model: nn.Module) -> list[LayerReport]:
    """Per quantized layer: format, alpha count, sparsity, multiplications replaced, DFP exponent and
    the saturation measured during calibration (:func:`calibrate`'s second pass)."""
    rows = []
    for name, layer in model.named_modules():
        if not isinstance(layer, (QuantLinear, QuantConv2d)):
            continue
        with torch.no_grad():
            qw = layer.quantized_weight()
        iq = layer.input_quantizer
        if isinstance(iq, DFPCalibratedAct):
            st = iq.stats()
            act, exponent = iq.describe(), iq.exponent
            sat = st["saturation"] if st["elements"] else None
            under = st["underflow_rate"] if st["elements"] else None
        else:
            act = "fp32" if iq is None else iq.describe()
            exponent, sat, under = getattr(iq, "exponent", None), None, None
        rows.append(
            LayerReport(
                name=name,
                weight=f"{qw.format}{'' if qw.format == 'ternary' else qw.bits} {qw.granularity_spec.describe()}",
                shape=qw.shape,
                alphas=int(qw.scales.numel()),
                sparsity=qw.sparsity(),
                mults_replaced=_mults_replaced(qw, layer),
                act=act,
                exponent=exponent,
                saturation=sat,
                underflow=under,
            )
        )
    return rows


def format_report(rows: Sequence[LayerReport]) -> str:
    """A plain-text table of :func:`report` rows."""
    header = (
        "layer",
        "weight",
        "shape",
        "alphas",
        "sparsity",
        "mults->adds",
        "input",
        "saturated",
        "underflow",
    )
    lines = [header]
    for r in rows:
        lines.append(
            (
                r.name,
                r.weight,
                "x".join(map(str, r.shape)),
                str(r.alphas),
                f"{100 * r.sparsity:.1f}%",
                "-" if r.mults_replaced is None else f"{100 * r.mults_replaced:.1f}%",
                r.act,
                "-" if r.saturation is None else f"{100 * r.saturation:.4f}%",
                "-" if r.underflow is None else f"{100 * r.underflow:.2f}%",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


# ----------------------------------------------------------------------------------------------
# The entry point


def fgq(
    model: nn.Module,
    calibration: Any,
    group_size: int | str = 4,
    weight_bits: int = 2,
    act_bits: int | None = 8,
    **options: Any,
) -> nn.Module:
    """Post-training FGQ/DFP quantization (arXiv 1705.01462 / 1701.08978; papers.md §4).

    1. ``model.eval()``; BatchNorm folded into the preceding conv/linear (:func:`fold_batchnorm`).
    2. Linear/Conv2d layers swapped (``lowbit.quantize(model, "fgq", ...)``; first and last kept
       float by default) for layers with ternary (``weight_bits=2``) or k-bit weights in groups of
       ``group_size`` sharing one scale (:func:`lowbit.methods.fgq.group_ternarize`, §4.1).
    3. Input activations of the quantized layers become ``act_bits``-bit dynamic fixed point,
       calibrated on ``calibration`` (:func:`calibrate`, §4.2); per-layer saturation is measured.

    Args:
        model: a trained float model (modified in place unless ``inplace=False``).
        calibration: a tensor, a ``lowbit.data.ArrayDataset`` or an iterable of batches (tensors or
            ``(x, y)`` tuples); a few hundred to a few thousand samples are plenty.
        group_size: N (int), ``"layer"`` (one scale per tensor) or ``"channel"``.
        weight_bits: 2 = ternary; 3..8 = symmetric k-bit (the DFP 4-bit variant).
        act_bits: DFP bits of the quantized layers' inputs (8 or 4); ``None`` keeps them float.
        **options: ``group_axis`` ("in"/"out"), ``rule`` ("exact"/"0.7"; k-bit "mse"/"max"),
            ``scale_bits`` (None = float32 group scales; 2..8 = fixed-point ``m · 2^E`` scales,
            one ``E`` per row, stored in one byte each by ``lowbit.pack``),
            ``act_mode`` ("calibrated"/"dynamic"), ``act_calibration`` ("max"/"percentile"),
            ``percentile`` (99.99), ``act_signed`` ("auto"/True/False), ``keep``, ``include``,
            ``exclude``, ``overrides`` (as in ``lowbit.quantize``), ``fold_bn`` (True),
            ``max_batches`` (None = all), ``inplace`` (True).

    Returns:
        The quantized model in eval mode. ``lowbit.ptq.report(model)`` gives per-layer alpha
        counts, sparsity, exponents and saturation (also logged on the ``lowbit.ptq`` logger);
        ``model._lowbit_ptq`` records the options, folded BNs and calibration statistics.
    """
    from lowbit.convert import quantize

    unknown = set(options) - set(FGQ_DEFAULTS)
    if unknown:
        raise TypeError(
            f"lowbit.ptq.fgq got unknown option(s) {', '.join(sorted(unknown))}; "
            f"valid: {', '.join(sorted(FGQ_DEFAULTS))}"
        )
    opts = {**FGQ_DEFAULTS, **options}
    if not opts["inplace"]:
        model = copy.deepcopy(model)
    start = time.perf_counter()
    model.eval()
    folded = fold_batchnorm(model) if opts["fold_bn"] else []
    quantize(
        model,
        "fgq",
        keep=opts["keep"],
        include=opts["include"],
        exclude=opts["exclude"],
        overrides=opts["overrides"],
        group_size=group_size,
        group_axis=opts["group_axis"],
        weight_bits=weight_bits,
        rule=opts["rule"],
        scale_bits=opts["scale_bits"],
        act_bits=act_bits,
        act_mode=opts["act_mode"],
        act_calibration=opts["act_calibration"],
        percentile=opts["percentile"],
        act_signed=opts["act_signed"],
    )
    model.eval()
    stats = calibrate(model, calibration, opts["max_batches"])
    rows = report(model)
    model.__dict__["_lowbit_ptq"] = {
        "method": "fgq",
        "options": {
            "group_size": group_size,
            "weight_bits": weight_bits,
            "act_bits": act_bits,
            **opts,
        },
        "folded_bn": folded,
        "calibration": stats,
        "seconds": time.perf_counter() - start,
    }
    if log.isEnabledFor(logging.INFO):
        log.info("FGQ post-training quantization:\n%s", format_report(rows))
    return model


# ----------------------------------------------------------------------------------------------
# Integer reference pipeline


def _row_alphas(qw: QuantizedWeight) -> tuple[torch.Tensor, int]:
    """``(alphas (out, G) float64, N)``: every output row's per-group scales in K order."""
    out = qw.shape[0]
    k = math.prod(qw.shape[1:])
    g = qw.granularity_spec
    s = qw.scales.double()
    if g.kind == "group" and g.axis == "in":
        return s.reshape(out, -1), int(g.group_size)  # type: ignore[arg-type]
    if g.kind == "group":
        rows = s.repeat_interleave(int(g.group_size))[:out]  # type: ignore[arg-type]
    elif g.kind == "channel":
        rows = s.reshape(out)
    else:
        rows = s.reshape(1).expand(out)
    return rows.reshape(out, 1), k


def _grouped_matmul(
    x: torch.Tensor, codes: torch.Tensor, alphas: torch.Tensor, n: int, keep_acc: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integer ``x`` (B, K) times codes (O, K) per group of ``n`` along K -> ``(sum_g alpha*acc, acc)``.

    ``acc`` (B, O, G) int64 holds exact integer sums: the products are computed by a float64
    batched matmul whose every partial sum is an integer below 2^53, hence exact.
    """
    b, k = x.shape
    o = codes.shape[0]
    groups = -(-k // n)
    pad = groups * n - k
    xf = TF.pad(x.double(), (0, pad)).reshape(b, groups, n).transpose(0, 1)  # (G, B, n)
    cf = TF.pad(codes.double(), (0, pad)).reshape(o, groups, n).permute(1, 2, 0)  # (G, n, O)
    bound = (
        n
        * float(codes.abs().max() if codes.numel() else 0)
        * float(x.abs().max() if x.numel() else 0)
    )
    if bound >= 2**53:
        raise OverflowError(
            "integer accumulators would exceed 2^53; use smaller groups or fewer bits"
        )
    accs, ys = [], []
    chunk = max(1, (1 << 24) // max(groups * o, 1))
    for lo in range(0, b, chunk):
        acc = torch.bmm(xf[:, lo : lo + chunk], cf).permute(1, 2, 0)  # (b, O, G), exact integers
        if keep_acc:
            accs.append(acc.to(torch.int64))
        ys.append((acc * alphas[None]).sum(-1))
    return torch.cat(ys, 0), torch.cat(accs, 0) if keep_acc else None


def _input_ints(layer: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    iq = layer.input_quantizer
    if isinstance(iq, DFPCalibratedAct):
        e, signed = iq.current_exponent(x)
        ints, e = F.dfp_quantize(x, iq.bits, signed, e)
    elif isinstance(iq, DFPAct):
        ints, e = F.dfp_quantize(x, iq.bits, iq.signed, iq.exponent)
    else:
        raise ValueError(
            f"the integer pipeline needs DFP input activations; layer {type(layer).__name__} has "
            f"{'float inputs' if iq is None else type(iq).__name__} (quantize with act_bits=8)"
        )
    return ints.to(torch.int64), int(e)


def integer_layer(
    layer: Any, x: torch.Tensor, keep_acc: bool = True
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One QuantLinear / QuantConv2d on the integer path (module docstring; FGQ/DFP §4.2).

    Returns ``(y, trace)``: ``y`` in ``x``'s dtype; ``trace`` holds ``x_int`` (int64 DFP codes),
    ``exponent`` and ``acc`` (int64 per-group accumulators: (B, O, G) for Linear,
    (B, L, O, G) for Conv2d with L output positions; None with ``keep_acc=False``, which saves
    their memory).
    """
    qw = layer.quantized_weight()
    if qw.format not in ("ternary", "kbit_linear", "binary"):
        raise ValueError(
            f"the integer pipeline handles ternary / k-bit linear weights, not {qw.format}"
        )
    x_int, e = _input_ints(layer, x)
    alphas, n = _row_alphas(qw)
    codes = qw.codes.to(torch.int64)
    bias = layer.bias.detach().double() if layer.bias is not None else None
    if isinstance(layer, QuantConv2d):
        if layer.padding_mode != "zeros":
            raise ValueError("the integer pipeline supports padding_mode='zeros' only")
        if isinstance(layer.padding, str):
            raise ValueError("the integer pipeline needs numeric padding (not 'same'/'valid')")
        bsz, _, h, w = x_int.shape
        kh, kw = layer.kernel_size
        cols = TF.unfold(x_int.double(), (kh, kw), layer.dilation, layer.padding, layer.stride)
        ho = (h + 2 * layer.padding[0] - layer.dilation[0] * (kh - 1) - 1) // layer.stride[0] + 1
        wo = (w + 2 * layer.padding[1] - layer.dilation[1] * (kw - 1) - 1) // layer.stride[1] + 1
        cols = cols.transpose(1, 2).to(torch.int64)  # (B, L, C*kh*kw), exact integers
        out_ch, groups = layer.out_channels, layer.groups
        kg = codes.shape[1] * kh * kw
        o_per, c_per = out_ch // groups, kg
        ys, accs = [], []
        flat_codes = codes.reshape(out_ch, -1)
        for gi in range(groups):
            xc = cols[..., gi * c_per : (gi + 1) * c_per].reshape(-1, c_per)
            rows = slice(gi * o_per, (gi + 1) * o_per)
            y, acc = _grouped_matmul(xc, flat_codes[rows], alphas[rows], n, keep_acc)
            ys.append(y)
            accs.append(acc)
        y = torch.cat(ys, 1)
        acc = torch.cat([a for a in accs if a is not None], 1) if keep_acc else None
        y = torch.ldexp(y, torch.tensor(e, dtype=torch.float64))
        if bias is not None:
            y = y + bias
        y = y.reshape(bsz, ho * wo, out_ch).transpose(1, 2).reshape(bsz, out_ch, ho, wo)
        if acc is not None:
            acc = acc.reshape(bsz, ho * wo, out_ch, -1)
    else:
        lead = x_int.shape[:-1]
        y, acc = _grouped_matmul(x_int.reshape(-1, x_int.shape[-1]), codes, alphas, n, keep_acc)
        y = torch.ldexp(y, torch.tensor(e, dtype=torch.float64))
        if bias is not None:
            y = y + bias
        y = y.reshape(*lead, -1)
    return y.to(x.dtype), {"x_int": x_int, "exponent": e, "acc": acc}


@torch.no_grad()
def integer_forward(
    model: nn.Module, x: torch.Tensor, trace: list[dict[str, Any]] | None = None
) -> torch.Tensor:
    """Run ``model`` with every quantized Linear/Conv2d on the integer reference path.

    DFP-quantized inputs, integer per-group accumulators, per-group alpha rescale, bias (BN
    folded); float layers (kept first/last) and elementwise ops run as usual. If ``trace`` is a
    list, each quantized layer appends ``{"name", "x_int", "exponent", "acc"}``.
    """
    names = {id(m): n for n, m in model.named_modules()}
    layers = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantConv2d))]
    unsupported = [
        names[id(m)] for m in model.modules() if isinstance(m, QuantModule) and m not in layers
    ]
    if unsupported:
        raise ValueError(
            f"integer_forward supports QuantLinear/QuantConv2d only; found {unsupported}"
        )

    def make(layer: nn.Module) -> Any:
        def forward(inp: torch.Tensor) -> torch.Tensor:
            y, t = integer_layer(layer, inp, keep_acc=trace is not None)
            if trace is not None:
                trace.append({"name": names[id(layer)], **t})
            return y

        return forward

    was = model.training
    model.eval()
    for layer in layers:
        layer.forward = make(layer)  # type: ignore[method-assign]
    try:
        return model(x)
    finally:
        for layer in layers:
            del layer.forward
        model.train(was)


# ----------------------------------------------------------------------------------------------
# Helpers for evaluation and optional low-precision fine-tuning


@contextmanager
def track_saturation(model: nn.Module) -> Iterator[None]:
    """Count DFP saturation / underflow afresh during the block (then :func:`report` shows them)."""
    acts = list(_dfp_acts(model).values())
    for a in acts:
        a.reset_stats()
        a.track = True
    try:
        yield
    finally:
        for a in acts:
            a.track = False


@torch.no_grad()
def accuracy(
    model: nn.Module,
    data: Any,
    batch_size: int = 512,
    integer: bool = False,
    saturation: bool = False,
) -> float:
    """Top-1 accuracy (%) of ``model`` on an ``ArrayDataset`` or an iterable of ``(x, y)`` batches.

    ``integer=True`` evaluates the integer reference pipeline (:func:`integer_forward`);
    ``saturation=True`` re-counts the DFP saturation statistics on this data
    (:func:`track_saturation`), replacing the calibration-time ones in :func:`report`.
    """
    items = data.batches(batch_size) if hasattr(data, "batches") else data
    device = _device_of(model)
    correct = total = 0
    with _eval_no_grad(model), track_saturation(model) if saturation else nullcontext():
        for x, y in items:
            x, y = x.to(device), y.to(device)
            out = integer_forward(model, x) if integer else model(x)
            correct += int((out.argmax(1) == y).sum())
            total += int(y.numel())
    return 100.0 * correct / max(total, 1)


def finetune(
    model: nn.Module,
    data: Any,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    calibration: Any = None,
    seed: int = 0,
) -> list[float]:
    """Low-precision fine-tuning of an FGQ model (DFP/FGQ §4.3): Adam on the latent weights, every
    group's threshold and alpha re-solved each step, straight-through gradients, cross-entropy.

    ``data``: an ``ArrayDataset`` (shuffled with ``seed``) or a re-iterable of ``(x, y)`` batches.
    Activation exponents stay as calibrated during training; pass ``calibration`` to re-calibrate
    them afterwards. For long runs use ``lowbit train`` with method ``fgq``. Returns the mean loss
    of every epoch.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    device = _device_of(model)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    for _ in range(epochs):
        items = (
            data.batches(batch_size, shuffle=True, generator=gen)
            if hasattr(data, "batches")
            else data
        )
        total, count = 0.0, 0
        for x, y in items:
            x, y = x.to(device), y.to(device)
            loss = TF.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            count += len(y)
        if count == 0:
            raise ValueError(
                f"fine-tuning epoch {len(losses) + 1} got no samples: pass a re-iterable "
                "(a list of (x, y) batches or a lowbit.data.ArrayDataset), not a one-shot "
                "generator, and at least one non-empty batch"
            )
        losses.append(total / count)
    model.eval()
    for m in model.modules():
        if isinstance(m, _FGQWeight):
            m._cache = None
    if calibration is not None:
        calibrate(model, calibration)
    return losses


# ----------------------------------------------------------------------------------------------
# Files: float models in, quantized checkpoints out (for ``lowbit ptq``)

PTQ_FORMAT = "lowbit-ptq-1"


def _model_spec(config: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    spec = config.get("model")
    if isinstance(spec, str):
        return spec, {}
    if isinstance(spec, dict):
        if isinstance(spec.get("options"), dict):
            opts = dict(spec["options"])
        else:
            opts = {k: v for k, v in spec.items() if k != "name"}
        return spec.get("name"), opts
    return None, {}


def _resolve_checkpoint(source: Path) -> tuple[Path, dict[str, Any]]:
    """(checkpoint file, the run's config.json or {}) for a run dir, checkpoints dir or file."""
    import json

    from lowbit.train.checkpoint import latest

    if source.is_dir():
        ckdir = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        path = latest(ckdir, "best") or latest(ckdir, "last")
        if path is None:
            candidates = sorted(ckdir.glob("*.pt"))
            if not candidates:
                raise FileNotFoundError(
                    f"no checkpoint in {source}: expected a run directory with checkpoints/ "
                    "(lowbit train) or a .pt file"
                )
            path = candidates[-1]
    elif source.is_file():
        path = source
    else:
        raise FileNotFoundError(f"{source} does not exist (give a run directory or a checkpoint)")
    config: dict[str, Any] = {}
    for d in (path.parent, path.parent.parent):
        if (d / "config.json").is_file():
            config = json.loads((d / "config.json").read_text())
            break
    return path, config


def load_float_model(
    source: str | Path,
    model: str | None = None,
    model_options: dict[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A float model from a ``lowbit train`` run directory (best checkpoint, else the last) or a
    checkpoint file (``{"model": state_dict, ...}`` or a bare state dict), in eval mode.

    The architecture comes from the run's ``config.json`` (``{"model": {"name", "options"}}``)
    unless ``model`` (a ``lowbit.models`` name) is given. Returns ``(model, info)`` with the
    model spec, the dataset named in the config (if any) and the checkpoint path.
    """
    from lowbit import models
    from lowbit.train.checkpoint import load_checkpoint

    path, config = _resolve_checkpoint(Path(source))
    trained = (config.get("method") or {}).get("name", "fp") if isinstance(config, dict) else "fp"
    if trained not in (None, "fp"):
        raise ValueError(
            f"{source} was trained with method {trained!r}: post-training quantization starts from "
            "a float model; give the run of its float baseline (method fp), or pack this run "
            f"directly (`lowbit pack {source}`)"
        )
    name, opts = _model_spec(config)
    if model is not None:
        name, opts = model, {}
    opts.update(model_options or {})
    if name is None:
        raise ValueError(
            f"cannot tell which architecture {path} holds: no config.json with a model entry next "
            "to it; pass the model name (lowbit ptq --model NAME)"
        )
    if input_shape is not None:
        opts.setdefault("input_shape", tuple(input_shape))
    if num_classes is not None:
        opts.setdefault("num_classes", int(num_classes))
    if "input_shape" in opts:
        opts["input_shape"] = tuple(opts["input_shape"])
    net = models.create(name, **opts)
    state = load_checkpoint(path)
    sd = state.get("model", state) if isinstance(state.get("model"), dict) else state
    net.load_state_dict(sd)
    net.eval()
    return net, {
        "model": {"name": name, "options": opts},
        "dataset": _data_table(config).get("name"),
        "data": _data_table(config),
        "checkpoint": str(path),
    }


def _data_table(config: dict[str, Any]) -> dict[str, Any]:
    # `lowbit train` stores the spec's ``data`` table (name, split, preprocess, ...); older or
    # hand-written configs may only name a ``dataset``.
    table = config.get("data")
    if isinstance(table, dict) and table.get("name"):
        return dict(table)
    ds = config.get("dataset")
    if isinstance(ds, dict) and ds.get("name"):
        return {"name": ds["name"]}
    return {"name": ds} if isinstance(ds, str) else {}


def float_run_info(source: str | Path) -> dict[str, Any]:
    """What :func:`load_float_model` would load: ``checkpoint`` path, ``model`` name and options,
    and the run's ``data`` table (``{}`` when the checkpoint has no ``config.json``)."""
    path, config = _resolve_checkpoint(Path(source))
    name, opts = _model_spec(config)
    return {
        "checkpoint": str(path),
        "model": {"name": name, "options": opts},
        "data": _data_table(config),
    }


def load_data(table: dict[str, Any], data_dir: str | Path | None = None) -> Any:
    """The ``lowbit.data`` splits a run's ``data`` table names (same split and preprocessing as
    training, augmentation off)."""
    from lowbit import data as data_mod

    t = dict(table)
    name = t.pop("name")
    kw = {k: t.pop(k) for k in ("split", "preprocess") if k in t}
    t.pop("augment", None)
    t.pop("data_dir", None)
    return data_mod.load(name, data_dir=data_dir, **kw, **t)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    return str(value)


def save_quantized(model: nn.Module, path: str | Path, info: dict[str, Any]) -> Path:
    """Write an FGQ model as a checkpoint (atomic; loads with ``weights_only=True``): the model
    spec (``info["model"]``), the PTQ options, the state dict (latent weights after BN folding,
    calibrated exponents) and the report. :func:`load_quantized` rebuilds it."""
    import io

    from lowbit.train.checkpoint import atomic_write_bytes

    ptq_info = model.__dict__.get("_lowbit_ptq", {})
    payload = {
        "format": PTQ_FORMAT,
        "model_spec": _plain(info.get("model", {})),
        "ptq": _plain(ptq_info.get("options", {})),
        "folded_bn": _plain(ptq_info.get("folded_bn", [])),
        "extra": _plain({k: v for k, v in info.items() if k != "model"}),
        "report": [_plain(r.as_dict()) for r in report(model)],
        "state_dict": model.state_dict(),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def is_quantized_file(path: str | Path) -> bool:
    """Whether ``path`` is a file written by :func:`save_quantized` (``lowbit ptq`` output)."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".pt":
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - not a loadable torch file: not ours
        return False
    return isinstance(state, dict) and state.get("format") == PTQ_FORMAT


def load_quantized(path: str | Path) -> nn.Module:
    """Rebuild a model written by :func:`save_quantized` (float architecture -> BN fold -> the
    same FGQ quantization -> saved weights and exponents), in eval mode."""
    from lowbit import models
    from lowbit.convert import quantize

    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != PTQ_FORMAT:
        raise ValueError(f"{path} is not a lowbit PTQ checkpoint ({PTQ_FORMAT})")
    spec = state["model_spec"]
    opts = dict(spec.get("options", {}))
    if "input_shape" in opts:
        opts["input_shape"] = tuple(opts["input_shape"])
    net = models.create(spec["name"], **opts).eval()
    p = state["ptq"]
    if p.get("fold_bn", True):
        fold_batchnorm(net)
    keep = p.get("keep")
    quantize(
        net,
        "fgq",
        keep=tuple(keep) if isinstance(keep, list) else keep,
        include=p.get("include"),
        exclude=p.get("exclude"),
        overrides=p.get("overrides"),
        group_size=p["group_size"],
        group_axis=p.get("group_axis", "in"),
        weight_bits=p["weight_bits"],
        rule=p.get("rule"),
        scale_bits=p.get("scale_bits"),
        act_bits=p["act_bits"],
        act_mode=p.get("act_mode", "calibrated"),
        act_calibration=p.get("act_calibration", "max"),
        percentile=p.get("percentile", 99.99),
        act_signed=p.get("act_signed", "auto"),
    )
    net.load_state_dict(state["state_dict"])
    net.eval()
    net.__dict__["_lowbit_ptq"] = {"method": "fgq", "options": p, "folded_bn": state["folded_bn"]}
    return net
