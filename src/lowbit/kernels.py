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

__all__ = [
    "ISA_PATHS",
    "KernelBuildError",
    "active_isa",
    "available_isas",
    "binary_gemm",
    "binary_matmul_reference",
    "cpu_features",
    "pack_signs",
    "pack_signs_reference",
    "packed_row_bytes",
    "use_isa",
]

ISA_PATHS = ("scalar", "avx2", "avx512")


class KernelBuildError(ImportError):
    """The C++ extension is missing or cannot run here."""


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
        raise RuntimeError(
            f"LOWBIT_ISA={forced!r} is not a kernel path: use one of {', '.join(ISA_PATHS)} "
            "or unset LOWBIT_ISA to pick the best path automatically."
        )
    missing = _ext.missing_features(forced)
    if missing:
        raise RuntimeError(
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
        raise RuntimeError(f"this CPU cannot run the {isa!r} kernels (missing: {missing})")
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
        raise ValueError(f"lowbit kernels run on the CPU; got a tensor on {t.device}. Call .cpu() first.")
    return t.detach().contiguous().numpy()


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """Pack the signs of a 2-D float tensor ``(rows, K)`` into ``(rows, packed_row_bytes(K))`` uint8.

    Bit = 1 where ``x < 0`` (see the module docstring for the exact layout).
    """
    if x.dim() != 2:
        raise ValueError(f"pack_signs expects a 2-D tensor (rows, K); got shape {tuple(x.shape)}")
    src = _as_numpy(x.to(torch.float32))
    out = torch.empty((x.shape[0], packed_row_bytes(x.shape[1])), dtype=torch.uint8)
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
