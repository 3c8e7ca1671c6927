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

_RUNNING_CLI = _os.path.basename(_sys.argv[0]) == "lowbit"
if _RUNNING_CLI and "torch" not in _sys.modules:
    # The `lowbit` command on a small, shared machine: OpenMP threads that spin-wait for a busy
    # core made one MNIST epoch 5x slower (344 s vs 72 s at load 7.5, docs/results.md). A user's
    # own OMP_WAIT_POLICY wins; library users keep PyTorch's default.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    from lowbit import kernels
except SetupError as _exc:
    # From the `lowbit` command, a setup problem is one line that says what to do, not a traceback.
    if _RUNNING_CLI:
        print(f"error: {_exc}", file=_sys.stderr)
        raise SystemExit(2) from None
    raise

from lowbit import functional, methods, nn, ptq, qtypes  # noqa: E402 - after the OMP_WAIT_POLICY default above
from lowbit.convert import quantize  # noqa: E402 - after the OMP_WAIT_POLICY default above
from lowbit.pack import pack  # noqa: E402 - after the OMP_WAIT_POLICY default above
from lowbit.saveload import load, save  # noqa: E402 - after the OMP_WAIT_POLICY default above
from lowbit.summary import Summary, summary  # noqa: E402 - after the OMP_WAIT_POLICY default above

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
