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
inference recipe), ``"dfp"`` (k-bit dynamic fixed point, k <= 8, signed or unsigned, one exponent
per batch exactly like ``lowbit.functional.dfp_quantize``, or a calibrated ``exponent``),
``"sign"`` (BNN's ±1 inputs), ``"kbit"`` (QNN's uniform codes ``* step``) or ``"float"`` (the
exact path for layers trained with float activations: fp32 activations times the packed weights,
fp32 accumulation; it differs from ``F.linear`` with the dequantized weight only by summation
order).

:class:`PackedConv2d` runs a convolution as im2col + one PackedLinear GEMM; :class:`PackedLSTM`
runs a ``QuantLSTM`` on two :class:`LSTMGemm` (PackedLinear) per layer and direction, the input
projection of all time steps as one GEMM and one recurrent GEMM per step.

Signed 8-bit DFP runs the fused C++ quantizer. Every other integer input format computes its
codes ``q`` in PyTorch exactly as the Quant layer's simulation does and hands the kernel
``q * 2**E`` with the fixed exponent ``E``, which it re-quantizes without error. Unsigned 8-bit
codes (0..255, FGQ's inputs after a ReLU) do not fit int8: the kernel gets ``q - 128`` and the
output gets ``128 * 2**E * sum_k w[n, k]`` back (a per-row constant, the "zero point" term), so
the integer accumulation stays exact.
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import torch
import torch.nn.functional as TF
from torch import nn

from lowbit import functional as F
from lowbit import kernels
from lowbit.qtypes import QuantizedWeight

__all__ = [
    "ACTIVATIONS",
    "LSTMGemm",
    "PackedConv2d",
    "PackedLSTM",
    "PackedLinear",
    "PackingError",
    "PackingWarning",
    "pack",
    "packable",
]

# "int8": per-token absmax; "float": exact fp32 path; "dfp": dynamic fixed point (any bits <= 8,
# signed or unsigned); "sign": ±1 (BNN inputs); "kbit": uniform k-bit codes * step (QNN inputs).
ACTIVATIONS = ("int8", "dfp", "float", "sign", "kbit")
# The state-dict entry of a packed layer's calibrated activation exponent (files keep it in the
# layer's config instead: see file_tensors).
ACT_EXPONENT = "act_exponent"


def file_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors ``lowbit.save`` writes for a packed GEMM layer: its state dict but the
    activation exponent, which the file's layer config holds."""
    return {
        k: v
        for k, v in layer.state_dict().items()
        if isinstance(v, torch.Tensor) and k.rsplit(".", 1)[-1] != ACT_EXPONENT
    }


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
    return unpackable_reason(qw) is None


def unpackable_reason(qw: QuantizedWeight) -> str | None:
    """Why :class:`PackedLinear` cannot run ``qw`` (``None`` when it can)."""
    try:
        _kernel_codes(qw)
        _row_or_group_scales(qw)
    except ValueError as exc:
        return f"no packed kernel for {qw!r}: {exc}"
    return None if len(qw.shape) == 2 else f"no packed kernel for {qw!r}: not a 2-D weight"


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


def _compact_scales(qw: QuantizedWeight, factor: float, step: float) -> torch.Tensor:
    """The weight scales at the granularity ``qw`` really has (layout 2's ``wscale``), fp32:
    ``(1,)`` per tensor, ``(2,)`` = ``[Wp, Wn]`` asymmetric per tensor, ``(N,)`` / ``(N, 2)`` per
    row (groups along the output axis expanded to rows), ``(N, ceil(K/G))`` groups along K;
    times the kernel factor (a power of two) and the k-bit input step."""
    s = qw.scales.detach().to(torch.float64)
    if factor != 1.0 or step != 1.0:
        s = s * factor * step
    asym = qw.format == "ternary_asym"
    if qw.granularity == "tensor" or (
        qw.granularity == "channel" and s.numel() == (2 if asym else 1)
    ):
        return s.reshape(2 if asym else 1).float()
    rows, _ = _row_or_group_scales(
        QuantizedWeight(
            qw.codes, s, qw.format, qw.bits, qw.granularity, qw.group_size, qw.group_axis, qw.shape
        )
    )
    return rows.to(torch.float64).float().contiguous()


def _is_per_tensor(shape: tuple[int, ...], asym: bool) -> bool:
    return tuple(shape) == ((2,) if asym else (1,))


def _scale_shapes(cfg: dict[str, Any]) -> list[tuple[int, ...]]:
    """The ``wscale`` shapes a layout-2 config may have."""
    n, k, gs = cfg["out_features"], cfg["in_features"], cfg["group_size"]
    if cfg["asym"]:
        return [(2,), (n, 2)]
    if gs:
        return [(n, (k + gs - 1) // gs)]
    return [(1,), (n,)]


def _kernel_scales(
    wscale: torch.Tensor,
    row_scale: torch.Tensor | None,
    n: int,
    k: int,
    group_size: int,
    asym: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel-layout ``(scale, scale2)`` expanded from layout 2's compact ``wscale`` (times the
    per-row ``row_scale`` of a folded BatchNorm, in float64, rounded once)."""
    s = wscale.detach().to(torch.float64)
    if row_scale is not None:
        r = row_scale.detach().to(torch.float64)
        if asym:
            s = s.reshape(1, 2) * r[:, None]
        elif group_size:  # fixed-point group scales keep a folded BatchNorm in row_scale
            s = s * r[:, None]
        else:
            s = s.reshape(1) * r
    return kernels.pack_ternary_scales(s, n, k, group_size=group_size, asym=asym)


def _signs_shape(n: int, k: int) -> tuple[int, int]:
    return (n, kernels.packed_row_bytes(k))


def _codes_from_signs(signs: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """±1 int8 codes ``(n, k)`` of layout 2's 1-bit ``signs`` (bit 1 = -1; padding bits ignored)."""
    import numpy as np

    bits = np.unpackbits(signs.detach().numpy().reshape(n, -1), axis=1, bitorder="little")[:, :k]
    return torch.from_numpy(1 - 2 * bits.astype(np.int8))


def _conv_scale_rows(qw: QuantizedWeight) -> QuantizedWeight:
    """A conv weight ``(out, in/g, kh, kw)`` viewed as the ``(out, K)`` matrix the GEMM runs."""
    if len(qw.shape) == 2:
        return qw
    n = qw.shape[0]
    k = 1
    for d in qw.shape[1:]:
        k *= d
    return QuantizedWeight(
        qw.codes.reshape(n, k),
        qw.scales,
        qw.format,
        qw.bits,
        qw.granularity,
        qw.group_size,
        qw.group_axis,
        (n, k),
    )


# Buffer layouts of PackedLinear (the ``layout`` config key; docs/format.md):
#   1 (files written before layout 2; config without "layout"): the kernel's own arrays,
#     ``scale`` / ``scale2`` / ``bias`` per row and padded to Np, grouped scales tiled;
#   2 (written since): ``wscale`` at the QuantizedWeight's real granularity, ``row_scale`` (N,)
#     only for a BatchNorm folded into per-tensor scales, ``bias`` (N,) unpadded and, for binary
#     weights, 1-bit ``signs`` instead of 2-bit ``tiles``; the kernel arrays are expanded from
#     them when the layer is built or loaded and are not saved.
LAYOUTS = (1, 2)


def _expected_buffers(cfg: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """dtype and shape of every tensor a PackedLinear with this config saves (file validation)."""
    n, k, bits, gs = cfg["out_features"], cfg["in_features"], cfg["bits"], cfg["group_size"]
    np_ = (n + 15) // 16 * 16
    tiles = kernels.ternary_tiles_shape(n, k) if bits == 2 else kernels.int4_tiles_shape(n, k)
    if cfg.get("layout", 1) == 2:
        out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        if _one_bit(cfg):
            out["signs"] = (torch.uint8, _signs_shape(n, k))
        else:
            out["tiles"] = (torch.uint8, tuple(tiles))
        if _fixed8(cfg):
            out["wscale_m"] = (torch.uint8, tuple(cfg["scale_shape"]))
            out["wscale_e"] = (torch.int16, (cfg["scale_shape"][0],))
        else:
            out["wscale"] = (torch.float32, tuple(cfg["scale_shape"]))
        if cfg["has_row_scale"]:
            out["row_scale"] = (torch.float32, (n,))
        if cfg["has_bias"]:
            out["bias"] = (torch.float32, (n,))
        if cfg["has_shift"]:
            out["shift"] = (torch.float32, (n,))
        return out
    if gs:
        kp = (k + 15) // 16 * 16
        scale: tuple[int, ...] = (np_ * ((kp + gs - 1) // gs),)
    else:
        scale = (np_,)
    out = {
        "tiles": (torch.uint8, tuple(tiles)),
        "scale": (torch.float32, scale),
    }
    if cfg["asym"]:
        out["scale2"] = (torch.float32, (np_,))
    if cfg["has_bias"]:
        out["bias"] = (torch.float32, (np_,))
    if cfg["has_shift"]:
        out["shift"] = (torch.float32, (n,))
    return out


def _one_bit(cfg: dict[str, Any]) -> bool:
    """Layout 2 stores binary weights as 1-bit signs (expanded to 2-bit tiles for the kernel)."""
    return cfg.get("layout", 1) == 2 and cfg["weight_format"] == "binary" and cfg["bits"] == 2


SCALE_FORMATS = ("f32", "fixed8")


def _fixed8(cfg: dict[str, Any]) -> bool:
    """Layout 2 stores grouped scales ``m · 2^E`` (FGQ ``scale_bits``) as one byte each plus
    one exponent per row (``scale_format = "fixed8"``)."""
    return cfg.get("scale_format", "f32") == "fixed8"


def _fixed8_encoding(wscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(m uint8 (N, groups), E int16 (N,))`` with ``wscale = m · 2^E`` exactly, or ``None``
    when some row's scales are not on an 8-bit fixed-point grid (then they stay float32)."""
    from lowbit.methods.fgq import scale_grid_exponents

    s = wscale.detach().to(torch.float64)
    if s.dim() != 2 or s.numel() == 0 or not bool(torch.isfinite(s).all()) or bool((s < 0).any()):
        return None
    e = scale_grid_exponents(s, 8)
    m = s / torch.exp2(e.to(torch.float64))[:, None]
    if not torch.equal(m, m.round()) or float(m.max()) > 255:
        return None
    return m.to(torch.uint8), e.to(torch.int16)


def _checked_saved(
    key: str,
    got: torch.Tensor | None,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    missing_keys: list[str],
    error_msgs: list[str],
) -> torch.Tensor | None:
    """A tensor saved in place of a buffer, reported the way ``load_state_dict`` reports buffers
    (missing, or another dtype/shape); ``None`` unless it fits."""
    if got is None:
        missing_keys.append(key)
        return None
    if got.dtype != dtype or tuple(got.shape) != shape:
        name = str(dtype).removeprefix("torch.")
        error_msgs.append(
            f"size mismatch for {key}: copying {str(got.dtype).removeprefix('torch.')}"
            f"{tuple(got.shape)}, the layer needs {name}{shape}"
        )
        return None
    return got


def _fixed8_decode(m: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """float32 ``m · 2^E`` (exact: at most 8 significant bits, ``E`` in [-149, 104])."""
    return (m.to(torch.float64) * torch.exp2(e.to(torch.float64))[:, None]).to(torch.float32)


def _check_config(cfg: dict[str, Any]) -> None:
    ints = ("in_features", "out_features", "bits", "group_size", "act_bits")
    for key in ints:
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool) or cfg[key] < 0:
            raise ValueError(
                f"packed layer config: {key} must be a non-negative int, got {cfg.get(key)!r}"
            )
    if cfg["bits"] not in (2, 4):
        raise ValueError(f"packed layer config: bits must be 2 or 4, got {cfg['bits']}")
    if cfg["group_size"] % 4:
        raise ValueError(
            f"packed layer config: group_size must be a multiple of 4, got {cfg['group_size']}"
        )
    if cfg.get("weight_format") not in (
        "binary",
        "ternary",
        "ternary_asym",
        "kbit_linear",
        "kbit_log",
    ):
        raise ValueError(f"packed layer config: unknown weight_format {cfg.get('weight_format')!r}")
    if not isinstance(cfg.get("act_step", 1.0), (int, float)):
        raise ValueError("packed layer config: act_step must be a number")
    if cfg.get("activations") not in ACTIVATIONS:
        raise ValueError(f"packed layer config: unknown activations {cfg['activations']!r}")
    if cfg["in_features"] * cfg["out_features"] > 1 << 40:
        raise ValueError("packed layer config: layer too large")
    if not isinstance(cfg.get("relu", False), bool):
        raise ValueError("packed layer config: relu must be a bool")
    for key in ("asym", "has_bias", "has_shift", "act_signed"):
        if not isinstance(cfg.get(key), bool):
            raise ValueError(f"packed layer config: {key} must be a bool")
    e = cfg.get("exponent")
    if e is not None and (not isinstance(e, int) or not -126 <= e <= 127):
        raise ValueError(f"packed layer config: exponent must be an int in [-126, 127], got {e!r}")
    if cfg["act_bits"] > 8:
        raise ValueError("packed layer config: integer activations have at most 8 bits")
    layout = cfg.get("layout", 1)
    if layout not in LAYOUTS or isinstance(layout, bool):
        raise ValueError(
            f"packed layer config: unknown buffer layout {layout!r} (this lowbit reads "
            f"{', '.join(map(str, LAYOUTS))}): upgrade lowbit"
        )
    if layout == 2:
        shape = cfg.get("scale_shape")
        if not isinstance(shape, list) or tuple(shape) not in _scale_shapes(cfg):
            raise ValueError(
                f"packed layer config: scale_shape {shape!r} does not fit the layer "
                f"(expected one of {[list(s) for s in _scale_shapes(cfg)]})"
            )
        if not isinstance(cfg.get("has_row_scale"), bool):
            raise ValueError("packed layer config: has_row_scale must be a bool")
        if cfg.get("scale_format", "f32") not in SCALE_FORMATS:
            raise ValueError(
                f"packed layer config: unknown scale_format {cfg.get('scale_format')!r} (this "
                f"lowbit reads {', '.join(SCALE_FORMATS)}): upgrade lowbit"
            )
        if _fixed8(cfg) and not (cfg["group_size"] and not cfg["asym"]):
            raise ValueError("packed layer config: scale_format 'fixed8' is for groups along K")
        if (
            cfg["has_row_scale"]
            and not _is_per_tensor(tuple(shape), cfg["asym"])
            and not _fixed8(cfg)
        ):
            raise ValueError(
                "packed layer config: row_scale only goes with per-tensor or 'fixed8' scales"
            )


class Float32Buffers:
    """Mixin for packed modules: their buffers are the file's float32 scales, bias and tables,
    which the kernels read as float32. ``.half()``, ``.double()`` and ``.to(dtype)`` therefore
    leave them as they are (device moves still apply), so casting a model that holds packed
    layers neither breaks them nor rounds their scales; the forward casts instead."""

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype != t.dtype:
                return t.to(device=out.device)  # the original values, not a round trip
            return out

        # The float dtype the model is being cast to: layers fed packed bits answer in it.
        probe = fn(torch.zeros((), dtype=torch.float32))
        if probe.is_floating_point():
            self._cast_dtype = None if probe.dtype == torch.float32 else probe.dtype
        return super()._apply(keep_dtype, recurse)  # type: ignore[misc]


def _dtype_forward(forward: Any, bits: bool) -> Any:
    @functools.wraps(forward)
    def wrapped(self: nn.Module, x: Any, *args: Any, **kwargs: Any) -> Any:
        floating = isinstance(x, torch.Tensor) and x.is_floating_point()
        if isinstance(x, torch.Tensor) and not floating and not bits:
            raise TypeError(
                f"{type(self).__name__} takes floating-point inputs (like the layer it replaces); "
                f"got {x.dtype}"
            )
        # packed bits in: float outputs take the dtype the model was last cast to
        cast = getattr(self, "_cast_dtype", None) if bits else None
        dtype = x.dtype if floating else cast or torch.float32
        if dtype is torch.float32:
            return forward(self, x, *args, **kwargs)
        x32 = x.to(torch.float32) if floating else x
        return _to_dtype(forward(self, x32, *args, **kwargs), dtype)

    return wrapped


def float32_forward(forward: Any) -> Any:
    """Run a packed module's forward in float32 and give the output the input's dtype (the float
    layers around a packed one keep whatever dtype the model was cast to)."""
    return _dtype_forward(forward, bits=False)


def float32_or_bits_forward(forward: Any) -> Any:
    """:func:`float32_forward` for the binary layers, which also take packed bits (uint8): their
    float outputs then take the dtype the module was last cast to (``.double()`` etc.), and
    packed-bit outputs stay uint8."""
    return _dtype_forward(forward, bits=True)


def _to_dtype(out: Any, dtype: torch.dtype) -> Any:
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.is_floating_point() else out  # packed bits stay uint8
    if isinstance(out, tuple):
        return tuple(_to_dtype(o, dtype) for o in out)
    return out


class PackedLinear(Float32Buffers, nn.Module):
    """Inference-only ``nn.Linear`` replacement on packed low-bit weights (C++ kernels).

    Saved (``state_dict``, buffer layout 2 of docs/format.md): ``tiles`` (uint8; 1-bit
    ``signs`` for binary weights), ``wscale`` (fp32 at the QuantizedWeight's own granularity:
    ``(1,)``, ``(2,)`` = ``[Wp, Wn]``, ``(N,)``, ``(N, 2)`` or ``(N, groups)``), ``row_scale``
    (fp32 ``(N,)``, only when a BatchNorm was folded into per-tensor scales), ``bias`` (fp32
    ``(N,)``, optional) and, for unsigned 8-bit inputs, ``shift`` (fp32 ``(N,)``:
    ``128 * sum_k w[n, k]``). The kernel's arrays (``tiles``, ``scale``, ``scale2``, padded
    ``kbias``) are expanded from them at construction / load time and not saved. Layers loaded
    from files written before layout 2 keep their saved kernel arrays (``layout=1``).
    ``forward`` accepts ``(..., in_features)`` float tensors and returns fp32
    ``(..., out_features)``. In eager mode it calls the kernel directly; under torch.compile /
    torch.export it goes through the ``torch.ops.lowbit`` custom ops (with fake implementations).

    ``activations`` (see the module docstring): ``"int8"``, ``"float"``, ``"dfp"`` (``act_bits``,
    ``act_signed``, calibrated ``exponent`` or None for one per batch), ``"sign"``, ``"kbit"``
    (``act_bits``, ``act_signed``, ``act_step``: value = code * step).
    """

    tiles: torch.Tensor
    scale: torch.Tensor
    scale2: torch.Tensor | None
    bias: torch.Tensor | None
    kbias: torch.Tensor | None
    shift: torch.Tensor | None
    wscale: torch.Tensor | None
    row_scale: torch.Tensor | None
    exponent: int | None  # the calibrated activation exponent; None: one per batch
    _kernel: kernels.LinearKernel | None

    def __init__(
        self,
        qweight: QuantizedWeight | None,
        bias: torch.Tensor | None = None,
        *,
        activations: str = "int8",
        exponent: int | None = None,
        act_bits: int = 8,
        act_signed: bool = True,
        act_step: float = 1.0,
        _config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self._kernel = None
        if qweight is None:
            # Rebuilt from a file: empty buffers of the validated shapes, filled by the loader.
            assert _config is not None
            _check_config(_config)
            self._set_config(_config)
            saved = _expected_buffers(_config)
            for name, (dtype, shape) in saved.items():
                if name not in ("signs", "wscale_m", "wscale_e"):
                    self.register_buffer(name, torch.zeros(shape, dtype=dtype))
            if _fixed8(_config):  # the float32 scales the kernel arrays are expanded from
                self.register_buffer(
                    "wscale", torch.zeros(self.scale_shape, dtype=torch.float32), persistent=False
                )
            for name in ("scale2", "bias", "kbias", "shift", "wscale", "row_scale"):
                if name not in self._buffers:
                    self.register_buffer(name, None)
            if self.layout == 2:
                n, k = self.out_features, self.in_features
                tshape = (
                    kernels.ternary_tiles_shape(n, k)
                    if self.bits == 2
                    else kernels.int4_tiles_shape(n, k)
                )
                if "tiles" not in saved:
                    self.register_buffer(
                        "tiles", torch.zeros(tshape, dtype=torch.uint8), persistent=False
                    )
                self._expand_kernel_buffers()
            return
        if len(qweight.shape) != 2:
            raise ValueError(
                f"PackedLinear needs a 2-D (out, in) weight; got shape {qweight.shape}"
            )
        if activations not in ACTIVATIONS:
            raise ValueError(
                f"activations must be one of {', '.join(ACTIVATIONS)}; got {activations!r}"
            )
        n, k = qweight.shape
        if activations in ("dfp", "kbit") and not 1 <= act_bits <= 8:
            raise ValueError(f"integer activations need 1..8 bits; got {act_bits}")
        _, hi = self._code_range(activations, act_bits, act_signed)
        codes, bits, factor = _kernel_codes(qweight)
        _, group_size = _row_or_group_scales(qweight)
        # QNN's activation step is a per-layer constant: folded into the weight scales.
        step = float(act_step) if activations == "kbit" else 1.0
        asym = qweight.format == "ternary_asym"
        has_shift = hi > 127
        wscale = _compact_scales(qweight, factor, step)
        # Grouped scales already on an 8-bit fixed-point grid (FGQ scale_bits) are saved as bytes.
        fixed8 = bool(group_size) and not asym and _fixed8_encoding(wscale) is not None
        self._set_config(
            {
                "in_features": int(k),
                "out_features": int(n),
                "bits": bits,
                "group_size": int(group_size),
                "weight_format": qweight.format,
                "asym": asym,
                "has_bias": bias is not None,
                "has_shift": has_shift,
                "relu": False,
                "activations": activations,
                "exponent": None if exponent is None else int(exponent),
                "act_bits": int(act_bits) if activations in ("dfp", "kbit") else 8,
                "act_signed": bool(act_signed) if activations in ("dfp", "kbit") else True,
                "act_step": step,
                "layout": 2,
                "scale_shape": list(wscale.shape),
                "has_row_scale": False,
                "scale_format": "fixed8" if fixed8 else "f32",
            }
        )
        _check_config(self.config())
        tiles = kernels.pack_ternary(codes) if bits == 2 else kernels.pack_int4(codes)
        # 1-bit layers save signs instead: the 2-bit tiles are then only the kernel's copy.
        self.register_buffer("tiles", tiles, persistent=not _one_bit(self.config()))
        self.register_buffer("wscale", wscale, persistent=not fixed8)
        self.register_buffer("row_scale", None)
        self.register_buffer(
            "bias", None if bias is None else bias.detach().reshape(-1).to(torch.float32).clone()
        )
        self._expand_kernel_buffers()
        shift = None
        if has_shift:
            # Codes 0..255 enter the kernel as q - 128; this row constant adds the 128s back.
            w = qweight.dequantize().to(torch.float64) * step
            shift = (128.0 * w.sum(dim=1)).to(torch.float32)
        self.register_buffer("shift", shift)

    # -- configuration (what a .lowbit manifest stores for this layer) ------------------------
    def _expand_kernel_buffers(self) -> None:
        """Layout 2: the kernel's ``scale`` / ``scale2`` / ``kbias`` from the saved compact
        buffers (non-persistent; rebuilt after every load and BatchNorm fold)."""
        n, k = self.out_features, self.in_features
        assert self.wscale is not None
        scale, scale2 = _kernel_scales(
            self.wscale, self.row_scale, n, k, self.group_size, self.asym
        )
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("scale2", scale2, persistent=False)
        self.register_buffer("kbias", kernels.pad_bias(self.bias, n), persistent=False)
        gscale_i = row_mult = None
        enc = _fixed8_encoding(self.wscale) if self.scale_format == "fixed8" else None
        if enc is not None:
            # The same scales as 8-bit mantissas and one multiplier per row (2^E times a folded
            # BatchNorm's scale): the AVX2 kernel for groups of 4 accumulates them in int32.
            mult = torch.exp2(enc[1].to(torch.float64))
            if self.row_scale is not None:
                mult = mult * self.row_scale.detach().to(torch.float64)
            gscale_i, row_mult = kernels.pack_group_mantissas(
                enc[0], mult.to(torch.float32), n, k, group_size=self.group_size
            )
        self.register_buffer("kgscale_i", gscale_i, persistent=False)
        self.register_buffer("krow_mult", row_mult, persistent=False)
        self._kernel = None

    def _kernel_bias(self) -> torch.Tensor | None:
        return self.kbias if self.layout == 2 else self.bias

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout == 2 and _one_bit(self.config()):
            codes = kernels.unpack_ternary(self.tiles, self.out_features, self.in_features)
            destination[prefix + "signs"] = kernels.pack_signs(codes.to(torch.float32))
        if self.layout == 2 and self.scale_format == "fixed8":
            assert self.wscale is not None
            enc = _fixed8_encoding(self.wscale)
            if enc is None:
                raise ValueError(
                    f"{prefix}wscale is no longer on its 8-bit fixed-point grid (was it edited "
                    "after packing?); re-pack the model from its quantized form"
                )
            destination[prefix + "wscale_m"], destination[prefix + "wscale_e"] = enc
        if self.exponent is not None:
            # The calibrated activation exponent is state, as a quantized layer's scale is: another
            # packed model of the same architecture that loads this state dict becomes this one.
            # (Files keep it in the layer's config; lowbit.save leaves this entry out.)
            destination[prefix + ACT_EXPONENT] = torch.tensor(self.exponent, dtype=torch.int16)

    def _load_act_exponent(self, value: Any, key: str, error_msgs: list[str]) -> None:
        if self.exponent is None:
            error_msgs.append(
                f"{key}: this layer picks its activation exponent per batch, the state dict's "
                "layer had a calibrated one; pack both models with the same activations"
            )
            return
        ok = (
            isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point()
        )
        e = int(value) if ok else None
        if e is None or not -126 <= e <= 127:
            error_msgs.append(f"{key}: expected one integer exponent in [-126, 127], got {value!r}")
            return
        if e != self.exponent:
            self.exponent = e
            self._kernel = None  # the cached kernel holds the old exponent

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        exponent_key = prefix + ACT_EXPONENT
        if exponent_key in state_dict:  # absent in files (the config holds it): nothing changes
            self._load_act_exponent(state_dict[exponent_key], exponent_key, error_msgs)
            state_dict = {k: v for k, v in state_dict.items() if k != exponent_key}
        one_bit = self.layout == 2 and _one_bit(self.config())
        fixed8 = self.layout == 2 and self.scale_format == "fixed8"
        n, k = self.out_features, self.in_features
        # Tensors layout 2 saves in place of buffers: 1-bit signs, fixed-point scales.
        saved: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        if one_bit:
            saved["signs"] = (torch.uint8, _signs_shape(n, k))
        if fixed8:
            saved["wscale_m"] = (torch.uint8, tuple(self.scale_shape))
            saved["wscale_e"] = (torch.int16, (self.scale_shape[0],))
        own = {prefix + name: state_dict.get(prefix + name) for name in saved}
        if own:
            state_dict = {key: v for key, v in state_dict.items() if key not in own}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.layout != 2:
            self._kernel = None
            return
        got = {
            name: _checked_saved(prefix + name, own[prefix + name], *spec, missing_keys, error_msgs)
            for name, spec in saved.items()
        }
        m, e = got.get("wscale_m"), got.get("wscale_e")
        if m is not None and e is not None:
            if bool((e < -149).any()) or bool((e > 104).any()):
                error_msgs.append(f"{prefix}wscale_e: exponents must lie in [-149, 104]")
            else:
                assert self.wscale is not None
                with torch.no_grad():
                    self.wscale.copy_(_fixed8_decode(m, e))
        signs = got.get("signs")
        if signs is not None:
            with torch.no_grad():
                self.tiles.copy_(kernels.pack_ternary(_codes_from_signs(signs, n, k)))
        self._expand_kernel_buffers()

    def _set_config(self, cfg: dict[str, Any]) -> None:
        self.in_features, self.out_features = cfg["in_features"], cfg["out_features"]
        self.bits, self.group_size = cfg["bits"], cfg["group_size"]
        self.weight_format, self.asym = cfg["weight_format"], cfg["asym"]
        self.activations, self.exponent = cfg["activations"], cfg["exponent"]
        self.act_bits, self.act_signed = cfg["act_bits"], cfg["act_signed"]
        self.act_step = float(cfg.get("act_step", 1.0))
        self.has_bias, self.has_shift = cfg["has_bias"], cfg["has_shift"]
        self.relu = bool(cfg.get("relu", False))
        self.layout = int(cfg.get("layout", 1))
        self.scale_shape = list(cfg.get("scale_shape", []))
        self.has_row_scale = bool(cfg.get("has_row_scale", False))
        self.scale_format = str(cfg.get("scale_format", "f32"))

    def config(self) -> dict[str, Any]:
        """Everything but the buffers, as JSON-serialisable values."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "weight_format": self.weight_format,
            "asym": self.asym,
            "has_bias": self.has_bias,
            "has_shift": self.has_shift,
            "activations": self.activations,
            "exponent": self.exponent,
            "act_bits": self.act_bits,
            "act_signed": self.act_signed,
            "act_step": self.act_step,
            "relu": self.relu,
            **(
                {
                    "layout": 2,
                    "scale_shape": list(self.scale_shape),
                    "has_row_scale": self.has_row_scale,
                }
                if self.layout == 2
                else {}
            ),
            # Only written when not the default, so f32 configs read by older lowbit unchanged.
            **({"scale_format": self.scale_format} if self.scale_format != "f32" else {}),
        }

    @staticmethod
    def expected_buffers(cfg: dict[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        _check_config(cfg)
        return _expected_buffers(cfg)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> PackedLinear:
        """An empty layer (zero buffers) for ``cfg``; ``load_state_dict`` fills it."""
        return cls(None, _config=dict(cfg))

    @staticmethod
    def _code_range(activations: str, bits: int, signed: bool) -> tuple[int, int]:
        if activations == "sign":
            return -1, 1
        if activations == "dfp":
            return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        if activations == "kbit":
            hi = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
            return (-hi if signed else 0), hi
        return -127, 127

    def __getstate__(self) -> dict[str, object]:
        # The cached kernel holds NumPy views of the buffers; a copy must view its own buffers.
        state = self.__dict__.copy()
        state["_kernel"] = None
        return state

    def _fused(self) -> bool:
        """Whether the C++ side quantizes the inputs itself (int8 absmax, float, signed dfp8,
        and unsigned dfp8 with a calibrated exponent on the grouped kernel)."""
        return (
            self.activations in ("int8", "float")
            or (self.activations == "dfp" and self.act_bits == 8 and self.act_signed)
            or self._unsigned_fused()
        )

    def _unsigned_fused(self) -> bool:
        """Unsigned 8-bit DFP inputs with a fixed exponent on groups along K (FGQ after a ReLU):
        the kernel takes the codes 0..255 as they are, so no ``shift`` term is added."""
        return (
            self.activations == "dfp"
            and self.act_bits == 8
            and not self.act_signed
            and self.exponent is not None
            and self.group_size > 0
            and not self.asym
        )

    def _get_kernel(self) -> kernels.LinearKernel:
        # Rebuilt when a buffer object is replaced (e.g. .float()); in-place loads keep it valid.
        mantissas = self._group_mantissas()
        current = (self.tiles, self.scale, self.scale2, self._kernel_bias(), *(mantissas or ()))
        kernel = self._kernel
        held = () if kernel is None else kernel.all_tensors()
        if (
            kernel is None
            or len(held) != len(current)
            or any(a is not b for a, b in zip(held, current, strict=True))
        ):
            kernel = kernels.LinearKernel(
                *current[:4], **self._kernel_options(), group_mantissas=mantissas
            )
            self._kernel = kernel
        return kernel

    def _group_mantissas(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(kgscale_i, krow_mult)`` for the eager kernel: 8-bit fixed-point group scales on the
        fused unsigned path (traced graphs use the equal float ``scale``)."""
        gscale_i, row_mult = getattr(self, "kgscale_i", None), getattr(self, "krow_mult", None)
        if gscale_i is None or row_mult is None or not self._unsigned_fused():
            return None
        return gscale_i, row_mult

    def _kernel_options(self) -> dict[str, Any]:
        """The fused kernel's settings (shared by the cached kernel and the traced custom op)."""
        return {
            "out_features": self.out_features,
            "bits": self.bits,
            "group_size": self.group_size,
            "act": self._act_name(),
            "exponent": self._fused_exponent(),
            "relu": self._kernel_relu(),
        }

    def _fused_exponent(self) -> int | None:
        return self.exponent if self.activations == "dfp" and self._fused() else None

    def _act_name(self) -> str:
        if self.activations in ("int8", "float"):
            return "absmax" if self.activations == "int8" else "float"
        if not self._fused():
            return "dfp"  # placeholder: every call passes its own fixed exponent
        if self._unsigned_fused():
            return "udfp"
        # DFP: a calibrated exponent, or one exponent per batch like functional.dfp_quantize.
        return "dfp" if self.exponent is not None else "dfp_tensor"

    # -- integer input codes computed in PyTorch (the Quant layer's own rules) -------------------
    def input_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        """``(q, E)``: integer codes of ``x`` as floats (``x_q = q * 2**E``, times ``act_step``
        for ``"kbit"``), bit-identical to what the Quant layer's input quantizer produced."""
        x = x.detach().to(torch.float32)
        if self.activations == "sign":
            return torch.where(x < 0, -1.0, 1.0), 0
        lo, hi = self._code_range(self.activations, self.act_bits, self.act_signed)
        if self.activations == "kbit":
            # act_step is LinearAct's own float64 step clip / qmax: the same division, same codes.
            return torch.round(x / self.act_step).clamp(lo, hi), 0
        e = self.exponent
        if e is None:
            e = F.dfp_exponent(x, self.act_bits, self.act_signed)
        v = torch.round(torch.ldexp(x, torch.tensor(-e, dtype=x.dtype)))
        return v.clamp(lo, hi), int(e)

    def gemm_codes(self, q: torch.Tensor, e: int) -> torch.Tensor:
        """The layer's output for integer codes ``q`` (float tensor, ``(..., K)``) at exponent E."""
        if self.has_shift:
            q = q - 128.0
        xs = torch.ldexp(q, torch.tensor(e, dtype=q.dtype)) if e else q
        if _tracing(xs):
            y = kernels.LinearKernel.call_op(
                xs,
                self.tiles,
                self.scale,
                self.scale2,
                self._kernel_bias(),
                out_features=self.out_features,
                bits=self.bits,
                group_size=self.group_size,
                act="dfp",
                exponent=e,
                relu=self._kernel_relu(),
            )
        else:
            y = self._get_kernel()(xs, exponent=e)
        if self.shift is not None:
            y = y + self.shift * (2.0**e)
            if self.relu:  # after the zero-point term, so not in the kernel
                y = torch.relu(y)
        return y

    @float32_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"PackedLinear expects inputs (..., {self.in_features}); got {tuple(x.shape)}"
            )
        if _tracing(x):
            if not self._fused():
                return self.gemm_codes(*self.input_codes(x))
            # Traced (fake) tensors cannot reach NumPy: go through the custom op, which has a
            # fake implementation, and cache nothing built from traced buffers.
            return kernels.LinearKernel.call_op(
                x,
                self.tiles,
                self.scale,
                self.scale2,
                self._kernel_bias(),
                **self._kernel_options(),
            )
        y = self.gemm_codes(*self.input_codes(x)) if not self._fused() else self._get_kernel()(x)
        if self.activations in ("dfp", "kbit"):
            # Integer codes have no NaN (the quantizers give NaN some code, differently per ISA):
            # a token with a NaN gets a NaN output row, as in PyTorch and the int8 kernels.
            nan_rows = torch.isnan(x).any(-1, keepdim=True)
            if bool(nan_rows.any()):
                y = y.masked_fill(nan_rows, float("nan"))
        return y

    def _kernel_relu(self) -> bool:
        return self.relu and (not self.has_shift or self._unsigned_fused())

    @torch.no_grad()
    def fold_batchnorm(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        """Fold an eval-mode BatchNorm that follows this layer into the scales and bias:
        ``y' = (y - mean) * g + beta`` with ``g = gamma / sqrt(var + eps)`` is one more per-row
        affine map, which the kernel epilogue applies for free (fp32 rounding differs only)."""
        n, np_ = self.out_features, (self.out_features + 15) // 16 * 16
        if bn.num_features != n or bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"cannot fold {bn} into a layer with {n} outputs")
        g = torch.ones(np_, dtype=torch.float64)
        g[:n] = (bn.running_var.double() + bn.eps).rsqrt()
        beta = torch.zeros(np_, dtype=torch.float64)
        if bn.weight is not None:
            g[:n] *= bn.weight.double()
        if bn.bias is not None:
            beta[:n] = bn.bias.double()
        mean = torch.zeros(np_, dtype=torch.float64)
        mean[:n] = bn.running_mean.double()
        if self.layout == 2:
            self._fold_compact(g[:n], beta[:n], mean[:n])
            return
        if self.group_size:
            view = self.scale.view(np_ // 16, -1, 16)
            view.copy_((view.double() * g.view(np_ // 16, 1, 16)).float())
        else:
            self.scale.copy_((self.scale.double() * g).float())
        if self.scale2 is not None:
            self.scale2.copy_((self.scale2.double() * g).float())
        if self.shift is not None:
            self.shift.copy_((self.shift.double() * g[:n]).float())
        old = self.bias.double() if self.bias is not None else torch.zeros(np_, dtype=torch.float64)
        bias = ((old - mean) * g + beta).float()
        bias[n:] = 0
        self.bias = bias  # a new buffer object: the cached kernel is rebuilt
        self.has_bias = True
        self._kernel = None

    def _fold_compact(self, g: torch.Tensor, beta: torch.Tensor, mean: torch.Tensor) -> None:
        """Layout 2 of fold_batchnorm: per-tensor scales keep their size and gain a per-row
        ``row_scale``; per-row and grouped scales absorb ``g`` themselves."""
        assert self.wscale is not None
        if _is_per_tensor(tuple(self.wscale.shape), self.asym) or self.scale_format == "fixed8":
            old = self.row_scale.double() if self.row_scale is not None else 1.0
            self.register_buffer("row_scale", (old * g).float())
            self.has_row_scale = True
        else:
            w = self.wscale.double()
            self.wscale.copy_((w * (g[:, None] if w.dim() == 2 else g)).float())
        if self.shift is not None:
            self.shift.copy_((self.shift.double() * g).float())
        old_b = self.bias.double() if self.bias is not None else torch.zeros_like(g)
        self.register_buffer("bias", ((old_b - mean) * g + beta).float())
        self.has_bias = True
        self._expand_kernel_buffers()

    def act_label(self) -> str:
        """The input format in words: ``int8``, ``float``, ``sign``, ``kbit4``, ``udfp8 E=-7``..."""
        act = self.activations
        if act in ("dfp", "kbit"):
            act = f"{'' if self.act_signed else 'u'}{act}{self.act_bits}"
            if self.activations == "dfp":
                act += f" E={self.exponent}" if self.exponent is not None else " dynamic"
        return act

    def extra_repr(self) -> str:
        kind = {2: "ternary", 4: "int4"}[self.bits]
        extra = f", group_size={self.group_size}" if self.group_size else ""
        extra += ", 8-bit fixed-point scales" if self.scale_format == "fixed8" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weight_format} "
            f"({kind} kernel{extra}), activations={self.act_label()}, bias={self.has_bias}"
        )


def _tracing(x: torch.Tensor) -> bool:
    return (
        torch.compiler.is_compiling()
        or torch.compiler.is_exporting()
        or torch.jit.is_tracing()
        or type(x) is not torch.Tensor
    )


class PackedConv2d(Float32Buffers, nn.Module):
    """Inference-only ``nn.Conv2d`` (groups=1, zero padding) on a :class:`PackedLinear` GEMM.

    ``unfold`` (im2col) turns the input into one row of ``K = in * kh * kw`` values per output
    pixel (in the ``(in, kh, kw)`` order of ``weight.reshape(out, K)``), the packed kernel
    multiplies, and the result is folded back to ``(B, out, H', W')``. Integer input formats are
    quantized on the whole input *before* unfolding, so padding is the code 0 (the value the
    Quant layer's zero padding of its quantized input gives, also for ±1 inputs) and DFP's one
    exponent per batch is taken over the input itself. ``"int8"`` quantizes each output pixel's
    patch separately (per token).
    """

    def __init__(
        self,
        gemm: PackedLinear,
        *,
        in_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> None:
        super().__init__()
        self.gemm = gemm
        self.in_channels, self.out_channels = int(in_channels), gemm.out_features
        self.kernel_size = tuple(int(v) for v in kernel_size)
        self.stride = tuple(int(v) for v in stride)
        self.padding = tuple(int(v) for v in padding)
        self.dilation = tuple(int(v) for v in dilation)
        if self.in_channels * self.kernel_size[0] * self.kernel_size[1] != gemm.in_features:
            raise ValueError(
                f"PackedConv2d: in_channels * kh * kw = {self.in_channels}*{self.kernel_size} "
                f"does not match the GEMM's K = {gemm.in_features}"
            )

    @classmethod
    def from_quant(cls, layer: nn.Conv2d, gemm: PackedLinear) -> PackedConv2d:
        return cls(
            gemm,
            in_channels=layer.in_channels,
            kernel_size=layer.kernel_size,  # type: ignore[arg-type]
            stride=layer.stride,  # type: ignore[arg-type]
            padding=layer.padding,  # type: ignore[arg-type]
            dilation=layer.dilation,  # type: ignore[arg-type]
        )

    def config(self) -> dict[str, Any]:
        return {
            "in_channels": self.in_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "gemm": self.gemm.config(),
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> PackedConv2d:
        """An empty layer (zero buffers) for ``cfg``; ``load_state_dict`` fills it."""
        geo = cls.check_config(cfg)
        return cls(PackedLinear.from_config(cfg["gemm"]), **geo)  # type: ignore[arg-type]

    @staticmethod
    def check_config(cfg: dict[str, Any]) -> dict[str, Any]:
        """Validate a config without allocating anything; returns the geometry arguments."""

        def pair(key: str) -> tuple[int, int]:
            v = cfg.get(key)
            if (
                not isinstance(v, list)
                or len(v) != 2
                or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 1 << 16 for i in v
                )
            ):
                raise ValueError(
                    f"packed conv config: {key} must be two small non-negative ints, got {v!r}"
                )
            return (v[0], v[1])

        cin, gemm = cfg.get("in_channels"), cfg.get("gemm")
        if not isinstance(cin, int) or isinstance(cin, bool) or not isinstance(gemm, dict):
            raise ValueError("packed conv config: needs in_channels (int) and gemm (dict)")
        ks, st, dl = pair("kernel_size"), pair("stride"), pair("dilation")
        if min(ks) < 1 or min(st) < 1 or min(dl) < 1:
            raise ValueError("packed conv config: kernel_size, stride and dilation must be >= 1")
        _check_config(gemm)
        if cin * ks[0] * ks[1] != gemm["in_features"]:
            raise ValueError(
                f"packed conv config: in_channels * kh * kw = {cin * ks[0] * ks[1]} differs "
                f"from the GEMM's in_features {gemm['in_features']}"
            )
        return {
            "in_channels": cin,
            "kernel_size": ks,
            "stride": st,
            "padding": pair("padding"),
            "dilation": dl,
        }

    @float32_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[0] == self.in_channels:  # unbatched, as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"PackedConv2d expects (B, {self.in_channels}, H, W) or ({self.in_channels}, H, W); "
                f"got {tuple(x.shape)}"
            )
        b, _, h, w = x.shape
        kh, kw = self.kernel_size
        ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        geometry = {
            "kernel_size": self.kernel_size,
            "dilation": self.dilation,
            "padding": self.padding,
            "stride": self.stride,
        }
        if self.gemm._fused() and not (
            self.gemm.activations == "dfp" and self.gemm.exponent is None
        ):
            cols = TF.unfold(x.float(), **geometry).transpose(1, 2)  # (B, L, K)
            y = self.gemm(cols)
        else:
            # Codes of the whole input (for DFP: one exponent over x itself, not the patches).
            q, e = self.gemm.input_codes(x)
            cols = TF.unfold(q, **geometry).transpose(1, 2)
            y = self.gemm.gemm_codes(cols, e)
        return y.transpose(1, 2).reshape(b, self.out_channels, ho, wo)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}"
        )


# ----------------------------------------------------------------------------------------------
# PackedLSTM: the 8 gate blocks of every layer / direction on two packed GEMMs

LSTM_GATES = ("i", "f", "g", "o")  # PyTorch's row order inside weight_ih / weight_hh


def lstm_matrix_keys(num_layers: int, bidirectional: bool) -> list[str]:
    """``ih_l0, hh_l0, ih_l0_reverse, hh_l0_reverse, ih_l1, ...`` (``QuantLSTM.matrix_keys``)."""
    keys = []
    for layer in range(num_layers):
        for suffix in ("", "_reverse")[: 2 if bidirectional else 1]:
            keys += [f"ih_l{layer}{suffix}", f"hh_l{layer}{suffix}"]
    return keys


def _stack_gates(gates: list[QuantizedWeight]) -> tuple[QuantizedWeight, bool]:
    """One ``(4H, K)`` QuantizedWeight for an LSTM matrix's 4 gate blocks (codes stacked in gate
    order, each block keeping its own scales) and whether every block has a single scale (pair).

    One scale per gate becomes groups of ``H`` output rows; per-row scales and groups along the
    output axis become per-row scales; groups along K stay groups along K (the same size in every
    gate). Raises ValueError (the reason) when the blocks have no common packed form."""
    first = gates[0]
    for qw in gates:
        if (qw.format, qw.bits) != (first.format, first.bits) or qw.shape != first.shape:
            raise ValueError(
                f"its gate blocks differ in format or shape ({first!r} vs {qw!r}): one packed "
                "GEMM needs one weight format"
            )
        why = unpackable_reason(qw)
        if why is not None:
            raise ValueError(f"{why} (its gate blocks)")
    h, k = first.shape
    codes = torch.cat([qw.codes for qw in gates])
    asym = first.format == "ternary_asym"
    tail = (2,) if asym else ()
    fmt, bits = first.format, first.bits
    if all(qw.scales.numel() == (2 if asym else 1) for qw in gates):
        scales = torch.cat([qw.scales.detach().reshape(1, *tail) for qw in gates]).float()
        return QuantizedWeight(codes, scales, fmt, bits, "group", h, "out", (4 * h, k)), True
    along_k = [qw.granularity == "group" and qw.group_axis == "in" for qw in gates]
    if any(along_k):
        sizes = {qw.group_size for qw in gates}
        if not all(along_k) or len(sizes) != 1:
            raise ValueError(
                "its gate blocks mix groups along K with other granularities (or group sizes): "
                "one packed GEMM needs one K grouping"
            )
        scales = torch.cat([qw.scales.detach() for qw in gates]).float()
        return (
            QuantizedWeight(codes, scales, fmt, bits, "group", sizes.pop(), "in", (4 * h, k)),
            False,
        )
    rows = torch.cat([_row_or_group_scales(qw)[0] for qw in gates])
    return QuantizedWeight(codes, rows, fmt, bits, "channel", shape=(4 * h, k)), False


class LSTMGemm(PackedLinear):
    """A :class:`PackedLinear` holding one LSTM matrix (``W_ih`` or ``W_hh``: 4 gate blocks of
    ``H`` rows). With ``gate_scales`` (every gate block has one scale, or one ``[Wp, Wn]`` pair)
    the state dict stores ``wscale`` as ``(4,)`` / ``(4, 2)``, one entry per gate, instead of the
    ``(4H,)`` / ``(4H, 2)`` rows the kernel arrays are expanded from (the rows of a block are
    equal): 8 KiB less per 512-unit matrix."""

    gate_scales: bool = False

    @classmethod
    def for_gates(
        cls, qweight: QuantizedWeight, gate_scales: bool, bias: torch.Tensor | None, **mode: Any
    ) -> LSTMGemm:
        gemm = cls(qweight, bias, **mode)
        gemm.gate_scales = bool(gate_scales)
        return gemm

    @classmethod
    def from_lstm_config(cls, cfg: dict[str, Any], gate_scales: bool) -> LSTMGemm:
        """An empty matrix (zero buffers) for a validated PackedLinear config."""
        gemm = cls(None, _config=dict(cfg))
        gemm.gate_scales = bool(gate_scales)
        return gemm

    def _gate_shape(self) -> tuple[int, ...]:
        return (4, 2) if self.asym else (4,)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.gate_scales:
            assert self.wscale is not None
            rows = self.wscale.detach() if not keep_vars else self.wscale
            h = self.out_features // 4
            destination[prefix + "wscale"] = rows.reshape(4, h, *rows.shape[1:])[:, 0].clone()

    def _load_from_state_dict(
        self,
        state_dict: Any,
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "wscale"
        bad = False
        if self.gate_scales and key in state_dict:
            s = state_dict[key]
            state_dict = {k: v for k, v in state_dict.items() if k != key}
            if tuple(s.shape) != self._gate_shape():
                error_msgs.append(
                    f"size mismatch for {key}: copying {tuple(s.shape)}, an LSTM matrix with "
                    f"one scale per gate block needs {self._gate_shape()}"
                )
                bad = True
            else:
                state_dict[key] = s.repeat_interleave(self.out_features // 4, dim=0)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if bad and key in missing_keys:
            missing_keys.remove(key)


def _check_lstm_config(cfg: Any) -> dict[str, Any]:
    """Validate a PackedLSTM config without allocating; returns ``{key: (gemm config,
    gate_scales)}``. Raises ValueError naming the problem."""
    keys = {
        "input_size",
        "hidden_size",
        "num_layers",
        "bias",
        "batch_first",
        "bidirectional",
        "matrices",
    }
    if not isinstance(cfg, dict) or set(cfg) != keys:
        got = sorted(cfg) if isinstance(cfg, dict) else cfg
        raise ValueError(f"packed LSTM config must have exactly the keys {sorted(keys)}, got {got}")
    for key, hi in (("input_size", 1 << 24), ("hidden_size", 1 << 24), ("num_layers", 1 << 10)):
        v = cfg[key]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= hi:
            raise ValueError(f"packed LSTM config: {key} must be an int in [1, {hi}], got {v!r}")
    for key in ("bias", "batch_first", "bidirectional"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"packed LSTM config: {key} must be a bool")
    h, dirs = cfg["hidden_size"], 2 if cfg["bidirectional"] else 1
    mats = cfg["matrices"]
    want = lstm_matrix_keys(cfg["num_layers"], cfg["bidirectional"])
    if not isinstance(mats, dict) or set(mats) != set(want):
        got = set(mats) if isinstance(mats, dict) else set()
        raise ValueError(
            f"packed LSTM config: matrices must be exactly the LSTM's {len(want)}; missing "
            f"{sorted(set(want) - got)}, unknown {sorted(got - set(want))}"
        )
    out = {}
    for key in want:
        m = mats[key]
        if not isinstance(m, dict) or set(m) != {"gemm", "gate_scales"}:
            raise ValueError(
                f"packed LSTM config: matrix {key} must be {{'gemm': ..., 'gate_scales': ...}}"
            )
        gemm, gate = m["gemm"], m["gate_scales"]
        if not isinstance(gemm, dict) or not isinstance(gate, bool):
            raise ValueError(f"packed LSTM config: matrix {key} has a bad gemm or gate_scales")
        _check_config(gemm)
        ih = key.startswith("ih")
        layer = int(key[4:].split("_")[0])
        k = (cfg["input_size"] if layer == 0 else dirs * h) if ih else h
        what = f"packed LSTM config: matrix {key}"
        if (gemm["out_features"], gemm["in_features"]) != (4 * h, k):
            raise ValueError(
                f"{what} is {gemm['out_features']}x{gemm['in_features']}, the LSTM needs "
                f"{4 * h}x{k}"
            )
        if gemm.get("layout") != 2 or gemm["has_row_scale"] or gemm["relu"]:
            raise ValueError(f"{what}: needs buffer layout 2, no row_scale and no relu")
        if gemm["has_bias"] != (ih and cfg["bias"]):
            raise ValueError(
                f"{what}: has_bias must be {ih and cfg['bias']} (the input projection carries "
                "b_ih + b_hh, the recurrent matrix none)"
            )
        if (not ih or layer > 0) and gemm["activations"] not in ("int8", "float"):
            raise ValueError(
                f"{what}: hidden-state inputs are int8 or float, got {gemm['activations']!r}"
            )
        asym = gemm["asym"]
        if gate and gemm["scale_shape"] != ([4 * h, 2] if asym else [4 * h]):
            raise ValueError(f"{what}: gate_scales needs per-row scales, got {gemm['scale_shape']}")
        out[key] = (gemm, gate)
    return out


class PackedLSTM(Float32Buffers, nn.Module):
    """Inference-only ``nn.LSTM`` on packed low-bit gate matrices (from a ``QuantLSTM``).

    Per layer and direction, ``W_ih`` (4H x In) and ``W_hh`` (4H x H) are each one
    :class:`LSTMGemm` (a PackedLinear: the codes of the 4 gate blocks stacked in i, f, g, o order,
    every block keeping its own scale(s) as per-row scales or, ternary_asym, per-row ``[Wp, Wn]``).
    ``b_ih + b_hh`` is folded (in float64, rounded once) into the bias of the input projection.

    Forward: the input projections of many time steps are one GEMM (all ``T * B`` rows when
    they are at most ``block_rows`` = 1024, else blocks of whole steps that size: bigger blocks
    only spill the caches); then per step one recurrent GEMM on ``h`` (``B`` rows) and the
    float gate nonlinearities (``c = σ(f)·c + σ(i)·tanh(g)``, ``h = σ(o)·tanh(c)``), as
    ``nn.LSTM``. The semantics are ``nn.LSTM``'s:
    ``num_layers``, ``bias``, ``batch_first``, ``bidirectional``, unbatched ``(T, In)`` input and
    ``(h0, c0)``; no dropout (inference) and no PackedSequence / proj_size. Returns fp32
    ``(output, (h_n, c_n))``.

    Activations (``activations`` of :func:`pack`): ``"int8"`` quantizes every GEMM input (x and
    the hidden states) per token to int8 (absmax, BitNet's recipe: lossy); ``"float"`` runs the
    exact fp32 path (equal to the simulated QuantLSTM up to fp32 summation order). A QuantLSTM
    with an input quantizer (QNN's uniform k-bit inputs) runs its first layer's input projection
    on exactly those codes (``"kbit"``/``"sign"``/``"dfp"`` as PackedLinear); its hidden states
    are float in the simulation, so the recurrent GEMMs use ``activations``.
    """

    def __init__(
        self,
        gemms: dict[str, LSTMGemm],
        *,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        bidirectional: bool = False,
    ) -> None:
        super().__init__()
        self.input_size, self.hidden_size = int(input_size), int(hidden_size)
        self.num_layers, self.bias = int(num_layers), bool(bias)
        self.batch_first, self.bidirectional = bool(batch_first), bool(bidirectional)
        keys = lstm_matrix_keys(self.num_layers, self.bidirectional)
        if set(gemms) != set(keys):
            raise ValueError(f"PackedLSTM needs the matrices {keys}; got {sorted(gemms)}")
        for key in keys:
            self.add_module(key, gemms[key])
        _check_lstm_config(self.config())

    def gemm(self, key: str) -> LSTMGemm:
        m = getattr(self, key)
        assert isinstance(m, LSTMGemm)
        return m

    @classmethod
    def from_quant(cls, lstm: nn.LSTM, activations: str) -> tuple[PackedLSTM | None, str]:
        """A PackedLSTM for a ``QuantLSTM``, or ``(None, why not)``."""
        if lstm.proj_size:
            return None, "proj_size > 0 has no packed LSTM"
        qws = lstm.quantized_weights()  # type: ignore[operator]
        first, why = _input_mode(lstm, activations)
        if first is None:
            return None, why
        gemms: dict[str, LSTMGemm] = {}
        for key in lstm_matrix_keys(lstm.num_layers, lstm.bidirectional):
            try:
                qw, gate = _stack_gates([qws[f"weight_{key}.{g}"] for g in LSTM_GATES])
            except ValueError as exc:
                return None, f"weight_{key}: {exc}"
            bias = None
            if key.startswith("ih") and lstm.bias:
                b_ih = getattr(lstm, f"bias_{key}").detach().double()
                b_hh = getattr(lstm, f"bias_hh{key[2:]}").detach().double()
                bias = (b_ih + b_hh).float()
            mode = first if key in ("ih_l0", "ih_l0_reverse") else {"activations": activations}
            gemms[key] = LSTMGemm.for_gates(qw, gate, bias, **mode)
        packed = cls(
            gemms,
            input_size=lstm.input_size,
            hidden_size=lstm.hidden_size,
            num_layers=lstm.num_layers,
            bias=lstm.bias,
            batch_first=lstm.batch_first,
            bidirectional=lstm.bidirectional,
        )
        return packed.eval(), ""

    def config(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "bias": self.bias,
            "batch_first": self.batch_first,
            "bidirectional": self.bidirectional,
            "matrices": {
                key: {"gemm": self.gemm(key).config(), "gate_scales": self.gemm(key).gate_scales}
                for key in lstm_matrix_keys(self.num_layers, self.bidirectional)
            },
        }

    @staticmethod
    def check_config(cfg: Any) -> None:
        """Validate a config without allocating anything (ValueError naming the problem)."""
        _check_lstm_config(cfg)

    @staticmethod
    def expected_buffers(cfg: Any) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """dtype and shape of every tensor a PackedLSTM with this config saves."""
        out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        for key, (gemm, gate) in _check_lstm_config(cfg).items():
            exp = _expected_buffers(gemm)
            if gate:
                exp["wscale"] = (torch.float32, (4, 2) if gemm["asym"] else (4,))
            for name, v in exp.items():
                out[f"{key}.{name}"] = v
        return out

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> PackedLSTM:
        """An empty LSTM (zero buffers) for ``cfg``; ``load_state_dict`` fills it."""
        mats = _check_lstm_config(cfg)
        gemms = {key: LSTMGemm.from_lstm_config(g, gate) for key, (g, gate) in mats.items()}
        geo = {k: cfg[k] for k in cfg if k != "matrices"}
        return cls(gemms, **geo)

    def float32_bytes(self) -> int:
        """fp32 bytes of the ``nn.LSTM`` weights and biases (``b_ih`` and ``b_hh``) it replaces."""
        total = 0
        for key in lstm_matrix_keys(self.num_layers, self.bidirectional):
            g = self.gemm(key)
            total += 4 * g.in_features * g.out_features + (4 * g.out_features if self.bias else 0)
        return total

    # Rows of one input-projection GEMM: all T*B rows at once would write (and re-read) a
    # T*B x 4H fp32 array far bigger than the caches (82 MB for the char-LSTM at batch 100 x
    # 100 steps, measured 1.5x slower end to end than blocks of ~1000 rows).
    block_rows = 1024

    def _blocks(self, steps: int, batch: int, reverse: bool) -> list[tuple[int, int]]:
        n = max(1, self.block_rows // max(batch, 1))
        blocks = [(t0, min(steps, t0 + n)) for t0 in range(0, steps, n)]
        return blocks[::-1] if reverse else blocks

    @float32_forward
    def forward(
        self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        from lowbit.nn import lstm_inputs

        x, h0, c0, unbatched = lstm_inputs("PackedLSTM", self, input, hx)
        x, h0, c0 = (t.detach().to(torch.float32) for t in (x, h0, c0))
        steps, batch = x.shape[0], x.shape[1]
        dirs = 2 if self.bidirectional else 1
        hs = self.hidden_size
        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for d in range(dirs):
                suffix = "_reverse" if d else ""
                ih, hh = self.gemm(f"ih_l{layer}{suffix}"), self.gemm(f"hh_l{layer}{suffix}")
                idx = layer * dirs + d
                h, c = h0[idx], c0[idx]
                out = x.new_empty(steps, batch, hs)
                for t0, t1 in self._blocks(steps, batch, reverse=bool(d)):
                    # The input projections (with b_ih + b_hh) of a block of time steps: one GEMM.
                    xw = ih(layer_input[t0:t1])
                    for t in range(t1 - 1, t0 - 1, -1) if d else range(t0, t1):
                        gates = hh(h)
                        gates += xw[t - t0]
                        i, f, g, o = gates.chunk(4, dim=1)
                        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                        h = torch.sigmoid(o) * torch.tanh(c)
                        out[t] = h
                outputs.append(out)
                h_n.append(h)
                c_n.append(c)
            layer_input = outputs[0] if dirs == 1 else torch.cat(outputs, dim=2)
        output = layer_input
        hn, cn = torch.stack(h_n, 0), torch.stack(c_n, 0)
        if unbatched:
            return output.squeeze(1), (hn.squeeze(1), cn.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (hn, cn)

    def extra_repr(self) -> str:
        g, ih = self.gemm("hh_l0"), self.gemm("ih_l0")
        kind = {2: "ternary", 4: "int4"}[g.bits]
        kind += f", group_size={g.group_size}" if g.group_size else ""
        act = g.act_label()
        if ih.act_label() != act:
            act = f"{ih.act_label()} (layer-0 input), {act}"
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bias={self.bias}, batch_first={self.batch_first}, "
            f"bidirectional={self.bidirectional}, weights={g.weight_format} ({kind} kernel, "
            f"{4 * len(lstm_matrix_keys(self.num_layers, self.bidirectional))} gate blocks), "
            f"activations={act}"
        )


# ----------------------------------------------------------------------------------------------
# pack(): Quant* layers -> Packed* layers


def _input_mode(layer: nn.Module, activations: str) -> tuple[dict[str, Any] | None, str]:
    """PackedLinear activation options for the layer's input quantizer, or ``(None, why not)``."""
    iq = getattr(layer, "input_quantizer", None)
    if iq is None:
        return {"activations": activations}, ""
    if getattr(iq, "signed", True) is None:
        return None, (
            "its DFP input signedness is still undecided ('auto' before any batch): run one "
            "calibration batch (lowbit.ptq.calibrate) or a forward pass first"
        )
    spec = iq.spec()
    if spec.kind == "float":
        return {"activations": activations}, ""
    if spec.kind == "binary":
        return {"activations": "sign"}, ""
    if spec.kind == "dfp" and spec.bits <= 8:
        return {
            "activations": "dfp",
            "exponent": spec.exponent,
            "act_bits": spec.bits,
            "act_signed": spec.signed,
        }, ""
    if spec.kind == "kbit_linear" and spec.bits <= 8 and spec.clip is not None:
        lo, hi = F.linear_qrange(spec.bits, spec.signed)
        clip = getattr(iq, "clip", spec.clip)
        return {
            "activations": "kbit",
            "act_bits": spec.bits,
            "act_signed": spec.signed,
            "act_step": float(clip) / hi,
        }, ""
    return None, (
        f"its {spec.describe()} inputs ({spec.kind}, {spec.bits} bits) have no packed kernel "
        "(supported: float, sign, dfp and uniform k-bit up to 8 bits)"
    )


def _packed_from(layer: nn.Module, activations: str) -> tuple[nn.Module | None, str]:
    """A PackedLinear / PackedConv2d for a QuantLinear / QuantConv2d, or ``(None, why not)``."""
    from lowbit.nn import QuantConv2d

    qw = layer.quantized_weight()  # type: ignore[operator]
    is_conv = isinstance(layer, QuantConv2d)
    if qw.format == "float":  # an "fp"-quantized layer: nothing to pack (and no codes to reshape)
        return None, f"no packed kernel for {qw!r}"
    if is_conv:
        if layer.groups != 1:
            return None, f"grouped convolutions (groups={layer.groups}) have no packed kernel"
        if layer.padding_mode != "zeros":
            return None, f"padding_mode={layer.padding_mode!r} is not supported (only zeros)"
        if isinstance(layer.padding, str):
            return None, f"padding={layer.padding!r} is not supported (give explicit sizes)"
        qw = _conv_scale_rows(qw)
    why = unpackable_reason(qw)
    if why is not None:
        return None, why
    mode, why = _input_mode(layer, activations)
    if mode is None:
        return None, why
    bias = layer.bias if isinstance(layer.bias, torch.Tensor) else None
    gemm = PackedLinear(qw, bias, **mode)
    if is_conv:
        return PackedConv2d.from_quant(layer, gemm), ""  # type: ignore[arg-type]
    return gemm, ""


def _fuse(model: nn.Module, report: dict[str, str]) -> None:
    names = {id(m): n for n, m in model.named_modules()}
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(seq.named_children())
        for i, (_, layer) in enumerate(children):
            gemm = layer.gemm if isinstance(layer, PackedConv2d) else layer
            if not isinstance(gemm, PackedLinear):
                continue
            path = names[id(layer)]
            j = i + 1
            bn_type = nn.BatchNorm2d if isinstance(layer, PackedConv2d) else nn.BatchNorm1d
            if j < len(children) and type(children[j][1]) is bn_type:
                bn = children[j][1]
                if bn.training or not bn.track_running_stats:
                    continue
                gemm.fold_batchnorm(bn)  # type: ignore[arg-type]
                setattr(seq, children[j][0], nn.Identity())
                report[path] += f"; folded {names[id(bn)]} (BatchNorm)"
                j += 1
            if j < len(children) and type(children[j][1]) is nn.ReLU:
                gemm.relu = True
                gemm._kernel = None
                setattr(seq, children[j][0], nn.Identity())
                report[path] += f"; fused {names[id(children[j][1])]} (ReLU)"


class PackingWarning(UserWarning):
    """``pack`` kept some quantized layers as they are (no packed kernel for their format)."""


class PackingError(ValueError):
    """``pack(..., strict=True)`` found layers it cannot pack (the message lists them and why)."""


def pack(
    model: nn.Module,
    activations: str = "int8",
    *,
    inplace: bool = False,
    strict: bool = False,
    fuse: bool = True,
    xnor: bool = False,
) -> nn.Module:
    """Inference model with every packable ``QuantLinear`` / ``QuantConv2d`` / ``QuantLSTM``
    replaced by a :class:`PackedLinear` / :class:`PackedConv2d` / :class:`PackedLSTM`.

    ``activations`` applies to layers trained with float inputs (TTQ, LAT, TWN, ...): ``"int8"``
    (per-token absmax int8, the BitNet inference recipe; lossy) or ``"float"`` (the exact path).
    Layers that quantize their own inputs keep that format: DFP (FGQ; signed or unsigned, with
    the layer's calibrated exponent or one per batch), ±1 (BNN) and uniform k-bit (QNN) inputs
    run the integer kernels on exactly the codes the Quant layer computes. In a PackedLSTM,
    ``activations`` also applies to the hidden states (the recurrent GEMMs and the inputs of
    layers after the first), which the QuantLSTM keeps float.
    Layers with no packed kernel (k-bit weights above 4 bits, log activations, groups along K
    that are not a multiple of 4, asymmetric ternary with groups, grouped convolutions,
    ``padding="same"``, ``padding_mode`` other than ``"zeros"``, LSTM gate blocks without a common
    packed format) stay as they are, float-sized and simulated, with a :class:`PackingWarning`
    naming them;
    ``model.packing_report`` maps every quantized layer to ``"packed: ..."`` or
    ``"kept as ...: why"``. With ``strict=True`` such layers raise :class:`PackingError` instead.
    ``fuse``: inside ``nn.Sequential`` containers, an eval-mode BatchNorm right after a packed
    layer is folded into its scales and bias and a ReLU after that runs in the kernel epilogue
    (both replaced by ``nn.Identity``; the report says so): two fewer passes over the
    activations. Outputs change only by fp32 rounding.
    ``xnor=True`` (BNN-trained sequential models such as ``lowbit.models`` ``mlp_bnn`` and
    ``convnet``): the fully binary path of :func:`lowbit.binary.pack_bnn` instead: binary layers
    on the XNOR-popcount kernels, batch norm + sign between them folded into integer thresholds,
    packed bits from layer to layer, predictions identical to the simulated model. Both paths save
    with :func:`lowbit.save` (``lowbit pack RUN --xnor -o m.lowbit`` on the command line).
    The result is in eval mode; the input model is left untouched unless ``inplace``.
    """
    other = sorted(
        {str(t.dtype).replace("torch.", "") for t in model.state_dict().values()
         if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float32}
    )  # fmt: skip
    if other:
        raise ValueError(
            f"lowbit.pack runs float32 models (the kernels take float32 in and out); this one has "
            f"{', '.join(other)} parameters: call model.float() before packing"
        )
    if xnor:
        from lowbit.binary import pack_bnn

        return pack_bnn(model)
    if activations not in ("int8", "float"):
        raise ValueError(f"activations must be 'int8' or 'float'; got {activations!r}")
    from lowbit.nn import QuantConv2d, QuantLinear, QuantLSTM, QuantModule

    target = model if inplace else copy.deepcopy(model)
    # The packed model is for inference: in eval mode from the start, so that BatchNorm folding
    # and ReLU fusion also happen for a model handed over in training mode.
    target.eval()
    report: dict[str, str] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            path = f"{prefix}{name}"
            if isinstance(child, (QuantLinear, QuantConv2d)):
                packed, why = _packed_from(child, activations)
                if packed is None:
                    report[path] = f"kept as {type(child).__name__}: {why}"
                else:
                    setattr(parent, name, packed)
                    what = f"{type(packed).__name__}({packed.extra_repr()})"
                    if isinstance(packed, PackedConv2d):
                        what += f" on {packed.gemm.extra_repr()}"
                    report[path] = f"packed: {what}"
            elif isinstance(child, QuantLSTM):
                lstm, why = PackedLSTM.from_quant(child, activations)
                if lstm is None:
                    report[path] = f"kept as {type(child).__name__}: {why}"
                else:
                    setattr(parent, name, lstm)
                    report[path] = f"packed: PackedLSTM({lstm.extra_repr()})"
            elif isinstance(child, QuantModule):
                report[path] = (
                    f"kept as {type(child).__name__}: no packed {type(child).__name__} yet"
                )
            else:
                visit(child, f"{path}.")

    visit(target, "")
    from lowbit.saveload import freeze_quantizers

    for path, why in report.items():
        if not why.startswith("packed"):  # a kept Quant layer: replay its weights from now on
            freeze_quantizers(target.get_submodule(path))
    if fuse:
        _fuse(target, report)
    if not report:
        warnings.warn(
            "lowbit.pack found no quantized layer: the model is returned as it is, float-sized "
            "(quantize it first: lowbit.quantize(model, method), or lowbit.ptq.fgq)",
            PackingWarning,
            stacklevel=2,
        )
    bad = {p: r for p, r in report.items() if not r.startswith("packed")}
    if bad and strict:
        raise PackingError("cannot pack: " + "; ".join(f"layer {p!r} {r}" for p, r in bad.items()))
    if bad:
        # Said out loud: these layers stay float-sized and run the simulated (slow) path.
        warnings.warn(
            f"lowbit.pack left {len(bad)} quantized layer(s) unpacked (float-sized, simulated): "
            + "; ".join(f"{p!r} {r}" for p, r in bad.items())
            + " (model.packing_report lists every layer; strict=True makes this an error)",
            PackingWarning,
            stacklevel=2,
        )
    target.packing_report = report  # type: ignore[assignment]
    # Inference only: no parameter of a packed model wants a gradient (the kept float layers
    # included), so torch.compile / export trace it without autograd (the custom ops have none).
    for p in target.parameters():
        p.requires_grad_(False)
    return target.eval()
