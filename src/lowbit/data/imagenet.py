"""ImageNet (ILSVRC2012) streamed from an ImageFolder tree on disk, for TTQ's AlexNet (§1.4-1.5).

ImageNet does not fit in memory, so unlike the other datasets the images stay on disk and are
decoded batch by batch with Pillow in a small thread pool (Pillow releases the GIL while it decodes
and resizes). Layout (``path=DIR`` points elsewhere)::

    <data_dir>/imagenet/train/<wnid>/*.JPEG
    <data_dir>/imagenet/val/<wnid>/*.JPEG        (val sorted into class folders: docs/datasets.md)

The classes are the sorted wnid folder names; train and val must have the same ones.

Protocol (czhu95/ternarynet ``tw-imagenet-alexnet.py``, papers.md §1.5): input ``image / 255``
minus the per-pixel mean image; evaluation resizes the short side to 256 and takes the center
224 x 224 crop. Training augmentations (``augment=``):

* ``rrcflip`` (default): random-resized crop to 224 (area scale U(0.08, 1), log-uniform aspect
  ratio in (3/4, 4/3), 10 attempts, else the center crop with the ratio clamped) + horizontal flip
  with probability 0.5 — the usual ImageNet recipe (torchvision's ``RandomResizedCrop``).
* ``ttq``: the official script's ``Resize`` augmentor: ``scale = randint(224, 308) / short side``,
  each axis scaled by ``scale * U(0.85, 1.15)`` but never above the original size nor below 224,
  then a random 224 crop and the flip.
* ``flip``: the evaluation crop + flip; ``none``: the evaluation crop.

The per-pixel mean (3 x 224 x 224) is the mean of the evaluation crops of the first
``mean_images`` training images in a fixed seeded order; it is cached as ``.npy`` beside the data
under a name holding a checksum of the file list, so adding or replacing images recomputes it.
(The official script subtracts ILSVRC's precomputed 256 x 256 mean, center-cropped to 224.)

Every random choice (the epoch's permutation, each image's crop and flip) is drawn from the
trainer's ``torch.Generator`` in the calling thread, a fixed number of draws per batch, before
any image is decoded: a resumed run replays exactly the same batches.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from PIL import Image

from lowbit.data.core import ArrayDataset, BatchTransform, DataSplits
from lowbit.data.files import DataNotFoundError, default_data_dir

__all__ = [
    "AUGMENTATIONS",
    "IMAGE_EXTENSIONS",
    "PREPROCESSING",
    "FolderDataset",
    "center_crop_box",
    "eval_crop",
    "find_classes",
    "list_images",
    "load",
    "mean_image",
    "random_resized_crop_box",
    "resize_short_side",
    "ttq_resize_crop_box",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
AUGMENTATIONS = ("rrcflip", "ttq", "flip", "none")
PREPROCESSING = ("center", "unit")
SCALE = (0.08, 1.0)
RATIO = (3.0 / 4.0, 4.0 / 3.0)
ATTEMPTS = 10
#: Uniform draws per image for each augmentation (a fixed number, whatever the image's size).
_DRAWS = {"rrcflip": 4 * ATTEMPTS + 1, "ttq": 6, "flip": 1, "none": 0}


# ---------------------------------------------------------------------------------------------
# files


def find_classes(folder: Path) -> list[str]:
    """The sorted names of the class sub-folders of ``folder`` (hidden folders skipped)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def list_images(
    folder: Path, classes: Sequence[str], max_per_class: int | None = None
) -> tuple[list[str], list[int]]:
    """Image files (relative paths ``<wnid>/<name>``, sorted by name in each class) and labels."""
    files: list[str] = []
    labels: list[int] = []
    for label, wnid in enumerate(classes):
        names = sorted(
            e.name
            for e in os.scandir(folder / wnid)
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if max_per_class is not None:
            names = names[:max_per_class]
        files += [f"{wnid}/{n}" for n in names]
        labels += [label] * len(names)
    return files, labels


# ---------------------------------------------------------------------------------------------
# transforms (Pillow images; boxes are (left, top, right, bottom))


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Resize (bilinear) so the short side is ``size``; the long side is ``int(size * long / short)``
    (torchvision's ``Resize(size)``)."""
    w, h = img.size
    new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, Image.Resampling.BILINEAR)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """The centered ``size`` x ``size`` box (offsets ``round((dim - size) / 2)``, as torchvision)."""
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def eval_crop(img: Image.Image, resize: int = 256, size: int = 224) -> Image.Image:
    """Evaluation transform: short side to ``resize``, then the center ``size`` crop."""
    img = resize_short_side(img, resize)
    return img.crop(center_crop_box(img.size[0], img.size[1], size))


def random_resized_crop_box(
    width: int, height: int, u: np.ndarray | Sequence[float]
) -> tuple[int, int, int, int]:
    """The random-resized-crop box of a ``width`` x ``height`` image from ``4 * ATTEMPTS`` uniform
    numbers in [0, 1): attempt ``k`` uses ``u[4k:4k+4]`` = (area scale, log aspect ratio, top,
    left). The first box that fits wins; else the whole image cut to the nearest allowed ratio,
    centered (torchvision ``RandomResizedCrop.get_params`` with scale (0.08, 1), ratio (3/4, 4/3))."""
    area = width * height
    lo, hi = math.log(RATIO[0]), math.log(RATIO[1])
    for k in range(ATTEMPTS):
        us, ur, ut, ul = (float(v) for v in u[4 * k : 4 * k + 4])
        target = area * (SCALE[0] + (SCALE[1] - SCALE[0]) * us)
        ratio = math.exp(lo + (hi - lo) * ur)
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(ut * (height - h + 1)), height - h)
            left = min(int(ul * (width - w + 1)), width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif in_ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def ttq_resize_crop_box(
    width: int, height: int, u: np.ndarray | Sequence[float], size: int = 224
) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The official TTQ ``Resize`` augmentor + ``RandomCrop`` from 5 uniform numbers: returns the
    resized (width, height) and the crop box in the resized image. ``scale = randint(224, 308) /
    short side``; ``new = int(max(size, min(dim, scale * U(0.85, 1.15) * dim)))`` per axis."""
    short = min(width, height)
    scale = (size + min(int(float(u[0]) * (308 - size)), 308 - size - 1)) / short
    sx = scale * (0.85 + 0.3 * float(u[1]))
    sy = scale * (0.85 + 0.3 * float(u[2]))
    nw = int(max(size, min(width, sx * width)))
    nh = int(max(size, min(height, sy * height)))
    left = min(int(float(u[3]) * (nw - size + 1)), nw - size)
    top = min(int(float(u[4]) * (nh - size + 1)), nh - size)
    return (nw, nh), (left, top, left + size, top + size)


def _decode(path: str) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or not an image
        raise ValueError(
            f"{path} cannot be decoded ({type(exc).__name__}: {exc}): replace or remove it"
        ) from exc


def _load_one(path: str, augment: str, u: np.ndarray | None, resize: int, size: int) -> np.ndarray:
    """Decode one image and apply its (pre-drawn) transform: uint8 (size, size, 3)."""
    img = _decode(path)
    flip = False
    if u is None or augment in ("none", "flip"):
        img = eval_crop(img, resize, size)
        flip = u is not None and augment == "flip" and float(u[0]) < 0.5
    elif augment == "rrcflip":
        box = random_resized_crop_box(img.size[0], img.size[1], u[: 4 * ATTEMPTS])
        img = img.crop(box).resize((size, size), Image.Resampling.BILINEAR)
        flip = float(u[4 * ATTEMPTS]) < 0.5
    elif augment == "ttq":
        new, box = ttq_resize_crop_box(img.size[0], img.size[1], u[:5], size)
        if new != img.size:
            img = img.resize(new, Image.Resampling.BILINEAR)
        img = img.crop(box)
        flip = float(u[5]) < 0.5
    else:
        raise ValueError(f"unknown ImageNet augmentation {augment!r}; valid: {AUGMENTATIONS}")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.shape != (size, size, 3):
        raise ValueError(f"{path}: transform gave shape {arr.shape}, expected {(size, size, 3)}")
    return arr[:, ::-1] if flip else arr


# ---------------------------------------------------------------------------------------------
# the dataset


class _LazyImages:
    """``FolderDataset.x``: ``x[i]`` / ``x[a:b]`` decode those images with the evaluation transform
    (so code written for :class:`ArrayDataset`, e.g. ``data.train.x[:2]``, keeps working)."""

    def __init__(self, ds: FolderDataset) -> None:
        self._ds = ds

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self._ds), *self._ds.sample_shape))

    def __len__(self) -> int:
        return len(self._ds)

    def __getitem__(self, key: int | slice | Sequence[int]) -> torch.Tensor:
        idx = np.arange(len(self._ds))[key]
        if np.ndim(idx) == 0:
            return self._ds.load(np.asarray([idx]))[0]
        return self._ds.load(np.asarray(idx))


class FolderDataset:
    """Images on disk (``root / files[i]``) with labels ``y``, decoded batch by batch.

    The same batch interface as :class:`~lowbit.data.core.ArrayDataset` (``len``,
    ``num_batches``, ``batches``, ``subset``, ``to``), so the Trainer works unchanged.
    ``augment`` is the transform of :meth:`batches` (``rrcflip``/``ttq``/``flip`` draw from the
    generator; ``none`` is the evaluation crop); ``mean`` (3, size, size) is subtracted from the
    [0, 1] pixels when given. ``x`` is a lazy view (evaluation transform) and ``sample_shape`` the
    shape of one sample.
    """

    def __init__(
        self,
        root: str | Path,
        files: Sequence[str] | np.ndarray,
        labels: Sequence[int] | torch.Tensor,
        *,
        augment: str = "none",
        mean: torch.Tensor | None = None,
        size: int = 224,
        resize: int = 256,
        threads: int | None = None,
        prefetch: int = 1,
        classes: Sequence[str] = (),
        device: torch.device | str | None = None,
    ) -> None:
        if augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {augment!r}; valid: {', '.join(AUGMENTATIONS)}")
        self.root = Path(root)
        self.files = np.asarray([os.fsencode(f) for f in files] if len(files) else [], dtype=bytes)
        self.y = torch.as_tensor(labels, dtype=torch.int64)
        if len(self.files) != self.y.shape[0]:
            raise ValueError(f"{len(self.files)} files but {self.y.shape[0]} labels")
        self.augment = augment
        self.mean = mean
        self.size = size
        self.resize = resize
        self.threads = threads or min(8, os.cpu_count() or 1)
        self.prefetch = prefetch
        self.classes = list(classes)
        self.device = torch.device(device) if device is not None else None
        self.sample_shape = (3, size, size)

    def _replace(self, **changes: Any) -> FolderDataset:
        kw: dict[str, Any] = {
            "augment": self.augment,
            "mean": self.mean,
            "size": self.size,
            "resize": self.resize,
            "threads": self.threads,
            "prefetch": self.prefetch,
            "classes": self.classes,
            "device": self.device,
        }
        files = changes.pop("files", self.files)
        labels = changes.pop("labels", self.y)
        kw.update(changes)
        out = FolderDataset(self.root, [], [], **kw)
        out.files, out.y = files, labels
        return out

    @property
    def x(self) -> _LazyImages:
        """Lazy ``(N, 3, size, size)`` view: indexing decodes with the evaluation transform."""
        return _LazyImages(self)

    def paths(self) -> list[Path]:
        """Absolute path of every image, in order."""
        return [self.root / os.fsdecode(f) for f in self.files]

    def __len__(self) -> int:
        return int(self.files.shape[0])

    def to(self, device: torch.device | str) -> FolderDataset:
        """The same images, batches delivered on ``device`` (labels moved there too)."""
        out = self._replace(device=device)
        out.y = self.y.to(device)
        return out

    def subset(self, start: int, stop: int | None = None) -> FolderDataset:
        """Samples ``start:stop``."""
        return self._replace(files=self.files[start:stop], labels=self.y[start:stop])

    def select(self, indices: Sequence[int] | np.ndarray) -> FolderDataset:
        """The samples at ``indices`` (in that order)."""
        idx = np.asarray(indices, dtype=np.int64)
        return self._replace(files=self.files[idx], labels=self.y[torch.from_numpy(idx)])

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        """How many batches :meth:`batches` yields."""
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def _to_tensor(self, arrays: list[np.ndarray]) -> torch.Tensor:
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        if self.mean is not None:
            x = x - self.mean
        return x.contiguous()

    def _submit(
        self, pool: ThreadPoolExecutor, idx: np.ndarray, u: np.ndarray | None, augment: str
    ) -> list[Future[np.ndarray]]:
        return [
            pool.submit(
                _load_one,
                os.path.join(self.root, os.fsdecode(self.files[i])),
                augment,
                None if u is None else u[k],
                self.resize,
                self.size,
            )
            for k, i in enumerate(idx)
        ]

    def load(self, indices: np.ndarray) -> torch.Tensor:
        """Images ``indices`` with the evaluation transform (mean subtracted): (n, 3, size, size)."""
        if len(indices) == 0:
            return torch.empty((0, *self.sample_shape))
        with ThreadPoolExecutor(min(self.threads, len(indices))) as pool:
            futures = self._submit(pool, np.asarray(indices), None, "none")
            return self._to_tensor([f.result() for f in futures])

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        drop_last: bool = False,
        transform: BatchTransform | None = None,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches, decoded in a thread pool one batch ahead.

        As :meth:`ArrayDataset.batches`: with ``shuffle`` one permutation is drawn from
        ``generator``; with ``world_size > 1`` every rank draws the same permutation and the
        random numbers of the whole global batch, and decodes only its contiguous share. Each
        batch draws ``batch * k`` uniform numbers (k fixed per augmentation) before decoding, so
        the generator advances identically whatever the images are. ``transform`` (rarely
        needed: the augmentation is built in) runs on each rank's share after decoding.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if world_size > 1 and batch_size % world_size:
            raise ValueError(
                f"batch size {batch_size} is not divisible by the {world_size} processes"
            )
        n = len(self)
        order = (
            torch.randperm(n, generator=generator, device="cpu").numpy()
            if shuffle
            else np.arange(n)
        )
        out_device = device if device is not None else self.device
        draws = _DRAWS[self.augment]

        def plan(b: int) -> tuple[np.ndarray, np.ndarray | None] | None:
            lo, hi = b * batch_size, min((b + 1) * batch_size, n)
            if world_size > 1:
                hi = lo + (hi - lo) // world_size * world_size
                if hi == lo:
                    return None
            idx = order[lo:hi]
            u = (
                torch.rand((hi - lo, draws), generator=generator, dtype=torch.float64).numpy()
                if draws
                else None
            )
            if world_size > 1:
                share = (hi - lo) // world_size
                sl = slice(rank * share, (rank + 1) * share)
                idx, u = idx[sl], (u[sl] if u is not None else None)
            return idx, u

        pool = ThreadPoolExecutor(self.threads)
        pending: deque[tuple[np.ndarray, list[Future[np.ndarray]]]] = deque()
        try:
            for b in range(self.num_batches(batch_size, drop_last)):
                p = plan(b)
                if p is None:
                    break
                pending.append((p[0], self._submit(pool, p[0], p[1], self.augment)))
                if len(pending) > self.prefetch:
                    yield self._finish(*pending.popleft(), transform, generator, out_device)
            while pending:
                yield self._finish(*pending.popleft(), transform, generator, out_device)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _finish(
        self,
        idx: np.ndarray,
        futures: list[Future[np.ndarray]],
        transform: BatchTransform | None,
        generator: torch.Generator | None,
        device: torch.device | str | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._to_tensor([f.result() for f in futures])
        y = self.y[torch.from_numpy(idx).to(self.y.device)]
        if transform is not None:
            x = transform(x, generator)
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        return x, y

    def __repr__(self) -> str:
        return f"FolderDataset({str(self.root)!r}, n={len(self)}, augment={self.augment!r})"


# ---------------------------------------------------------------------------------------------
# the mean image


def _mean_checksum(ds: FolderDataset, chosen: np.ndarray) -> str:
    h = hashlib.sha256(f"lowbit-imagenet-mean v1 {ds.size} {ds.resize} {len(chosen)}\n".encode())
    for f in ds.files:
        h.update(bytes(f) + b"\0")
    for i in chosen:
        h.update(f"{(ds.root / os.fsdecode(ds.files[i])).stat().st_size}\n".encode())
    return h.hexdigest()


def mean_image(
    ds: FolderDataset,
    n_images: int = 10000,
    cache_dirs: Sequence[Path] = (),
    batch_size: int = 256,
) -> torch.Tensor:
    """Per-pixel mean (3, size, size) in [0, 1] of the evaluation crops of the first ``n_images``
    of ``ds`` in a fixed order (NumPy ``default_rng(0)`` permutation), summed in float64.

    Cached as ``lowbit-mean-<size>-<checksum>.npy`` in the first writable of ``cache_dirs``; the
    checksum covers the whole file list and the sizes of the images used.
    """
    n = len(ds)
    if n == 0:
        raise ValueError("cannot compute a mean image of an empty training split")
    chosen = np.random.default_rng(0).permutation(n)[: min(n_images, n)]
    name = f"lowbit-mean-{ds.size}-{_mean_checksum(ds, chosen)[:20]}.npy"
    for d in cache_dirs:
        if (d / name).is_file():
            arr = np.load(d / name)
            if arr.shape == ds.sample_shape:
                return torch.from_numpy(arr.astype(np.float32))
    plain = ds._replace(mean=None, augment="none")
    total = np.zeros(ds.sample_shape, dtype=np.float64)
    for lo in range(0, len(chosen), batch_size):
        total += plain.load(chosen[lo : lo + batch_size]).double().sum(dim=0).numpy()
    mean = (total / len(chosen)).astype(np.float32)
    for d in cache_dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{name}.{os.getpid()}.tmp.npy"
            np.save(tmp, mean)
            os.replace(tmp, d / name)
            break
        except OSError:
            continue
    return torch.from_numpy(mean)


# ---------------------------------------------------------------------------------------------
# load


def _missing(root: Path, what: str) -> DataNotFoundError:
    return DataNotFoundError(
        f"ImageNet not found: {what}; put the ILSVRC2012 class folders train/<wnid>/*.JPEG and "
        f"val/<wnid>/*.JPEG in {root}/ (val sorted into class folders, see docs/datasets.md; "
        "or pass path=DIR) — no download: ImageNet needs a login at image-net.org"
    )


def load(
    data_dir: Path,
    split: str = "paper",
    download: bool = True,
    *,
    path: str | Path | None = None,
    preprocess: str = "center",
    augment: str | None = None,
    mean_images: int = 10000,
    valid_images: int = 10000,
    max_per_class: int | None = None,
    size: int = 224,
    resize: int = 256,
    threads: int | None = None,
) -> DataSplits:
    """ImageNet from ``<data_dir>/imagenet`` (or ``path``) as :class:`FolderDataset` splits.

    ``split``: ``paper`` = train minus a fixed holdout / valid = ``valid_images`` training images
    (at most a tenth; chosen by a NumPy ``default_rng(0)`` permutation) / test = val (the
    official script validates on val); ``full`` = all of train / no valid / val.
    ``preprocess``: ``center`` (the protocol: [0, 1] minus the training split's mean image) or
    ``unit``. ``augment`` (train only): ``rrcflip`` (default), ``ttq``, ``flip`` or ``none``.
    ``max_per_class`` keeps the first N images of each class (small subsets). ``download`` is
    ignored: ImageNet cannot be downloaded without a login.
    """
    del download
    if split not in ("paper", "full"):
        raise ValueError(f"unknown ImageNet split {split!r}; valid: paper, full")
    if preprocess not in PREPROCESSING:
        raise ValueError(
            f"ImageNet takes preprocess {' or '.join(PREPROCESSING)}, got {preprocess!r}"
        )
    augment = augment if augment is not None else "rrcflip"
    if augment not in AUGMENTATIONS:
        raise ValueError(
            f"unknown ImageNet augmentation {augment!r}; valid: {', '.join(AUGMENTATIONS)}"
        )
    root = Path(path).expanduser() if path is not None else data_dir / "imagenet"
    folders = {part: root / part for part in ("train", "val")}
    for folder in folders.values():
        if not folder.is_dir():
            raise _missing(root, f"no folder {folder}")
    classes = find_classes(folders["train"])
    if not classes:
        raise _missing(root, f"{folders['train']} has no class folders")
    val_classes = find_classes(folders["val"])
    if val_classes != classes:
        if not val_classes:
            raise ValueError(
                f"{folders['val']} has no class folders: sort the validation images into "
                "val/<wnid>/ first (see docs/datasets.md)"
            )
        only_train = sorted(set(classes) - set(val_classes))[:5]
        only_val = sorted(set(val_classes) - set(classes))[:5]
        raise ValueError(
            f"ImageNet train and val class folders differ ({len(classes)} vs {len(val_classes)}; "
            f"only in train: {only_train}, only in val: {only_val})"
        )
    mpc = int(max_per_class) if max_per_class is not None else None
    tr_files, tr_labels = list_images(folders["train"], classes, mpc)
    te_files, te_labels = list_images(folders["val"], classes, mpc)
    if not tr_files:
        raise _missing(root, f"no images in {folders['train']}/<wnid>/")
    if not te_files:
        raise _missing(root, f"no images in {folders['val']}/<wnid>/")
    common: dict[str, Any] = {"size": size, "resize": resize, "threads": threads}
    common["classes"] = classes
    full_train = FolderDataset(folders["train"], tr_files, tr_labels, **common)
    valid: FolderDataset | None = None
    train = full_train
    if split == "paper":
        k = min(int(valid_images), len(full_train) // 10)
        if k > 0:
            perm = np.random.default_rng(0).permutation(len(full_train))
            valid = full_train.select(np.sort(perm[:k]))
            train = full_train.select(np.sort(perm[k:]))
    test = FolderDataset(folders["val"], te_files, te_labels, **common)
    mean: torch.Tensor | None = None
    if preprocess == "center":
        cache = [root, default_data_dir() / "imagenet-cache"]
        mean = mean_image(train, int(mean_images), cache)
    parts = [train, valid, test]
    for p in parts:
        if p is not None:
            p.mean = mean
    train.augment = augment
    return DataSplits(
        "imagenet",
        cast(ArrayDataset, train),  # FolderDataset has ArrayDataset's batch interface
        cast(ArrayDataset, valid) if valid is not None else None,
        cast(ArrayDataset, test),
        len(classes),
        info={
            "source": str(root),
            "split": split,
            "preprocess": preprocess,
            "augment": augment,
            "mean_images": min(int(mean_images), len(train)) if mean is not None else 0,
            "size": size,
        },
    )
