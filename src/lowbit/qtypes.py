"""The training <-> deployment contract: :class:`QuantizedWeight`, :class:`ActSpec`, :class:`Granularity`.

Every weight quantizer, whatever its method, ``export()``s a :class:`QuantizedWeight`; packing, the
summary, the file format and the kernels only read these objects. ``QuantizedWeight.dequantize()``
reproduces *exactly* (bit for bit, in float32) the weight the layer used in its forward pass,
because both go through the same function, :func:`lowbit.functional.dequantize`.

Weight formats (value of one element; ``s`` is its scale, broadcast per granularity):

================ ====== ============================================ ==================================
format           bits   codes (int8)                                 value
================ ====== ============================================ ==================================
``binary``       1      {-1, +1}                                     ``code * s``
``ternary``      2      {-1, 0, +1}                                  ``code * s``
``ternary_asym`` 2      {-1, 0, +1}                                  ``+s[..., 0]`` (Wp) for +1,
                                                                     ``-s[..., 1]`` (Wn) for -1, 0 for 0
``kbit_linear``  k      [-(2^(k-1)), 2^(k-1) - 1] (quantizers in     ``code * s`` (``s`` is the step)
                        lowbit use the symmetric [-(2^(k-1)-1), ..])
``kbit_log``     k      [-n, n] with n = 2^(k-1) - 1                 ``sign(code) * 2^(|code| - n) * s``,
                                                                     0 for code 0 (levels
                                                                     {0, ±2^-(n-1), ..., ±1} * s)
``float``        32     empty tensor (shape ``(0,)``)                ``scales`` holds the float weight
================ ====== ============================================ ==================================

Granularity (weights are ``(out, in)`` for Linear, ``(out, in/groups, kh, kw)`` for Conv2d; let
``K = numel / out`` be the reduction length of one output row, in ``weight.reshape(out, K)`` order):

* ``"tensor"``: one scale, ``scales.shape == (1,)``.
* ``"channel"``: one scale per output channel (row), ``scales.shape == (out,)``.
* ``"group"`` with ``group_axis="in"``: each row is cut into consecutive runs of ``group_size``
  elements of its flattened reduction dimension (``(in, kh, kw)`` order for convolutions);
  the last run of a row is shorter when ``group_size`` does not divide ``K`` (a remainder group).
  ``scales.shape == (out, ceil(K / group_size))``. This is FGQ's "groups of N weights" along the
  reduction dimension: N ternary accumulations share one multiply.
* ``"group"`` with ``group_axis="out"``: consecutive runs of ``group_size`` output channels (whole
  filters) share one scale (DFP's "clusters of N filters"); the last cluster may be smaller.
  ``scales.shape == (ceil(out / group_size),)``.

``ternary_asym`` appends a trailing dimension of 2 to every scale shape (``[..., 0] = Wp``,
``[..., 1] = Wn``, both positive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ACT_KINDS",
    "FORMAT_BITS",
    "GRANULARITIES",
    "WEIGHT_FORMATS",
    "ActSpec",
    "Granularity",
    "QuantizedWeight",
    "code_range",
    "level_table",
]

WEIGHT_FORMATS = ("binary", "ternary", "ternary_asym", "kbit_linear", "kbit_log", "float")
GRANULARITIES = ("tensor", "channel", "group")
ACT_KINDS = ("float", "binary", "kbit_linear", "kbit_log", "dfp")
# Formats whose bit width is fixed by the format itself.
FORMAT_BITS = {"binary": 1, "ternary": 2, "ternary_asym": 2, "float": 32}


@dataclass(frozen=True)
class Granularity:
    """How scales are shared: per tensor, per output channel, or per group of ``group_size``.

    ``axis`` is ``"in"`` (runs along each row's flattened reduction dimension) or ``"out"``
    (clusters of output channels); see the module docstring for the exact layout.
    """

    kind: str = "tensor"
    group_size: int | None = None
    axis: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in GRANULARITIES:
            raise ValueError(
                f"unknown granularity {self.kind!r}: choose one of {', '.join(GRANULARITIES)}"
            )
        if self.kind == "group":
            if self.group_size is None or int(self.group_size) < 1:
                raise ValueError(
                    f"granularity 'group' needs group_size >= 1 (got {self.group_size!r}); "
                    "e.g. granularity='group', group_size=4"
                )
            axis = self.axis or "in"
            if axis not in ("in", "out"):
                raise ValueError(f"group_axis must be 'in' or 'out', got {self.axis!r}")
            object.__setattr__(self, "axis", axis)
            object.__setattr__(self, "group_size", int(self.group_size))
        else:
            object.__setattr__(self, "group_size", None)
            object.__setattr__(self, "axis", None)

    @classmethod
    def of(
        cls,
        granularity: str | Granularity | None = None,
        group_size: int | None = None,
        group_axis: str | None = None,
    ) -> Granularity:
        """Build from the option triple used everywhere (``granularity``, ``group_size``, ``group_axis``).

        A bare ``group_size`` implies ``granularity="group"``.
        """
        if isinstance(granularity, Granularity):
            return granularity
        if granularity is None:
            granularity = "group" if group_size is not None else "tensor"
        return cls(str(granularity), group_size, group_axis)

    def scale_shape(self, shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
        """Shape of the (symmetric) scale tensor for a weight of ``shape``."""
        shape = tuple(int(s) for s in shape)
        if self.kind == "tensor":
            return (1,)
        out = shape[0]
        if self.kind == "channel":
            return (out,)
        k = math.prod(shape[1:])
        assert self.group_size is not None
        if self.axis == "in":
            return (out, -(-k // self.group_size))
        return (-(-out // self.group_size),)

    def describe(self) -> str:
        if self.kind == "group":
            return f"group{self.group_size}/{self.axis}"
        return self.kind


def code_range(format: str, bits: int) -> tuple[int, int]:
    """Smallest and largest code a format allows."""
    if format == "binary":
        return (-1, 1)
    if format in ("ternary", "ternary_asym"):
        return (-1, 1)
    if format == "kbit_linear":
        return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if format == "kbit_log":
        n = 2 ** (bits - 1) - 1
        return (-n, n)
    if format == "float":
        return (0, 0)
    raise ValueError(f"unknown weight format {format!r}: choose one of {', '.join(WEIGHT_FORMATS)}")


def level_table(format: str, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, multipliers)``: every code of a format and the multiple of its scale it stands for.

    For ``ternary_asym`` the multiplier of +1 is "times Wp" and of -1 is "times Wn" (negated).
    """
    lo, hi = code_range(format, bits)
    codes = torch.arange(lo, hi + 1, dtype=torch.int64)
    if format == "kbit_log":
        n = 2 ** (bits - 1) - 1
        mult = [0.0 if c == 0 else math.copysign(2.0 ** (abs(c) - n), c) for c in codes.tolist()]
        return codes.to(torch.int8), torch.tensor(mult, dtype=torch.float64)
    if format == "binary":
        codes = torch.tensor([-1, 1], dtype=torch.int64)
    return codes.to(torch.int8), codes.to(torch.float64)


@dataclass
class QuantizedWeight:
    """A quantized weight: int8 codes + scales + format (see the module docstring for the layout).

    ``dequantize()`` returns exactly the float weight the layer used in its forward pass.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    format: str
    bits: int
    granularity: str = "tensor"
    group_size: int | None = None
    group_axis: str | None = None
    shape: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.format not in WEIGHT_FORMATS:
            raise ValueError(
                f"unknown weight format {self.format!r}: choose one of {', '.join(WEIGHT_FORMATS)}"
            )
        if self.format in FORMAT_BITS and self.bits != FORMAT_BITS[self.format]:
            raise ValueError(
                f"format {self.format!r} has {FORMAT_BITS[self.format]} bits, got bits={self.bits}"
            )
        if self.format in ("kbit_linear", "kbit_log") and not 2 <= self.bits <= 8:
            raise ValueError(f"{self.format} supports 2..8 bits, got {self.bits}")
        if not self.shape:
            source = self.scales if self.format == "float" else self.codes
            self.shape = tuple(int(s) for s in source.shape)
        else:
            self.shape = tuple(int(s) for s in self.shape)
        gran = self.granularity_spec  # validates the triple
        self.group_size, self.group_axis = gran.group_size, gran.axis
        if self.format != "float":
            if self.codes.dtype != torch.int8:
                raise TypeError(f"QuantizedWeight.codes must be int8, got {self.codes.dtype}")
            if tuple(self.codes.shape) != self.shape:
                raise ValueError(
                    f"codes shape {tuple(self.codes.shape)} differs from weight shape {self.shape}"
                )
            expected = gran.scale_shape(self.shape)
            if self.format == "ternary_asym":
                expected = (*expected, 2)
            if tuple(self.scales.shape) != expected:
                raise ValueError(
                    f"scales of a {self.format} weight {self.shape} with granularity "
                    f"{gran.describe()} must have shape {expected}, got {tuple(self.scales.shape)}"
                )

    @property
    def granularity_spec(self) -> Granularity:
        return Granularity(self.granularity, self.group_size, self.group_axis)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The level table of this format: ``(codes, multipliers of the scale)``."""
        return level_table(self.format, self.bits)

    def dequantize(self) -> torch.Tensor:
        """The float weight (dtype of ``scales``), bit-identical to the forward pass's weight."""
        from lowbit.functional import dequantize

        return dequantize(
            self.codes, self.scales, self.format, self.bits, self.granularity_spec, self.shape
        )

    def sparsity(self) -> float:
        """Fraction of zero codes (ternary formats; 0.0 for the others)."""
        if self.format not in ("ternary", "ternary_asym", "kbit_linear", "kbit_log"):
            return 0.0
        if self.numel == 0:
            return 0.0
        return float((self.codes == 0).sum().item()) / self.numel

    def packed_bytes(self) -> int:
        """Ideal storage: ``ceil(numel * bits / 8)`` code bytes plus float32 scales.

        The ``.lowbit`` file pads rows to whole 64-bit words; this is the information content.
        """
        if self.format == "float":
            return 4 * self.numel
        return -(-self.numel * self.bits // 8) + 4 * int(self.scales.numel())

    def to(self, device: torch.device | str) -> QuantizedWeight:
        return QuantizedWeight(
            self.codes.to(device),
            self.scales.to(device),
            self.format,
            self.bits,
            self.granularity,
            self.group_size,
            self.group_axis,
            self.shape,
        )

    def metadata(self) -> dict[str, Any]:
        """JSON-serialisable description (everything but the tensors)."""
        return {
            "format": self.format,
            "bits": self.bits,
            "granularity": self.granularity,
            "group_size": self.group_size,
            "group_axis": self.group_axis,
            "shape": list(self.shape),
        }

    @classmethod
    def from_metadata(
        cls, meta: dict[str, Any], codes: torch.Tensor, scales: torch.Tensor
    ) -> QuantizedWeight:
        return cls(
            codes,
            scales,
            meta["format"],
            int(meta["bits"]),
            meta.get("granularity", "tensor"),
            meta.get("group_size"),
            meta.get("group_axis"),
            tuple(meta["shape"]),
        )

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight(format={self.format}, bits={self.bits}, shape={self.shape}, "
            f"granularity={self.granularity_spec.describe()}, scales={tuple(self.scales.shape)})"
        )


@dataclass
class ActSpec:
    """How a layer's input activations are quantized.

    ``kind``: ``"float"`` (not quantized), ``"binary"`` (sign, ±1), ``"kbit_linear"`` (uniform
    levels ``code * scale`` clipped to ``clip``), ``"kbit_log"`` (power-of-two levels times
    ``scale``), ``"dfp"`` (dynamic fixed point: ``ints * 2**exponent`` with one exponent per
    tensor; ``exponent=None`` means it is chosen per batch from ``max|x|``, an int means a
    calibrated, fixed exponent).
    """

    kind: str = "float"
    bits: int = 32
    signed: bool = True
    exponent: int | None = None
    scale: float | None = None
    clip: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ACT_KINDS:
            raise ValueError(
                f"unknown activation kind {self.kind!r}: choose one of {', '.join(ACT_KINDS)}"
            )
        if self.kind == "float":
            self.bits = 32
        elif self.kind == "binary":
            self.bits = 1
            self.signed = True
        elif not 2 <= int(self.bits) <= 16:
            raise ValueError(f"{self.kind} activations support 2..16 bits, got {self.bits}")

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    def describe(self) -> str:
        if self.kind == "float":
            return "fp32"
        if self.kind == "binary":
            return "sign"
        sign = "" if self.signed else "u"
        return {
            "kbit_linear": f"{sign}int{self.bits}",
            "kbit_log": f"log{self.bits}",
            "dfp": f"dfp{self.bits}",
        }[self.kind]
