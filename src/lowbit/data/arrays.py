"""Your own data as arrays: one ``.npz`` (or ``.pt``) file with train and test inputs and labels.

>>> splits = data.load("arrays", path="my_data.npz")      # lowbit train --dataset arrays -D path=...

The file holds ``x_train``, ``y_train``, ``x_test``, ``y_test`` and optionally ``x_valid``,
``y_valid`` (NumPy arrays in an ``.npz``, or tensors in a dict saved with ``torch.save``; read
with ``allow_pickle=False`` / ``weights_only=True``, so nothing in the file runs). Inputs are
``(N, C, H, W)`` images, ``(N, H, W)`` single-channel images, ``(N, H, W, C)`` with
``layout="nhwc"``, or ``(N, D)`` feature vectors. ``uint8`` inputs are scaled to [0, 1]
(``x / 255``); float inputs are used as they are (the ``unit`` preprocessing leaves them alone,
``standardize`` / ``center`` fit on the training split). Labels are integer class ids
``0 .. classes − 1``.

Splits: ``paper`` (default) — train / valid / test, the validation set being ``x_valid`` when the
file has one, else the last ``valid_fraction`` of the training arrays (no shuffling, so the split
is the same every time); ``full`` — everything that is not test is training, no validation set.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.data.core import ArrayDataset, DataSplits
from lowbit.data.files import DataNotFoundError

__all__ = ["load"]

KEYS = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("x_valid", "y_valid")


def _read(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    if path.suffix in (".pt", ".pth"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a bad file
            raise ValueError(f"{path}: not a readable torch file of tensors ({exc})") from None
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ValueError(f"{path}: expected a dict of tensors (torch.save({{'x_train': ...}}))")
        return {k: v.numpy() for k, v in obj.items()}
    raise ValueError(f"{path}: give a .npz file (numpy.savez) or a .pt dict of tensors")


def _inputs(x: np.ndarray, key: str, layout: str) -> torch.Tensor:
    if x.dtype == np.uint8:
        t = torch.from_numpy(x.astype(np.float32) / np.float32(255.0))
    elif np.issubdtype(x.dtype, np.floating):
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    elif np.issubdtype(x.dtype, np.integer):
        # int64 pixels (np.array of Python ints) would silently skip the /255: say which to mean
        raise ValueError(
            f"{key} has integer dtype {x.dtype}: for pixels 0..255 store it as uint8 "
            f"(x.astype(np.uint8), scaled by 1/255), for features as float32 (used as they are)"
        )
    else:
        raise ValueError(f"{key} has dtype {x.dtype}; give uint8 or float inputs")
    if t.dim() < 2:
        raise ValueError(f"{key} must be (N, D), (N, H, W) or (N, C, H, W); got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{key} contains NaN or inf")
    if t.dim() == 3:  # (N, H, W): one channel
        return t.unsqueeze(1)
    if t.dim() == 4 and layout == "nhwc":
        return t.permute(0, 3, 1, 2).contiguous()
    if t.dim() == 4 and t.shape[3] in (1, 3, 4) and t.shape[1] > 4:
        warnings.warn(
            f"{key} has shape {tuple(t.shape)}, read as (N, C, H, W) with {t.shape[1]} channels; "
            "if it is (N, H, W, C) images, pass layout=nhwc (-D layout=nhwc)",
            stacklevel=3,
        )
    if t.dim() > 4:
        raise ValueError(f"{key} must be (N, D), (N, H, W) or (N, C, H, W); got {tuple(t.shape)}")
    return t


def _labels(y: np.ndarray, key: str) -> torch.Tensor:
    if y.ndim != 1:
        raise ValueError(f"{key} must be 1-D class ids; got shape {y.shape}")
    whole = np.issubdtype(y.dtype, np.integer) or (
        np.issubdtype(y.dtype, np.floating) and bool(np.all(np.equal(np.mod(y, 1), 0)))
    )
    if not whole:
        raise ValueError(f"{key} must hold integer class ids; got dtype {y.dtype}")
    t = torch.from_numpy(y.astype(np.int64))
    if t.numel() and int(t.min()) < 0:
        raise ValueError(f"{key} has negative class ids (min {int(t.min())})")
    return t


def load(
    path: str | Path | None = None,
    data_dir: Path | None = None,
    split: str = "paper",
    download: bool = False,
    valid_fraction: float = 0.1,
    layout: str = "nchw",
    classes: int | None = None,
) -> DataSplits:
    """Train / valid / test :class:`ArrayDataset` s from the arrays in ``path`` (module docstring)."""
    if path is None:
        raise ValueError(
            "dataset 'arrays' needs path=FILE (an .npz with x_train, y_train, x_test, y_test)"
        )
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataNotFoundError(f"arrays file {p} not found (give path=FILE.npz)")
    if layout not in ("nchw", "nhwc"):
        raise ValueError(f"layout must be 'nchw' or 'nhwc'; got {layout!r}")
    if not 0.0 <= float(valid_fraction) < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1); got {valid_fraction!r}")
    raw = _read(p)
    missing = [k for k in KEYS if k not in raw]
    if missing:
        raise ValueError(
            f"{p} lacks {', '.join(missing)}: it needs x_train, y_train, x_test, y_test "
            f"(and optionally x_valid, y_valid); it has {', '.join(sorted(raw)) or 'nothing'}"
        )
    if ("x_valid" in raw) != ("y_valid" in raw):
        raise ValueError(f"{p}: give both x_valid and y_valid, or neither")
    parts: dict[str, ArrayDataset] = {}
    for name in ("train", "valid", "test"):
        if f"x_{name}" not in raw:
            continue
        x = _inputs(raw[f"x_{name}"], f"x_{name}", layout)
        y = _labels(raw[f"y_{name}"], f"y_{name}")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x_{name} has {x.shape[0]} samples but y_{name} has {y.shape[0]}")
        parts[name] = ArrayDataset(x, y)
    shapes = {k: tuple(v.x.shape[1:]) for k, v in parts.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{p}: the splits' sample shapes differ: {shapes}")
    top = max(int(v.y.max()) for v in parts.values() if len(v))
    n_classes = int(classes) if classes is not None else top + 1
    if top >= n_classes:
        raise ValueError(f"{p}: class id {top} does not fit classes={n_classes}")
    train, valid = parts["train"], parts.get("valid")
    if split == "full":
        if valid is not None:
            train = ArrayDataset(torch.cat([train.x, valid.x]), torch.cat([train.y, valid.y]))
        valid = None
    elif valid is None and valid_fraction > 0:
        n_valid = int(round(len(train) * float(valid_fraction)))
        if n_valid < 1 or n_valid >= len(train):
            raise ValueError(
                f"{p}: {len(train)} training samples are too few to hold out valid_fraction="
                f"{valid_fraction} (give x_valid/y_valid, or valid_fraction=0)"
            )
        cut = len(train) - n_valid
        train, valid = train.subset(0, cut), train.subset(cut)
    info: dict[str, Any] = {
        "source": str(p),
        "split": split,
        "valid": "file" if "valid" in parts else f"last {valid_fraction:g} of train",
    }
    return DataSplits("arrays", train, valid, parts["test"], n_classes, info=info)
