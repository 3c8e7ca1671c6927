"""lowbit: binary, ternary and low-bit neural networks in PyTorch that are truly smaller and faster on the CPU."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lowbit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

from lowbit import functional, kernels, methods, nn, qtypes
from lowbit.convert import quantize
from lowbit.summary import Summary, summary

__all__ = [
    "Summary",
    "__version__",
    "functional",
    "kernels",
    "methods",
    "nn",
    "qtypes",
    "quantize",
    "summary",
]
