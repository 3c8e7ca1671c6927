"""SVHN (cropped digits, format 2) from the standard ``.mat`` files, read with scipy.

Files: ``train_32x32.mat``, ``test_32x32.mat`` and, for the paper split, ``extra_32x32.mat`` in
``<data_dir>/svhn/``; downloaded and md5-checked when missing and online. Each holds ``X``
(32, 32, 3, N) uint8 and ``y`` (N, 1) with labels 1..10, where 10 is the digit 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch

from lowbit.data.core import ArrayDataset, DataSplits
from lowbit.data.files import RemoteFile, require

__all__ = ["FILES", "load", "read_mat", "per_class_holdout"]

_URL = "http://ufldl.stanford.edu/housenumbers/"
FILES = {
    "train": RemoteFile(
        "train_32x32.mat", (_URL + "train_32x32.mat",), "e26dedcc434d2e4c54c9b2d4a06d8373"
    ),
    "test": RemoteFile(
        "test_32x32.mat", (_URL + "test_32x32.mat",), "eb5a983be6a315427106f1b164d9cef3"
    ),
    "extra": RemoteFile(
        "extra_32x32.mat", (_URL + "extra_32x32.mat",), "a93ce644f1a588dc4d68dda5feec44a7"
    ),
}


#: Validation images per class taken from train and from extra (pylearn2's SVHN split).
VALID_PER_CLASS_TRAIN = 400
VALID_PER_CLASS_EXTRA = 200


def read_mat(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 in 0..9 from one SVHN ``.mat`` file."""
    try:
        m = scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise
    except (OSError, ValueError, TypeError, scipy.io.matlab.MatReadError) as exc:
        raise ValueError(
            f"{path} is damaged or not a .mat file ({type(exc).__name__}: {exc}): delete it and "
            "download it again"
        ) from exc
    if "X" not in m or "y" not in m:
        raise ValueError(f"{path} is not an SVHN .mat file (needs variables X and y)")
    x = np.ascontiguousarray(np.transpose(m["X"], (3, 2, 0, 1)), dtype=np.uint8)
    y = m["y"].reshape(-1).astype(np.int64)
    y[y == 10] = 0
    if x.shape[0] != y.shape[0] or x.shape[1:] != (3, 32, 32):
        raise ValueError(f"{path}: X gives {x.shape}, y gives {y.shape}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise ValueError(
            f"{path} has labels outside 1..10 (10 = digit 0): {sorted(set(y.tolist()) - set(range(10)))[:5]}"
        )
    return x, y


def per_class_holdout(y: np.ndarray, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, holdout): the first ``per_class`` samples of every class are held out."""
    hold = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    mask = np.zeros(y.shape[0], dtype=bool)
    mask[hold] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def load(data_dir: Path, split: str = "small", download: bool = True) -> DataSplits:
    """SVHN as float32 (N, 3, 32, 32) in [0, 1] with int64 labels 0..9.

    ``split``:
      * ``paper`` — pylearn2's ``splitted_train``/``valid``/``test`` as used by BNN and LAQ: valid = 400
        images per class from train + 200 per class from extra (6000); train = the rest of train +
        extra (598k images, about 7 GB as float32); needs ``extra_32x32.mat``. (pylearn2 draws the
        held-out images at random; we take the first ones of each class.)
      * ``small`` — train without extra: valid = 400 per class from train, train = the rest (69k).
      * ``full`` — all of train, no valid.
    """
    if split not in ("paper", "small", "full"):
        raise ValueError(f"unknown SVHN split {split!r}; valid: paper, small, full")
    d = data_dir / "svhn"
    xtr, ytr = read_mat(require(FILES["train"], d, "SVHN", download_ok=download))
    xte, yte = read_mat(require(FILES["test"], d, "SVHN", download_ok=download))
    xva = yva = None
    if split in ("paper", "small"):
        counts = np.bincount(ytr, minlength=10)
        if counts.min() <= VALID_PER_CLASS_TRAIN:
            raise ValueError(
                f"split={split!r} holds out {VALID_PER_CLASS_TRAIN} training images per class for "
                f"validation, but {d / FILES['train'].name} has only {int(counts.min())} of class "
                f"{int(counts.argmin())} (the real file has thousands): use split='full', or the "
                "complete file"
            )
        keep, hold = per_class_holdout(ytr, VALID_PER_CLASS_TRAIN)
        xva, yva = xtr[hold], ytr[hold]
        xtr, ytr = xtr[keep], ytr[keep]
    if split == "paper":
        xex, yex = read_mat(
            require(
                FILES["extra"],
                d,
                "SVHN extra (split='paper')",
                download_ok=download,
                hint="or use split='small'",
            )
        )
        keep, hold = per_class_holdout(yex, VALID_PER_CLASS_EXTRA)
        xva, yva = np.concatenate([xva, xex[hold]]), np.concatenate([yva, yex[hold]])
        xtr, ytr = np.concatenate([xtr, xex[keep]]), np.concatenate([ytr, yex[keep]])

    def ds(x: np.ndarray, y: np.ndarray) -> ArrayDataset:
        return ArrayDataset(torch.from_numpy(x).float().div_(255.0), torch.from_numpy(y))

    valid = ds(xva, yva) if xva is not None and yva is not None else None
    return DataSplits(
        "svhn", ds(xtr, ytr), valid, ds(xte, yte), 10, info={"source": str(d), "split": split}
    )
