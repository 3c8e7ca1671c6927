"""CIFAR-10 and CIFAR-100 from the standard python-pickle batches.

Reads ``<data_dir>/cifar10/cifar-10-batches-py/`` (or ``cifar-100-python/``) when extracted, else the
members of ``cifar-10-python.tar.gz`` / ``cifar-100-python.tar.gz`` straight from the archive
(nothing is extracted to disk). The archive is downloaded and md5-checked when missing and online.
Batches are unpickled with an unpickler that accepts arrays, lists, dicts and bytes only.
"""

from __future__ import annotations

import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.data.core import ArrayDataset, DataSplits
from lowbit.data.files import RemoteFile, require, safe_pickle_load

__all__ = ["ARCHIVES", "load", "read_batch"]

ARCHIVES = {
    "cifar10": RemoteFile(
        "cifar-10-python.tar.gz",
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": RemoteFile(
        "cifar-100-python.tar.gz",
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}
_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", 100),
}
_TITLE = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def read_batch(
    raw: bytes | Any, label_key: bytes | str, where: str = "CIFAR batch", classes: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Decode one pickled batch: ``data`` (N, 3072) uint8 rows (R, G, B planes) and its labels.

    The official batches were written by Python 2, whose ``str`` keys load as ``str``
    (``'data'``); batches pickled by Python 3 have ``bytes`` keys (``b'data'``): both read.
    ``where`` names the batch in errors; ``classes`` checks the labels' range."""
    try:
        d = safe_pickle_load(raw) if isinstance(raw, bytes) else raw
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        if "refusing to unpickle" in str(exc):
            raise  # not damage: a pickle that would run code
        raise ValueError(
            f"{where} is damaged ({exc}): delete it and download or extract it again"
        ) from exc
    if isinstance(d, dict):
        d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    key = label_key.decode() if isinstance(label_key, bytes) else label_key
    if not isinstance(d, dict) or "data" not in d or key not in d:
        raise ValueError(f"{where} is not a CIFAR batch: expected a dict with 'data' and {key!r}")
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.size % 3072:
        raise ValueError(f"{where}: 'data' holds {data.size} bytes, not whole 3x32x32 images")
    x = data.reshape(-1, 3, 32, 32)
    y = np.asarray(d[key], dtype=np.int64)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{where} has {x.shape[0]} images but {y.shape[0]} labels")
    if classes is not None and y.size and (y.min() < 0 or y.max() >= classes):
        raise ValueError(
            f"{where} has labels outside 0..{classes - 1} (min {y.min()}, max {y.max()})"
        )
    return x, y


def _read_members(
    name: str, directory: Path, download: bool
) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """``(where, raw bytes)`` of the training and test batches, from the extracted folder or the
    archive; a missing or damaged file is a ValueError that names it and the fix."""
    folder, train_names, test_names, _, _ = _LAYOUT[name]
    extracted = directory / folder
    if extracted.is_dir():

        def read(n: str) -> tuple[str, bytes]:
            path = extracted / n
            if not path.is_file():
                raise ValueError(
                    f"{path} is missing: extract {ARCHIVES[name].name} again (all of "
                    f"{', '.join(train_names + test_names)} belong in {extracted})"
                )
            return str(path), path.read_bytes()

        return [read(n) for n in train_names], [read(n) for n in test_names]
    archive = require(
        ARCHIVES[name],
        directory,
        _TITLE[name],
        download_ok=download,
        hint=f"or its extracted {folder}/",
    )
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}

            def get(n: str) -> tuple[str, bytes]:
                m = members.get(f"{folder}/{n}")
                if m is None:
                    raise ValueError(
                        f"{archive} has no member {folder}/{n}; is it the python version of {_TITLE[name]}?"
                    )
                f = tar.extractfile(m)
                assert f is not None
                return f"{archive}:{folder}/{n}", f.read()

            return [get(n) for n in train_names], [get(n) for n in test_names]
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ValueError(
            f"{archive} is damaged or not a .tar.gz ({type(exc).__name__}: {exc}): delete it and "
            "download it again"
        ) from exc


def load(name: str, data_dir: Path, split: str = "paper", download: bool = True) -> DataSplits:
    """CIFAR-10/100 as float32 (N, 3, 32, 32) in [0, 1] with int64 labels.

    ``split``: ``paper`` = train 45k / valid 5k (the last 5k of the training batches, as the BNN and
    LAQ scripts) / test 10k; ``full`` = 50k train / no valid / 10k test.
    """
    if split not in ("paper", "full"):
        raise ValueError(f"unknown {_TITLE[name]} split {split!r}; valid: paper, full")
    directory = data_dir / name
    train_raw, test_raw = _read_members(name, directory, download)
    label_key, classes = _LAYOUT[name][3], _LAYOUT[name][4]
    tr = [read_batch(r, label_key, where, classes) for where, r in train_raw]
    xtr, ytr = np.concatenate([t[0] for t in tr]), np.concatenate([t[1] for t in tr])
    te = [read_batch(r, label_key, where, classes) for where, r in test_raw]
    xte, yte = np.concatenate([t[0] for t in te]), np.concatenate([t[1] for t in te])

    def ds(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y))

    n_valid = min(5000, xtr.shape[0] // 10)
    if split == "paper":
        train, valid = ds(xtr[:-n_valid], ytr[:-n_valid]), ds(xtr[-n_valid:], ytr[-n_valid:])
    else:
        train, valid = ds(xtr, ytr), None
    return DataSplits(
        name,
        train,
        valid,
        ds(xte, yte),
        _LAYOUT[name][4],
        info={"source": str(directory), "split": split},
    )
