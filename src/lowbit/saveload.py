"""``.lowbit`` files: :func:`save` / :func:`load` for quantized (``Quant*``) and packed models.

A ``.lowbit`` file is a standard safetensors file (docs/format.md has it byte by byte): an 8-byte
little-endian header length, a JSON header naming every tensor with its dtype, shape and byte
range, then the raw tensor bytes. lowbit's JSON manifest (format version, architecture, one spec
per quantized / packed layer, SHA-256 of every tensor) sits in the header's ``__metadata__``
under ``"lowbit.manifest"``, with its own SHA-256 under ``"lowbit.manifest.sha256"``. Nothing is
ever unpickled: loading reads JSON and raw little-endian numbers only.

What is stored:

* packed layers (:class:`~lowbit.pack.PackedLinear`, :class:`~lowbit.pack.PackedConv2d`,
  :class:`~lowbit.pack.PackedLSTM`): their config and kernel-ready buffers (the tiles of
  docs/format.md; an LSTM's matrices as PackedLinear buffers, one scale per gate block where
  that is all the block has);
* XNOR-packed layers (:func:`lowbit.binary.pack_bnn`: ``PackedBinaryLinear``,
  ``PackedBinaryConv2d``, ``PackedBitplaneLinear``, ``BinaryMaxPool2d``; ``FlattenBits`` is a
  plain module): the interleaved sign bits the kernels read and the epilogue vectors (thresholds
  or scale / bias); derived sums are recomputed from the bits, and padding bits, padding rows and
  flips are checked on load (docs/format.md "XNOR-packed binary layers");
* quantized layers (``QuantLinear``, ``QuantConv2d``, and ``QuantLSTM`` gate block by gate
  block): the exported :class:`~lowbit.qtypes.QuantizedWeight` — codes packed 2 bits (binary,
  ternary) or 4 bits (k-bit up to 4 / log up to 3 bits) per weight in the kernel tiles, else
  int8 — its scales, the bias and the input quantizer's :class:`~lowbit.qtypes.ActSpec`. They load as ``Quant*`` layers
  whose weight quantizer replays the stored codes (:class:`StoredWeight`): the forward pass is
  bit-identical, ``lowbit.pack`` works on them, but the latent float weights of training are not
  kept (that is what makes the file 16x smaller; keep the training checkpoint to train on);
* every other parameter and buffer (BatchNorm, float layers) as float tensors.

Architecture: ``{"kind": "registry", "name", "options"}`` (``lowbit.models.create``; pass
``architecture=`` to :func:`save` or set ``model.lowbit_architecture``), ``{"kind": "modules"}``
(an ``nn.Sequential`` tree of standard layers, rebuilt from the manifest) or ``{"kind":
"skeleton", "class"}``: any other module loads into a skeleton the caller builds,
``lowbit.load(path, model=MyNet())``. Leaf modules that differ from a fresh skeleton (BatchNorm
folded into ``Identity`` by FGQ) are recorded and replaced on load.

Loading validates everything before it touches the target: header bounds, dtypes, shapes, byte
ranges that tile the data exactly, file size, format version, the manifest's checksum, every
tensor's SHA-256 and that every tensor has exactly the shape the rebuilt layer needs. Any failure
raises :class:`LowbitFileError` naming the file and the problem; the model passed in is unchanged.
:func:`save` writes a temporary file, fsyncs and renames, so a failed save never clobbers an
existing file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import mmap
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit import functional as F
from lowbit import kernels
from lowbit.binary import (
    OUT_KINDS,
    BinaryMaxPool2d,
    FlattenBits,
    PackedBinaryConv2d,
    PackedBinaryLinear,
    PackedBitplaneLinear,
    deinterleave_weights,
    packed_bytes,
)
from lowbit.nn import (
    QuantConv2d,
    QuantLinear,
    QuantLSTM,
    QuantModule,
    WeightQuantizer,
    make_act_quantizer,
)
from lowbit.pack import (
    LSTM_GATES,
    PackedConv2d,
    PackedLinear,
    PackedLSTM,
    file_tensors,
    lstm_matrix_keys,
)
from lowbit.qtypes import ActSpec, Granularity, QuantizedWeight, code_range

__all__ = ["FORMAT", "VERSION", "LowbitFileError", "StoredWeight", "load", "read_manifest", "save"]

FORMAT = "lowbit"
# 2: packed layers may use layout 2 (scales at their real granularity, 1-bit binary weights) and
# XNOR-packed modules; files of version 1 still load. A version-1 reader refuses version 2 files
# with "upgrade lowbit" instead of failing on an unknown tensor.
VERSION = 2
MAX_HEADER_BYTES = 64 << 20  # a header this large is corrupt, not a model
MANIFEST_KEY = "lowbit.manifest"
MANIFEST_SHA_KEY = "lowbit.manifest.sha256"

_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


class LowbitFileError(ValueError):
    """A ``.lowbit`` file is corrupt, truncated, from a newer format, or does not fit the model."""


# ----------------------------------------------------------------------------------------------
# Quantized layers rebuilt from stored codes


class StoredWeight(WeightQuantizer):
    """A weight quantizer that replays stored codes and scales (a loaded ``Quant*`` layer).

    ``quantize`` ignores the latent weight and returns the stored ``(codes, scales)``, so the
    forward weight is ``functional.dequantize`` of exactly what was saved — bit-identical to the
    original layer's — and ``export()`` returns the stored :class:`QuantizedWeight`.
    """

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, qw: QuantizedWeight) -> None:
        self.format = qw.format  # instance attribute: one class serves every format
        super().__init__(
            bits=qw.bits,
            granularity=qw.granularity,
            group_size=qw.group_size,
            group_axis=qw.group_axis,
        )
        self.register_buffer("codes", qw.codes)
        self.register_buffer("scales", qw.scales)

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes, self.scales

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.format == "float":
            return self.scales.to(w.dtype)
        if w.requires_grad and torch.is_grad_enabled():
            return super().forward(w)  # straight through to a latent someone chose to train
        # Frozen (a loaded or kept-by-pack layer): the stored weight, nothing recorded or traced.
        return F.dequantize(
            self.codes, self.scales, self.format, self.bits, self.granularity, w.shape
        ).to(w.dtype)

    def export(self, w: torch.Tensor | None = None) -> QuantizedWeight:
        if self.format == "float":
            return QuantizedWeight(
                torch.empty(0, dtype=torch.int8),
                self.scales,
                "float",
                32,
                shape=tuple(self.scales.shape),
            )
        return QuantizedWeight(
            self.codes,
            self.scales,
            self.format,
            self.bits,
            self.granularity.kind,
            self.granularity.group_size,
            self.granularity.axis,
            tuple(self.codes.shape),
        )


def _codes_layout(qw: QuantizedWeight) -> str:
    if qw.format == "float":
        return "none"
    if qw.format in ("binary", "ternary", "ternary_asym"):
        return "t2r16"
    if (qw.format == "kbit_linear" and qw.bits <= 4) or (qw.format == "kbit_log" and qw.bits <= 3):
        return "q4r16"
    return "int8"


def _rows(shape: list[int]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:]) if len(shape) > 1 else 1


def _act_spec_dict(layer: nn.Module, path: str) -> dict[str, Any] | None:
    iq = getattr(layer, "input_quantizer", None)
    if iq is None:
        return None
    spec_fn = getattr(iq, "spec", None)
    if not callable(spec_fn):
        raise ValueError(
            f"cannot save layer {path!r}: its input quantizer {type(iq).__name__} does not describe "
            "itself as an ActSpec (spec())"
        )
    if getattr(iq, "signed", True) is None:
        raise ValueError(
            f"cannot save layer {path!r}: its DFP input signedness is undecided ('auto' before any "
            "batch); calibrate or run one forward pass first"
        )
    s: ActSpec = spec_fn()
    return {
        "kind": s.kind,
        "bits": int(s.bits),
        "signed": bool(s.signed),
        "exponent": s.exponent,
        "scale": s.scale,
        "clip": s.clip,
    }


def _encode_weight(qw: QuantizedWeight) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(weight description, {"codes", "scales"})`` of one QuantizedWeight (docs/format.md)."""
    layout = _codes_layout(qw)
    tensors: dict[str, torch.Tensor] = {"scales": qw.scales.detach().to(torch.float32)}
    if layout != "none":
        n, k = _rows(list(qw.shape))
        codes = qw.codes.reshape(n, k)
        if layout == "t2r16":
            tensors["codes"] = kernels.pack_ternary(codes)
        elif layout == "q4r16":
            tensors["codes"] = kernels.pack_int4(codes)
        else:
            tensors["codes"] = qw.codes
    return {**qw.metadata(), "codes_layout": layout}, tensors


def _quant_layer_spec(
    layer: nn.Module, path: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    weight, tensors = _encode_weight(layer.quantized_weight())  # type: ignore[operator]
    if isinstance(layer.bias, torch.Tensor):
        tensors["bias"] = layer.bias.detach().to(torch.float32)
    if isinstance(layer, QuantConv2d):
        module: dict[str, Any] = {
            "type": "QuantConv2d",
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": list(layer.kernel_size),
            "stride": list(layer.stride),
            "padding": layer.padding if isinstance(layer.padding, str) else list(layer.padding),
            "dilation": list(layer.dilation),
            "groups": layer.groups,
            "padding_mode": layer.padding_mode,
        }
    else:
        module = {
            "type": "QuantLinear",
            "in_features": layer.in_features,
            "out_features": layer.out_features,
        }
    module["bias"] = "bias" in tensors
    spec = {**module, "weight": weight, "input": _act_spec_dict(layer, path)}
    return spec, tensors


def _quant_lstm_spec(layer: QuantLSTM, path: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A QuantLSTM: every gate block's codes and scales (``weight_ih_l0.i.codes``, ...) and the
    biases ``bias_ih_l0`` / ``bias_hh_l0`` (F32 ``(4H,)``) as nn.LSTM names them."""
    tensors: dict[str, torch.Tensor] = {}
    weights: dict[str, Any] = {}
    for name, qw in layer.quantized_weights().items():
        weights[name], own = _encode_weight(qw)
        tensors.update({f"{name}.{k}": t for k, t in own.items()})
    if layer.bias:
        for key in layer.matrix_keys():
            tensors[f"bias_{key}"] = getattr(layer, f"bias_{key}").detach().to(torch.float32)
    spec = {
        "type": "QuantLSTM",
        "input_size": layer.input_size,
        "hidden_size": layer.hidden_size,
        "num_layers": layer.num_layers,
        "bias": bool(layer.bias),
        "batch_first": bool(layer.batch_first),
        "dropout": float(layer.dropout),
        "bidirectional": bool(layer.bidirectional),
        "weights": weights,
        "input": _act_spec_dict(layer, path),
    }
    return spec, tensors


def _lstm_float_bytes(lstm: nn.LSTM) -> int:
    """fp32 bytes of an LSTM's weight matrices and biases."""
    return sum(4 * p.numel() for _, p in lstm.named_parameters())


def _expect_int(v: Any, what: str, lo: int = 0, hi: int = 1 << 40) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise LowbitFileError(f"{what} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _weight_expected(
    w: Any, dims: tuple[int, ...], where: str
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype/shape of ``codes`` and ``scales`` of one weight description, which must describe a
    weight of shape ``dims`` (validated on the way)."""
    if not isinstance(w, dict):
        raise LowbitFileError(f"{where}: no weight description")
    shape = w.get("shape")
    if not isinstance(shape, list) or not shape:
        raise LowbitFileError(f"{where}: weight shape must be a non-empty list")
    shape_t = tuple(_expect_int(d, f"{where}: weight shape entry", 0, 1 << 31) for d in shape)
    fmt, bits = w.get("format"), w.get("bits")
    try:
        code_range(str(fmt), _expect_int(bits, f"{where}: bits", 1, 32))
        gran = Granularity(str(w.get("granularity")), w.get("group_size"), w.get("group_axis"))
    except (ValueError, TypeError) as exc:
        raise LowbitFileError(f"{where}: bad weight description: {exc}") from None
    if shape_t != dims:
        raise LowbitFileError(f"{where}: weight shape {shape_t} does not match the layer {dims}")
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    scale_shape = gran.scale_shape(shape_t) if fmt != "float" else shape_t
    if fmt == "ternary_asym":
        scale_shape = (*scale_shape, 2)
    out["scales"] = (torch.float32, tuple(scale_shape))
    layout = w.get("codes_layout")
    n, k = _rows(list(shape_t))
    expected_layout = _codes_layout(_FakeQW(str(fmt), int(bits)))  # type: ignore[arg-type]
    if layout != expected_layout:
        raise LowbitFileError(f"{where}: codes_layout {layout!r} should be {expected_layout!r}")
    if layout == "t2r16":
        out["codes"] = (torch.uint8, kernels.ternary_tiles_shape(n, k))
    elif layout == "q4r16":
        out["codes"] = (torch.uint8, kernels.int4_tiles_shape(n, k))
    elif layout == "int8":
        out["codes"] = (torch.int8, shape_t)
    return out


def _quant_expected(
    spec: dict[str, Any], where: str
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype/shape of every tensor a Quant layer spec needs (validates the spec on the way)."""
    if spec["type"] == "QuantLSTM":
        return _quant_lstm_expected(spec, where)
    dims: tuple[int, ...]
    if spec["type"] == "QuantLinear":
        dims = (
            _expect_int(spec.get("out_features"), f"{where}: out_features"),
            _expect_int(spec.get("in_features"), f"{where}: in_features"),
        )
        n_out = dims[0]
    else:
        ks = spec.get("kernel_size")
        groups = _expect_int(spec.get("groups"), f"{where}: groups", 1, 1 << 20)
        if not isinstance(ks, list) or len(ks) != 2:
            raise LowbitFileError(f"{where}: kernel_size must be two ints")
        n_out = _expect_int(spec.get("out_channels"), f"{where}: out_channels")
        cin = _expect_int(spec.get("in_channels"), f"{where}: in_channels")
        dims = (n_out, cin // groups, _expect_int(ks[0], "kh"), _expect_int(ks[1], "kw"))
    out = _weight_expected(spec.get("weight"), dims, where)
    if not isinstance(spec.get("bias"), bool):
        raise LowbitFileError(f"{where}: bias must be true or false")
    if spec["bias"]:
        out["bias"] = (torch.float32, (n_out,))
    return out


class _FakeQW:
    """Just enough of a QuantizedWeight for :func:`_codes_layout` (no tensors allocated)."""

    def __init__(self, fmt: str, bits: int) -> None:
        self.format, self.bits = fmt, bits


def _decode_weight(
    w: dict[str, Any], tensors: dict[str, torch.Tensor], where: str, prefix: str = ""
) -> QuantizedWeight:
    """The QuantizedWeight of a validated weight description and its ``{prefix}codes`` /
    ``{prefix}scales`` tensors (codes checked against the format's range)."""
    shape = tuple(w["shape"])
    fmt, bits = w["format"], int(w["bits"])
    layout = w["codes_layout"]
    n, k = _rows(list(shape))
    if layout == "none":
        codes = torch.empty(0, dtype=torch.int8)
    elif layout == "t2r16":
        codes = kernels.unpack_ternary(tensors[prefix + "codes"], n, k).reshape(shape)
    elif layout == "q4r16":
        codes = kernels.unpack_int4(tensors[prefix + "codes"], n, k).reshape(shape)
    else:
        codes = tensors[prefix + "codes"]
    if layout != "none":
        lo, hi = code_range(fmt, bits)
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi):
            raise LowbitFileError(f"{where}: codes outside [{lo}, {hi}] for {fmt} weights")
        if fmt == "binary" and bool((codes == 0).any()):
            raise LowbitFileError(f"{where}: binary codes must be -1 or +1")
    return QuantizedWeight(
        codes,
        tensors[prefix + "scales"],
        fmt,
        bits,
        w["granularity"],
        w.get("group_size"),
        w.get("group_axis"),
        shape,
    )


def _stored_latent(qw: QuantizedWeight) -> torch.Tensor:
    """The latent weight of a replay layer: the stored quantized weight itself."""
    return qw.dequantize() if qw.format != "float" else qw.scales.clone()


def _input_quantizer(spec: dict[str, Any], where: str) -> nn.Module | None:
    if spec.get("input") is None:
        return None
    try:
        return make_act_quantizer(ActSpec(**spec["input"]))
    except (TypeError, ValueError) as exc:
        raise LowbitFileError(f"{where}: bad input spec: {exc}") from None


def freeze_quantizers(layer: nn.Module) -> None:
    """Swap a ``QuantLinear`` / ``QuantConv2d`` / ``QuantLSTM``'s weight quantizer(s) for
    :class:`StoredWeight` replays of what they give now: what a ``.lowbit`` file reloads, and what
    ``lowbit.pack`` leaves in the layers it cannot pack (no solver or data-dependent scale runs
    per forward, so the inference copy exports and runs faster; outputs are unchanged)."""
    with torch.no_grad():
        qws = {
            k: dataclasses.replace(
                qw, codes=qw.codes.detach().clone(), scales=qw.scales.detach().clone()
            )
            for k, qw in layer.quantized_weights().items()  # type: ignore[operator]
        }
    if isinstance(layer, QuantLSTM):
        layer.weight_quantizer = nn.ModuleDict(
            {
                key: nn.ModuleList(StoredWeight(qws[f"weight_{key}.{g}"]) for g in LSTM_GATES)
                for key in layer.matrix_keys()
            }
        )
    else:
        layer.weight_quantizer = StoredWeight(qws["weight"])


def _build_quant(spec: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    if spec["type"] == "QuantLSTM":
        return _build_quant_lstm(spec, tensors, where)
    qw = _decode_weight(spec["weight"], tensors, where)
    iq = _input_quantizer(spec, where)
    wq = StoredWeight(qw)
    layer: nn.Module
    if spec["type"] == "QuantLinear":
        layer = QuantLinear(
            spec["in_features"], spec["out_features"], spec["bias"], wq, iq, device="meta"
        )
    else:
        padding = spec.get("padding")
        layer = QuantConv2d(
            spec["in_channels"],
            spec["out_channels"],
            tuple(spec["kernel_size"]),
            stride=tuple(spec.get("stride", (1, 1))),
            padding=padding if isinstance(padding, str) else tuple(padding or (0, 0)),
            dilation=tuple(spec.get("dilation", (1, 1))),
            groups=spec["groups"],
            bias=spec["bias"],
            padding_mode=spec.get("padding_mode", "zeros"),
            weight_quantizer=wq,
            input_quantizer=iq,
            device="meta",
        )
    # The latent weight is the stored quantized weight itself (there is nothing else to keep).
    layer.weight = nn.Parameter(_stored_latent(qw))
    if spec["bias"]:
        layer.bias = nn.Parameter(tensors["bias"])
    return layer.eval()


_LSTM_KEYS = {
    "type",
    "input_size",
    "hidden_size",
    "num_layers",
    "bias",
    "batch_first",
    "dropout",
    "bidirectional",
    "weights",
    "input",
}


def _quant_lstm_expected(
    spec: dict[str, Any], where: str
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype/shape of every tensor of a QuantLSTM spec (validated on the way, nothing allocated)."""
    _check_keys(spec, _LSTM_KEYS, where)
    n_in = _expect_int(spec["input_size"], f"{where}: input_size", 1, 1 << 24)
    h = _expect_int(spec["hidden_size"], f"{where}: hidden_size", 1, 1 << 24)
    layers = _expect_int(spec["num_layers"], f"{where}: num_layers", 1, 1 << 10)
    for flag in ("bias", "batch_first", "bidirectional"):
        if not isinstance(spec[flag], bool):
            raise LowbitFileError(f"{where}: {flag} must be true or false")
    p = spec["dropout"]
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 <= p <= 1:
        raise LowbitFileError(f"{where}: dropout must be a number in [0, 1], got {p!r}")
    keys = lstm_matrix_keys(layers, spec["bidirectional"])
    want = {f"weight_{key}.{g}" for key in keys for g in LSTM_GATES}
    weights = spec["weights"]
    if not isinstance(weights, dict) or set(weights) != want:
        got = set(weights) if isinstance(weights, dict) else set()
        raise LowbitFileError(
            f"{where}: weights must describe exactly the {len(want)} gate blocks of the LSTM; "
            f"missing {sorted(want - got)}, unknown {sorted(got - want)}"
        )
    dirs = 2 if spec["bidirectional"] else 1
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for key in keys:
        layer = int(key[4:].split("_")[0])
        k = (n_in if layer == 0 else dirs * h) if key.startswith("ih") else h
        for g in LSTM_GATES:
            name = f"weight_{key}.{g}"
            exp = _weight_expected(weights[name], (h, k), f"{where}: {name}")
            out.update({f"{name}.{t}": v for t, v in exp.items()})
        if spec["bias"]:
            out[f"bias_{key}"] = (torch.float32, (4 * h,))
    return out


def _build_quant_lstm(
    spec: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
) -> nn.Module:
    """A QuantLSTM whose 8 gate quantizers per layer / direction replay the stored codes."""
    keys = lstm_matrix_keys(spec["num_layers"], spec["bidirectional"])
    qws = {
        f"{key}.{g}": _decode_weight(
            spec["weights"][f"weight_{key}.{g}"],
            tensors,
            f"{where}: weight_{key}.{g}",
            f"weight_{key}.{g}.",
        )
        for key in keys
        for g in LSTM_GATES
    }
    wq = nn.ModuleDict(
        {key: nn.ModuleList(StoredWeight(qws[f"{key}.{g}"]) for g in LSTM_GATES) for key in keys}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nn.LSTM warns about dropout with one layer
        layer = QuantLSTM(
            spec["input_size"],
            spec["hidden_size"],
            spec["num_layers"],
            bias=spec["bias"],
            batch_first=spec["batch_first"],
            dropout=float(spec["dropout"]),
            bidirectional=spec["bidirectional"],
            weight_quantizer=wq,
            input_quantizer=_input_quantizer(spec, where),
            device="meta",
        )
    for key in keys:
        w = torch.cat([_stored_latent(qws[f"{key}.{g}"]) for g in LSTM_GATES])
        setattr(layer, f"weight_{key}", nn.Parameter(w))
        if spec["bias"]:
            setattr(layer, f"bias_{key}", nn.Parameter(tensors[f"bias_{key}"]))
    return layer.eval()


# ----------------------------------------------------------------------------------------------
# XNOR-packed layers (lowbit.binary): kernel-ready bits, validated against their config

_BINARY_EPILOGUE = ("scale", "bias", "thr", "flip")


def _binary_layer_spec(layer: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor], int]:
    """(spec, tensors, float32 bytes of the float layer it replaces) of a binary packed layer."""
    if isinstance(layer, BinaryMaxPool2d):
        config = {
            "kernel_size": list(layer.kernel_size),
            "stride": list(layer.stride),
            "padding": list(layer.padding),
            "channel_bytes": int(layer.or_mask.numel()),
        }
        return {"type": "BinaryMaxPool2d", "config": config}, {"or_mask": layer.or_mask}, 0
    if isinstance(layer, PackedBitplaneLinear):  # w_sum is derived from w_bits on load
        own = {"w_bits": layer.w_bits, "scale": layer.scale}
        if layer.bias is not None:
            own["bias"] = layer.bias
        fb = 4 * layer.in_features * layer.out_features + (
            0 if layer.bias is None else 4 * layer.out_features
        )
        return {"type": "PackedBitplaneLinear", "config": layer.config()}, own, fb
    assert isinstance(layer, (PackedBinaryLinear, PackedBinaryConv2d))
    own = {"w_bits": layer.w_bits}
    for name in _BINARY_EPILOGUE:
        t = getattr(layer, name)
        if t is not None:
            own[name] = t
    if isinstance(layer, PackedBinaryLinear):
        weights = layer.in_features * layer.out_features
    else:  # tap_sums is derived from w_bits on load, not stored
        weights = layer.out_channels * layer._reduction()
    float_bytes = 4 * weights + (4 * layer.n_out if layer.bias is not None else 0)
    return {"type": type(layer).__name__, "config": layer.config()}, own, float_bytes


def _pair_of(v: Any, what: str, lo: int) -> tuple[int, int]:
    if not isinstance(v, list) or len(v) != 2:
        raise LowbitFileError(f"{what} must be a pair of ints, got {v!r}")
    a, b = (_expect_int(x, what, lo, 1 << 16) for x in v)
    return a, b


def _check_keys(config: Any, keys: set[str], where: str) -> dict[str, Any]:
    if not isinstance(config, dict) or set(config) != keys:
        got = sorted(config) if isinstance(config, dict) else config
        raise LowbitFileError(
            f"{where}: config must have exactly the keys {sorted(keys)}, got {got}"
        )
    return config


def _binary_geometry(kind: str, config: Any, where: str) -> tuple[int, int, int, int]:
    """Validates a binary layer's config; ``(N, K, groups, group_bits)``: every packed weight row
    is ``groups`` chunks of ``packed_bytes(group_bits)`` bytes with ``group_bits`` valid bits."""
    common = {"input", "out", "has_scale", "has_bias", "has_threshold"}
    if kind == "PackedBitplaneLinear":
        keys = {"in_features", "out_features", "act_bits", "act_signed", "act_clip", "has_bias"}
        c = _check_keys(config, keys, where)
        k = _expect_int(c["in_features"], f"{where}: in_features", 1, 1 << 31)
        n = _expect_int(c["out_features"], f"{where}: out_features", 1, 1 << 31)
        _expect_int(c["act_bits"], f"{where}: act_bits", 1, 8)
        clip = c["act_clip"]
        if not isinstance(clip, (int, float)) or isinstance(clip, bool) or not 0 < clip < math.inf:
            raise LowbitFileError(f"{where}: act_clip must be a positive number, got {clip!r}")
        for flag in ("act_signed", "has_bias"):
            if not isinstance(c[flag], bool):
                raise LowbitFileError(f"{where}: {flag} must be true or false")
        return n, k, 1, k
    if kind == "PackedBinaryLinear":
        c = _check_keys(config, common | {"in_features", "out_features", "input_layout"}, where)
        k = _expect_int(c["in_features"], f"{where}: in_features", 1, 1 << 31)
        n = _expect_int(c["out_features"], f"{where}: out_features", 1, 1 << 31)
        layout = c["input_layout"]
        if layout is None:
            groups, bits = 1, k
        else:
            if not isinstance(layout, list) or len(layout) != 3:
                raise LowbitFileError(f"{where}: input_layout must be null or [H, W, C]")
            h, w, ch = (_expect_int(v, f"{where}: input_layout", 1, 1 << 31) for v in layout)
            if h * w * ch != k or c["input"] != "bits":
                raise LowbitFileError(
                    f"{where}: input_layout {layout} needs packed inputs of in_features={k} values"
                )
            groups, bits = h * w, ch
    elif kind == "PackedBinaryConv2d":
        keys = common | {
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
        }
        c = _check_keys(config, keys, where)
        ch = _expect_int(c["in_channels"], f"{where}: in_channels", 1, 1 << 24)
        n = _expect_int(c["out_channels"], f"{where}: out_channels", 1, 1 << 24)
        kh, kw = _pair_of(c["kernel_size"], f"{where}: kernel_size", 1)
        _pair_of(c["stride"], f"{where}: stride", 1)
        _pair_of(c["padding"], f"{where}: padding", 0)
        _pair_of(c["dilation"], f"{where}: dilation", 1)
        k, groups, bits = ch * kh * kw, kh * kw, ch
    else:
        raise LowbitFileError(f"{where}: unknown binary layer type {kind!r}")
    if c["input"] not in ("float", "bits"):
        raise LowbitFileError(f"{where}: input must be 'float' or 'bits', got {c['input']!r}")
    if c["out"] not in OUT_KINDS:
        raise LowbitFileError(f"{where}: out must be one of {OUT_KINDS}, got {c['out']!r}")
    for flag in ("has_scale", "has_bias", "has_threshold"):
        if not isinstance(c[flag], bool):
            raise LowbitFileError(f"{where}: {flag} must be true or false")
    if c["out"] == "bits" and not c["has_threshold"]:
        raise LowbitFileError(f"{where}: bit outputs need a threshold (has_threshold)")
    return n, k, groups, bits


def _binary_expected(
    kind: str, config: Any, where: str
) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype/shape of every tensor of a binary layer (docs/format.md "Binary layers")."""
    if kind == "BinaryMaxPool2d":
        c = _check_keys(config, {"kernel_size", "stride", "padding", "channel_bytes"}, where)
        _pair_of(c["kernel_size"], f"{where}: kernel_size", 1)
        _pair_of(c["stride"], f"{where}: stride", 1)
        _pair_of(c["padding"], f"{where}: padding", 0)
        cb = _expect_int(c["channel_bytes"], f"{where}: channel_bytes", 8, 1 << 24)
        if cb % 8:
            raise LowbitFileError(f"{where}: channel_bytes must be whole 64-bit words, got {cb}")
        return {"or_mask": (torch.uint8, (cb,))}
    n, _, groups, bits = _binary_geometry(kind, config, where)
    row_bytes = groups * packed_bytes(bits)
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "w_bits": (torch.uint8, ((n + 7) // 8, 8 * row_bytes))
    }
    if kind == "PackedBitplaneLinear":
        out["scale"] = (torch.float32, (n,))
        if config["has_bias"]:
            out["bias"] = (torch.float32, (n,))
        return out
    if config["has_scale"]:
        out["scale"] = (torch.float32, (n,))
    if config["has_bias"]:
        out["bias"] = (torch.float32, (n,))
    if config["has_threshold"]:
        out["thr"] = (torch.int32, (n,))
        out["flip"] = (torch.uint8, (n,))
    return out


def _build_binary(spec: dict[str, Any], tensors: dict[str, torch.Tensor], where: str) -> nn.Module:
    """A binary layer from validated shapes, after checking the bits themselves: padding rows
    and padding bits must be 0 (the kernels rely on it: padding cancels in ``a ^ w``), flips
    0 or 1."""
    kind, config = spec["type"], spec["config"]
    if kind == "BinaryMaxPool2d":
        return BinaryMaxPool2d(
            tuple(config["kernel_size"]),
            tuple(config["stride"]),
            tuple(config["padding"]),
            or_mask=tensors["or_mask"],
        ).eval()
    n, _, groups, bits = _binary_geometry(kind, config, where)
    w_bits = tensors["w_bits"]
    blocks = w_bits.shape[0]
    interleaved = w_bits.numpy().view("<u8").reshape(blocks, -1, 8)  # (block, word, row)
    if interleaved[-1, :, n - 8 * (blocks - 1) :].any():
        raise LowbitFileError(f"{where}: padding rows of w_bits must be 0")
    rows = deinterleave_weights(w_bits, n).numpy().reshape(n, groups, -1)
    valid = np.zeros(rows.shape[-1] * 8, dtype=np.uint8)
    valid[:bits] = 1
    pad_mask = ~np.packbits(valid, bitorder="little")
    if (rows & pad_mask).any():
        raise LowbitFileError(f"{where}: padding bits of w_bits must be 0")
    if "flip" in tensors and int(tensors["flip"].max()) > 1:
        raise LowbitFileError(f"{where}: flip must hold 0 or 1")
    if kind == "PackedBitplaneLinear":
        return PackedBitplaneLinear.from_packed(config, tensors).eval()
    cls = PackedBinaryLinear if kind == "PackedBinaryLinear" else PackedBinaryConv2d
    return cls.from_packed(config, tensors).eval()


# ----------------------------------------------------------------------------------------------
# Plain modules: a whitelist rebuilt from their constructor arguments

_PLAIN: dict[str, tuple[type[nn.Module], tuple[str, ...]]] = {
    "Linear": (nn.Linear, ("in_features", "out_features", "bias")),
    "Conv2d": (
        nn.Conv2d,
        (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "bias",
            "padding_mode",
        ),
    ),
    "BatchNorm1d": (
        nn.BatchNorm1d,
        ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    ),
    "BatchNorm2d": (
        nn.BatchNorm2d,
        ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    ),
    "ReLU": (nn.ReLU, ()),
    "ReLU6": (nn.ReLU6, ()),
    "Tanh": (nn.Tanh, ()),
    "Sigmoid": (nn.Sigmoid, ()),
    "GELU": (nn.GELU, ("approximate",)),
    "LeakyReLU": (nn.LeakyReLU, ("negative_slope",)),
    "Hardtanh": (nn.Hardtanh, ("min_val", "max_val")),
    "Identity": (nn.Identity, ()),
    "Flatten": (nn.Flatten, ("start_dim", "end_dim")),
    "Dropout": (nn.Dropout, ("p",)),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation", "ceil_mode")),
    "AvgPool2d": (
        nn.AvgPool2d,
        ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad"),
    ),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",)),
    "Softmax": (nn.Softmax, ("dim",)),
    "LogSoftmax": (nn.LogSoftmax, ("dim",)),
    "FlattenBits": (FlattenBits, ()),
}


def _plain_encoding(m: nn.Module) -> dict[str, Any] | None:
    name = type(m).__name__
    entry = _PLAIN.get(name)
    if entry is None or type(m) is not entry[0]:
        return None
    args: dict[str, Any] = {}
    for a in entry[1]:
        v = getattr(m, a)
        if a == "bias":
            v = v is not None
        args[a] = list(v) if isinstance(v, tuple) else v
    return {"type": name, "args": args}


def _plain_build(enc: dict[str, Any], where: str) -> nn.Module:
    if (
        not isinstance(enc, dict)
        or enc.get("type") not in _PLAIN
        or not isinstance(enc.get("args"), dict)
    ):
        raise LowbitFileError(f"{where}: unknown module {enc!r}")
    cls, names = _PLAIN[enc["type"]]
    args = enc["args"]
    if set(args) != set(names):
        raise LowbitFileError(
            f"{where}: {enc['type']} needs arguments {sorted(names)}, got {sorted(args)}"
        )
    for key in ("in_features", "out_features", "in_channels", "out_channels", "num_features"):
        if key in args:
            _expect_int(args[key], f"{where}: {key}", 0, 1 << 24)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        # On the meta device: nothing is allocated until the file's tensors are known to fit.
        with torch.device("meta"):
            m = cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise LowbitFileError(f"{where}: cannot build {enc['type']}({args}): {exc}") from None
    return m


class _LayerSlot(nn.Module):
    """Where a quantized / packed layer goes in a tree rebuilt from the manifest."""


_BINARY = (PackedBinaryLinear, PackedBinaryConv2d, BinaryMaxPool2d, PackedBitplaneLinear)
_BINARY_KINDS = tuple(cls.__name__ for cls in _BINARY)


def _is_special(m: nn.Module) -> bool:
    return isinstance(m, (QuantModule, PackedLinear, PackedConv2d, PackedLSTM, *_BINARY))


def _tree(m: nn.Module) -> dict[str, Any] | None:
    """The ``nn.Sequential`` tree of ``m`` if every module in it can be rebuilt, else None."""
    if type(m) is nn.Sequential:
        children = []
        for name, child in m.named_children():
            enc = _tree(child)
            if enc is None:
                return None
            children.append([name, enc])
        return {"type": "Sequential", "children": children}
    if _is_special(m):
        return {"type": "layer"}
    return _plain_encoding(m)


def _why_skeleton(m: nn.Module, prefix: str = "") -> str:
    """Why ``m`` cannot be rebuilt from the file alone (the first module that stops it)."""
    if type(m) is not nn.Sequential:
        if not prefix:
            return f"the model is a {type(m).__name__}, not an nn.Sequential or a lowbit model"
        return f"module {prefix[:-1]!r} is a {type(m).__name__}, which a .lowbit file does not describe"
    for name, child in m.named_children():
        if type(child) is nn.Sequential or _tree(child) is None:
            why = _why_skeleton(child, f"{prefix}{name}.")
            if why:
                return why
    return ""


def _tree_build(enc: Any, where: str, depth: int = 0) -> nn.Module:
    if depth > 64:
        raise LowbitFileError(f"{where}: module tree too deep")
    if isinstance(enc, dict) and enc.get("type") == "Sequential":
        seq = nn.Sequential()
        for item in enc.get("children", []):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                raise LowbitFileError(f"{where}: bad Sequential child {item!r}")
            seq.add_module(item[0], _tree_build(item[1], f"{where}.{item[0]}", depth + 1))
        return seq
    if isinstance(enc, dict) and enc.get("type") == "layer":
        return _LayerSlot()  # placeholder: the layer spec at this path replaces it
    return _plain_build(enc, where)


# ----------------------------------------------------------------------------------------------
# save


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(_tensor_bytes(t)).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.numel() == 0:
        return b""
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _walk_special(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []

    def visit(m: nn.Module, prefix: str) -> None:
        if _is_special(m):
            out.append((prefix, m))
            return
        for name, child in m.named_children():
            visit(child, f"{prefix}.{name}" if prefix else name)

    visit(model, "")
    return out


def _check_float32(model: nn.Module) -> None:
    """``.lowbit`` files hold float32 models: quantized layers are rebuilt in float32 and packed
    layers compute in float32, so a float16/bfloat16/float64 tensor would come back as a model
    that does not run (or, cast, silently different)."""
    for name, t in model.state_dict().items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32:
            raise ValueError(
                f"lowbit.save writes float32 models, but {name!r} is {t.dtype}: call "
                "model.float() first (packed layers always compute in float32)"
            )


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    architecture: dict[str, Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``model`` (quantized and/or packed) to a ``.lowbit`` file, atomically.

    ``architecture``: ``{"name": <lowbit.models name>, "options": {...}}`` for registry models
    (defaults to ``model.lowbit_architecture`` when set); ``nn.Sequential`` models need nothing;
    anything else is stored as a skeleton reference (load it with ``model=``). ``metadata``:
    JSON-serialisable extras (dataset, accuracy, ...). Returns a summary: ``bytes`` (file size),
    ``float32_bytes`` (the same model with float32 weights) and ``compression``.
    """
    from safetensors.torch import save as st_save

    if Path(path).is_dir():
        raise IsADirectoryError(
            f"{path} is a directory: give a file path, e.g. {Path(path) / 'model.lowbit'}"
        )
    _check_float32(model)
    layers: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    float_bytes = 0
    layer_bytes = 0  # bytes of the quantized / packed layers' tensors (codes, scales, bias)
    special = _walk_special(model)
    for lpath, layer in special:
        where = lpath or "<root>"
        if isinstance(layer, (PackedLinear, PackedConv2d)):
            spec = {"type": type(layer).__name__, "config": layer.config()}
            own = file_tensors(layer)
            gemm = layer if isinstance(layer, PackedLinear) else layer.gemm
            float_bytes += 4 * gemm.in_features * gemm.out_features + (
                4 * gemm.out_features if gemm.has_bias else 0
            )
        elif isinstance(layer, PackedLSTM):
            spec = {"type": "PackedLSTM", "config": layer.config()}
            own = {k: v for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
            float_bytes += layer.float32_bytes()
        elif isinstance(layer, _BINARY):
            spec, own, layer_float = _binary_layer_spec(layer)
            float_bytes += layer_float
        elif isinstance(layer, QuantLSTM):
            spec, own = _quant_lstm_spec(layer, where)
            float_bytes += _lstm_float_bytes(layer)
        elif isinstance(layer, (QuantLinear, QuantConv2d)):
            spec, own = _quant_layer_spec(layer, where)
            float_bytes += 4 * layer.weight.numel() + (
                4 * layer.bias.numel() if layer.bias is not None else 0
            )
        else:
            raise ValueError(
                f"cannot save layer {where!r}: {type(layer).__name__} has no .lowbit encoding yet "
                "(supported: QuantLinear, QuantConv2d, QuantLSTM, PackedLinear, PackedConv2d, "
                "PackedLSTM, PackedBinaryLinear, PackedBinaryConv2d, BinaryMaxPool2d, "
                "PackedBitplaneLinear)"
            )
        layers[lpath] = spec
        layer_bytes += sum(t.numel() * t.element_size() for t in own.values())
        for name, t in own.items():
            tensors[f"{lpath}.{name}" if lpath else name] = t.detach().cpu().contiguous()
    layer_float = float_bytes  # so far only the special layers were counted
    state_keys = []
    prefixes = tuple(f"{p}." for p, _ in special if p)
    for key, value in model.state_dict(keep_vars=False).items():
        if any(p == "" for p, _ in special) or key.startswith(prefixes):
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"cannot save {key!r}: non-tensor state ({type(value).__name__})")
        if value.dtype not in _DTYPE_NAMES:
            raise ValueError(f"cannot save {key!r}: dtype {value.dtype} is not supported")
        tensors[key] = value.detach().cpu().contiguous().clone()
        state_keys.append(key)
        if value.is_floating_point():
            float_bytes += 4 * value.numel()
    # Leaf modules as they are now (e.g. BatchNorm folded to Identity): replayed onto a skeleton.
    leaves = {}
    for name, m in model.named_modules():
        if name and not _is_special(m) and not any(True for _ in m.children()):
            if any(name.startswith(p) for p in prefixes) or any(p == name for p, _ in special):
                continue
            enc = _plain_encoding(m)
            if enc is not None:
                leaves[name] = enc
    arch = architecture if architecture is not None else getattr(model, "lowbit_architecture", None)
    if arch is not None:
        from lowbit import models

        if not isinstance(arch, dict) or arch.get("name") not in models.available():
            raise ValueError(
                f"architecture must be {{'name': <one of {', '.join(models.available())}>, 'options': {{...}}}}; got {arch!r}"
            )
        architecture_json: dict[str, Any] = {
            "kind": "registry",
            "name": arch["name"],
            "options": _jsonable(arch.get("options", {})),
        }
    else:
        tree = _tree(model)
        if tree is not None and (type(model) is nn.Sequential or _is_special(model)):
            architecture_json = {"kind": "modules", "tree": tree}
        else:
            architecture_json = {
                "kind": "skeleton",
                "class": f"{type(model).__module__}.{type(model).__qualname__}",
                "why": _why_skeleton(model),
            }
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "lowbit_version": _lowbit_version(),
        "architecture": architecture_json,
        "layers": layers,
        "state_keys": state_keys,
        "leaves": leaves,
        "tensors": {
            name: {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "sha256": _sha256(t)}
            for name, t in tensors.items()
        },
        "packing_report": getattr(model, "packing_report", None),
        "float32_bytes": float_bytes,
        "metadata": _jsonable(metadata or {}),
    }
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    blob = st_save(
        tensors,
        metadata={
            MANIFEST_KEY: text,
            MANIFEST_SHA_KEY: hashlib.sha256(text.encode()).hexdigest(),
        },
    )
    _atomic_write(Path(path), blob)
    return {
        "path": str(path),
        "bytes": len(blob),
        "float32_bytes": float_bytes,
        "compression": float_bytes / len(blob) if blob else 0.0,
        "layer_bytes": layer_bytes,
        "layer_float32_bytes": layer_float,
        "layer_compression": layer_float / layer_bytes if layer_bytes else 0.0,
    }


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the target directory, fsync, rename over ``path``, fsync the directory."""
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; a model file gets the permissions of any new file (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(
        f"cannot store {type(v).__name__} {v!r} in a .lowbit manifest (JSON values only)"
    )


def _lowbit_version() -> str:
    import lowbit

    return str(lowbit.__version__)


# ----------------------------------------------------------------------------------------------
# load


def _fail(path: Path, msg: str) -> LowbitFileError:
    return LowbitFileError(f"{path}: {msg}")


def _file_size(p: Path) -> int:
    """The size of the file at ``p``; clear errors for a missing path and for a directory (a run
    directory is the usual mistake: it has to be packed first)."""
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise FileNotFoundError(f"{p}: no such .lowbit file") from None
    if p.is_dir():
        hint = ""
        if (p / "config.json").exists():
            hint = f": a run directory; pack it first (`lowbit pack {p} -o model.lowbit`)"
        raise _fail(p, f"a directory, not a .lowbit file{hint}")
    return size


def _read_header(path: Path, f: Any, size: int) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(tensor entries, manifest, data start) after checking every byte range against the size."""
    if size < 8:
        raise _fail(
            path, f"truncated: {size} bytes, not even a header length (not a .lowbit file?)"
        )
    n = int.from_bytes(f.read(8), "little")
    if n < 2 or n > MAX_HEADER_BYTES:
        raise _fail(path, f"corrupt: header length {n} is implausible (not a .lowbit file?)")
    if 8 + n > size:
        raise _fail(path, f"truncated: the header needs {n} bytes but the file has {size - 8}")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(path, f"corrupt header (not valid JSON: {exc})") from None
    if not isinstance(header, dict):
        raise _fail(path, "corrupt header (not a JSON object)")
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or not isinstance(meta.get(MANIFEST_KEY), str):
        if isinstance(meta, dict) and MANIFEST_SHA_KEY in meta:  # written by lowbit, then damaged
            raise _fail(path, "corrupt header: its lowbit manifest entry is damaged")
        raise _fail(path, "not a .lowbit file: a safetensors file without a lowbit manifest")
    text = meta[MANIFEST_KEY]
    if hashlib.sha256(text.encode()).hexdigest() != meta.get(MANIFEST_SHA_KEY):
        raise _fail(path, "corrupt: the manifest's SHA-256 does not match")
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _fail(path, f"corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _fail(path, "not a .lowbit file (manifest format is not 'lowbit')")
    version = manifest.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _fail(path, f"corrupt manifest: format version {version!r}")
    if version > VERSION:
        raise _fail(
            path,
            f"written in .lowbit format version {version} by lowbit {manifest.get('lowbit_version')}; "
            f"this lowbit reads versions up to {VERSION}: upgrade lowbit",
        )
    # Every tensor: known dtype, sane shape, a byte range of exactly its size; ranges tile the data.
    ranges = []
    for name, e in header.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise _fail(path, f"corrupt header entry for {name!r}")
        if e["dtype"] not in _DTYPES:
            raise _fail(path, f"tensor {name!r} has unsupported dtype {e['dtype']!r}")
        shape = e["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape
        ):
            raise _fail(path, f"tensor {name!r} has a bad shape {shape!r}")
        offs = e["data_offsets"]
        if not (
            isinstance(offs, list)
            and len(offs) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        ):
            raise _fail(path, f"tensor {name!r} has bad data_offsets {offs!r}")
        nbytes = math.prod(shape) * _DTYPES[e["dtype"]].itemsize
        if offs[0] < 0 or offs[1] - offs[0] != nbytes:
            raise _fail(
                path, f"tensor {name!r}: byte range {offs} does not hold {e['dtype']}{shape}"
            )
        ranges.append((offs[0], offs[1], name))
    ranges.sort()
    pos = 0
    for b, end, name in ranges:
        if b != pos:
            raise _fail(
                path, f"corrupt: tensor {name!r} starts at {b}, expected {pos} (gap or overlap)"
            )
        pos = end
    if 8 + n + pos != size:
        what = "truncated" if 8 + n + pos > size else "corrupt (trailing bytes)"
        raise _fail(path, f"{what}: the header describes {8 + n + pos} bytes, the file has {size}")
    entries = manifest.get("tensors")
    if not isinstance(entries, dict) or set(entries) != set(header):
        raise _fail(path, "corrupt: the manifest's tensor list differs from the file's")
    for name, e in header.items():
        m = entries[name]
        if not isinstance(m, dict) or m.get("dtype") != e["dtype"] or m.get("shape") != e["shape"]:
            raise _fail(path, f"corrupt: tensor {name!r} differs between manifest and header")
        if not isinstance(m.get("sha256"), str):
            raise _fail(path, f"corrupt: tensor {name!r} has no SHA-256")
    for key in ("layers", "leaves"):
        if not isinstance(manifest.get(key), dict):
            raise _fail(path, f"corrupt manifest: {key} must be an object")
    if not isinstance(manifest.get("state_keys"), list):
        raise _fail(path, "corrupt manifest: state_keys must be a list")
    return header, manifest, 8 + n


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a ``.lowbit`` file (header checks only; tensors are not read)."""
    p = Path(path)
    size = _file_size(p)
    with open(p, "rb") as f:
        return _read_header(p, f, size)[1]


def _expected_for(
    spec: dict[str, Any], where: str
) -> tuple[str, dict[str, tuple[torch.dtype, tuple[int, ...]]]]:
    kind = spec.get("type") if isinstance(spec, dict) else None
    try:
        if kind == "PackedLinear":
            return kind, PackedLinear.expected_buffers(spec["config"])
        if kind == "PackedConv2d":
            PackedConv2d.check_config(spec["config"])  # geometry, without allocating
            exp = PackedLinear.expected_buffers(spec["config"]["gemm"])
            return kind, {f"gemm.{k}": v for k, v in exp.items()}
        if kind == "PackedLSTM":
            return kind, PackedLSTM.expected_buffers(spec["config"])
        if kind in ("QuantLinear", "QuantConv2d", "QuantLSTM"):
            return kind, _quant_expected(spec, where)
        if kind in _BINARY_KINDS:
            return kind, _binary_expected(kind, spec.get("config"), where)
    except LowbitFileError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise LowbitFileError(f"{where}: bad {kind} spec: {exc}") from None
    raise LowbitFileError(f"{where}: unknown layer type {kind!r}")


def _layer_dims(kind: str, spec: dict[str, Any]) -> tuple[str, tuple[int, ...]]:
    """("linear" | "conv", dims) a skeleton module at this path must have."""
    if kind == "PackedLinear":
        c = spec["config"]
        return "linear", (c["in_features"], c["out_features"])
    if kind == "QuantLinear":
        return "linear", (spec["in_features"], spec["out_features"])
    if kind == "PackedConv2d":
        c = spec["config"]
        return "conv", (c["in_channels"], c["gemm"]["out_features"], *c["kernel_size"])
    if kind in ("PackedBinaryLinear", "PackedBitplaneLinear"):
        c = spec["config"]
        return "linear", (c["in_features"], c["out_features"])
    if kind == "PackedBinaryConv2d":
        c = spec["config"]
        return "conv", (c["in_channels"], c["out_channels"], *c["kernel_size"])
    if kind == "BinaryMaxPool2d":
        return "pool", tuple(spec["config"]["kernel_size"])
    if kind in ("PackedLSTM", "QuantLSTM"):
        c = spec["config"] if kind == "PackedLSTM" else spec
        return "lstm", tuple(int(c[k]) for k in _LSTM_DIMS)
    return "conv", (spec["in_channels"], spec["out_channels"], *spec["kernel_size"])


# What a skeleton LSTM must share with the file's (dropout and the quantizers may differ).
_LSTM_DIMS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "bidirectional")
_DIMS_LABEL = {"conv": "(in, out, kh, kw)", "lstm": f"({', '.join(_LSTM_DIMS)})"}


def _module_dims(m: nn.Module) -> tuple[str, tuple[int, ...]] | None:
    if isinstance(m, PackedLSTM) or (isinstance(m, nn.LSTM) and not m.proj_size):
        return "lstm", tuple(int(getattr(m, k)) for k in _LSTM_DIMS)
    if isinstance(m, (PackedBinaryLinear, PackedBitplaneLinear)):
        return "linear", (m.in_features, m.out_features)
    if isinstance(m, PackedBinaryConv2d):
        return "conv", (m.in_channels, m.out_channels, *m.kernel_size)
    if isinstance(m, BinaryMaxPool2d):
        return "pool", m.kernel_size
    if isinstance(m, nn.MaxPool2d):
        ks = m.kernel_size
        return "pool", (ks, ks) if isinstance(ks, int) else tuple(ks)
    if isinstance(m, PackedLinear):
        return "linear", (m.in_features, m.out_features)
    if isinstance(m, PackedConv2d):
        return "conv", (m.in_channels, m.out_channels, *m.kernel_size)
    if isinstance(m, nn.Linear):
        return "linear", (m.in_features, m.out_features)
    if isinstance(m, nn.Conv2d):
        return "conv", (m.in_channels, m.out_channels, *m.kernel_size)  # type: ignore[misc]
    return None


def _skeleton(path: Path, manifest: dict[str, Any], model: nn.Module | None) -> nn.Module:
    if model is not None:
        return model
    arch = manifest.get("architecture")
    if not isinstance(arch, dict):
        raise _fail(path, f"corrupt manifest: architecture {arch!r}")
    kind = arch.get("kind")
    if kind == "registry":
        from lowbit import models

        name, options = arch.get("name"), arch.get("options", {})
        if name not in models.available() or not isinstance(options, dict):
            raise _fail(
                path,
                f"architecture {name!r} is not a lowbit model here ({', '.join(models.available())})",
            )
        opts: dict[str, Any] = {
            k: tuple(v) if k == "input_shape" and isinstance(v, list) else v
            for k, v in options.items()
        }
        try:
            return models.create(name, **opts)
        except (TypeError, ValueError) as exc:
            raise _fail(path, f"cannot build model {name!r} with {options}: {exc}") from None
    if kind == "modules":
        # Built on the meta device; materialised by _apply once everything is validated.
        return _tree_build(arch.get("tree"), str(path))
    if kind == "skeleton":
        raise _fail(
            path,
            f"holds a custom model ({arch.get('class')}"
            + (f": {arch['why']}" if isinstance(arch.get("why"), str) and arch["why"] else "")
            + "); build it and pass it: lowbit.load(path, model=MyNet())",
        )
    raise _fail(path, f"corrupt manifest: unknown architecture {arch!r}")


def load(path: str | os.PathLike[str], model: nn.Module | None = None) -> nn.Module:
    """Load a ``.lowbit`` file; returns the model in eval mode.

    ``model``: a skeleton to load into (required for custom modules, optional otherwise): the
    same architecture as the saved model before or after quantization/packing. Its layers at the
    saved quantized/packed paths are replaced; everything else is loaded in place. Raises
    :class:`LowbitFileError` (a ``ValueError``) before touching ``model`` if anything is wrong.
    """
    p = Path(path)
    size = _file_size(p)
    with open(p, "rb") as f:
        header, manifest, start = _read_header(p, f, size)
        # Checksums first (mmap: nothing is copied to hash it).
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for name, e in header.items():
                b, end = e["data_offsets"]
                digest = hashlib.sha256(mm[start + b : start + end]).hexdigest()
                if digest != manifest["tensors"][name]["sha256"]:
                    raise _fail(p, f"corrupt: tensor {name!r} fails its SHA-256 check")
            skeleton = _skeleton(p, manifest, model)
            plan = _plan(p, manifest, header, skeleton)
            tensors = {}
            for name, e in header.items():
                b, end = e["data_offsets"]
                buf = bytearray(mm[start + b : start + end]) if end > b else bytearray()
                dtype = _DTYPES[e["dtype"]]
                t = torch.frombuffer(buf, dtype=dtype) if buf else torch.empty(0, dtype=dtype)
                tensors[name] = t.reshape(e["shape"])
    loaded = _apply(p, manifest, skeleton, plan, tensors)
    _freeze_inference_only(loaded)
    return loaded


def _freeze_inference_only(model: nn.Module) -> None:
    """A model with packed layers is inference-only, as ``lowbit.pack`` returns it (no parameter
    wants a gradient); in a replayed quantized model the latent weights of the quantized layers
    no longer set the forward weight (the stored codes do), so they do not train either."""
    from lowbit.binary import PackedBinaryConv2d, PackedBinaryLinear, PackedBitplaneLinear
    from lowbit.nn import QuantModule
    from lowbit.pack import PackedConv2d, PackedLinear, PackedLSTM

    packed = (
        PackedLinear, PackedConv2d, PackedLSTM,
        PackedBinaryLinear, PackedBinaryConv2d, PackedBitplaneLinear,
    )  # fmt: skip
    if any(isinstance(m, packed) for m in model.modules()):
        for prm in model.parameters():
            prm.requires_grad_(False)
        return
    for m in model.modules():
        if isinstance(m, QuantModule):
            for w, q in m.weight_pairs():
                if isinstance(q, StoredWeight) and w.is_leaf:
                    w.requires_grad_(False)


def _split(path: str) -> tuple[str, str]:
    parent, _, name = path.rpartition(".")
    return parent, name


def _plan(
    path: Path, manifest: dict[str, Any], header: dict[str, Any], skeleton: nn.Module
) -> dict[str, Any]:
    """Check that the file fits ``skeleton`` and what to replace, without changing anything."""
    replace: dict[str, nn.Module | dict[str, Any]] = {}
    named = dict(skeleton.named_modules())
    for lpath, enc in manifest["leaves"].items():
        if lpath not in named:
            raise _fail(path, f"does not fit the model: it has no module {lpath!r}")
        leaf = _plain_encoding(named[lpath])
        if leaf != enc:
            if leaf is not None and isinstance(enc, dict) and leaf["type"] == enc.get("type"):
                # the same kind of layer configured differently (another width, eps, ...): the
                # skeleton is not the saved model, which must not be swapped in silently
                diff = {
                    k: (enc.get("args", {}).get(k), v)
                    for k, v in leaf["args"].items()
                    if enc.get("args", {}).get(k) != v
                }
                if diff == {"bias": (True, False)}:
                    # a BatchNorm folded into a bias-free conv/linear (lowbit.ptq.fgq) gave it a
                    # bias: the file's layer, with its bias, is the saved model's
                    replace[lpath] = _plain_build(enc, f"{path}: {lpath}")
                    continue
                raise _fail(
                    path,
                    f"does not fit the model at {lpath!r}: the file's {leaf['type']} has "
                    + ", ".join(f"{k}={a!r} (the model's {b!r})" for k, (a, b) in diff.items()),
                )
            # a leaf that changed type since the skeleton was built (BN folded to Identity, ...)
            replace[lpath] = _plain_build(enc, f"{path}: {lpath}")
    expected: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for lpath, spec in manifest["layers"].items():
        where = f"{path}: layer {lpath!r}"
        kind, exp = _expected_for(spec, where)
        if lpath and lpath not in named:
            raise _fail(
                path, f"does not fit the model: it has no layer {lpath!r} (a {kind} in the file)"
            )
        target = named[lpath] if lpath else skeleton
        want = _layer_dims(kind, spec)
        have = _module_dims(target)
        if isinstance(target, _LayerSlot):
            have = want
        if have is None or have[0] != want[0] or tuple(have[1]) != tuple(want[1]):
            raise _fail(
                path,
                f"does not fit the model at {lpath!r}: the file has a {kind} {want[0]} with "
                f"{_DIMS_LABEL.get(want[0], '(in, out)')} = {tuple(want[1])}, the model a "
                f"{type(target).__name__} with {None if have is None else tuple(have[1])}",
            )
        replace[lpath] = spec
        for name, v in exp.items():
            expected[f"{lpath}.{name}" if lpath else name] = v
    # Plain state: the skeleton (with replacements) must have exactly the saved keys and shapes.
    replaced = tuple(f"{p}." for p in replace if p)
    for key, value in skeleton.state_dict().items():
        if key.startswith(replaced) or "" in replace:
            continue
        if isinstance(value, torch.Tensor):
            expected[key] = (value.dtype, tuple(value.shape))
    for lpath, new in replace.items():
        if isinstance(new, nn.Module):
            for key, value in new.state_dict().items():
                expected[f"{lpath}.{key}"] = (value.dtype, tuple(value.shape))
    missing = sorted(set(expected) - set(header))
    extra = sorted(set(header) - set(expected))
    if missing or extra:
        raise _fail(
            path,
            "does not fit the model: "
            + (
                f"the model needs {missing[:5]}{' ...' if len(missing) > 5 else ''} which the file lacks"
                if missing
                else ""
            )
            + ("; " if missing and extra else "")
            + (
                f"the file has {extra[:5]}{' ...' if len(extra) > 5 else ''} which the model lacks"
                if extra
                else ""
            ),
        )
    for key, (dtype, shape) in expected.items():
        e = header[key]
        if _DTYPES[e["dtype"]] != dtype or tuple(e["shape"]) != tuple(shape):
            raise _fail(
                path,
                f"does not fit the model: {key!r} is {e['dtype']}{e['shape']} in the file, "
                f"the model needs {_DTYPE_NAMES.get(dtype, dtype)}{list(shape)}",
            )
    return {"replace": replace}


def _apply(
    path: Path,
    manifest: dict[str, Any],
    skeleton: nn.Module,
    plan: dict[str, Any],
    tensors: dict[str, torch.Tensor],
) -> nn.Module:
    built: dict[str, nn.Module] = {}
    for lpath, new in plan["replace"].items():
        if isinstance(new, nn.Module):
            built[lpath] = new.to_empty(device="cpu")  # from meta; filled from the file below
            continue
        where = f"{path}: layer {lpath!r}"
        own = (
            {k[len(lpath) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{lpath}.")}
            if lpath
            else tensors
        )
        kind = new["type"]
        if kind == "PackedLinear":
            layer: nn.Module = PackedLinear.from_config(new["config"])
            layer.load_state_dict(own)
        elif kind == "PackedConv2d":
            layer = PackedConv2d.from_config(new["config"])
            layer.load_state_dict(own)
        elif kind == "PackedLSTM":
            layer = PackedLSTM.from_config(new["config"])
            layer.load_state_dict(own)
        elif kind in _BINARY_KINDS:
            layer = _build_binary(new, own, where)
        else:
            layer = _build_quant(new, own, where)
        built[lpath] = layer
    if any(t.is_meta for t in skeleton.state_dict().values() if isinstance(t, torch.Tensor)):
        skeleton.to_empty(device="cpu")  # our own tree: every tensor is filled from the file
    if "" in built:
        root = built.pop("")
        root.packing_report = manifest.get("packing_report")  # type: ignore[assignment]
        return root.eval()
    for lpath, layer in built.items():
        parent_path, name = _split(lpath)
        parent = skeleton.get_submodule(parent_path) if parent_path else skeleton
        setattr(parent, name, layer)
    state = skeleton.state_dict()
    replaced = tuple(f"{p}." for p in plan["replace"] if isinstance(plan["replace"][p], dict))
    with torch.no_grad():
        for key, dst in state.items():
            if key.startswith(replaced) or not isinstance(dst, torch.Tensor):
                continue
            dst.copy_(tensors[key])
    if manifest.get("packing_report") is not None:
        skeleton.packing_report = manifest["packing_report"]  # type: ignore[assignment]
    if manifest["architecture"].get("kind") == "registry":
        arch = manifest["architecture"]
        skeleton.lowbit_architecture = {"name": arch["name"], "options": arch.get("options", {})}  # type: ignore[assignment]
    return skeleton.eval()
