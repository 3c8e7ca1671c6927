"""``lowbit.summary(model, input_shape=None)``: bits, packed bytes and MACs per layer.

Rows: every quantized layer (its exported :class:`~lowbit.qtypes.QuantizedWeight` objects give
the bits, packed bytes and ternary sparsity) and every other module that directly owns
parameters or persistent buffers (floating-point ones counted as float32, others at their own
size). Sizes:

* ``bytes``: the ideal deployed size: ``ceil(numel * bits / 8)`` per quantized weight, plus its
  float32 scales, plus float32 for everything else (biases, BatchNorm, float layers). The
  ``.lowbit`` file adds row padding to 64-bit words and a small manifest.
* ``float32_bytes``: the same model with every parameter/buffer in float32.

MACs (multiply-accumulates of Linear, Conv2d and LSTM layers) need ``input_shape`` (including
the batch dimension): the model runs one forward pass on zeros in eval mode under ``no_grad``
with hooks that read the real shapes. They are split by what the hardware needs:

* ``xnor``: binary weights x binary activations (XNOR-popcount);
* ``addsub``: binary/ternary weights with other activations (additions and subtractions only);
* ``int``: k-bit weights x integer activations (int8 multiply-accumulate);
* ``float``: everything else.

``mult_free`` is the share of MACs needing no multiplication (``xnor + addsub``); the per-output
(or per-group) multiply by the scale is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.nn import QuantModule

__all__ = ["MAC_KINDS", "LayerSummary", "Summary", "mac_kind", "summary"]

MAC_KINDS = ("xnor", "addsub", "int", "float")
_BINARY_TERNARY = ("binary", "ternary", "ternary_asym")
_INT_ACTS = ("binary", "kbit_linear", "kbit_log", "dfp")


def mac_kind(weight_format: str, act_kind: str) -> str:
    """Which kind of MAC a layer performs for a weight format and an activation kind."""
    if weight_format == "binary" and act_kind == "binary":
        return "xnor"
    if weight_format in _BINARY_TERNARY:
        return "addsub"
    if weight_format in ("kbit_linear", "kbit_log") and act_kind in _INT_ACTS:
        return "int"
    return "float"


@dataclass
class LayerSummary:
    """One row of the table."""

    name: str
    type: str
    weight: str
    act: str
    params: int
    bytes: int
    float32_bytes: int
    weight_bits: int = 32
    act_bits: int = 32
    kind: str = "float"
    macs: dict[str, int] | None = None
    sparsity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class Summary:
    """Per-layer rows and totals; ``str(summary)`` renders the table."""

    layers: list[LayerSummary]
    input_shape: tuple[int, ...] | None = None
    macs: dict[str, int] | None = field(default=None)

    @property
    def params(self) -> int:
        return sum(row.params for row in self.layers)

    @property
    def total_bytes(self) -> int:
        return sum(row.bytes for row in self.layers)

    @property
    def float32_bytes(self) -> int:
        return sum(row.float32_bytes for row in self.layers)

    @property
    def compression(self) -> float:
        """``float32_bytes / total_bytes`` (how many times smaller than float32)."""
        return self.float32_bytes / self.total_bytes if self.total_bytes else 1.0

    @property
    def total_macs(self) -> int | None:
        return None if self.macs is None else sum(self.macs.values())

    @property
    def mult_free(self) -> float | None:
        """Share of MACs that need no multiplication (xnor + add/sub); None without ``input_shape``."""
        if self.macs is None:
            return None
        total = sum(self.macs.values())
        return (self.macs["xnor"] + self.macs["addsub"]) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [row.to_dict() for row in self.layers],
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "params": self.params,
            "total_bytes": self.total_bytes,
            "float32_bytes": self.float32_bytes,
            "compression": self.compression,
            "macs": self.macs,
            "mult_free": self.mult_free,
        }

    def __str__(self) -> str:
        headers = ["layer", "type", "weight", "act", "params", "bytes", "fp32 bytes"]
        with_macs = self.macs is not None
        if with_macs:
            headers += ["MACs xnor", "MACs add/sub", "MACs int", "MACs float"]
        headers.append("sparsity")
        rows = []
        for r in self.layers:
            row = [
                r.name,
                r.type,
                r.weight,
                r.act,
                f"{r.params:,}",
                f"{r.bytes:,}",
                f"{r.float32_bytes:,}",
            ]
            if with_macs:
                row += [f"{(r.macs or {}).get(k, 0):,}" if r.macs else "-" for k in MAC_KINDS]
            row.append("-" if r.sparsity is None else f"{r.sparsity:.1%}")
            rows.append(row)
        total = [
            "total",
            "",
            "",
            "",
            f"{self.params:,}",
            f"{self.total_bytes:,}",
            f"{self.float32_bytes:,}",
        ]
        if with_macs:
            total += [f"{self.macs[k]:,}" for k in MAC_KINDS]  # type: ignore[index]
        total.append("")
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, total, strict=True)]
        numeric = set(range(4, len(headers)))

        def fmt(cells: Sequence[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in numeric else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "-" * len(fmt(headers))
        lines = [fmt(headers), rule, *(fmt(r) for r in rows), rule, fmt(total)]
        lines.append(
            f"size: {_human(self.total_bytes)} packed vs {_human(self.float32_bytes)} float32 "
            f"-> {self.compression:.2f}x smaller"
        )
        if with_macs:
            lines.append(
                f"MACs for input {tuple(self.input_shape or ())}: {self.total_macs:,}; "
                f"{self.mult_free:.1%} need no multiplication"
            )
        return "\n".join(lines)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _buffer_bytes(module: nn.Module) -> int:
    """Bytes of a module's own persistent buffers: 4 per floating-point element (deployed as
    float32), the real element size for the others (BatchNorm's int64 ``num_batches_tracked``,
    a packed max-pool's uint8 padding mask)."""
    names = set(module._non_persistent_buffers_set)
    return sum(
        b.numel() * (4 if b.is_floating_point() else b.element_size())
        for name, b in module.named_buffers(recurse=False)
        if name not in names
    )


def _describe(q: Any) -> str:
    if q is None:
        return "fp32"
    d = getattr(q, "describe", None)
    return d() if callable(d) else type(q).__name__


def _act_kind(q: Any) -> tuple[str, int]:
    if q is None:
        return "float", 32
    spec = getattr(q, "spec", None)
    if callable(spec):
        s = spec()
        return s.kind, s.bits
    return "float", 32


def _weight_quantizers(layer: nn.Module) -> list[nn.Module]:
    wq = layer.weight_quantizer
    if isinstance(wq, nn.ModuleDict):
        return [q for qs in wq.values() for q in qs.children()]
    assert isinstance(wq, nn.Module)
    return [wq]


def packed_layer_bytes(m: nn.Module) -> tuple[int, int, int, int] | None:
    """For one packed layer (``lowbit.pack`` / ``pack_bnn`` output): (bytes of its tensors,
    float32 bytes of the weight + bias it replaces, bytes of its weight tensors (all but the bias),
    float32 bytes of the weight matrix alone); ``None`` for any other module. A PackedConv2d
    counts its GEMM (the PackedLinear inside it is then not a layer of its own)."""
    from lowbit.binary import PackedBinaryConv2d, PackedBinaryLinear, PackedBitplaneLinear
    from lowbit.pack import PackedConv2d, PackedLinear, file_tensors
    from lowbit.saveload import _binary_layer_spec

    if isinstance(m, (PackedBinaryLinear, PackedBinaryConv2d, PackedBitplaneLinear)):
        # what lowbit.save stores of the layer (thresholds, scales, bias: all but the bias count
        # as weight data) and the float32 bytes of the layer it replaces
        _, own, float_bytes = _binary_layer_spec(m)
        bias = own.get("bias")
        bias_f32 = 0 if bias is None else 4 * bias.numel()
        total = sum(t.numel() * t.element_size() for t in own.values())
        weights = sum(t.numel() * t.element_size() for n, t in own.items() if n != "bias")
        return total, float_bytes, weights, float_bytes - bias_f32
    if isinstance(m, (PackedLinear, PackedConv2d)):
        gemm = m if isinstance(m, PackedLinear) else m.gemm
        total = weights = 0
        for name, t in file_tensors(m).items():
            total += t.numel() * t.element_size()
            weights += 0 if name.endswith("bias") else t.numel() * t.element_size()
        w_f32 = 4 * gemm.in_features * gemm.out_features
        return total, w_f32 + (4 * gemm.out_features if gemm.has_bias else 0), weights, w_f32
    return None


def _packed_row(name: str, m: nn.Module) -> LayerSummary | None:
    counts = packed_layer_bytes(m)
    if counts is None:
        return None
    from lowbit.pack import PackedConv2d, PackedLinear

    total, f32, _, _ = counts
    if isinstance(m, (PackedLinear, PackedConv2d)):
        gemm = m if isinstance(m, PackedLinear) else m.gemm
        fmt, bits, act = gemm.weight_format, gemm.bits, gemm.act_label()
        # int8 / DFP / k-bit codes are integer activations (kbit_linear stands for them all)
        act_kind = "float" if act == "float" else ("binary" if act == "sign" else "kbit_linear")
        act_bits = {"float": 32, "binary": 1}.get(act_kind, gemm.act_bits or 8)
        weight = f"packed {fmt}" + (f"/N={gemm.group_size}" if gemm.group_size else "")
        weight += " s8" if gemm.scale_format == "fixed8" else ""  # 8-bit fixed-point scales
    else:  # the binary XNOR layers: 1-bit weights; packed bits, floats signed here, bit planes
        from lowbit.binary import PackedBitplaneLinear

        fmt, bits, weight = "binary", 1, "packed binary"
        if isinstance(m, PackedBitplaneLinear):  # k-bit codes: binary weights x integers
            act = f"{'' if m.act_signed else 'u'}int{m.act_bits} planes"
            act_kind, act_bits = "kbit_linear", int(m.act_bits)
        else:
            act = "bits" if getattr(m, "input_kind", "bits") == "bits" else "sign"
            act_kind, act_bits = "binary", 1
    return LayerSummary(
        name=name,
        type=type(m).__name__,
        weight=weight,
        act=act,
        params=f32 // 4,
        bytes=total,
        float32_bytes=f32,
        weight_bits=bits,
        act_bits=act_bits,
        kind=mac_kind(fmt, act_kind),
    )


def _layer_rows(model: nn.Module) -> tuple[list[LayerSummary], dict[str, LayerSummary]]:
    rows: list[LayerSummary] = []
    by_name: dict[str, LayerSummary] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        packed_row = _packed_row(name, module)
        if packed_row is not None:
            skip.append(name + ".")
            rows.append(packed_row)
            by_name[name] = packed_row
            continue
        if isinstance(module, QuantModule):
            layer: Any = module
            skip.append(name + ".")
            exported = layer.quantized_weights()
            latent = sum(qw.numel for qw in exported.values())
            others = sum(
                p.numel()
                for n, p in layer.named_parameters(recurse=False)
                if not n.startswith("weight")
            )
            others_bytes = 4 * others + _buffer_bytes(layer)
            first = next(iter(exported.values()))
            act_kind, act_bits = _act_kind(layer.input_quantizer)
            ternary = [qw for qw in exported.values() if qw.format in ("ternary", "ternary_asym")]
            sparsity = None
            if ternary:
                sparsity = sum(qw.sparsity() * qw.numel for qw in ternary) / sum(
                    qw.numel for qw in ternary
                )
            wq = _weight_quantizers(layer)
            row = LayerSummary(
                name=name,
                type=type(layer).__name__,
                weight=_describe(wq[0]),
                act=_describe(layer.input_quantizer),
                params=latent
                + sum(
                    p.numel()
                    for n, p in layer.named_parameters(recurse=False)
                    if not n.startswith("weight")
                ),
                bytes=sum(qw.packed_bytes() for qw in exported.values()) + others_bytes,
                float32_bytes=4 * latent + others_bytes,
                weight_bits=first.bits,
                act_bits=act_bits,
                kind=mac_kind(first.format, act_kind),
                sparsity=sparsity,
            )
        else:
            params = sum(p.numel() for p in module.parameters(recurse=False))
            buffers = _buffer_bytes(module)
            if params == 0 and buffers == 0:
                continue
            row = LayerSummary(
                name=name or "<root>",
                type=type(module).__name__,
                weight="fp32",
                act="fp32",
                params=params,
                bytes=4 * params + buffers,
                float32_bytes=4 * params + buffers,
            )
        rows.append(row)
        by_name[name] = row
    return rows, by_name


def _macs_of(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> int:
    from lowbit.binary import PackedBinaryConv2d, PackedBinaryLinear, PackedBitplaneLinear
    from lowbit.pack import PackedConv2d, PackedLinear

    if isinstance(module, PackedBinaryConv2d):
        # NCHW floats, or packed NHWC bits (B, H, W, bytes): one output pixel per row of bytes
        pixels = (
            output.numel() // output.shape[-1]
            if module.out_kind == "bits"
            else output.numel() // max(module.out_channels, 1)
        )
        return pixels * module.out_channels * module._reduction()
    if isinstance(module, (PackedLinear, PackedBinaryLinear, PackedBitplaneLinear)):
        rows = output.numel() // max(output.shape[-1], 1)  # the last dim may be packed bits
        return rows * module.in_features * module.out_features
    if isinstance(module, PackedConv2d):
        return output.numel() * module.gemm.in_features
    if isinstance(module, nn.Linear):
        return output.numel() // module.out_features * module.in_features * module.out_features
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        # every input element meets (out / groups) * kernel weights
        per_input = module.out_channels // module.groups * math.prod(module.kernel_size)
        return inputs[0].numel() * per_input
    if isinstance(module, nn.modules.conv._ConvNd):  # Conv1d / Conv2d / Conv3d
        return (
            output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        )
    if isinstance(module, nn.RNNBase):  # LSTM (4 gate blocks), GRU (3), RNN (1)
        gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
        x = inputs[0]
        if isinstance(x, nn.utils.rnn.PackedSequence):
            tokens = int(x.data.shape[0])
        else:
            tokens = x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]
        dirs = 2 if module.bidirectional else 1
        h = module.hidden_size
        return tokens * sum(
            dirs * gates * h * ((module.input_size if layer == 0 else h * dirs) + h)
            for layer in range(module.num_layers)
        )
    return 0


def _is_packed(module: nn.Module) -> bool:
    from lowbit.binary import PackedBinaryConv2d, PackedBinaryLinear, PackedBitplaneLinear
    from lowbit.pack import PackedConv2d, PackedLinear

    return isinstance(
        module,
        (PackedLinear, PackedConv2d, PackedBinaryLinear, PackedBinaryConv2d, PackedBitplaneLinear),
    )


def _trace_macs(
    model: nn.Module, input_shape: Sequence[int], input_dtype: torch.dtype | None
) -> dict[str, int]:
    counts: dict[str, int] = {}
    hooks = []
    names = {id(m): n for n, m in model.named_modules()}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p) for p in skip):
            continue
        if isinstance(module, nn.MultiheadAttention | QuantModule) or _is_packed(module):
            skip.append(name + ".")
        if isinstance(module, nn.Linear | nn.modules.conv._ConvNd | nn.RNNBase) or _is_packed(
            module
        ):

            def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
                out = output[0] if isinstance(output, tuple) else output
                key = names[id(mod)]
                counts[key] = counts.get(key, 0) + _macs_of(mod, inputs, out)

            hooks.append(module.register_forward_hook(hook))
    try:
        param = next(iter(model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        if input_dtype is None:
            first = next(
                (m for m in model.modules() if next(m.parameters(recurse=False), None) is not None),
                None,
            )
            if isinstance(first, nn.Embedding | nn.EmbeddingBag):
                input_dtype = torch.long
            else:
                input_dtype = (
                    param.dtype
                    if param is not None and param.is_floating_point()
                    else torch.float32
                )
        x = torch.zeros(tuple(int(s) for s in input_shape), dtype=input_dtype, device=device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(x)
        finally:
            model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    return counts


def summary(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    input_dtype: torch.dtype | None = None,
) -> Summary:
    """Per-layer weight/activation precision, packed bytes, MACs by kind and ternary sparsity.

    Args:
        model: any module (quantized with :func:`lowbit.quantize` or not).
        input_shape: shape of one input batch *including* the batch dimension, e.g.
            ``(1, 1, 28, 28)``; enables the MAC columns (one traced forward pass on zeros).
        input_dtype: dtype of that input (default: the parameters' float dtype, or ``long``
            when the model starts with an Embedding).
    """
    rows, by_name = _layer_rows(model)
    macs = None
    if input_shape is not None:
        counts = _trace_macs(model, input_shape, input_dtype)
        macs = dict.fromkeys(MAC_KINDS, 0)
        for name, n in counts.items():
            row = by_name.get(name)
            if row is None:  # a weight layer without direct parameters (shared elsewhere)
                continue
            row.macs = {row.kind: n}
            macs[row.kind] += n
    return Summary(
        rows, tuple(int(s) for s in input_shape) if input_shape is not None else None, macs
    )
