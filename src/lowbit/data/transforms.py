"""The papers' preprocessing (fitted on the training split) and batched augmentation.

Preprocessing runs once on whole tensors; augmentation runs per batch inside the batch iterator
with the trainer's generator, so it is reproducible and resumable.

===============  =======================================================  =====================
name             what                                                     used by
===============  =======================================================  =====================
``unit``         pixels in [0, 1]                                         default for MNIST
``bnn``          ``2x - 1``: pixels in [-1, 1]                            BNN (§2.8)
``center``       [0, 1] minus the training split's per-pixel mean         LAQ MNIST (§3.7)
``standardize``  per-channel (x - mean) / std of the training split       default for CIFAR/SVHN
``ttq``          ``255x/128 - 1`` minus the per-pixel training mean       TTQ CIFAR (§1.5)
``gcn_zca``      global contrast normalisation (scale 55) then ZCA        LAQ CIFAR (§3.7)
                 whitening (filter bias 0.1) fitted on the training split
===============  =======================================================  =====================
"""

from __future__ import annotations

import torch

from lowbit.data.core import BatchTransform, DataSplits

__all__ = [
    "AUGMENTATIONS",
    "PREPROCESSING",
    "apply_preprocessing",
    "augmentation",
    "flip",
    "gcn",
    "pad_crop_flip",
    "zca_fit",
]

PREPROCESSING = ("unit", "bnn", "center", "standardize", "ttq", "gcn_zca")
AUGMENTATIONS = ("none", "flip", "padcropflip")


def gcn(
    x: torch.Tensor, scale: float = 55.0, sqrt_bias: float = 0.0, min_divisor: float = 1e-8
) -> torch.Tensor:
    """Global contrast normalisation as pylearn2's ``global_contrast_normalize(use_std=False)``.

    Each example (flattened) has its mean removed and is scaled to L2 norm ``scale``:
    ``x <- scale * (x - mean) / sqrt(sqrt_bias + sum((x - mean)^2))``.
    """
    flat = x.reshape(x.shape[0], -1).double()
    flat = flat - flat.mean(dim=1, keepdim=True)
    norm = torch.sqrt(sqrt_bias + flat.pow(2).sum(dim=1, keepdim=True)) / scale
    norm = torch.where(norm < min_divisor, torch.ones_like(norm), norm)
    return (flat / norm).to(x.dtype).reshape(x.shape)


def zca_fit(x: torch.Tensor, filter_bias: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ZCA whitening on ``x`` (N, ...): returns ``(mean, W)`` with ``whiten(z) = (z - mean) @ W``.

    ``W = V diag(1 / sqrt(eig + filter_bias)) V^T`` from the covariance ``X^T X / N`` of the
    centred data (pylearn2's ``ZCA``), computed in float64.
    """
    flat = x.reshape(x.shape[0], -1).double()
    mean = flat.mean(dim=0)
    centred = flat - mean
    cov = centred.T @ centred / flat.shape[0]
    eig, vec = torch.linalg.eigh(cov)
    w = (vec * (1.0 / torch.sqrt(eig.clamp_min(0) + filter_bias))) @ vec.T
    return mean.float(), w.float()


def _zca_apply(
    x: torch.Tensor, mean: torch.Tensor, w: torch.Tensor, chunk: int = 8192
) -> torch.Tensor:
    flat = x.reshape(x.shape[0], -1)
    out = torch.empty_like(flat)
    for i in range(0, flat.shape[0], chunk):
        out[i : i + chunk] = (flat[i : i + chunk] - mean) @ w
    return out.reshape(x.shape)


def apply_preprocessing(splits: DataSplits, name: str) -> DataSplits:
    """Preprocess every split of ``splits`` (inputs in [0, 1], float32) in place with statistics
    fitted on the training split only. Returns ``splits``; records the choice in ``splits.info``.
    """
    if name not in PREPROCESSING:
        raise ValueError(f"unknown preprocessing {name!r}; valid: {', '.join(PREPROCESSING)}")
    parts = list(splits.splits().values())
    train_x = splits.train.x
    if name == "unit":
        pass
    elif name == "bnn":
        for p in parts:
            p.x = p.x * 2 - 1
    elif name == "center":
        mean = train_x.mean(dim=0, keepdim=True)
        for p in parts:
            p.x = p.x - mean
    elif name == "standardize":
        dims = [0] + list(range(2, train_x.dim()))
        mean = train_x.mean(dim=dims, keepdim=True)
        std = train_x.std(dim=dims, keepdim=True).clamp_min(1e-8)
        for p in parts:
            p.x = (p.x - mean) / std
    elif name == "ttq":
        scaled = train_x * (255.0 / 128.0) - 1
        mean = scaled.mean(dim=0, keepdim=True)
        for p in parts:
            p.x = p.x * (255.0 / 128.0) - 1 - mean
    elif name == "gcn_zca":
        # pylearn2 applies GCN to 0..255 pixel values; GCN removes the scale, so [0, 1] is the same.
        train_g = gcn(train_x)
        mean, w = zca_fit(train_g)
        for p in parts:
            p.x = _zca_apply(train_g if p is splits.train else gcn(p.x), mean, w)
    splits.info["preprocess"] = name
    return splits


def pad_crop_flip(
    x: torch.Tensor, generator: torch.Generator | None, pad: int = 4, flip_p: float = 0.5
) -> torch.Tensor:
    """TTQ's augmentation on a batch (N, C, H, W): zero-pad by ``pad``, random crop back to H x W,
    random horizontal flip. One gather, no per-sample Python."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded[
        torch.arange(n, device=x.device)[:, None, None, None],
        torch.arange(c, device=x.device)[None, :, None, None],
        rows,
        cols,
    ]
    return flip(out, generator, flip_p)


def flip(x: torch.Tensor, generator: torch.Generator | None, p: float = 0.5) -> torch.Tensor:
    """Random horizontal flip of each image in a batch (N, C, H, W) with probability ``p``."""
    mask = (torch.rand(x.shape[0], generator=generator) < p).to(x.device)
    return torch.where(mask[:, None, None, None], x.flip(-1), x)


def augmentation(name: str) -> BatchTransform | None:
    """The batch transform called ``name`` (``none`` gives None)."""
    if name == "none":
        return None
    if name == "flip":
        return flip
    if name == "padcropflip":
        return pad_crop_flip
    raise ValueError(f"unknown augmentation {name!r}; valid: {', '.join(AUGMENTATIONS)}")
