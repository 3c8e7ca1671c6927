"""Python side of lowbit's C++ kernels: ISA dispatch, `cpu_features()` and the kernel ops.

The extension ``lowbit._kernels`` is a plain CPython module (nanobind, no libtorch). Tensors
cross as zero-copy NumPy views of CPU tensors; outputs are allocated here, so the C++ side never
owns memory that PyTorch sees. Every kernel releases the GIL and splits its work over a small
persistent thread pool sized from ``torch.get_num_threads()`` (no OpenMP).

ISA selection: the best path the CPU supports runs by default; ``LOWBIT_ISA=scalar|avx2|avx512``
forces one (an error if the CPU lacks it), and :func:`use_isa` switches in-process (tests use
it to run every path).

Binary packing convention (shared by every path and the NumPy references in this module):
element ``j`` of a row goes to bit ``j % 64`` of little-endian 64-bit word ``j // 64``; the bit
is 1 exactly when ``x < 0``, so ``sign(0) = sign(-0.0) = +1`` and NaN packs as +1. Padding bits
are 0 and cancel in ``popcount(a ^ w)``; ``dot(a, w) = K - 2 * popcount(a ^ w)``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lowbit.errors import SetupError

__all__ = [
    "ISA_PATHS",
    "KernelBuildError",
    "LinearKernel",
    "active_isa",
    "available_isas",
    "binary_gemm",
    "binary_matmul_reference",
    "cpu_features",
    "int4_gemm",
    "int4_linear",
    "int4_tiles_shape",
    "pack_int4",
    "pack_int4_reference",
    "pack_signs",
    "pack_signs_reference",
    "pack_ternary",
    "pack_ternary_reference",
    "pack_ternary_scales",
    "packed_row_bytes",
    "pad_bias",
    "quantize_activations",
    "quantize_activations_reference",
    "ternary_gemm",
    "ternary_linear",
    "ternary_matmul_reference",
    "ternary_tiles_shape",
    "unpack_int4",
    "unpack_ternary",
    "use_isa",
]

ISA_PATHS = ("scalar", "avx2", "avx512")


class KernelBuildError(SetupError, ImportError):
    """The C++ extension is missing or cannot run here."""


class IsaError(SetupError):
    """``LOWBIT_ISA`` names a path that does not exist or that this CPU cannot run (also raised by
    :func:`use_isa` for a path this CPU cannot run; a ``RuntimeError``)."""


def _import_extension() -> Any:
    try:
        from lowbit import _kernels  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise KernelBuildError(
            f"lowbit's C++ extension (lowbit._kernels) is not built or failed to load ({exc}). "
            "Reinstall with `pip install -e .` (needs a C++17 compiler: `apt-get install g++`), "
            "or run `make test`, which does it for you."
        ) from exc
    return _kernels


_ext = _import_extension()


def _apply_env_isa() -> None:
    forced = os.environ.get("LOWBIT_ISA", "").strip().lower()
    if not forced:
        return
    if forced not in ISA_PATHS:
        raise IsaError(
            f"LOWBIT_ISA={forced!r} is not a kernel path: use one of {', '.join(ISA_PATHS)} "
            "or unset LOWBIT_ISA to pick the best path automatically."
        )
    missing = _ext.missing_features(forced)
    if missing:
        raise IsaError(
            f"LOWBIT_ISA={forced} was requested but this CPU lacks {missing}; "
            f"this CPU supports: {', '.join(_ext.supported_isas())}. Unset LOWBIT_ISA or choose one of those."
        )
    _ext.select_isa(forced)


_apply_env_isa()


def available_isas() -> list[str]:
    """ISA paths this CPU can run, best last."""
    return list(_ext.supported_isas())


def active_isa() -> str:
    """The ISA path the kernels currently run."""
    return str(_ext.active_isa())


def cpu_features() -> dict[str, Any]:
    """What the CPU has and which kernel path runs (paste this into bug reports).

    Keys: ``flags`` (feature -> bool), ``compiled`` (paths in this build), ``supported``
    (paths this CPU can run), ``active`` (the path in use), ``forced`` (``LOWBIT_ISA`` or None),
    ``threads`` (threads a kernel call uses, from ``torch.get_num_threads()``).
    """
    return {
        "flags": dict(_ext.cpu_flags()),
        "compiled": list(_ext.compiled_isas()),
        "supported": available_isas(),
        "active": active_isa(),
        "forced": os.environ.get("LOWBIT_ISA") or None,
        "threads": _num_threads(),
    }


@contextlib.contextmanager
def use_isa(isa: str) -> Iterator[None]:
    """Run the kernels on one ISA path inside the ``with`` block (raises if unsupported)."""
    if isa not in ISA_PATHS:
        raise ValueError(f"unknown ISA path {isa!r}: choose one of {', '.join(ISA_PATHS)}")
    missing = _ext.missing_features(isa)
    if missing:
        raise IsaError(f"this CPU cannot run the {isa!r} kernels (missing: {missing})")
    previous = active_isa()
    _ext.select_isa(isa)
    try:
        yield
    finally:
        _ext.select_isa(previous)


def _num_threads() -> int:
    return max(1, int(torch.get_num_threads()))


def packed_row_bytes(k: int) -> int:
    """Bytes per packed binary row of length ``k``: whole 64-bit words."""
    return 8 * ((k + 63) // 64)


def _as_numpy(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(
            f"lowbit kernels run on the CPU; got a tensor on {t.device}. Call .cpu() first."
        )
    if t.requires_grad:
        t = t.detach()
    # The fast path matters: a batch-1 ternary GEMV takes ~60 us, a needless copy a few more.
    return t.numpy() if t.is_contiguous() else t.contiguous().numpy()


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack the signs of a 2-D float tensor ``(rows, K)`` into ``(rows, packed_row_bytes(K))`` uint8.

    Bit = 1 where ``x < 0`` (see the module docstring for the exact layout).
    """
    if x.dim() != 2:
        raise ValueError(f"pack_signs expects a 2-D tensor (rows, K); got shape {tuple(x.shape)}")
    out = torch.empty((x.shape[0], packed_row_bytes(x.shape[1])), dtype=torch.uint8)
    if x.shape[0] == 0:  # an empty batch (its NumPy view may carry odd strides)
        return out
    src = _as_numpy(x.to(torch.float32))
    _ext.pack_signs_f32(src, out.numpy(), _num_threads())
    return out


def binary_gemm(a_bits: torch.Tensor, w_bits: torch.Tensor, k: int) -> torch.Tensor:
    """int32 ``(M, N)`` of ±1 dot products between packed rows: ``K - 2·popcount(a ^ w)``."""
    if a_bits.dtype != torch.uint8 or w_bits.dtype != torch.uint8:
        raise TypeError("binary_gemm expects packed uint8 tensors from pack_signs")
    if a_bits.dim() != 2 or w_bits.dim() != 2 or a_bits.shape[1] != w_bits.shape[1]:
        raise ValueError(
            f"binary_gemm needs 2-D packed operands with equal row bytes; got {tuple(a_bits.shape)} and {tuple(w_bits.shape)}"
        )
    out = torch.empty((a_bits.shape[0], w_bits.shape[0]), dtype=torch.int32)
    _ext.binary_gemm(_as_numpy(a_bits), _as_numpy(w_bits), int(k), out.numpy(), _num_threads())
    return out


# ----------------------------------------------------------------------------------------------
# NumPy references (independent of the C++ code; the tests compare against these bit-exactly)


def pack_signs_reference(x: np.ndarray) -> np.ndarray:
    """Reference packing with NumPy's ``packbits`` (little bit order)."""
    rows, k = x.shape
    bits = np.zeros((rows, packed_row_bytes(k) * 8), dtype=np.uint8)
    bits[:, :k] = np.asarray(x) < 0  # NaN < 0 is False -> +1, -0.0 < 0 is False -> +1
    return np.packbits(bits, axis=1, bitorder="little")


def binary_matmul_reference(a_signs: np.ndarray, w_signs: np.ndarray) -> np.ndarray:
    """int64 matmul of ±1 matrices: the definition the popcount kernels must reproduce."""
    return a_signs.astype(np.int64) @ w_signs.astype(np.int64).T


# ----------------------------------------------------------------------------------------------
# Ternary (2-bit) weights x int8 activations. Layout: docs/format.md ("t2r16" tiles); the kernel
# contract is in csrc/kernels.h (lowbit_t2_args). Summary:
#   * codes w in {-1, 0, 1} are stored as w + 1 at 2 bits; N is padded to 16 (row blocks), K to 16;
#   * tile (rb, kt) is 64 bytes; byte 4*r + j holds in bits 2p..2p+1 the code of row 16*rb + r at
#     k = 16*kt + 4*p + j, so (tile >> 2p) & 3 is the unsigned vpdpbusd operand for 4 k of 16 rows;
#   * D = sum (code - 1) * a = sum code * a - sum a ("code trick"); asymmetric ternary (TTQ) also
#     accumulates P = sum over w = +1 of a (the code's high bit): y = Wn * D + (Wp - Wn) * P.

# "udfp": unsigned 8-bit DFP with a fixed exponent, u = clamp(round(x * 2^-E), 0, 255), run by
# the grouped kernel with the activations as the unsigned vpdpbusd operand (group_size > 0 only).
ACT_MODES = {"absmax": 0, "dfp": 1, "dfp_tensor": 2, "dfp_fixed": 3, "float": 4, "udfp": 5}
ACT_FLOAT = ACT_MODES["float"]  # exact path: fp32 activations, fp32 accumulation
ABSMAX_EPS = 1e-5  # BitNet's floor on max|x|: keeps the scale finite for all-zero tokens.


def ternary_tiles_shape(n: int, k: int) -> tuple[int, int, int]:
    """Shape of the packed ternary weights of an ``(n, k)`` layer: ``(ceil(n/16), ceil(k/16), 64)``."""
    return ((n + 15) // 16, (k + 15) // 16, 64)


def _padded(n: int) -> int:
    return (n + 15) // 16 * 16


def pack_ternary(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 ternary codes ``(N, K)`` in {-1, 0, 1} into uint8 tiles (see the section comment)."""
    if codes.dim() != 2:
        raise ValueError(
            f"pack_ternary expects 2-D codes (out_features, in_features); got shape {tuple(codes.shape)}"
        )
    src = _as_numpy(codes.to(torch.int8))
    out = torch.empty(ternary_tiles_shape(*codes.shape), dtype=torch.uint8)
    _ext.pack_tiles(src, out.numpy(), 2)
    return out


def unpack_ternary(tiles: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_ternary`: int8 codes ``(n, k)``."""
    out = torch.empty((n, k), dtype=torch.int8)
    _ext.unpack_tiles(_as_numpy(tiles), int(n), int(k), out.numpy(), 2)
    return out


def int4_tiles_shape(n: int, k: int) -> tuple[int, int, int]:
    """Shape of packed 4-bit weights of an ``(n, k)`` layer: ``(ceil(n/16), 2*ceil(k/16), 64)``."""
    return ((n + 15) // 16, 2 * ((k + 15) // 16), 64)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack int8 4-bit codes ``(N, K)`` in [-8, 7] (3-bit codes too) into uint8 tiles.

    Same 64-byte tiles as ternary, 8 k per tile: byte ``4*r + j`` of tile ``(rb, kt)`` holds
    ``code + 8`` of row ``16*rb + r`` at ``k = 8*kt + j`` (low nibble) and ``8*kt + 4 + j`` (high).
    """
    if codes.dim() != 2:
        raise ValueError(
            f"pack_int4 expects 2-D codes (out_features, in_features); got shape {tuple(codes.shape)}"
        )
    out = torch.empty(int4_tiles_shape(*codes.shape), dtype=torch.uint8)
    _ext.pack_tiles(_as_numpy(codes.to(torch.int8)), out.numpy(), 4)
    return out


def unpack_int4(tiles: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes ``(n, k)``."""
    out = torch.empty((n, k), dtype=torch.int8)
    _ext.unpack_tiles(_as_numpy(tiles), int(n), int(k), out.numpy(), 4)
    return out


def pack_ternary_scales(
    scales: torch.Tensor,
    n: int,
    k: int,
    *,
    group_size: int = 0,
    asym: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Kernel-ready fp32 scales ``(scale, scale2)`` for :func:`ternary_linear` (done once, at pack time).

    * symmetric, ``group_size=0``: ``scales`` is a scalar (per tensor) or ``(n,)``/``(n, 1)`` (per row);
      returns ``scale`` padded to ``16*ceil(n/16)`` and ``scale2=None``.
    * symmetric, grouped along K: ``scales`` is ``(n, ceil(k/group_size))``, ``group_size`` a multiple
      of 4; returns ``scale`` laid out ``(ceil(n/16), ceil(kp/group_size), 16)`` (16 rows of one group
      are one 64-byte vector), zero for padded rows and groups.
    * asymmetric (TTQ, LAT2): ``scales[..., 0] = Wp`` and ``scales[..., 1] = Wn`` (both positive), per
      tensor ``(2,)`` or per row ``(n, 2)``; returns ``scale = Wn`` and ``scale2 = Wp - Wn`` (per row,
      padded), because the kernel computes ``y = Wn * D + (Wp - Wn) * P``.
    """
    s = scales.detach().to(torch.float64)
    np_ = _padded(n)
    if asym:
        if group_size:
            raise ValueError(
                "asymmetric ternary supports per-tensor or per-row scales, not groups along K"
            )
        s = s.reshape(-1, 2)
        if s.shape[0] not in (1, n):
            raise ValueError(
                f"asymmetric scales must be (2,) or ({n}, 2); got {tuple(scales.shape)}"
            )
        wp, wn = s[:, 0].expand(n), s[:, 1].expand(n)
        scale = torch.zeros(np_, dtype=torch.float32)
        scale2 = torch.zeros(np_, dtype=torch.float32)
        scale[:n] = wn.float()
        scale2[:n] = (wp - wn).float()
        return scale, scale2
    if group_size:
        if group_size < 0 or group_size % 4:
            raise ValueError(f"group_size must be a positive multiple of 4; got {group_size}")
        groups = (k + group_size - 1) // group_size
        if tuple(s.shape) != (n, groups):
            raise ValueError(
                f"grouped scales must have shape ({n}, {groups}) for group_size={group_size}; got {tuple(scales.shape)}"
            )
        return _group_layout(s.float(), k, group_size), None
    s = s.reshape(-1)
    if s.numel() not in (1, n):
        raise ValueError(
            f"per-row scales must have {n} entries (or 1 for per tensor); got {tuple(scales.shape)}"
        )
    scale = torch.zeros(np_, dtype=torch.float32)
    scale[:n] = s.expand(n).float()
    return scale, None


def pack_group_mantissas(
    mantissas: torch.Tensor,
    row_mult: torch.Tensor,
    n: int,
    k: int,
    *,
    group_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel-ready 8-bit fixed-point group scales ``(gscale_i, row_mult)`` (once, at pack time).

    The scale of row ``n``'s group ``g`` is ``mantissas[n, g] * row_mult[n]`` with integer
    mantissas in 0..255 (FGQ ``scale_bits=8``: ``m · 2^E`` with one ``E`` per row, times a folded
    BatchNorm's row scale). ``gscale_i`` holds each mantissa twice, ``(m << 16) | m`` (an int16
    pair for ``vpmaddwd``), in the layout :func:`pack_ternary_scales` gives the float scales;
    ``row_mult`` is fp32, padded like :func:`pad_bias`. :class:`LinearKernel` takes both as
    ``group_mantissas`` next to the float scales ``mantissas * row_mult``: the AVX2 kernel for
    groups of 4 with unsigned inputs then sums ``m_g · D_g`` exactly in int32 and multiplies by
    ``row_mult`` once per output; every other path uses the float scales.
    """
    groups = (k + group_size - 1) // group_size if group_size > 0 else 0
    if group_size <= 0 or group_size % 4 or tuple(mantissas.shape) != (n, groups):
        raise ValueError(
            f"group mantissas must have shape ({n}, {groups}) for a group_size that is a positive "
            f"multiple of 4; got {tuple(mantissas.shape)} with group_size={group_size}"
        )
    m = mantissas.detach().to(torch.float64)
    if m.numel() and (not torch.equal(m, m.round()) or float(m.min()) < 0 or float(m.max()) > 255):
        raise ValueError("group mantissas must be integers in 0..255")
    r = row_mult.detach().reshape(-1)
    if r.numel() != n:
        raise ValueError(f"row_mult must have {n} entries; got {tuple(row_mult.shape)}")
    padded = pad_bias(r, n)
    assert padded is not None
    return _group_layout(m.to(torch.int32) * 65537, k, group_size), padded


def _group_layout(values: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """``(n, groups)`` per-group values in the grouped kernels' layout: rows padded to
    ``16*ceil(n/16)`` and groups to ``ceil(kp/group_size)`` with zeros, then (row blocks, groups,
    16 rows), so that one vector load reads 16 rows of one group."""
    n, groups = values.shape
    np_, groups_p = _padded(n), (_padded(k) + group_size - 1) // group_size
    out = torch.zeros((np_, groups_p), dtype=values.dtype)
    out[:n, :groups] = values
    return out.reshape(np_ // 16, 16, groups_p).transpose(1, 2).contiguous().reshape(-1)


def pad_bias(bias: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Bias padded to ``16*ceil(n/16)`` fp32 entries (the kernels read whole row blocks)."""
    if bias is None:
        return None
    out = torch.zeros(_padded(n), dtype=torch.float32)
    out[:n] = bias.detach().reshape(-1).float()
    return out


def _act_mode(act: str, exponent: int | None) -> tuple[int, int]:
    if exponent is not None:
        if act == "udfp":
            return ACT_MODES["udfp"], int(exponent)
        if act not in ("dfp", "dfp_fixed"):
            raise ValueError("a fixed exponent only applies to act='dfp' or 'udfp'")
        return ACT_MODES["dfp_fixed"], int(exponent)
    if act == "udfp":
        raise ValueError("act='udfp' (unsigned 8-bit DFP) needs a fixed exponent")
    if act not in ACT_MODES or act == "dfp_fixed":
        raise ValueError(
            f"unknown activation mode {act!r}: use 'absmax', 'dfp', 'dfp_tensor' (or exponent=E) "
            "or 'float' (exact fp32 path, linear layers only)"
        )
    return ACT_MODES[act], 0


def quantize_activations(
    x: torch.Tensor, act: str = "absmax", *, exponent: int | None = None, group_size: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token int8 quantization of a 2-D float tensor ``(M, K)`` by the C++ kernels.

    Returns ``(q, a_inv, sums)``: ``q`` int8 ``(M, K)`` with ``x ≈ q * a_inv[:, None]``, ``a_inv`` fp32
    ``(M,)`` and ``sums`` int32 ``(M, groups)``, the sum of ``q`` per group of ``group_size`` k (one
    group, the whole row, when ``group_size=0``). Rules (identical to
    :func:`quantize_activations_reference`):

    * ``"absmax"``: ``s = 127 / max(max|x|, 1e-5)`` (fp32), ``q = clamp(round(x * s), -127, 127)``
      with half-to-even rounding, ``a_inv = 1 / s``.
    * ``"dfp"``: dynamic fixed point per token, ``a_inv = 2**E`` with the smallest ``E`` such that
      ``round(max|x| * 2**-E) <= 127`` (the rule of :func:`lowbit.functional.dfp_exponent`; also
      ``E >= -126``), ``q = clamp(round(x * 2**-E), -128, 127)``; ``"dfp_tensor"``: one ``E`` for the
      whole batch (what ``functional.dfp_quantize`` does on a batch); ``exponent=E``: a fixed
      (calibrated) exponent, values beyond the int8 range saturate.
    * ``"udfp"`` with ``exponent=E``: unsigned 8-bit DFP, ``q = clamp(round(x * 2**-E), 0, 255)``,
      returned as uint8 (what the grouped kernel reads with ``act="udfp"``).

    Inputs must be finite (NaN/inf give unspecified codes).
    """
    if x.dim() != 2:
        raise ValueError(f"quantize_activations expects (M, K); got shape {tuple(x.shape)}")
    if act == "float":
        raise ValueError("act='float' keeps the activations in fp32: there is nothing to quantize")
    mode, e = _act_mode(act, exponent)
    m, k = x.shape
    kq = _padded(k)
    groups = (kq + group_size - 1) // group_size if group_size else 1
    q = torch.empty((m, kq), dtype=torch.int8)
    sums = torch.empty((m, groups), dtype=torch.int32)
    a_inv = torch.empty((m,), dtype=torch.float32)
    _ext.quantize_act(
        _as_numpy(x.to(torch.float32)),
        mode,
        e,
        int(group_size),
        q.numpy(),
        sums.numpy(),
        a_inv.numpy(),
        _num_threads(),
    )
    if group_size:
        sums = sums[:, : (k + group_size - 1) // group_size]
    if act == "udfp":
        q = q.view(torch.uint8)
    return q[:, :k], a_inv, sums


def ternary_gemm(
    a: torch.Tensor, tiles: torch.Tensor, n: int, *, asym: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Integer ternary GEMM: int8 activations ``(M, K)`` × packed ternary weights → int32 ``(M, n)``.

    Returns ``D = a @ codes.T`` (exact int32), or ``(D, P)`` with ``P = a @ (codes == 1).T`` when
    ``asym`` (the two accumulations of asymmetric ternary). Any int8 value is allowed (also -128).
    """
    if a.dtype != torch.int8 or a.dim() != 2:
        raise TypeError(
            f"ternary_gemm expects 2-D int8 activations; got {a.dtype} of shape {tuple(a.shape)}"
        )
    out = torch.empty((a.shape[0], n), dtype=torch.int32)
    out_p = torch.empty((a.shape[0], n), dtype=torch.int32) if asym else None
    _ext.ternary_gemm_i32(
        _as_numpy(a),
        _as_numpy(tiles),
        int(n),
        out.numpy(),
        None if out_p is None else out_p.numpy(),
        2,
        _num_threads(),
    )
    return (out, out_p) if out_p is not None else out


def int4_gemm(a: torch.Tensor, tiles: torch.Tensor, n: int) -> torch.Tensor:
    """Integer 4-bit GEMM: int8 ``(M, K)`` × tiles from :func:`pack_int4` → exact int32 ``a @ codes.T``."""
    if a.dtype != torch.int8 or a.dim() != 2:
        raise TypeError(
            f"int4_gemm expects 2-D int8 activations; got {a.dtype} of shape {tuple(a.shape)}"
        )
    out = torch.empty((a.shape[0], n), dtype=torch.int32)
    _ext.ternary_gemm_i32(
        _as_numpy(a), _as_numpy(tiles), int(n), out.numpy(), None, 4, _num_threads()
    )
    return out


def _ternary_linear_impl(
    x: torch.Tensor,
    tiles: torch.Tensor,
    scale: torch.Tensor,
    scale2: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    group_size: int,
    act_mode: int,
    exponent: int,
    relu: bool,
    bits: int = 2,
) -> torch.Tensor:
    return _run_linear(
        x,
        _as_numpy(tiles),
        _as_numpy(scale),
        None if scale2 is None else _as_numpy(scale2),
        None if bias is None else _as_numpy(bias),
        out_features,
        group_size,
        act_mode,
        exponent,
        relu,
        bits,
    )


def _run_linear(
    x: torch.Tensor,
    tiles: np.ndarray,
    scale: np.ndarray,
    scale2: np.ndarray | None,
    bias: np.ndarray | None,
    out_features: int,
    group_size: int,
    act_mode: int,
    exponent: int,
    relu: bool,
    bits: int,
    mantissas: tuple[np.ndarray, np.ndarray] | None = None,
) -> torch.Tensor:
    if x.dtype != torch.float32:
        x = x.float()
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    out = torch.empty((x2.shape[0], out_features), dtype=torch.float32)
    if x2.shape[0] and act_mode == ACT_FLOAT:
        _ext.ternary_linear_float(
            _as_numpy(x2),
            tiles,
            out_features,
            scale,
            scale2,
            bias,
            group_size,
            relu,
            out.numpy(),
            bits,
            _num_threads(),
        )
    elif x2.shape[0]:
        _ext.ternary_linear(
            _as_numpy(x2),
            tiles,
            out_features,
            scale,
            scale2,
            bias,
            group_size,
            act_mode,
            exponent,
            relu,
            out.numpy(),
            bits,
            _num_threads(),
            *(mantissas or (None, None)),
        )
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], out_features)


class LinearKernel:
    """One packed linear layer's kernel call with its constant arguments converted once.

    ``tiles`` from :func:`pack_ternary` (``bits=2``) or :func:`pack_int4` (``bits=4``), ``scale`` /
    ``scale2`` from :func:`pack_ternary_scales`, ``bias`` from :func:`pad_bias`, optionally
    ``group_mantissas`` from :func:`pack_group_mantissas` (8-bit fixed-point group scales, equal to
    ``scale``: the AVX2 kernel for groups of 4 then accumulates in int32). Calling it runs
    the fused C++ path directly (a few microseconds of Python overhead); :meth:`op` goes through
    the ``torch.ops.lowbit`` custom op instead, which torch.compile / torch.export can trace.
    The tensors are held (not copied), so in-place updates (``load_state_dict``) are seen.
    """

    def __init__(
        self,
        tiles: torch.Tensor,
        scale: torch.Tensor,
        scale2: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        out_features: int,
        bits: int = 2,
        group_size: int = 0,
        act: str = "absmax",
        exponent: int | None = None,
        relu: bool = False,
        group_mantissas: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if bits not in (2, 4):
            raise ValueError(f"bits must be 2 (ternary) or 4 (int4); got {bits}")
        if group_mantissas is not None and (not group_size or scale2 is not None):
            raise ValueError("group_mantissas are fixed-point scales of symmetric groups along K")
        if bits == 4 and scale2 is not None:
            raise ValueError("asymmetric scales (scale2) exist for ternary weights only")
        self.tensors = (tiles, scale, scale2, bias)
        self.out_features, self.bits, self.group_size, self.relu = (
            int(out_features),
            bits,
            int(group_size),
            bool(relu),
        )
        self.act_mode, self.exponent = _act_mode(act, exponent)
        self._np = tuple(None if t is None else _as_numpy(t) for t in self.tensors)
        self.group_mantissas = group_mantissas
        self._mantissas = (
            None
            if group_mantissas is None
            else (_as_numpy(group_mantissas[0]), _as_numpy(group_mantissas[1]))
        )

    def all_tensors(self) -> tuple[torch.Tensor | None, ...]:
        """Every tensor the kernel holds (to tell whether a module replaced one of them)."""
        return self.tensors + (self.group_mantissas or ())

    def __call__(self, x: torch.Tensor, exponent: int | None = None) -> torch.Tensor:
        """Run the layer; ``exponent=E`` overrides the activation mode with a fixed DFP exponent
        for this call (packed layers that compute integer codes themselves pass ``codes * 2**E``,
        which the kernel re-quantizes exactly)."""
        tiles, scale, scale2, bias = self._np
        assert tiles is not None and scale is not None
        mode, e = (
            (self.act_mode, self.exponent)
            if exponent is None
            else (ACT_MODES["dfp_fixed"], int(exponent))
        )
        return _run_linear(
            x,
            tiles,
            scale,
            scale2,
            bias,
            self.out_features,
            self.group_size,
            mode,
            e,
            self.relu,
            self.bits,
            self._mantissas,
        )

    def op(self, x: torch.Tensor) -> torch.Tensor:
        tiles, scale, scale2, bias = self.tensors
        return _linear_op(
            x,
            tiles,
            scale,
            scale2,
            bias,
            self.out_features,
            self.bits,
            self.group_size,
            self.act_mode,
            self.exponent,
            self.relu,
        )

    @staticmethod
    def call_op(
        x: torch.Tensor,
        tiles: torch.Tensor,
        scale: torch.Tensor,
        scale2: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        *,
        out_features: int,
        bits: int = 2,
        group_size: int = 0,
        act: str = "absmax",
        exponent: int | None = None,
        relu: bool = False,
    ) -> torch.Tensor:
        """The custom-op call without building a kernel (works on fake / traced tensors)."""
        mode, e = _act_mode(act, exponent)
        return _linear_op(
            x, tiles, scale, scale2, bias, out_features, bits, group_size, mode, e, relu
        )


def _linear_op(
    x: torch.Tensor,
    tiles: torch.Tensor,
    scale: torch.Tensor,
    scale2: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    bits: int,
    group_size: int,
    act_mode: int,
    exponent: int,
    relu: bool,
) -> torch.Tensor:
    if bits == 4:
        return torch.ops.lowbit.int4_linear(
            x, tiles, scale, bias, out_features, group_size, act_mode, exponent, relu
        )
    return torch.ops.lowbit.ternary_linear(
        x, tiles, scale, scale2, bias, out_features, group_size, act_mode, exponent, relu
    )


def ternary_linear(
    x: torch.Tensor,
    tiles: torch.Tensor,
    scale: torch.Tensor,
    scale2: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    out_features: int,
    group_size: int = 0,
    act: str = "absmax",
    exponent: int | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """Fused ternary linear layer: per-token int8 quantization of ``x (..., K)``, ternary × int8
    GEMM and the fp32 epilogue, in one C++ call (GIL released).

    ``tiles`` from :func:`pack_ternary`, ``scale``/``scale2`` from :func:`pack_ternary_scales`,
    ``bias`` from :func:`pad_bias`. Output fp32 ``(..., out_features)``:
    ``y = D * scale * a_inv + bias`` (per row), ``(D * Wn + P * (Wp - Wn)) * a_inv + bias``
    (asymmetric) or ``(sum_g D_g * scale_g) * a_inv + bias`` (groups along K), then ReLU if asked.
    ``act="float"`` is the exact path instead: fp32 activations times the ternary / int4 weights
    with fp32 accumulation (no activation quantization; differs from a float64 reference only
    by summation order). Calls go straight to the extension (about 1 µs of overhead); the ``torch.ops.lowbit.ternary_linear``
    custom op wraps the same function for torch.compile / torch.export.
    """
    mode, e = _act_mode(act, exponent)
    return _ternary_linear_impl(
        x, tiles, scale, scale2, bias, out_features, group_size, mode, e, relu
    )


def int4_linear(
    x: torch.Tensor,
    tiles: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out_features: int,
    group_size: int = 0,
    act: str = "absmax",
    exponent: int | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """Fused 4-bit linear layer (tiles from :func:`pack_int4`, scales from :func:`pack_ternary_scales`
    without ``asym``): like :func:`ternary_linear` with ``y = D * scale * a_inv + bias``."""
    mode, e = _act_mode(act, exponent)
    return _ternary_linear_impl(
        x, tiles, scale, None, bias, out_features, group_size, mode, e, relu, 4
    )


# ----------------------------------------------------------------------------------------------
# torch.library custom ops: the packed modules call these, so torch.compile and torch.export see
# one opaque op with a fake (meta) implementation instead of tracing into NumPy.


@torch.library.custom_op("lowbit::ternary_linear", mutates_args=(), device_types="cpu")
def _ternary_linear_op(
    x: torch.Tensor,
    tiles: torch.Tensor,
    scale: torch.Tensor,
    scale2: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_features: int,
    group_size: int,
    act_mode: int,
    exponent: int,
    relu: bool,
) -> torch.Tensor:
    return _ternary_linear_impl(
        x, tiles, scale, scale2, bias, out_features, group_size, act_mode, exponent, relu
    )


@_ternary_linear_op.register_fake
def _(x, tiles, scale, scale2, bias, out_features, group_size, act_mode, exponent, relu):  # type: ignore[no-untyped-def]
    torch._check(tiles.dim() == 3 and tiles.shape[0] == (out_features + 15) // 16)
    torch._check(tiles.shape[1] * 16 >= x.shape[-1])
    return x.new_empty((*x.shape[:-1], out_features), dtype=torch.float32)


@torch.library.custom_op("lowbit::int4_linear", mutates_args=(), device_types="cpu")
def _int4_linear_op(
    x: torch.Tensor,
    tiles: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    group_size: int,
    act_mode: int,
    exponent: int,
    relu: bool,
) -> torch.Tensor:
    return _ternary_linear_impl(
        x, tiles, scale, None, bias, out_features, group_size, act_mode, exponent, relu, 4
    )


@_int4_linear_op.register_fake
def _(x, tiles, scale, bias, out_features, group_size, act_mode, exponent, relu):  # type: ignore[no-untyped-def]
    torch._check(tiles.dim() == 3 and tiles.shape[0] == (out_features + 15) // 16)
    torch._check(tiles.shape[1] * 8 >= x.shape[-1])
    return x.new_empty((*x.shape[:-1], out_features), dtype=torch.float32)


@torch.library.custom_op("lowbit::ternary_gemm_i32", mutates_args=(), device_types="cpu")
def _ternary_gemm_i32_op(a: torch.Tensor, tiles: torch.Tensor, out_features: int) -> torch.Tensor:
    out = ternary_gemm(a, tiles, out_features)
    assert isinstance(out, torch.Tensor)
    return out


@_ternary_gemm_i32_op.register_fake
def _(a, tiles, out_features):  # type: ignore[no-untyped-def]
    return a.new_empty((a.shape[0], out_features), dtype=torch.int32)


# ----------------------------------------------------------------------------------------------
# Ternary references (NumPy/PyTorch, independent of the C++ code)


def pack_ternary_reference(codes: np.ndarray) -> np.ndarray:
    """The tile layout written with NumPy reshapes (padding codes are 1, i.e. weight 0)."""
    n, k = codes.shape
    rb, kt, _ = ternary_tiles_shape(n, k)
    c = np.ones((rb * 16, kt * 16), dtype=np.uint8)
    c[:n, :k] = np.asarray(codes, dtype=np.int64) + 1
    # (rb, r, kt, p, j) -> (rb, kt, r, j, p): byte (r, j) of tile (rb, kt) gathers planes p.
    c = c.reshape(rb, 16, kt, 4, 4).transpose(0, 2, 1, 4, 3)
    byte = c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)
    return byte.reshape(rb, kt, 64).astype(np.uint8)


def pack_int4_reference(codes: np.ndarray) -> np.ndarray:
    """The 4-bit tile layout written with NumPy reshapes (padding codes are 8, i.e. weight 0)."""
    n, k = codes.shape
    rb, kt, _ = int4_tiles_shape(n, k)
    c = np.full((rb * 16, kt * 8), 8, dtype=np.uint8)
    c[:n, :k] = np.asarray(codes, dtype=np.int64) + 8
    c = c.reshape(rb, 16, kt, 2, 4).transpose(0, 2, 1, 4, 3)  # (rb, kt, r, j, nibble)
    return (c[..., 0] | (c[..., 1] << 4)).reshape(rb, kt, 64).astype(np.uint8)


def quantize_activations_reference(
    x: torch.Tensor, act: str = "absmax", *, exponent: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch reference of :func:`quantize_activations`: ``(q int8, a_inv fp32)``."""
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0])
    if act == "absmax" and exponent is None:
        # Correctly rounded fp32 divisions, as in C++. Beware: `127.0 / tensor` in PyTorch is
        # computed as 127 * reciprocal(tensor) and can be one ulp off.
        s = torch.full_like(amax, 127.0) / amax.clamp(min=ABSMAX_EPS)
        q = torch.round(x * s[:, None]).clamp(-127, 127)
        return q.to(torch.int8), torch.ones_like(s) / s
    if exponent is not None:
        e = torch.full_like(amax, float(exponent), dtype=torch.float64)
    else:
        if act == "dfp_tensor":
            amax = amax.max().expand_as(amax) if amax.numel() else amax
        a64 = amax.to(torch.float64)
        e = torch.floor(torch.log2(a64 / 127.5)) + 1
        # log2 can be off by an ulp: settle on the smallest e with amax < 127.5 * 2**e exactly.
        e = torch.where(a64 >= 127.5 * torch.exp2(e), e + 1, e)
        e = torch.where(a64 < 127.5 * torch.exp2(e - 1), e - 1, e)
        e = torch.where(amax > 0, e, torch.zeros_like(e)).clamp(min=-126)
    mult = torch.exp2(-e).to(torch.float32)
    q = torch.round(x * mult[:, None]).clamp(-128, 127)
    return q.to(torch.int8), torch.exp2(e).to(torch.float32)


def ternary_matmul_reference(a: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """int64 ``a @ codes.T``: the definition the ternary kernels must reproduce."""
    return np.asarray(a, dtype=np.int64) @ np.asarray(codes, dtype=np.int64).T


# ----------------------------------------------------------------------------------------------
# Fused loss-aware solvers (lowbit._la_solver; the PyTorch reference is
# lowbit.methods.loss_aware._support_alternate / _laq_alternate / _topk_exact)

_la_ext_cache: list[Any] = []


def _la_ext() -> Any:
    if not _la_ext_cache:
        try:
            from lowbit import _la_solver  # type: ignore[attr-defined]
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise KernelBuildError(
                f"lowbit's loss-aware solver extension (lowbit._la_solver) is not built or failed to load ({exc}). "
                "Reinstall with `pip install -e .`, or set LOWBIT_LA_SOLVER=torch."
            ) from exc
        _la_ext_cache.append(_la_solver)
    return _la_ext_cache[0]


def la_solver_available() -> bool:
    """True when the fused loss-aware solvers (``lowbit._la_solver``) load."""
    try:
        _la_ext()
    except KernelBuildError:
        return False
    return True


def _la_inputs(
    w: torch.Tensor, d: torch.Tensor, codes0: torch.Tensor | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """NumPy views of the solvers' ``(U, L)`` inputs after checking shapes and dtypes."""
    c_shape = tuple(w.shape) if codes0 is None else tuple(codes0.shape)
    if w.dim() != 2 or tuple(d.shape) != tuple(w.shape) or c_shape != tuple(w.shape):
        given = f"{tuple(w.shape)}, {tuple(d.shape)}" + (
            "" if codes0 is None else f" and {c_shape}"
        )
        raise ValueError(
            f"the loss-aware solvers take (U, L) units: w, d (and codes0) of one shape; got {given}"
        )
    c_dtype = torch.int8 if codes0 is None else codes0.dtype
    if w.dtype != torch.float32 or d.dtype != torch.float32 or c_dtype != torch.int8:
        raise TypeError(
            f"the loss-aware solvers take float32 w and d and int8 codes0; got {w.dtype}, {d.dtype}, {c_dtype}"
        )
    return _as_numpy(w), _as_numpy(d), None if codes0 is None else _as_numpy(codes0)


def la_support_solve(
    w: torch.Tensor,
    d: torch.Tensor,
    codes0: torch.Tensor,
    *,
    two_sided: bool,
    max_iter: int = 10,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused LAT_a (``two_sided=False``) / LAT2_a (``two_sided=True``) alternation on ``(U, L)`` units.

    ``w``, ``d`` float32 and ``codes0`` (the warm-start codes) int8, all ``(U, L)``. Returns
    ``(codes int8 (U, L), alpha, iterations int64 (U,))`` with alpha ``(U,)`` (LAT_a) or
    ``(U, 2) = [alpha_p, alpha_n]`` (LAT2_a): the computation of
    ``loss_aware._support_alternate`` (on ``|w|``, or on ``w`` and ``-w``) with the sums in
    double, at most one pass over ``(w, d)`` per round. Bit-identical for any thread count.
    """
    wn, dn, cn = _la_inputs(w, d, codes0)
    u = w.shape[0]
    codes = torch.empty(w.shape, dtype=torch.int8)
    alpha = torch.empty((u, 2) if two_sided else (u,), dtype=torch.float32)
    iters = torch.empty(u, dtype=torch.int64)
    _la_ext().la_support_solve(
        wn, dn, cn, bool(two_sided), int(max_iter), float(tol),
        codes.numpy(), alpha.numpy(), iters.numpy(), _num_threads(),
    )  # fmt: skip
    return codes, alpha, iters


def la_topk_exact(
    w: torch.Tensor, d: torch.Tensor, *, two_sided: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LAT_e (``two_sided=False``) / LAT2_e (``two_sided=True``) solution on ``(U, L)`` units.

    ``w``, ``d`` float32 ``(U, L)``. Returns ``(codes int8 (U, L), alpha)`` with alpha ``(U,)`` or
    ``(U, 2) = [alpha_p, alpha_n]``: the computation of ``loss_aware._topk_exact`` (a stable
    descending sort of the keys, then the cumulative sums in double), here a radix sort and one
    scan per unit. Bit-identical to the PyTorch reference and for any thread count.
    """
    wn, dn, _ = _la_inputs(w, d)
    u = w.shape[0]
    codes = torch.empty(w.shape, dtype=torch.int8)
    alpha = torch.empty((u, 2) if two_sided else (u,), dtype=torch.float32)
    _la_ext().la_topk_exact(wn, dn, bool(two_sided), codes.numpy(), alpha.numpy(), _num_threads())
    return codes, alpha


def twn_exact_units(units: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """TWN's exact ternarization (``d = 1``) of float64 ``(U, L)`` units, ``L <= 256`` (FGQ's
    groups), with ``counts`` (int64 ``(U,)``) the true length of each padded unit. Returns
    ``(alpha float64 (U,), codes int8 (U, L))``: the computation of ``functional.twn(w, "exact")``
    (candidate thresholds only between distinct magnitudes), one small sort per unit, bit-identical.
    """
    if units.dim() != 2 or units.dtype != torch.float64 or units.shape[1] > 256:
        raise ValueError(
            f"twn_exact_units takes float64 (U, L) units with L <= 256; got {units.dtype} {tuple(units.shape)}"
        )
    if tuple(counts.shape) != (units.shape[0],):
        raise ValueError(f"one count per unit: {tuple(counts.shape)} for {units.shape[0]} units")
    alpha = torch.empty(units.shape[0], dtype=torch.float64)
    codes = torch.empty(units.shape, dtype=torch.int8)
    _la_ext().twn_exact_units(
        _as_numpy(units),
        _as_numpy(counts.to(torch.int64)),
        alpha.numpy(),
        codes.numpy(),
        _num_threads(),
    )
    return alpha, codes


def la_laq_solve(
    w: torch.Tensor,
    d: torch.Tensor,
    codes0: torch.Tensor,
    *,
    bits: int,
    log_levels: bool,
    official: bool = False,
    max_iter: int = 10,
    tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused LAQ alternation (``loss_aware._laq_alternate``) on ``(U, L)`` units.

    Linear (``log_levels=False``) or log levels of ``bits`` (2..8), alpha rule ``"official"``
    (``official=True``) or ``"ls"``. Returns ``(codes int8 (U, L), alpha (U,), iterations (U,))``;
    alpha is the full scale (for linear levels the export step is ``alpha / k``).
    """
    wn, dn, cn = _la_inputs(w, d, codes0)
    u = w.shape[0]
    codes = torch.empty(w.shape, dtype=torch.int8)
    alpha = torch.empty(u, dtype=torch.float32)
    iters = torch.empty(u, dtype=torch.int64)
    _la_ext().la_laq_solve(
        wn, dn, cn, int(bits), bool(log_levels), bool(official), int(max_iter), float(tol),
        codes.numpy(), alpha.numpy(), iters.numpy(), _num_threads(),
    )  # fmt: skip
    return codes, alpha, iters


_LA_DEQUANT_KINDS = {"binary": 0, "ternary": 0, "kbit_linear": 0, "ternary_asym": 1, "kbit_log": 2}


def la_dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: str, bits: int) -> torch.Tensor:
    """``functional.dequantize`` of int8 ``codes (U, L)`` with one scale per unit (``(U,)``, or
    ``(U, 2) = [Wp, Wn]`` for ``ternary_asym``) in one C++ pass, bit-identical to it (same float
    operations). ``fmt``: binary, ternary, ternary_asym, kbit_linear (the scale is the step) or
    kbit_log (``bits`` of levels). Returns float32 ``(U, L)``."""
    kind = _LA_DEQUANT_KINDS.get(fmt)
    if kind is None:
        raise ValueError(f"la_dequantize has no kernel for format {fmt!r}")
    if codes.dim() != 2 or codes.dtype != torch.int8 or scales.dtype != torch.float32:
        raise TypeError(
            f"la_dequantize takes int8 (U, L) codes and float32 scales; got {codes.dtype} "
            f"{tuple(codes.shape)} and {scales.dtype}"
        )
    out = torch.empty(codes.shape, dtype=torch.float32)
    k = 2 ** (bits - 1) - 1 if kind == 2 else 1
    _la_ext().la_dequantize(
        _as_numpy(codes.contiguous()),
        _as_numpy(scales.contiguous()),
        kind,
        k,
        out.numpy(),
        _num_threads(),
    )
    return out


def ttq_forward(
    w: torch.Tensor, wp: float, wn: float, delta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """TTQ's ternary weight of a contiguous CPU float32 ``w`` with one ``(Wp, Wn)`` pair and
    threshold ``delta``, in one C++ pass: ``(codes int8, w_t float32)``, both of ``w``'s shape,
    bit-identical to :class:`lowbit.methods.ttq.TTQFunction`'s PyTorch forward."""
    codes = torch.empty(w.shape, dtype=torch.int8)
    out = torch.empty(w.shape, dtype=torch.float32)
    _la_ext().ttq_forward(
        _as_numpy(w), float(wp), float(wn), float(delta), codes.numpy(), out.numpy(), _num_threads()
    )
    return codes, out


def ttq_backward(
    grad: torch.Tensor, codes: torch.Tensor, wp: float, wn: float
) -> tuple[torch.Tensor, float, float]:
    """TTQ's gradients in one C++ pass: ``(dL/dw, dL/dWp, dL/dWn)`` from the output gradient and
    the forward's codes; ``dL/dw`` bit-identical to the PyTorch backward, the two scale gradients
    summed in double (PyTorch's float32 dot products agree to rounding)."""
    gw = torch.empty(grad.shape, dtype=torch.float32)
    gwp, gwn = _la_ext().ttq_backward(
        _as_numpy(grad.contiguous()),
        _as_numpy(codes),
        float(wp),
        float(wn),
        gw.numpy(),
        _num_threads(),
    )
    return gw, float(gwp), float(gwn)


def sign_pm1(x: torch.Tensor) -> torch.Tensor:
    """``functional.sign`` of a contiguous CPU float32 tensor in one C++ pass (+-1, sign(0) = +1,
    NaN -> +1)."""
    out = torch.empty(x.shape, dtype=torch.float32)
    _la_ext().sign_pm1(_as_numpy(x.detach()), out.numpy(), _num_threads())
    return out


def sign_gate(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sign(x), |x| <= 1 as uint8)`` of a contiguous CPU float32 tensor in one C++ pass."""
    out = torch.empty(x.shape, dtype=torch.float32)
    gate = torch.empty(x.shape, dtype=torch.uint8)
    _la_ext().sign_gate(_as_numpy(x.detach()), out.numpy(), gate.numpy(), _num_threads())
    return out, gate


def gate_grad(g: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``g * gate`` (a uint8 0/1 gate) in one C++ pass; CPU float32."""
    out = torch.empty(g.shape, dtype=torch.float32)
    _la_ext().gate_grad(_as_numpy(g.contiguous()), _as_numpy(gate), out.numpy(), _num_threads())
    return out


def kbit_fake(
    x: torch.Tensor, step: float, lo: int, hi: int, lo_x: float, hi_x: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """QNN's uniform k-bit fake quantization of a contiguous CPU float32 tensor in one C++ pass:
    ``(clamp(round(x / step), lo, hi) * step, (lo_x <= x <= hi_x) as uint8)`` with ``step``,
    ``lo_x``, ``hi_x`` as float32 (the values of ``functional.linear_fake_quantize``)."""
    out = torch.empty(x.shape, dtype=torch.float32)
    gate = torch.empty(x.shape, dtype=torch.uint8)
    _la_ext().kbit_fake(
        _as_numpy(x.detach()), float(step), float(lo), float(hi), float(lo_x), float(hi_x),
        out.numpy(), gate.numpy(), _num_threads(),
    )  # fmt: skip
    return out, gate
