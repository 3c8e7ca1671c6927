"""Packed inference layers: a :class:`~lowbit.qtypes.QuantizedWeight` turned into the bit layouts
of docs/format.md and run by lowbit's C++ kernels.

:class:`PackedLinear` covers the integer paths (int8 activations x ternary / 4-bit weights):

=========================================== =============================== ==================
QuantizedWeight                             kernel                          weight bits stored
=========================================== =============================== ==================
``ternary``, ``binary`` (±1 is ternary)     ternary x int8                  2
``ternary_asym`` (TTQ Wp/Wn, LAT2)          ternary x int8, D and P sums    2
``kbit_linear`` with bits <= 4              int4 x int8 (3-bit: same box)   4
``kbit_log`` with bits 2 / 3                ternary / int4 (levels x 2^n-1) 2 / 4
=========================================== =============================== ==================

Scales: per tensor and per output channel become per-row scales; groups along the output axis
(DFP's filter clusters) are expanded to rows; groups along K (FGQ) must have a size that is a
multiple of 4 and run the grouped kernel. Activations: ``"int8"`` (per-token absmax, the BitNet
inference recipe), ``"dfp"`` (8-bit dynamic fixed point, one exponent per batch exactly like
``lowbit.functional.dfp_quantize``, or a calibrated ``exponent``) or ``"float"`` (the exact
path for layers trained with float activations: fp32 activations times the packed weights,
fp32 accumulation; it differs from ``F.linear`` with the dequantized weight only by summation
order).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lowbit import kernels
from lowbit.qtypes import QuantizedWeight

__all__ = ["ACTIVATIONS", "PackedLinear", "pack", "packable"]

ACTIVATIONS = ("int8", "dfp", "float")


def _kernel_codes(qw: QuantizedWeight) -> tuple[torch.Tensor, int, float]:
    """``(integer codes, bits of the kernel (2 or 4), factor)`` with weight = codes * scale * factor."""
    fmt, bits = qw.format, qw.bits
    codes = qw.codes
    if fmt in ("ternary", "ternary_asym", "binary"):
        return codes, 2, 1.0
    if fmt == "kbit_linear" and bits <= 4:
        return codes, 4, 1.0
    if fmt == "kbit_log" and bits <= 3:
        # Level of code c is sign(c) * 2^(|c| - n) with n = 2^(bits-1) - 1; times 2^(n-1) it is
        # the integer sign(c) * 2^(|c| - 1) (±1, ±2, ±4 for 3 bits), exact in any float.
        n = 2 ** (bits - 1) - 1
        ints = torch.where(
            codes == 0, 0, torch.sign(codes) * torch.pow(2, codes.abs().clamp(min=1) - 1)
        )
        return ints.to(torch.int8), (2 if bits == 2 else 4), 2.0 ** (1 - n)
    raise ValueError(
        f"no packed kernel for {fmt} weights with {bits} bits: packed layers support binary, ternary, "
        "ternary_asym, kbit_linear up to 4 bits and kbit_log up to 3 bits (keep the layer as a "
        "Quant* layer)"
    )


def packable(qw: QuantizedWeight) -> bool:
    """Whether :class:`PackedLinear` can run ``qw`` on an integer kernel."""
    try:
        _kernel_codes(qw)
        _row_or_group_scales(qw)
    except ValueError:
        return False
    return len(qw.shape) == 2


def _row_or_group_scales(qw: QuantizedWeight) -> tuple[torch.Tensor, int]:
    """Scales as ``(N,)`` / ``(N, 2)`` per row or ``(N, groups)`` along K, and the K group size."""
    n = qw.shape[0]
    s = qw.scales.detach().to(torch.float32)
    asym = qw.format == "ternary_asym"
    tail = (2,) if asym else ()
    if qw.granularity in ("tensor", "channel"):
        s = s.reshape(-1, *tail)
        return (s.expand(n, *tail) if s.shape[0] == 1 else s), 0
    if qw.granularity == "group" and qw.group_axis == "out":
        size = int(qw.group_size or 1)
        return s.reshape(-1, *tail).repeat_interleave(size, dim=0)[:n], 0
    if qw.granularity == "group" and qw.group_axis == "in":
        size = int(qw.group_size or 0)
        if asym:
            raise ValueError("asymmetric ternary with groups along K has no packed kernel")
        if size % 4:
            raise ValueError(
                f"groups along K must be a multiple of 4 for the packed kernels; got {size}"
            )
        return s, size
    raise ValueError(f"unsupported granularity {qw.granularity_spec.describe()}")


class PackedLinear(nn.Module):
    """Inference-only ``nn.Linear`` replacement on packed low-bit weights (C++ kernels).

    Buffers (all saved in ``state_dict``): ``tiles`` (uint8, docs/format.md), ``scale`` and, for
    asymmetric ternary, ``scale2`` (fp32, kernel layout), ``bias`` (fp32 padded, optional).
    ``forward`` accepts ``(..., in_features)`` float tensors and returns fp32
    ``(..., out_features)``. In eager mode it calls the kernel directly; under torch.compile /
    torch.export it goes through the ``torch.ops.lowbit`` custom ops (with fake implementations).
    """

    tiles: torch.Tensor
    scale: torch.Tensor
    scale2: torch.Tensor | None
    bias: torch.Tensor | None
    _kernel: kernels.LinearKernel | None

    def __init__(
        self,
        qweight: QuantizedWeight,
        bias: torch.Tensor | None = None,
        *,
        activations: str = "int8",
        exponent: int | None = None,
    ) -> None:
        super().__init__()
        if len(qweight.shape) != 2:
            raise ValueError(
                f"PackedLinear needs a 2-D (out, in) weight; got shape {qweight.shape}"
            )
        if activations not in ACTIVATIONS:
            raise ValueError(
                f"activations must be one of {', '.join(ACTIVATIONS)}; got {activations!r}"
            )
        self.out_features, self.in_features = qweight.shape
        self.activations, self.exponent = activations, exponent
        self.weight_format = qweight.format
        n, k = qweight.shape
        codes, self.bits, factor = _kernel_codes(qweight)
        scales, self.group_size = _row_or_group_scales(qweight)
        if factor != 1.0:
            scales = scales * factor  # a power of two: exact
        asym = qweight.format == "ternary_asym"
        tiles = kernels.pack_ternary(codes) if self.bits == 2 else kernels.pack_int4(codes)
        scale, scale2 = kernels.pack_ternary_scales(
            scales, n, k, group_size=self.group_size, asym=asym
        )
        self.register_buffer("tiles", tiles)
        self.register_buffer("scale", scale)
        self.register_buffer("scale2", scale2)
        self.register_buffer("bias", kernels.pad_bias(bias, n))
        self._kernel = None

    def __getstate__(self) -> dict[str, object]:
        # The cached kernel holds NumPy views of the buffers; a copy must view its own buffers.
        state = self.__dict__.copy()
        state["_kernel"] = None
        return state

    def _get_kernel(self) -> kernels.LinearKernel:
        # Rebuilt when a buffer object is replaced (e.g. .float()); in-place loads keep it valid.
        current = (self.tiles, self.scale, self.scale2, self.bias)
        kernel = self._kernel
        if kernel is None or any(a is not b for a, b in zip(kernel.tensors, current, strict=True)):
            kernel = kernels.LinearKernel(
                self.tiles,
                self.scale,
                self.scale2,
                self.bias,
                out_features=self.out_features,
                bits=self.bits,
                group_size=self.group_size,
                act=self._act_name(),
                exponent=self.exponent if self.activations == "dfp" else None,
            )
            self._kernel = kernel
        return kernel

    def _act_name(self) -> str:
        if self.activations in ("int8", "float"):
            return "absmax" if self.activations == "int8" else "float"
        # DFP: a calibrated exponent, or one exponent per batch like functional.dfp_quantize.
        return "dfp" if self.exponent is not None else "dfp_tensor"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"PackedLinear expects inputs (..., {self.in_features}); got {tuple(x.shape)}"
            )
        tracing = (
            torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
        )
        if tracing or type(x) is not torch.Tensor:
            # Traced (fake) tensors cannot reach NumPy: go through the custom op, which has a
            # fake implementation, and cache nothing built from traced buffers.
            return kernels.LinearKernel.call_op(
                x,
                self.tiles,
                self.scale,
                self.scale2,
                self.bias,
                out_features=self.out_features,
                bits=self.bits,
                group_size=self.group_size,
                act=self._act_name(),
                exponent=self.exponent if self.activations == "dfp" else None,
            )
        return self._get_kernel()(x)

    def extra_repr(self) -> str:
        kind = {2: "ternary", 4: "int4"}[self.bits]
        extra = f", group_size={self.group_size}" if self.group_size else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weight_format} "
            f"({kind} kernel{extra}), activations={self.activations}, bias={self.bias is not None}"
        )


def _packed_from(layer: nn.Module, activations: str) -> tuple[PackedLinear | None, str]:
    """A PackedLinear for a QuantLinear, or ``(None, why not)``."""
    qw = layer.quantized_weight()  # type: ignore[operator]
    if not packable(qw):
        return None, f"no packed kernel for {qw!r}"
    iq = getattr(layer, "input_quantizer", None)
    spec = iq.spec() if iq is not None else None
    bias = layer.bias if isinstance(layer.bias, torch.Tensor) else None
    if spec is None or spec.kind == "float":
        return PackedLinear(qw, bias, activations=activations), ""
    if spec.kind == "dfp" and spec.bits == 8 and spec.signed:
        return PackedLinear(qw, bias, activations="dfp", exponent=spec.exponent), ""
    return (
        None,
        f"its {spec.kind} {spec.bits}-bit {'signed' if spec.signed else 'unsigned'} inputs have no packed kernel yet",
    )


def pack(model: nn.Module, activations: str = "int8", *, inplace: bool = False) -> nn.Module:
    """Inference model with every packable ``QuantLinear`` replaced by a :class:`PackedLinear`.

    ``activations`` applies to layers trained with float inputs (TTQ, LAT, TWN, ...): ``"int8"``
    (per-token absmax int8, the BitNet inference recipe; lossy) or ``"float"`` (the exact path).
    Layers that quantize their own inputs keep that format: signed 8-bit DFP (FGQ) runs the DFP
    kernels with the layer's calibrated exponent, or one exponent per batch when it has none.
    Layers with no packed kernel yet (binary / unsigned / k-bit activations, convolutions, LSTMs)
    stay as they are; ``model.packing_report`` lists what was packed and what was not, and why.
    The result is in eval mode; the input model is left untouched unless ``inplace``.
    """
    if activations not in ("int8", "float"):
        raise ValueError(f"activations must be 'int8' or 'float'; got {activations!r}")
    from lowbit.nn import QuantLinear

    target = model if inplace else copy.deepcopy(model)
    report: dict[str, str] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if isinstance(child, QuantLinear):
                packed, why = _packed_from(child, activations)
                if packed is None:
                    report[path] = f"kept as {type(child).__name__}: {why}"
                else:
                    setattr(parent, name, packed)
                    report[path] = f"packed: {packed.extra_repr()}"
            else:
                visit(child, f"{path}.")

    visit(target, "")
    target.packing_report = report  # type: ignore[assignment]
    return target.eval()
