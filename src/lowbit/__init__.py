"""lowbit: binary, ternary and low-bit neural networks in PyTorch that are truly smaller and faster on the CPU."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lowbit")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

import os as _os
import sys as _sys

from lowbit.errors import SetupError

try:
    from lowbit import kernels
except SetupError as _exc:
    # From the `lowbit` command, a setup problem is one line that says what to do, not a traceback.
    if _os.path.basename(_sys.argv[0]) == "lowbit":
        print(f"error: {_exc}", file=_sys.stderr)
        raise SystemExit(2) from None
    raise

from lowbit import functional, methods, nn, ptq, qtypes
from lowbit.convert import quantize
from lowbit.pack import pack
from lowbit.saveload import load, save
from lowbit.summary import Summary, summary

__all__ = [
    "Summary",
    "__version__",
    "functional",
    "kernels",
    "load",
    "methods",
    "nn",
    "pack",
    "ptq",
    "qtypes",
    "quantize",
    "save",
    "summary",
]
