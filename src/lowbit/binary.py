"""Binary networks at bit speed: XNOR-popcount GEMM and convolution, fused epilogues, packed BNNs.

Everything here runs ±1 weights against ±1 activations packed as sign bits (the convention of
:mod:`lowbit.kernels`): element ``j`` of a row is bit ``j % 64`` of little-endian 64-bit word
``j // 64``, the bit is 1 exactly when ``x < 0`` (``sign(0) = sign(-0.0) = +1``, NaN -> +1), and
bits past ``K`` are 0 in both operands so they cancel. Then ``dot(a, w) = K - 2*popcount(a ^ w)``
(BNN, arXiv 1602.02830 §2; kernels.md §2.4).

Layers:

* :func:`binary_linear` — popcount GEMM with a fused epilogue: ``"int32"`` dots, ``"float"``
  (``d * scale + bias``: a bias or a folded batch norm), ``"int8"`` (the same, rounded half to even
  and saturated) or ``"bits"`` (a per-channel integer threshold that writes the *packed* input
  of the next binary layer, so a binary stack never leaves the integer domain).
* :func:`binary_conv2d` — NHWC with channels packed (``ceil(C/64)`` words per pixel), im2col on
  packed words, any stride / padding / dilation. Zero padding is exact: padding taps enter the
  popcount as +1 and a per-output-channel int32 correction (:func:`zero_padding_correction`)
  removes them, so a model trained with ordinary zero padding gives identical results.
* :func:`binary_maxpool2d` — max-pool on packed bits (max of ±1 is +1 when any input is +1, the
  AND of the sign bits; OR for channels whose threshold was flipped).
* :func:`bitplane_linear` — an 8-bit first layer against binary weights through the bit-plane
  decomposition ``x = sum_n 2^n x_n`` (QNN §2.5), every plane a binary GEMM.

Models: :func:`pack_bnn` turns a BNN-trained sequential model (``lowbit.quantize(model, "bnn")``,
e.g. ``lowbit.models`` MLP / ConvNet) into :class:`PackedBinaryLinear` / :class:`PackedBinaryConv2d`
stages whose batch norms and sign activations are folded into thresholds. Because the
threshold is read off the *same* float modules evaluated at every reachable integer dot
product (a monotone step function), the packed model's predictions equal the simulated model's.

A first layer with binary weights and k-bit uniform inputs becomes a :class:`PackedBitplaneLinear`
(exact integer dot products over bit-planes). Packed models save to ``.lowbit`` files
(:func:`lowbit.save`; docs/format.md) and run from the CLI (``lowbit pack RUN --xnor``).

Every kernel has an int64 / float64 reference here (``*_reference``) used by tests/test_binary*.py.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn
from torch.nn import functional as TF

from lowbit import kernels
from lowbit.pack import Float32Buffers, float32_forward, float32_or_bits_forward

__all__ = [
    "OUT_KINDS",
    "BinaryMaxPool2d",
    "FlattenBits",
    "NotMonotoneError",
    "PackedBinaryConv2d",
    "PackedBinaryLinear",
    "PackedBitplaneLinear",
    "binary_conv2d",
    "binary_conv2d_reference",
    "binary_linear",
    "binary_linear_reference",
    "binary_layer_weight",
    "binary_maxpool2d",
    "bitplane_linear",
    "conv_output_size",
    "fold_threshold",
    "is_binary_layer",
    "is_bitplane_layer",
    "pack_bits",
    "pack_bnn",
    "pack_conv_input",
    "pack_conv_weight",
    "deinterleave_weights",
    "interleave_weights",
    "pack_weights",
    "packed_bytes",
    "signs",
    "unpack_bits",
    "zero_padding_correction",
]

_ext = kernels._ext
OUT_KINDS = ("int32", "float", "int8", "bits")
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1


def _threads() -> int:
    return max(1, int(torch.get_num_threads()))


def _np(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        raise ValueError(f"lowbit binary kernels run on the CPU; got a tensor on {t.device}")
    if t.requires_grad:
        t = t.detach()
    return t.numpy() if t.is_contiguous() else t.contiguous().numpy()


def _opt(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else _np(t)


def packed_bytes(k: int) -> int:
    """Bytes of one packed row of ``k`` signs: whole 64-bit words."""
    return 8 * ((int(k) + 63) // 64)


def signs(x: torch.Tensor) -> torch.Tensor:
    """The ±1 values the packing stores: ``-1`` where ``x < 0``, else ``+1`` (NaN and -0.0 -> +1)."""
    return torch.where(x < 0, -1, 1).to(torch.int64)


def pack_bits(x: torch.Tensor) -> torch.Tensor:
    """Pack the signs of ``x (..., K)`` into uint8 ``(..., packed_bytes(K))`` (the C++ packer)."""
    if x.dim() == 0:
        raise ValueError("pack_bits needs at least one dimension (the one packed)")
    flat = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
    out = kernels.pack_signs(flat.float())
    return out.reshape(*x.shape[:-1], out.shape[-1])


def unpack_bits(bits: torch.Tensor, k: int) -> torch.Tensor:
    """±1 int64 ``(..., k)`` of packed rows (inverse of :func:`pack_bits` up to the sign rule)."""
    raw = np.unpackbits(_np(bits.to(torch.uint8)), axis=-1, bitorder="little")[..., :k]
    return torch.from_numpy(1 - 2 * raw.astype(np.int64))


def interleave_weights(w_bits: torch.Tensor) -> torch.Tensor:
    """Row-major packed weights ``(N, row_bytes)`` -> the kernels' ``(ceil(N/8), 8*row_bytes)`` layout.

    Blocks of 8 rows; inside a block, word ``i`` of row ``r`` sits at byte ``64*i + 8*r``, so one
    512-bit load holds word ``i`` of 8 rows (csrc/binary.h). Padding rows are zero.
    """
    n, row_bytes = w_bits.shape
    if row_bytes % 8:
        raise ValueError("packed rows must be whole 64-bit words (a multiple of 8 bytes)")
    words = row_bytes // 8
    blocks = (n + 7) // 8
    padded = torch.zeros((blocks * 8, row_bytes), dtype=torch.uint8)
    padded[:n] = w_bits
    as_words = padded.view(torch.int64).reshape(blocks, 8, words).transpose(1, 2)
    return as_words.contiguous().view(torch.uint8).reshape(blocks, 64 * words)


def deinterleave_weights(w_bits: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`interleave_weights`: the row-major packed rows ``(n, row_bytes)``."""
    blocks, width = w_bits.shape
    if width % 64 or not 0 < n <= 8 * blocks or blocks != (n + 7) // 8:
        raise ValueError(f"interleaved weights {tuple(w_bits.shape)} do not hold {n} rows")
    words = width // 64
    as_words = _np(w_bits).view("<u8").reshape(blocks, words, 8).transpose(0, 2, 1)
    rows = np.ascontiguousarray(as_words.reshape(blocks * 8, words)[:n])
    return torch.from_numpy(rows.view(np.uint8).reshape(n, 8 * words))


def pack_weights(w: torch.Tensor) -> torch.Tensor:
    """Signs of ``(N, K)`` weights packed for the kernels: :func:`interleave_weights` of :func:`pack_bits`."""
    return interleave_weights(pack_bits(w))


def _out_tensor(kind: str, m: int, n: int) -> torch.Tensor:
    if kind == "int32":
        return torch.empty((m, n), dtype=torch.int32)
    if kind == "float":
        return torch.empty((m, n), dtype=torch.float32)
    if kind == "int8":
        return torch.empty((m, n), dtype=torch.int8)
    if kind == "bits":
        return torch.empty((m, packed_bytes(n)), dtype=torch.uint8)
    raise ValueError(f"out must be one of {', '.join(OUT_KINDS)}; got {kind!r}")


def _linear_impl(
    a_bits: torch.Tensor,
    w_bits: torch.Tensor,
    n: int,
    k: int,
    corr: torch.Tensor | None,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    thr: torch.Tensor | None,
    flip: torch.Tensor | None,
    kind: str,
) -> torch.Tensor:
    out = _out_tensor(kind, a_bits.shape[0], n)
    outs: dict[str, np.ndarray | None] = dict.fromkeys(OUT_KINDS)
    outs[kind] = out.numpy()
    _ext.binary_linear(
        _np(a_bits),
        _np(w_bits),
        int(n),
        int(k),
        _opt(corr),
        _opt(scale),
        _opt(bias),
        _opt(thr),
        _opt(flip),
        outs["int32"],
        outs["float"],
        outs["int8"],
        outs["bits"],
        _threads(),
    )
    return out


def binary_linear(
    a_bits: torch.Tensor,
    w_bits: torch.Tensor,
    k: int,
    *,
    out: str = "int32",
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    threshold: tuple[torch.Tensor, torch.Tensor] | None = None,
    corr: torch.Tensor | None = None,
) -> torch.Tensor:
    """Binary GEMM ``(M, bytes) x (N, bytes) -> (M, N)`` with a fused epilogue (one C++ call, GIL released).

    ``a_bits`` and ``w_bits`` are row-major packed signs (:func:`pack_bits`); the weights are
    re-laid out per call (:func:`interleave_weights`), which the packed modules do once instead.

    With ``d = K - 2*popcount(a ^ w) + corr[m % P, n]`` (``corr`` int32 ``(P, N)``, optional):
    ``out="int32"`` gives ``d``; ``"float"`` ``float(d) * scale + bias`` (fp32, each optional,
    per output); ``"int8"`` that value rounded half to even and saturated to [-128, 127];
    ``"bits"`` the packed signs ``(M, packed_bytes(N))`` of the next layer's input:
    bit ``n`` is 1 (-1) when ``d < thr[n]``, or ``d > thr[n]`` where ``flip[n]``
    (``threshold=(thr int32, flip bool)`` from :func:`fold_threshold`).
    """
    if a_bits.dtype != torch.uint8 or w_bits.dtype != torch.uint8:
        raise TypeError("binary_linear expects packed uint8 operands (pack_bits)")
    thr = flip = None
    if out == "bits":
        if threshold is None:
            raise ValueError('out="bits" needs threshold=(thr, flip) (see fold_threshold)')
        thr, flip = threshold[0].to(torch.int32), threshold[1].to(torch.uint8)
    f32 = lambda t: None if t is None else t.detach().float().reshape(-1)  # noqa: E731
    if a_bits.dim() != 2 or w_bits.dim() != 2 or a_bits.shape[1] != w_bits.shape[1]:
        raise ValueError(
            f"packed activations {tuple(a_bits.shape)} and weights {tuple(w_bits.shape)} must be "
            "2-D with the same bytes per row"
        )
    return _linear_impl(
        a_bits,
        interleave_weights(w_bits),
        w_bits.shape[0],
        k,
        None if corr is None else corr.to(torch.int32),
        f32(scale),
        f32(bias),
        thr,
        flip,
        out,
    )


def binary_linear_reference(
    a_signs: torch.Tensor,
    w_signs: torch.Tensor,
    *,
    out: str = "int32",
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    threshold: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """int64 / fp32 reference of :func:`binary_linear` from ±1 matrices (bits returned as ±1 int64)."""
    d = a_signs.to(torch.int64) @ w_signs.to(torch.int64).T
    if out == "int32":
        return d
    if out == "bits":
        assert threshold is not None
        thr, flip = threshold[0].to(torch.int64), threshold[1].to(torch.bool)
        neg = torch.where(flip, d > thr, d < thr)
        return torch.where(neg, -1, 1).to(torch.int64)
    y = d.to(torch.float32)
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    if out == "int8":
        return torch.round(y).clamp(-128, 127).to(torch.int8)
    return y


# ----------------------------------------------------------------------------------------------
# Thresholds: batch norm / bias / sign folded into one integer compare per channel


class NotMonotoneError(ValueError):
    """The float function between two binary layers is not monotone in the dot product."""


def fold_threshold(
    fn: Callable[[torch.Tensor], torch.Tensor], k: int, n: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(thr int32 (n,), flip bool (n,))`` with ``fn(d) < 0  <=>  (d > thr if flip else d < thr)``.

    ``fn`` maps float dot products ``(R, n)`` (every channel sees the same column of values) to
    the pre-sign activations, e.g. ``lambda y: hardtanh(bn(y + bias))``. It is evaluated at
    *every* integer in ``[-k, k]``: exact for whatever rounding ``fn`` does, because float
    ``+``, ``*`` by a constant and clamps are monotone, so ``fn(d) < 0`` is a prefix (rising
    channel: ``d < thr``) or a suffix (falling channel, e.g. a negative BN scale: ``d > thr``)
    of the integers. Raises :class:`NotMonotoneError` otherwise. The sign rule is lowbit's:
    ``fn(d) = -0.0`` or NaN counts as +1.
    """
    grid = torch.arange(-k, k + 1, dtype=torch.float32)[:, None].expand(2 * k + 1, n).contiguous()
    with torch.no_grad():
        neg = (fn(grid) < 0).T.numpy()  # (n, 2k+1)
    thr = np.empty(n, dtype=np.int64)
    flip = np.zeros(n, dtype=bool)
    for c in range(n):
        row = neg[c]
        count = int(row.sum())
        if count == 0:
            thr[c] = _INT32_MIN  # never negative
        elif count == row.size:
            thr[c] = _INT32_MAX  # always negative
        elif row[:count].all():  # prefix: negative below the first non-negative d
            thr[c] = count - k
        elif row[row.size - count :].all():  # suffix: negative above the last non-negative d
            thr[c] = (row.size - count - 1) - k
            flip[c] = True
        else:
            raise NotMonotoneError(
                f"channel {c}: the activation between the binary layers is not monotone in the "
                "dot product, so it cannot be folded into a threshold"
            )
    return torch.from_numpy(thr.astype(np.int32)), torch.from_numpy(flip)


# ----------------------------------------------------------------------------------------------
# Convolution: NHWC, channels packed


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    a, b = v
    return (int(a), int(b))


def conv_output_size(
    h: int,
    w: int,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int] = (1, 1),
) -> tuple[int, int]:
    """``(OH, OW)`` of a convolution / pool (floor mode, as ``nn.Conv2d``)."""
    oh = (h + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
    return oh, ow


def pack_conv_input(x: torch.Tensor) -> torch.Tensor:
    """NCHW float -> packed NHWC ``(B, H, W, packed_bytes(C))`` uint8 (channels along the bits)."""
    if x.dim() != 4:
        raise ValueError(f"pack_conv_input expects NCHW; got shape {tuple(x.shape)}")
    return pack_bits(x.permute(0, 2, 3, 1))


def pack_conv_weight(w: torch.Tensor) -> torch.Tensor:
    """``(N, C, KH, KW)`` weights (any sign-carrying dtype) -> ``(N, KH*KW*packed_bytes(C))`` uint8.

    Row-major packed rows, tap-major with the channel words of each tap contiguous (the row
    layout of :func:`binary_conv2d`'s im2col); channel padding bits are 0 (they cancel).
    """
    n, c, kh, kw = w.shape
    bits = pack_bits(w.float().permute(0, 2, 3, 1).reshape(n * kh * kw, c))
    return bits.reshape(n, kh * kw * bits.shape[-1]).contiguous()


def zero_padding_correction(
    w_signs: torch.Tensor,
    h: int,
    w: int,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> torch.Tensor | None:
    """int32 ``(OH*OW, N)`` to add to the popcount dots of a binary conv so zero padding is exact.

    The rule: im2col stores padding taps as bit 0, i.e. +1 inputs, so the kernel computes
    ``d_plus = d_zero + sum over out-of-bounds taps t of S[n, t]`` with ``S[n, t] = sum_c w[n, c, t]``
    (the ±1 filter summed over channels at tap ``t``). The correction ``-sum_oob S`` depends only
    on the filter and the output pixel (which taps fall outside), so it is computed once per
    input size: a float64 convolution (exact for these small integers) of the padding-ring
    indicator with ``S``. ``None`` when there is no padding. Interior pixels get 0.
    """
    ph, pw = _pair(padding)
    if ph == 0 and pw == 0:
        return None
    s = w_signs.to(torch.float64).sum(1, keepdim=True)  # (N, 1, KH, KW)
    ring = torch.ones((1, 1, h + 2 * ph, w + 2 * pw), dtype=torch.float64)
    ring[:, :, ph : ph + h, pw : pw + w] = 0
    c = TF.conv2d(ring, s, stride=_pair(stride), dilation=_pair(dilation))  # (1, N, OH, OW)
    return (-c[0]).permute(1, 2, 0).reshape(-1, s.shape[0]).round().to(torch.int32).contiguous()


def _im2col(
    x_bits: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> torch.Tensor:
    b, h, w, cb = x_bits.shape
    oh, ow = conv_output_size(h, w, kernel, stride, padding, dilation)
    cols = torch.empty((b * oh * ow, kernel[0] * kernel[1] * cb), dtype=torch.uint8)
    _ext.binary_im2col(_np(x_bits), *kernel, *stride, *padding, *dilation, cols.numpy(), _threads())
    return cols


def binary_conv2d(
    x_bits: torch.Tensor,
    w_bits: torch.Tensor,
    in_channels: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    *,
    corr: torch.Tensor | None = None,
    out: str = "int32",
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    threshold: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Binary convolution on packed NHWC input ``(B, H, W, packed_bytes(C))`` -> NHWC output.

    ``w_bits`` from :func:`pack_conv_weight`; ``corr`` from :func:`zero_padding_correction`
    (without it, padding acts as +1: "same-one" padding). Output ``(B, OH, OW, N)`` of the
    ``out`` kind (see :func:`binary_linear`), or packed bits ``(B, OH, OW, packed_bytes(N))``.
    """
    kernel, st, pad, dil = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    b, h, w, _ = x_bits.shape
    oh, ow = conv_output_size(h, w, kernel, st, pad, dil)
    cols = _im2col(x_bits, kernel, st, pad, dil)
    k = in_channels * kernel[0] * kernel[1]
    y = binary_linear(
        cols, w_bits, k, out=out, scale=scale, bias=bias, threshold=threshold, corr=corr
    )
    return y.reshape(b, oh, ow, y.shape[-1])


def binary_conv2d_reference(
    x_signs: torch.Tensor,
    w_signs: torch.Tensor,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
) -> torch.Tensor:
    """float64 ``conv2d`` of ±1 NCHW tensors with ordinary zero padding (exact integers), as int64."""
    y = TF.conv2d(
        x_signs.to(torch.float64),
        w_signs.to(torch.float64),
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    return y.round().to(torch.int64)


def binary_maxpool2d(
    x_bits: torch.Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    or_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Max-pool of a packed ±1 NHWC map (``max`` = AND of the sign bits), as ``nn.MaxPool2d``.

    ``or_mask`` (uint8, one byte per channel byte, bit per channel) selects channels pooled with
    OR instead (min of ±1): what a max-pool *before* a falling threshold becomes.
    """
    kernel = _pair(kernel_size)
    st = kernel if stride is None else _pair(stride)
    pad = _pair(padding)
    b, h, w, cb = x_bits.shape
    oh, ow = conv_output_size(h, w, kernel, st, pad)
    mask = torch.zeros(cb, dtype=torch.uint8) if or_mask is None else or_mask.to(torch.uint8)
    out = torch.empty((b, oh, ow, cb), dtype=torch.uint8)
    _ext.binary_maxpool(_np(x_bits), *kernel, *st, *pad, _np(mask), out.numpy(), _threads())
    return out


# ----------------------------------------------------------------------------------------------
# 8-bit first layer: bit-plane decomposition (QNN §2.5)


def bitplane_linear(
    x: torch.Tensor, w_bits: torch.Tensor, k: int, *, bits: int = 8, signed: bool = False
) -> torch.Tensor:
    """Exact int64 ``x @ w.T`` for integer inputs ``x (M, k)`` and packed ±1 weights, on the binary GEMM.

    ``x = sum_n 2^n x_n`` with bit-planes ``x_n`` in {0, 1} (two's complement when ``signed``: the
    top plane weighs ``-2^(bits-1)``). For a plane, ``x_n . w = (s_n . w + sum(w)) / 2`` with
    ``s_n = 2 x_n - 1`` in ±1, and ``s_n . w`` is one popcount GEMM (all planes in one call).
    Matches :func:`lowbit.methods.bnn.bitplane_linear`.
    """
    if x.dtype.is_floating_point:
        raise TypeError("bitplane_linear needs integer inputs (uint8 pixels or int8)")
    m = x.shape[0]
    xi = x.to(torch.int64) & ((1 << bits) - 1)
    planes = torch.stack([(xi >> p) & 1 for p in range(bits)])  # (bits, M, k)
    # Plane bit 1 (input +1) must pack as +1: pack -0.5 for 0 and +0.5 for 1.
    s_bits = pack_bits((planes.to(torch.float32) - 0.5).reshape(bits * m, k))
    d = binary_linear(s_bits, w_bits, k).to(torch.int64).reshape(bits, m, -1)
    wsum = binary_linear(pack_bits(torch.ones(1, k)), w_bits, k).to(torch.int64)  # sum_k w
    out = torch.zeros((m, w_bits.shape[0]), dtype=torch.int64)
    for p in range(bits):
        weight = -(1 << (bits - 1)) if (signed and p == bits - 1) else (1 << p)
        out += weight * ((d[p] + wsum) // 2)
    return out


# ----------------------------------------------------------------------------------------------
# torch.library custom ops: the packed modules call these under torch.compile / torch.export


_KIND_CODE = {kind: i for i, kind in enumerate(OUT_KINDS)}
_NP_DTYPES = {"int32": np.int32, "float": np.float32, "int8": np.int8, "bits": np.uint8}


@torch.library.custom_op("lowbit::binary_linear", mutates_args=(), device_types="cpu")
def _binary_linear_op(
    a_bits: torch.Tensor,
    w_bits: torch.Tensor,
    n: int,
    k: int,
    corr: torch.Tensor | None,
    scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    thr: torch.Tensor | None,
    flip: torch.Tensor | None,
    kind: int,
) -> torch.Tensor:
    return _linear_impl(a_bits, w_bits, n, k, corr, scale, bias, thr, flip, OUT_KINDS[kind])


@_binary_linear_op.register_fake
def _(a_bits, w_bits, n, k, corr, scale, bias, thr, flip, kind):  # type: ignore[no-untyped-def]
    torch._check(w_bits.shape[0] == (n + 7) // 8)
    m = a_bits.shape[0]
    dtype = {0: torch.int32, 1: torch.float32, 2: torch.int8, 3: torch.uint8}[kind]
    cols = (n + 63) // 64 * 8 if kind == 3 else n
    return a_bits.new_empty((m, cols), dtype=dtype)


@torch.library.custom_op("lowbit::binary_pack", mutates_args=(), device_types="cpu")
def _binary_pack_op(x: torch.Tensor) -> torch.Tensor:
    return pack_bits(x)


@_binary_pack_op.register_fake
def _(x):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], (x.shape[-1] + 63) // 64 * 8), dtype=torch.uint8)


@torch.library.custom_op("lowbit::binary_im2col", mutates_args=(), device_types="cpu")
def _binary_im2col_op(x_bits: torch.Tensor, geometry: list[int]) -> torch.Tensor:
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    return _im2col(x_bits, (kh, kw), (sh, sw), (ph, pw), (dh, dw))


@_binary_im2col_op.register_fake
def _(x_bits, geometry):  # type: ignore[no-untyped-def]
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    b, h, w, cb = x_bits.shape
    oh, ow = conv_output_size(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    return x_bits.new_empty((b * oh * ow, kh * kw * cb), dtype=torch.uint8)


@torch.library.custom_op("lowbit::binary_maxpool2d", mutates_args=(), device_types="cpu")
def _binary_maxpool_op(
    x_bits: torch.Tensor, geometry: list[int], or_mask: torch.Tensor
) -> torch.Tensor:
    kh, kw, sh, sw, ph, pw = geometry
    return binary_maxpool2d(x_bits, (kh, kw), (sh, sw), (ph, pw), or_mask)


@_binary_maxpool_op.register_fake
def _(x_bits, geometry, or_mask):  # type: ignore[no-untyped-def]
    kh, kw, sh, sw, ph, pw = geometry
    b, h, w, cb = x_bits.shape
    oh, ow = conv_output_size(h, w, (kh, kw), (sh, sw), (ph, pw))
    return x_bits.new_empty((b, oh, ow, cb), dtype=torch.uint8)


_is_compiling = torch.compiler.is_compiling  # the same function objects (dynamo knows them)
_is_exporting = torch.compiler.is_exporting
_jit_tracing = torch._C._is_tracing  # what torch.jit.is_tracing() returns outside TorchScript
_num_threads = torch.get_num_threads
_from_numpy = torch.from_numpy


def _tracing(x: torch.Tensor) -> bool:
    # Cheapest test first: fake / functional tensors are subclasses. Module-level aliases save
    # the attribute lookups: a plain eager call pays ~0.3 us here (a batch-1 layer: ~30 us).
    return type(x) is not torch.Tensor or _is_compiling() or _is_exporting() or bool(_jit_tracing())


# ----------------------------------------------------------------------------------------------
# Packed modules


def _check_bits(x: torch.Tensor) -> torch.Tensor:
    if x.dtype != torch.uint8:
        raise TypeError(f"input='bits' layers take packed uint8 bits (pack_bits); got {x.dtype}")
    return x


_PLAN_BUFFERS = frozenset(("w_bits", "scale", "bias", "thr", "flip", "tap_sums"))


class _PackedBinaryBase(Float32Buffers, nn.Module):
    """Shared epilogue state: ``bias``/``scale`` (float outputs) or ``thr``/``flip`` (bit outputs).

    Eager calls run one C++ call per layer (``BinaryLinearPlan.forward``): the constant operands
    are checked and converted once into a plan, cached until a buffer is replaced
    (``__setattr__``, ``.to()``/``_apply``, ``load_state_dict``), and the call takes the input
    as a NumPy view and returns a new output array, so a batch-1 layer pays only for the module
    call and two array conversions around the kernel. Under torch.compile / export / jit
    tracing the same computation goes through the ``torch.ops.lowbit`` custom ops.
    """

    w_bits: torch.Tensor
    tap_sums: torch.Tensor
    scale: torch.Tensor | None
    bias: torch.Tensor | None
    thr: torch.Tensor | None
    flip: torch.Tensor | None
    input_kind: str
    out_kind: str
    n_out: int

    def _init_epilogue(
        self,
        n: int,
        out: str,
        scale: torch.Tensor | None,
        bias: torch.Tensor | None,
        threshold: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        if out not in OUT_KINDS:
            raise ValueError(f"out must be one of {', '.join(OUT_KINDS)}; got {out!r}")
        if out == "bits" and threshold is None:
            raise ValueError('out="bits" needs threshold=(thr, flip) (see fold_threshold)')
        self.out_kind, self.n_out = out, n

        def vec(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
            return None if t is None else t.detach().reshape(-1).to(dtype).expand(n).contiguous()

        self.register_buffer("scale", vec(scale, torch.float32))
        self.register_buffer("bias", vec(bias, torch.float32))
        self.register_buffer("thr", None if threshold is None else vec(threshold[0], torch.int32))
        self.register_buffer("flip", None if threshold is None else vec(threshold[1], torch.uint8))

    # -- the C++ plan -------------------------------------------------------------------------

    def _drop_caches(self) -> None:
        self.__dict__.pop("_plan", None)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _PLAN_BUFFERS:
            self._drop_caches()
        super().__setattr__(name, value)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._drop_caches()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._drop_caches()
        super()._load_from_state_dict(*args, **kwargs)

    def _reduction(self) -> int:
        raise NotImplementedError

    def plan(self) -> Any:
        """The layer's C++ plan (``_kernels.BinaryLinearPlan``), built on first use."""
        plan = self.__dict__.get("_plan")
        if plan is None:
            bufs = self._buffers
            arrays = [
                None if bufs[name] is None else _np(cast(torch.Tensor, bufs[name]))
                for name in ("w_bits", "scale", "bias", "thr", "flip")
            ]
            plan = _ext.BinaryLinearPlan(
                arrays[0],
                self.n_out,
                self._reduction(),
                *arrays[1:],
                _KIND_CODE[self.out_kind],
                float_input=self.input_kind == "float" and not isinstance(self, PackedBinaryConv2d),
            )
            if isinstance(self, PackedBinaryConv2d):
                geometry = (*self.kernel_size, *self.stride, *self.padding, *self.dilation)
                plan.set_conv(*geometry, packed_bytes(self.in_channels))
            self.__dict__["_plan"] = plan
        return plan

    def _gemm(self, a_bits: torch.Tensor, k: int, corr: torch.Tensor | None) -> torch.Tensor:
        n = self.n_out
        if _tracing(a_bits):
            args = (self.w_bits, n, k, corr, self.scale, self.bias, self.thr, self.flip)
            return torch.ops.lowbit.binary_linear(a_bits, *args, _KIND_CODE[self.out_kind])
        m = a_bits.shape[0]
        shape = (m, packed_bytes(n)) if self.out_kind == "bits" else (m, n)
        o = np.empty(shape, dtype=_NP_DTYPES[self.out_kind])
        self.plan()(_np(a_bits), None if corr is None else _np(corr), o, _threads())
        return torch.from_numpy(o)

    def __getstate__(self) -> dict[str, Any]:
        # The plan must not travel with a copy (it points into the original buffers).
        state = self.__dict__.copy()
        state.pop("_plan", None)
        return state

    def _pack(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.lowbit.binary_pack(x) if _tracing(x) else pack_bits(x)

    def _epilogue_config(self) -> dict[str, Any]:
        return {
            "out": self.out_kind,
            "has_scale": self.scale is not None,
            "has_bias": self.bias is not None,
            "has_threshold": self.thr is not None,
        }

    def _set_epilogue_buffers(self, tensors: dict[str, torch.Tensor], out: str, n: int) -> None:
        self.out_kind, self.n_out = out, n
        for name in ("scale", "bias", "thr", "flip"):
            self.register_buffer(name, tensors.get(name))


class PackedBinaryLinear(_PackedBinaryBase):
    """Inference ``Linear`` with ±1 weights and ±1 inputs on the popcount kernels.

    ``input="float"``: takes float ``(..., in_features)`` and binarizes it (sign, lowbit's rule);
    ``input="bits"``: takes packed rows ``(B, row_bytes)`` from a previous bit-output layer.
    ``out``: ``"float"`` (``d * scale + bias``), ``"int32"``, ``"int8"`` or ``"bits"`` (packed
    ``(B, packed_bytes(out_features))`` for the next binary layer, thresholds from
    :func:`fold_threshold`). ``weight`` is ±1 ``(out, in)`` (anything whose sign is the weight).
    ``input_layout`` ``(H, W, C)`` says the packed input is a flattened NHWC map with channels
    padded to words (a conv before it): the weight columns (PyTorch's C, H, W order) are
    permuted to match, so ``nn.Flatten`` needs no data movement.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        bias: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        threshold: tuple[torch.Tensor, torch.Tensor] | None = None,
        input: str = "float",
        out: str = "float",
        input_layout: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if input not in ("float", "bits"):
            raise ValueError(f"input must be 'float' or 'bits'; got {input!r}")
        if input_layout is not None and input != "bits":
            raise ValueError("input_layout describes packed inputs: it needs input='bits'")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.input_kind = input
        self.input_layout = None if input_layout is None else tuple(int(v) for v in input_layout)
        w = weight.detach().float()
        if input_layout is not None:
            h, wd, c = input_layout
            if c * h * wd != self.in_features:
                raise ValueError(
                    f"input_layout {input_layout} does not match in_features={self.in_features}"
                )
            wb = pack_bits(w.reshape(-1, c, h, wd).permute(0, 2, 3, 1).reshape(-1, c))
            wb = wb.reshape(self.out_features, -1).contiguous()
        else:
            wb = pack_bits(w)
        self.register_buffer("w_bits", interleave_weights(wb))
        self._init_epilogue(self.out_features, out, scale, bias, threshold)

    def _reduction(self) -> int:
        return self.in_features

    @float32_or_bits_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(x) is torch.Tensor and not (_is_compiling() or _is_exporting() or _jit_tracing()):
            # Hot path, kept to a handful of Python operations (after a batch-1 GEMV that has
            # streamed megabytes through the caches, each one runs cold): one C++ call packs a
            # float input, runs the GEMM and the epilogue and allocates the output.
            try:
                return _from_numpy(
                    (self.__dict__.get("_plan") or self.plan()).forward(
                        x.numpy(), None, _num_threads()
                    )
                )
            except (TypeError, RuntimeError, ValueError):
                pass  # another dtype, requires grad, not contiguous, (..., bytes) bits: general path
        if self.input_kind == "float":
            if x.shape[-1] != self.in_features:
                raise ValueError(f"expected inputs (..., {self.in_features}); got {tuple(x.shape)}")
            lead = x.shape[:-1]
            a = self._pack(x.reshape(-1, self.in_features))
        else:
            _check_bits(x)
            if self.input_layout is None:  # bits of a linear layer: (..., packed bytes)
                lead = x.shape[:-1]
                a = x.reshape(-1, x.shape[-1])
            else:  # a conv's NHWC bits, flattened per sample
                lead = x.shape[:1]
                a = x.flatten(1)
        y = self._gemm(a, self.in_features, None)
        return y.reshape(*lead, y.shape[-1])

    def config(self) -> dict[str, Any]:
        """JSON description (``.lowbit`` files; docs/format.md "Binary layers")."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "input": self.input_kind,
            "input_layout": None if self.input_layout is None else list(self.input_layout),
            **self._epilogue_config(),
        }

    @classmethod
    def from_packed(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> PackedBinaryLinear:
        """A layer from :meth:`config` and its stored buffers (``w_bits`` interleaved, epilogue
        vectors); the caller has validated shapes and dtypes (lowbit.saveload)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.in_features, self.out_features = (
            int(config["in_features"]),
            int(config["out_features"]),
        )
        self.input_kind = str(config["input"])
        layout = config.get("input_layout")
        self.input_layout = None if layout is None else tuple(int(v) for v in layout)
        self.register_buffer("w_bits", tensors["w_bits"])
        self._set_epilogue_buffers(tensors, str(config["out"]), self.out_features)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"input={self.input_kind}, out={self.out_kind}"
        )


class PackedBinaryConv2d(_PackedBinaryBase):
    """Inference ``Conv2d`` (groups=1, zero padding) with ±1 weights and inputs on packed NHWC maps.

    ``input="float"``: NCHW float, binarized and packed here; ``input="bits"``: packed NHWC
    ``(B, H, W, packed_bytes(C))``. ``out="bits"`` returns packed NHWC (for the next binary
    layer); the other kinds return NCHW tensors, as ``nn.Conv2d`` would. Zero padding is exact
    (:func:`zero_padding_correction`, cached per input size).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        *,
        bias: torch.Tensor | None = None,
        scale: torch.Tensor | None = None,
        threshold: tuple[torch.Tensor, torch.Tensor] | None = None,
        input: str = "float",
        out: str = "float",
    ) -> None:
        super().__init__()
        if input not in ("float", "bits"):
            raise ValueError(f"input must be 'float' or 'bits'; got {input!r}")
        n, c, kh, kw = (int(s) for s in weight.shape)
        self.out_channels, self.in_channels, self.kernel_size = n, c, (kh, kw)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.input_kind = input
        self.register_buffer("w_bits", interleave_weights(pack_conv_weight(weight.detach())))
        self.register_buffer("tap_sums", signs(weight.detach()).sum(1).to(torch.int32))
        self._init_epilogue(n, out, scale, bias, threshold)
        self._corr: dict[tuple[int, int], tuple[torch.Tensor, np.ndarray] | None] = {}

    def _drop_caches(self) -> None:
        super()._drop_caches()
        self.__dict__["_corr"] = {}

    def _reduction(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def _correction(self, h: int, w: int) -> tuple[torch.Tensor, np.ndarray] | None:
        key = (h, w)
        if key not in self._corr:
            s = self.tap_sums.to(torch.float64)[:, None]  # (N, 1, KH, KW): one channel of sums
            c = zero_padding_correction(s, h, w, self.stride, self.padding, self.dilation)
            self._corr[key] = None if c is None else (c, c.numpy())
        return self._corr[key]

    def correction(self, h: int, w: int, tracing: bool = False) -> torch.Tensor | None:
        """The zero-padding correction for an ``h x w`` input (cached; computed afresh from the
        traced buffers under torch.compile / export, where NumPy cannot see them)."""
        if tracing:
            s = self.tap_sums.to(torch.float64)[:, None]
            return zero_padding_correction(s, h, w, self.stride, self.padding, self.dilation)
        c = self._correction(h, w)
        return None if c is None else c[0]

    @float32_or_bits_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _tracing(x):
            xb = pack_bits(x.permute(0, 2, 3, 1)) if self.input_kind == "float" else x
            if xb.dim() == 4:
                plan = self.__dict__.get("_plan") or self.plan()
                c = self._correction(xb.shape[1], xb.shape[2])
                try:
                    y = torch.from_numpy(
                        plan.forward_conv(xb.numpy(), None if c is None else c[1], _num_threads())
                    )
                except (TypeError, RuntimeError):
                    pass  # not packed uint8, requires grad, not contiguous: general path
                else:
                    return y if self.out_kind == "bits" else y.permute(0, 3, 1, 2)
        xb = self._pack(x.permute(0, 2, 3, 1)) if self.input_kind == "float" else _check_bits(x)
        b, h, w, _ = xb.shape
        oh, ow = conv_output_size(h, w, self.kernel_size, self.stride, self.padding, self.dilation)
        geometry = [*self.kernel_size, *self.stride, *self.padding, *self.dilation]
        tracing = _tracing(xb)
        if tracing:
            cols = torch.ops.lowbit.binary_im2col(xb, geometry)
        else:
            cols = _im2col(xb, self.kernel_size, self.stride, self.padding, self.dilation)
        k = self._reduction()
        y = self._gemm(cols, k, self.correction(h, w, tracing)).reshape(b, oh, ow, -1)
        return y if self.out_kind == "bits" else y.permute(0, 3, 1, 2)

    def config(self) -> dict[str, Any]:
        """JSON description (``.lowbit`` files; docs/format.md "Binary layers")."""
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "input": self.input_kind,
            **self._epilogue_config(),
        }

    @classmethod
    def from_packed(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> PackedBinaryConv2d:
        """A layer from :meth:`config` and its stored buffers; ``tap_sums`` (the zero-padding
        correction's filter sums) is recomputed from ``w_bits``. Shapes validated by the caller."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        n, c = int(config["out_channels"]), int(config["in_channels"])
        kh, kw = (int(v) for v in config["kernel_size"])
        self.out_channels, self.in_channels, self.kernel_size = n, c, (kh, kw)
        self.stride = _pair(config["stride"])
        self.padding = _pair(config["padding"])
        self.dilation = _pair(config["dilation"])
        self.input_kind = str(config["input"])
        w_bits = tensors["w_bits"]
        self.register_buffer("w_bits", w_bits)
        rows = deinterleave_weights(w_bits, n).reshape(n, kh * kw, -1)
        neg = np.unpackbits(rows.numpy(), axis=-1, bitorder="little")[..., :c].sum(-1)
        sums = torch.from_numpy((c - 2 * neg.astype(np.int64)).astype(np.int32))
        self.register_buffer("tap_sums", sums.reshape(n, kh, kw).contiguous())
        self._set_epilogue_buffers(tensors, str(config["out"]), n)
        self._corr = {}
        return self

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, input={self.input_kind}, out={self.out_kind}"
        )


class BinaryMaxPool2d(Float32Buffers, nn.Module):
    """``nn.MaxPool2d`` on packed NHWC bits (see :func:`binary_maxpool2d`)."""

    or_mask: torch.Tensor

    def __init__(
        self,
        kernel_size: int | Sequence[int],
        stride: int | Sequence[int] | None = None,
        padding: int | Sequence[int] = 0,
        or_mask: torch.Tensor | None = None,
        channels: int = 0,
    ) -> None:
        super().__init__()
        self.kernel_size = _pair(kernel_size)
        self.stride = self.kernel_size if stride is None else _pair(stride)
        self.padding = _pair(padding)
        mask = (
            or_mask
            if or_mask is not None
            else torch.zeros(packed_bytes(channels), dtype=torch.uint8)
        )
        self.register_buffer("or_mask", mask.to(torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _tracing(x):
            geometry = [*self.kernel_size, *self.stride, *self.padding]
            return torch.ops.lowbit.binary_maxpool2d(x, geometry, self.or_mask)
        return binary_maxpool2d(x, self.kernel_size, self.stride, self.padding, self.or_mask)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, packed bits"


class PackedBitplaneLinear(Float32Buffers, nn.Module):
    """A first layer with ±1 weights and k-bit uniform inputs on the XNOR kernel (QNN §2.5).

    The layer this replaces (a ``QuantLinear`` with binary weights whose input quantizer is
    ``LinearAct``, e.g. ``overrides={"<first>": {"activations": "uint8"}}``) computes
    ``F.linear(q * step, w_b * wscale, bias)`` with codes ``q = clamp(round(x / step), lo, hi)``,
    ``step = clip / hi`` (:func:`lowbit.functional.linear_fake_quantize`). Here the same codes
    are split into bit-planes ``q = sum_n c_n x_n`` (``c_n = 2^n``; the top plane of signed
    codes weighs ``-2^(bits-1)``, two's complement), every plane runs through one popcount GEMM
    as ``s_n = 2 x_n - 1`` (``x_n . w = (s_n . w + sum(w)) / 2``), so ``s = sum_n c_n x_n . w``
    is the exact integer ``q . w_b`` (:func:`lowbit.methods.bnn.bitplane_linear`). The output is
    ``float(s) * (step * wscale[n]) + bias[n]`` in fp32: the simulated layer's value up to fp32
    rounding (its ``F.linear`` sums ``q * step`` products in another order).
    """

    w_bits: torch.Tensor
    w_sum: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor,
        *,
        act_bits: int = 8,
        act_signed: bool = False,
        act_clip: float = 1.0,
        wscale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        from lowbit.functional import linear_qrange

        if not 1 <= int(act_bits) <= 8:
            raise ValueError(f"bit-plane layers take 1..8-bit inputs; got {act_bits}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.act_bits, self.act_signed, self.act_clip = (
            int(act_bits),
            bool(act_signed),
            float(act_clip),
        )
        self.lo, self.hi = linear_qrange(self.act_bits, self.act_signed)
        self.step = self.act_clip / self.hi  # exactly linear_fake_quantize's step
        n = self.out_features
        self.register_buffer("w_bits", pack_weights(weight.detach().float()))
        self.register_buffer("w_sum", signs(weight.detach()).sum(1).to(torch.int32))
        ws = torch.ones(n) if wscale is None else wscale.detach().float().reshape(-1).expand(n)
        self.register_buffer("scale", (ws * self.step).to(torch.float32).contiguous())
        self.register_buffer(
            "bias", None if bias is None else bias.detach().float().reshape(n).contiguous()
        )

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """The integer input codes, computed exactly as the simulated layer's quantizer does."""
        return torch.round(x.detach() / self.step).clamp(self.lo, self.hi)

    @float32_forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs (..., {self.in_features}); got {tuple(x.shape)}")
        q = self.codes(x.reshape(-1, self.in_features).float())
        if not _tracing(q):
            # One C++ call: bit-planes, popcount GEMM, exact integer combination, fp32 epilogue.
            y = self._kernel(q, self.scale, self.bias)
        else:
            y = self.dots(q).to(torch.float32) * self.scale
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _kernel(
        self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        codes = q.to(torch.int8 if self.act_signed else torch.uint8)
        return torch.from_numpy(
            _ext.binary_bitplane_linear(
                _np(codes),
                self.act_bits,
                _np(self.w_bits),
                self.out_features,
                self.in_features,
                _np(self.w_sum),
                _np(scale),
                _opt(bias),
                _threads(),
            )
        )

    def dots(self, q: torch.Tensor) -> torch.Tensor:
        """Exact int64 ``q @ w_b.T`` of integer codes ``q (M, K)`` (any dtype holding integers
        in the layer's code range)."""
        k, n, bits = self.in_features, self.out_features, self.act_bits
        if not _tracing(q) and k * (1 << bits) < (1 << 24):  # float(s) is exact below 2^24
            return self._kernel(q, torch.ones(n), None).to(torch.int64)
        q = q.to(torch.int64) & ((1 << bits) - 1)
        m = q.shape[0]
        shifts = torch.arange(bits, dtype=torch.int64).reshape(bits, 1, 1)
        # Plane bit 1 is the input +1 (sign bit 0): pack x_n - 0.5.
        planes = ((q.unsqueeze(0) >> shifts) & 1).to(torch.float32).sub_(0.5).reshape(bits * m, k)
        if _tracing(q):
            a = torch.ops.lowbit.binary_pack(planes)
            args = (self.w_bits, n, k, None, None, None, None, None, _KIND_CODE["int32"])
            d = torch.ops.lowbit.binary_linear(a, *args)
        else:
            d = _linear_impl(
                pack_bits(planes), self.w_bits, n, k, None, None, None, None, None, "int32"
            )
        half = (d.reshape(bits, m, n).to(torch.int64) + self.w_sum.to(torch.int64)) // 2
        weights = [1 << p for p in range(bits)]
        if self.act_signed:
            weights[-1] = -(1 << (bits - 1))
        return (half * torch.tensor(weights, dtype=torch.int64).reshape(bits, 1, 1)).sum(0)

    def config(self) -> dict[str, Any]:
        """JSON description (``.lowbit`` files; docs/format.md)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "act_bits": self.act_bits,
            "act_signed": self.act_signed,
            "act_clip": self.act_clip,
            "has_bias": self.bias is not None,
        }

    @classmethod
    def from_packed(
        cls, config: dict[str, Any], tensors: dict[str, torch.Tensor]
    ) -> PackedBitplaneLinear:
        """A layer from :meth:`config` and its stored ``w_bits`` / ``scale`` / ``bias``;
        ``w_sum`` is recomputed from the bits. Shapes validated by the caller."""
        n, k = int(config["out_features"]), int(config["in_features"])
        self = cls(
            torch.ones(1, 1),
            act_bits=int(config["act_bits"]),
            act_signed=bool(config["act_signed"]),
            act_clip=float(config["act_clip"]),
        )
        self.out_features, self.in_features = n, k
        self.w_bits = tensors["w_bits"]
        rows = deinterleave_weights(self.w_bits, n).numpy()
        neg = np.unpackbits(rows, axis=-1, bitorder="little")[:, :k].sum(-1).astype(np.int64)
        self.w_sum = torch.from_numpy((k - 2 * neg).astype(np.int32))
        self.scale = tensors["scale"]
        self.bias = tensors.get("bias")
        return self

    def extra_repr(self) -> str:
        kind = f"{'' if self.act_signed else 'u'}int{self.act_bits}"
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"input={kind} bit-planes, out=float"
        )


def is_bitplane_layer(module: nn.Module) -> bool:
    """A ``QuantLinear`` with binary weights whose input quantizer is uniform k-bit (k <= 8):
    what :class:`PackedBitplaneLinear` runs exactly on the XNOR kernel."""
    from lowbit.nn import LinearAct, QuantLinear

    if not isinstance(module, QuantLinear) or type(module.input_quantizer) is not LinearAct:
        return False
    if not 1 <= module.input_quantizer.bits <= 8:
        return False
    return bool(module.quantized_weight().format == "binary")


class FlattenBits(nn.Module):
    """``nn.Flatten`` for packed NHWC bits: a view (the next layer's weights are permuted instead)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)  # also for an empty batch, where reshape(0, -1) is ambiguous


# ----------------------------------------------------------------------------------------------
# Whole models


def is_binary_layer(module: nn.Module) -> bool:
    """A ``QuantLinear`` / ``QuantConv2d`` with binary weights and a binarizing input quantizer."""
    return not_binary_reason(module) is None


def not_binary_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot run on the XNOR kernels (``None`` when it can)."""
    from lowbit.nn import QuantConv2d, QuantLinear

    if not isinstance(module, (QuantLinear, QuantConv2d)):
        return f"a {type(module).__name__}, not a QuantLinear / QuantConv2d"
    iq = getattr(module, "input_quantizer", None)
    if iq is None or not hasattr(iq, "spec") or iq.spec().kind != "binary":
        kind = "float" if iq is None or not hasattr(iq, "spec") else iq.spec().kind
        return f"its inputs are {kind}, not binarized (XNOR needs ±1 inputs and weights)"
    if getattr(iq, "stochastic", False) and iq.training:
        return "stochastic input binarization in training mode (call model.eval())"
    qw = module.quantized_weight()
    if qw.format != "binary":
        return f"its weights are {qw.format}, not binary"
    if isinstance(module, QuantConv2d):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return "padding other than explicit zero padding"
    return None


_ELEMENTWISE = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.Hardtanh,
    nn.Tanh,
    nn.Identity,
    nn.Dropout,
)


def _batch_statistics(m: nn.Module) -> bool:
    """A batch norm that normalises with the batch's own statistics at inference (no running
    statistics, or left in training mode): not a fixed per-channel map, so not foldable."""
    from lowbit.methods.bnn import ShiftBatchNorm

    return isinstance(m, (nn.modules.batchnorm._BatchNorm, ShiftBatchNorm)) and (
        m.training or m.running_mean is None or m.running_var is None
    )


def _elementwise() -> tuple[type[nn.Module], ...]:
    """Per-channel maps a threshold can absorb: :data:`_ELEMENTWISE` and QNN's shift-based batch
    norm (its eval mode is a fixed per-channel affine map with power-of-two factors)."""
    from lowbit.methods.bnn import ShiftBatchNorm

    return (*_ELEMENTWISE, ShiftBatchNorm)


def _leaves(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, nn.Sequential):
        out: list[nn.Module] = []
        for child in model:
            out.extend(_leaves(child))
        return out
    children = list(model.children())
    if not children or not hasattr(model, "input_shape"):
        return [model]
    # lowbit.models' MLP / ConvNet: forward is the composition of their Sequential children.
    out = []
    for child in children:
        out.extend(_leaves(child))
    return out


def binary_layer_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(±1 codes as float, per-output scale or None when it is exactly 1)``."""
    qw = layer.quantized_weight()  # type: ignore[operator]
    codes = qw.codes.to(torch.float32)
    scales = qw.scales.detach().float()
    n = qw.shape[0]
    if bool((scales == 1).all()):
        return codes, None
    if scales.numel() == 1:
        return codes, scales.reshape(1).expand(n).contiguous()
    if qw.granularity == "channel":
        return codes, scales.reshape(n)
    raise ValueError(f"binary weights with {qw.granularity} scales have no packed binary layer")


def _chain_fn(
    wscale: torch.Tensor | None, bias: torch.Tensor | None, is_conv: bool, n: int
) -> Callable[..., torch.Tensor]:
    """The float function a binary layer's dot products go through: scale, bias, then ``mods``."""

    def run(d: torch.Tensor, mods: Sequence[nn.Module]) -> torch.Tensor:
        y = d * wscale if wscale is not None else d
        y = y + bias if bias is not None else y
        if is_conv:
            # The grid runs along the spatial axis of one NCHW image: the layout (and so the
            # vectorized code path, hence the rounding) a conv's batch norm sees in the model.
            y = y.T.contiguous().reshape(1, n, -1, 1)
        for mod in mods:
            y = mod(y)
        return y.reshape(n, -1).T if is_conv else y

    return run


def pack_bnn(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    *,
    verify: bool = True,
    bitplanes: bool = True,
) -> nn.Sequential:
    """A fully packed inference model of a BNN-trained sequential model.

    ``model``: an ``nn.Sequential`` or a model whose forward is the composition of its
    (Sequential) children, such as ``lowbit.models`` MLP and ConvNet, quantized with
    ``lowbit.quantize(model, "bnn")``. Every binary layer (:func:`is_binary_layer`) becomes a
    :class:`PackedBinaryLinear` / :class:`PackedBinaryConv2d`:

    * if the next binary layer follows through only batch norms with running statistics
      (nn.BatchNorm, ShiftBatchNorm), Hardtanh/Tanh, dropout
      (eval), max-pools and a flatten, those are folded into a per-channel threshold
      (:func:`fold_threshold`: evaluated with the model's own modules, so exact) and the layer
      writes packed bits; max-pools become :class:`BinaryMaxPool2d` on bits, a flatten after a
      conv becomes :class:`FlattenBits` (the next layer's weight columns are permuted);
    * otherwise it outputs ``float(d) + bias`` and the following modules run as they are.

    A linear layer with binary weights and uniform k-bit inputs (k <= 8: a first layer trained
    with ``overrides={"<first>": {"activations": "uint8"}}``) becomes a
    :class:`PackedBitplaneLinear` when ``bitplanes`` (the default): its integer dot products are
    computed exactly over bit-planes on the XNOR kernel, its float output is the simulated
    layer's up to fp32 rounding.

    Float layers (the kept first / last layer) stay as they are. ``input_shape`` (without the
    batch) defaults to ``model.input_shape``; it is needed for conv -> linear flattening and,
    with ``verify``, to check on a random batch that the leaves compose to ``model``.
    """
    model = copy.deepcopy(model).eval()
    leaves = _leaves(model)
    shape = tuple(input_shape) if input_shape is not None else getattr(model, "input_shape", None)
    in_shapes: list[tuple[int, ...] | None] = [None] * len(leaves)
    if shape is not None:
        with torch.no_grad():
            x = torch.randn(2, *shape)
            ref = model(x)
            y = x
            for i, leaf in enumerate(leaves):
                in_shapes[i] = tuple(y.shape[1:])
                y = leaf(y)
            if verify and not torch.equal(y, ref):
                raise ValueError(
                    "pack_bnn: the model's forward is not the composition of its child modules; "
                    "pass an nn.Sequential"
                )
    from lowbit.nn import QuantConv2d

    stages: list[nn.Module] = []
    elementwise = _elementwise()
    bits_in = False  # does the current activation arrive as packed bits?
    layout: tuple[int, int, int] | None = None  # NHWC layout of flattened packed bits
    i = 0
    while i < len(leaves):
        layer = leaves[i]
        if not is_binary_layer(layer):
            if bitplanes and is_bitplane_layer(layer):
                weight, wscale = binary_layer_weight(layer)
                iq = cast(Any, layer).input_quantizer
                layer_bias = getattr(layer, "bias", None)
                layer = PackedBitplaneLinear(
                    weight,
                    act_bits=iq.bits,
                    act_signed=iq.signed,
                    act_clip=iq.clip,
                    wscale=wscale,
                    bias=layer_bias if isinstance(layer_bias, torch.Tensor) else None,
                )
            stages.append(layer)
            bits_in = False
            i += 1
            continue
        weight, wscale = binary_layer_weight(layer)
        layer_bias = getattr(layer, "bias", None)
        bias = layer_bias.detach().float() if isinstance(layer_bias, torch.Tensor) else None
        is_conv = isinstance(layer, QuantConv2d)
        # Look ahead for a foldable chain ending at the next binary layer.
        j, chain = i + 1, []
        while j < len(leaves) and isinstance(leaves[j], (*elementwise, nn.MaxPool2d, nn.Flatten)):
            chain.append(leaves[j])
            j += 1
        fold = j < len(leaves) and is_binary_layer(leaves[j])
        pools = [m for m in chain if isinstance(m, nn.MaxPool2d)]
        flat = [m for m in chain if isinstance(m, nn.Flatten)]
        if fold and (
            len(pools) > 1
            or (pools and not is_conv)
            or any(p.ceil_mode or p.dilation not in (1, (1, 1)) or p.return_indices for p in pools)
        ):  # type: ignore[attr-defined]
            fold = False
        if fold and any(_batch_statistics(m) for m in chain):
            fold = False  # its output depends on the batch: no fixed threshold reproduces it
        n = weight.shape[0]
        common: dict[str, Any] = {"input": "bits" if bits_in else "float"}
        threshold = None
        or_mask = None
        if fold:
            funcs = [m for m in chain if isinstance(m, elementwise)]
            before_pool = (
                [m for m in chain[: chain.index(pools[0])] if isinstance(m, elementwise)]
                if pools
                else []
            )

            pre = _chain_fn(wscale, bias, is_conv, n)

            k = int(math.prod(weight.shape[1:]))
            try:
                threshold = fold_threshold(functools.partial(pre, mods=funcs), k, n)
            except NotMonotoneError:
                fold = False
            if fold and pools and threshold is not None:
                # Pool on d is a max where the ops before the pool rise, a min where they fall;
                # the pooled sign is then an AND or an OR of sign bits (docs/binary.md).
                ends = pre(
                    torch.tensor([[-float(k)], [float(k)]]).expand(2, n).contiguous(), before_pool
                )
                falling = (ends[1] < ends[0]).numpy()
                use_or = np.logical_xor(threshold[1].numpy(), falling)
                or_bits = np.zeros(packed_bytes(n) * 8, dtype=np.uint8)
                or_bits[:n] = use_or
                or_mask = torch.from_numpy(np.packbits(or_bits, bitorder="little"))
        out = "bits" if fold else "float"
        packed: nn.Module
        if is_conv:
            conv = cast(QuantConv2d, layer)
            packed = PackedBinaryConv2d(
                weight,
                conv.stride,
                cast(tuple[int, int], conv.padding),
                conv.dilation,
                bias=None if fold else bias,
                scale=None if fold else wscale,
                threshold=threshold,
                out=out,
                **common,
            )
        else:
            packed = PackedBinaryLinear(
                weight,
                bias=None if fold else bias,
                scale=None if fold else wscale,
                threshold=threshold,
                out=out,
                input_layout=layout if bits_in else None,
                **common,
            )
        stages.append(packed)
        layout = None
        if fold:
            for m in chain:
                if isinstance(m, nn.MaxPool2d):
                    stages.append(BinaryMaxPool2d(m.kernel_size, m.stride, m.padding, or_mask))  # type: ignore[arg-type]
                elif isinstance(m, nn.Flatten):
                    pos = chain.index(m)
                    s = in_shapes[i + 1 + pos]
                    if is_conv:
                        if s is None:
                            raise ValueError(
                                "packing a binary conv followed by a flatten needs the model's "
                                "input shape: set model.input_shape = (C, H, W) (lowbit.models "
                                "do) or call lowbit.binary.pack_bnn(model, input_shape=(C, H, W))"
                            )
                        c, h, w = s
                        layout = (h, w, c)
                        stages.append(FlattenBits())
            bits_in = True
            i = j
            if flat and not is_conv:
                layout = None
        else:
            bits_in = False
            i += 1
    packed = nn.Sequential(*stages).eval()
    packed.packing_report = _stage_report(packed)  # type: ignore[assignment]
    if not any(r.startswith("packed") for r in packed.packing_report.values()):  # type: ignore[union-attr, operator]
        kinds = ", ".join(sorted({type(leaf).__name__ for leaf in leaves}))
        raise ValueError(
            "pack_bnn / pack(xnor=True) found no binary layer to put on the XNOR kernels among "
            f"the model's stages ({kinds}): it takes an nn.Sequential (or a lowbit.models MLP / "
            "ConvNet) whose layers are BNN-quantized; pack other models with lowbit.pack(model)"
        )
    return packed


def _stage_report(packed: nn.Sequential) -> dict[str, str]:
    """One line per stage of a :func:`pack_bnn` model (``packing_report``, like
    :func:`lowbit.pack`'s; stored in the ``.lowbit`` manifest by :func:`lowbit.save`)."""
    report: dict[str, str] = {}
    for name, stage in packed.named_children():
        kind = type(stage).__name__
        if isinstance(stage, (PackedBinaryLinear, PackedBinaryConv2d, PackedBitplaneLinear)):
            report[name] = f"packed: {kind}({stage.extra_repr()})"
        elif isinstance(stage, (BinaryMaxPool2d, FlattenBits)):
            report[name] = f"on bits: {kind}"
        elif any(True for _ in stage.parameters()):
            why = not_binary_reason(stage) if hasattr(stage, "quantized_weight") else None
            report[name] = f"kept as {kind}" + (f": {why}" if why else "")
    return report
