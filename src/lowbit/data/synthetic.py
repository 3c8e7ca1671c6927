"""Small synthetic datasets, in memory and written in the real file formats.

The images are learnable (each class has a fixed random prototype; samples are the prototype plus
noise), so a tiny model reaches high accuracy in a few steps. The writers produce files the real
loaders read — IDX (MNIST), CIFAR python pickle batches (directory or ``.tar.gz``), SVHN ``.mat`` —
which is how the tests exercise every loader without the real data.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch

from lowbit.data.core import ArrayDataset, DataSplits

__all__ = ["images", "load", "write_cifar", "write_mnist_idx", "write_svhn"]


def images(
    n: int, shape: tuple[int, ...], classes: int = 10, seed: int = 0, noise: float = 0.25
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 images of ``shape`` and labels in ``0..classes-1``: class prototype + noise."""
    proto_rng = np.random.default_rng(12345)
    protos = proto_rng.uniform(0, 1, size=(classes, *shape))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=n)
    x = np.clip(protos[y] + noise * rng.standard_normal((n, *shape)), 0, 1)
    return np.round(x * 255).astype(np.uint8), y.astype(np.int64)


def load(
    n_train: int = 512,
    n_valid: int = 128,
    n_test: int = 128,
    shape: tuple[int, ...] = (1, 28, 28),
    classes: int = 10,
    seed: int = 0,
) -> DataSplits:
    """An in-memory synthetic image dataset (float32 in [0, 1])."""
    x, y = images(n_train + n_valid + n_test, tuple(shape), classes, seed)
    xt = torch.from_numpy(x).float().div_(255.0)
    yt = torch.from_numpy(y)
    a, b = n_train, n_train + n_valid
    valid = ArrayDataset(xt[a:b], yt[a:b]) if n_valid else None
    return DataSplits(
        "synthetic",
        ArrayDataset(xt[:a], yt[:a]),
        valid,
        ArrayDataset(xt[b:], yt[b:]),
        classes,
        info={"split": "synthetic"},
    )


def write_mnist_idx(
    directory: str | Path, n_train: int = 600, n_test: int = 100, seed: int = 0, gz: bool = True
) -> Path:
    """Write the four MNIST IDX files (28x28 uint8) into ``directory``; returns it."""
    from lowbit.data.mnist import IDX_FILES, write_idx

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    xtr, ytr = images(n_train, (28, 28), seed=seed)
    xte, yte = images(n_test, (28, 28), seed=seed + 1)
    for key, arr in (
        ("train_images", xtr),
        ("train_labels", ytr),
        ("test_images", xte),
        ("test_labels", yte),
    ):
        name = IDX_FILES[key][0]
        write_idx(d / (name if gz else name[:-3]), arr.astype(np.uint8))
    return d


def write_cifar(
    directory: str | Path,
    name: str = "cifar10",
    n_per_batch: int = 100,
    seed: int = 0,
    archive: bool = True,
    py2: bool = True,
) -> Path:
    """Write CIFAR python batches (5 train + test for CIFAR-10; train + test for CIFAR-100) into
    ``directory``, as the ``.tar.gz`` archive (default) or the extracted folder. Returns the path.

    ``py2`` (default): pickled as the official files are, by Python 2's cPickle (protocol 2,
    every string a Python 2 ``str``: dict keys like ``'data'`` load as ``str`` in Python 3);
    ``py2=False``: Python 3's pickle (``bytes`` keys)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    if name == "cifar10":
        folder, train_names, label_key, classes = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            b"labels",
            10,
        )
    elif name == "cifar100":
        folder, train_names, label_key, classes = "cifar-100-python", ["train"], b"fine_labels", 100
    else:
        raise ValueError(f"unknown CIFAR name {name!r}")
    members = {}
    for i, batch in enumerate(
        [*train_names, "test"] if name == "cifar100" else [*train_names, "test_batch"]
    ):
        n = n_per_batch * (5 if name == "cifar100" and batch == "train" else 1)
        x, y = images(n, (3, 32, 32), classes=classes, seed=seed + i)
        entry = {b"data": x.reshape(n, -1), label_key: y.tolist(), b"batch_label": batch.encode()}
        if name == "cifar100":
            entry[b"coarse_labels"] = (y // 5).tolist()
        members[f"{folder}/{batch}"] = py2_pickle(entry) if py2 else pickle.dumps(entry, protocol=2)
    if archive:
        path = (
            d / {"cifar10": "cifar-10-python.tar.gz", "cifar100": "cifar-100-python.tar.gz"}[name]
        )
        with tarfile.open(path, "w:gz") as tar:
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path
    for member, data in members.items():
        (d / member).parent.mkdir(parents=True, exist_ok=True)
        (d / member).write_bytes(data)
    return d / folder


_PurePickler: Any = pickle._Pickler  # type: ignore[attr-defined]  # the Python implementation


class _Py2Pickler(_PurePickler):
    """Python 2 cPickle's output: ``str`` and ``bytes`` both as BINSTRING (a Python 2 ``str``),
    NumPy under its Python 2 module name ``numpy.core.multiarray``."""

    dispatch = _PurePickler.dispatch.copy()

    def _save_py2_str(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)

    dispatch[str] = _save_py2_str
    dispatch[bytes] = _save_py2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", None) or "builtins"
        module = module.replace("numpy._core", "numpy.core")
        self.write(
            pickle.GLOBAL + module.encode() + b"\n" + (name or obj.__qualname__).encode() + b"\n"
        )

    dispatch[type] = save_global


def py2_pickle(obj: Any) -> bytes:
    """``obj`` pickled the way Python 2's cPickle (protocol 2) wrote the official CIFAR batches."""
    f = io.BytesIO()
    _Py2Pickler(f, protocol=2).dump(obj)
    return f.getvalue()


def write_svhn(
    directory: str | Path, n_train: int = 500, n_test: int = 100, n_extra: int = 0, seed: int = 0
) -> Path:
    """Write ``train_32x32.mat``, ``test_32x32.mat`` (and ``extra_32x32.mat`` if ``n_extra``) with
    ``X`` (32, 32, 3, N) uint8 and ``y`` (N, 1) labels 1..10 (10 = digit 0)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for i, (split, n) in enumerate((("train", n_train), ("test", n_test), ("extra", n_extra))):
        if n == 0:
            continue
        x, y = images(n, (3, 32, 32), seed=seed + i)
        labels = np.where(y == 0, 10, y).reshape(-1, 1).astype(np.uint8)
        scipy.io.savemat(
            str(d / f"{split}_32x32.mat"), {"X": np.transpose(x, (2, 3, 1, 0)), "y": labels}
        )
    return d
