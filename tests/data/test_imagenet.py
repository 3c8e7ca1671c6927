"""The streamed ImageNet loader on a tiny fake ImageFolder tree written with Pillow.

References are computed here with Pillow directly (resize the short side, center crop) or by
brute force over every crop box, never with the loader's own helpers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit import data
from lowbit.data import imagenet
from lowbit.data.files import DataNotFoundError

WNIDS = ["n01440764", "n01443537", "n01484850"]
# (width, height, format) of each class's images: landscape, portrait, square, small, odd sizes.
TRAIN_IMAGES = [
    [(300, 260, "JPEG"), (260, 400, "PNG"), (500, 240, "JPEG"), (230, 230, "PNG")],
    [(256, 256, "JPEG"), (240, 320, "JPEG"), (333, 250, "PNG"), (400, 300, "JPEG")],
    [(250, 500, "PNG"), (300, 300, "JPEG"), (270, 240, "JPEG"), (260, 257, "PNG")],
]
VAL_IMAGES = [(280, 250, "JPEG"), (250, 290, "PNG")]


def _image(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth gradients plus noise: JPEG-friendly, and no two images alike.
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], axis=-1)
    arr = np.clip(base + rng.integers(-40, 40, size=(h, w, 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    return img.convert(mode) if mode != "RGB" else img


def _write(path: Path, w: int, h: int, fmt: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # One grayscale and one RGBA image among them: the loader must convert to RGB.
    mode = "L" if seed % 7 == 3 else ("RGBA" if fmt == "PNG" and seed % 5 == 1 else "RGB")
    ext = ".JPEG" if fmt == "JPEG" else ".png"
    _image(w, h, seed, mode).save(path.with_suffix(ext), format=fmt)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """``tmp_path/imagenet/{train,val}/<wnid>/`` with 4 train and 2 val images per class."""
    root = tmp_path / "imagenet"
    seed = 0
    for c, wnid in enumerate(WNIDS):
        for i, (w, h, fmt) in enumerate(TRAIN_IMAGES[c]):
            _write(root / "train" / wnid / f"{wnid}_{i:04d}", w, h, fmt, seed)
            seed += 1
        for i, (w, h, fmt) in enumerate(VAL_IMAGES):
            _write(root / "val" / wnid / f"ILSVRC2012_val_{c}{i:07d}", w, h, fmt, seed)
            seed += 1
    return root


def _eval_reference(path: Path) -> np.ndarray:
    """Resize the short side to 256 (long side int(256 * long / short)), center crop 224."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    new = (256, int(256 * h / w)) if w <= h else (int(256 * w / h), 256)
    img = img.resize(new, Image.Resampling.BILINEAR)
    left, top = int(round((new[0] - 224) / 2)), int(round((new[1] - 224) / 2))
    return np.array(img.crop((left, top, left + 224, top + 224)))


def _as_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] back to (H, W, 3) uint8 (exact: the loader divides by 255)."""
    return (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_classes_labels_and_shapes(tree: Path) -> None:
    s = data.load("imagenet", data_dir=tree.parent, split="full", preprocess="unit")
    assert s.num_classes == 3 and s.input_shape == (3, 224, 224)
    assert s.train.classes == WNIDS and s.test.classes == WNIDS
    assert (len(s.train), len(s.test)) == (12, 6) and s.valid is None
    for p, label in zip(s.train.paths(), s.train.y.tolist(), strict=True):
        assert p.parent.name == WNIDS[label]
    assert s.test.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.info["augment"] == "rrcflip" and s.info["preprocess"] == "unit"
    # `path=` points at the same tree from anywhere.
    t = data.load("imagenet", data_dir="/nonexistent", path=str(tree), preprocess="unit")
    assert len(t.test) == 6
    # `lowbit datasets` sees it.
    row = next(r for r in data.status(tree.parent) if r["name"] == "imagenet")
    assert row["available"] is True


def test_eval_transform_matches_pil_pixel_for_pixel(tree: Path) -> None:
    s = data.load("imagenet", data_dir=tree.parent, split="full", preprocess="unit")
    got = torch.cat([x for x, _ in s.test.batches(4)])
    assert got.shape == (6, 3, 224, 224) and got.dtype == torch.float32
    for k, path in enumerate(s.test.paths()):
        want = torch.from_numpy(_eval_reference(path)).permute(2, 0, 1).float() / 255
        assert torch.equal(got[k], want), path
    # The lazy `x` view (what code written for in-memory datasets uses) is the same transform.
    assert torch.equal(s.test.x[1], got[1]) and torch.equal(s.test.x[:2], got[:2])
    assert s.test.x.shape == (6, 3, 224, 224)


def test_random_resized_crop_box_rules() -> None:
    rng = np.random.default_rng(1)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(1, 600, size=2))
        left, top, right, bottom = imagenet.random_resized_crop_box(w, h, rng.random(40))
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
    # A 1000 x 10 strip: every attempt needs a crop taller than 10 pixels, so the fallback cuts
    # the whole height to the widest allowed ratio 4/3 (width round(13.33) = 13), centered.
    assert imagenet.random_resized_crop_box(1000, 10, np.full(40, 0.5)) == (493, 0, 506, 10)
    # First attempt fits: u = (1, 0.5, 0, 0) asks for the whole area at ratio 1 of a 100 x 100.
    assert imagenet.random_resized_crop_box(100, 100, [0.999999, 0.5, 0, 0] * 10) == (
        0,
        0,
        100,
        100,
    )


def test_ttq_resize_box_by_hand() -> None:
    # 500 x 375: scale = 224 / 375; jitter factors 1.0 -> 298.67 x 224 -> (298, 224); crop at 0.
    new, box = imagenet.ttq_resize_crop_box(500, 375, [0.0, 0.5, 0.5, 0.0, 0.0])
    assert new == (298, 224) and box == (0, 0, 224, 224)
    # 300 x 250: scale = 307 / 250 (randint's top value); x: 1.228 * 1.15 * 300 capped at 300;
    # y: 1.228 * 0.85 * 250 = 260.9 capped at 250; left = int(0.9999 * 77) = 76.
    new, box = imagenet.ttq_resize_crop_box(300, 250, [0.9999, 0.9999, 0.0, 0.9999, 0.0])
    assert new == (300, 250) and box == (76, 0, 300, 224)
    # 100 x 80: never above the original size (100, 80), never below 224: (224, 224).
    new, box = imagenet.ttq_resize_crop_box(100, 80, [0.0, 0.0, 0.0, 0.0, 0.0])
    assert new == (224, 224) and box == (0, 0, 224, 224)


def test_train_crops_lie_inside_the_image_and_flips_mirror(tmp_path: Path) -> None:
    # A small noise image, lossless, so every candidate crop can be tried by brute force.
    src = _image(13, 10, seed=5)
    (tmp_path / "c").mkdir()
    src.save(tmp_path / "c" / "a.png")
    n = 12
    ds = imagenet.FolderDataset(tmp_path, ["c/a.png"] * n, [0] * n, augment="rrcflip", size=8)
    ((x, _),) = list(ds.batches(n, generator=torch.Generator().manual_seed(3)))
    candidates = []
    for left in range(13):
        for right in range(left + 1, 14):
            for top in range(10):
                for bottom in range(top + 1, 11):
                    crop = src.crop((left, top, right, bottom))
                    candidates.append(np.asarray(crop.resize((8, 8), Image.Resampling.BILINEAR)))
    cand = np.stack(candidates)
    flips = []
    for k in range(n):
        out = _as_uint8(x[k])
        plain = (cand == out).all(axis=(1, 2, 3)).any()
        mirrored = (cand == out[:, ::-1]).all(axis=(1, 2, 3)).any()
        assert plain or mirrored, f"sample {k} is no crop of the image"
        flips.append(bool(mirrored and not plain))
    assert any(flips) and not all(flips)


def test_same_generator_state_replays_the_same_batches(tree: Path) -> None:
    s = data.load("imagenet", data_dir=tree.parent, split="full", preprocess="unit")

    def epoch(g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(s.train.batches(5, shuffle=True, generator=g))

    g = torch.Generator().manual_seed(7)
    epoch(g)  # epoch 1
    saved = g.get_state()  # what a checkpoint stores
    second = epoch(g)
    after = g.get_state()
    g2 = torch.Generator()
    g2.set_state(saved)
    replay = epoch(g2)
    assert torch.equal(g2.get_state(), after)
    for (xa, ya), (xb, yb) in zip(second, replay, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    first_again = epoch(torch.Generator().manual_seed(7))
    assert not torch.equal(first_again[0][0], second[0][0])  # epochs differ from each other


def test_rank_sharding_matches_the_global_batch(tree: Path) -> None:
    s = data.load("imagenet", data_dir=tree.parent, split="full", preprocess="unit")
    train = s.train.subset(0, 9)
    full = list(train.batches(4, shuffle=True, generator=torch.Generator().manual_seed(1)))
    shares = [
        list(
            train.batches(
                4,
                shuffle=True,
                generator=torch.Generator().manual_seed(1),
                rank=r,
                world_size=2,
            )
        )
        for r in range(2)
    ]
    # 9 samples in batches of 4: 4, 4, 1; the last global batch is cut to 0 with 2 ranks.
    assert len(full) == 3 and len(shares[0]) == len(shares[1]) == 2
    for k in range(2):
        joined_x = torch.cat([shares[0][k][0], shares[1][k][0]])
        joined_y = torch.cat([shares[0][k][1], shares[1][k][1]])
        assert torch.equal(joined_x, full[k][0]) and torch.equal(joined_y, full[k][1])
    with pytest.raises(ValueError, match="not divisible"):
        next(train.batches(3, world_size=2))


def test_mean_image_is_computed_cached_and_invalidated(tree: Path) -> None:
    s = data.load("imagenet", data_dir=tree.parent, split="full", mean_images=100)
    want = np.mean([_eval_reference(p).astype(np.float64) / 255 for p in s.train.paths()], axis=0)
    mean = s.train.mean
    assert mean is not None and mean.shape == (3, 224, 224)
    np.testing.assert_allclose(mean.permute(1, 2, 0).numpy(), want, atol=1e-6)
    # Every split subtracts the training mean.
    x, _ = next(s.test.batches(1))
    ref = torch.from_numpy(_eval_reference(s.test.paths()[0])).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(x[0], ref - mean)
    cached = list(tree.glob("lowbit-mean-224-*.npy"))
    assert len(cached) == 1
    # A second load reads the cache (proof: plant a recognisable value there).
    np.save(cached[0], np.full((3, 224, 224), 0.25, dtype=np.float32))
    again = data.load("imagenet", data_dir=tree.parent, split="full", mean_images=100)
    assert again.train.mean is not None and float(again.train.mean.min()) == 0.25
    # Adding an image changes the file list: the mean is recomputed under a new name.
    _write(tree / "train" / WNIDS[1] / "extra", 320, 240, "JPEG", seed=99)
    third = data.load("imagenet", data_dir=tree.parent, split="full", mean_images=100)
    assert third.train.mean is not None and float(third.train.mean.min()) != 0.25
    assert len(list(tree.glob("lowbit-mean-224-*.npy"))) == 2


def test_paper_split_holdout_and_max_per_class(tree: Path) -> None:
    s = data.load("imagenet", data_dir=tree.parent, preprocess="unit")  # split paper
    assert s.valid is not None and (len(s.train), len(s.valid), len(s.test)) == (11, 1, 6)
    names = {str(p) for p in s.train.paths()} | {str(p) for p in s.valid.paths()}
    assert len(names) == 12
    assert s.valid.augment == "none" and s.train.augment == "rrcflip"
    small = data.load(
        "imagenet", data_dir=tree.parent, split="full", preprocess="unit", max_per_class=2
    )
    assert len(small.train) == 6 and small.train.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert [p.name for p in small.train.paths()][:2] == [
        f"{WNIDS[0]}_0000.JPEG",
        f"{WNIDS[0]}_0001.png",
    ]


def test_missing_or_malformed_folders_give_clear_errors(tmp_path: Path, tree: Path) -> None:
    with pytest.raises(DataNotFoundError) as err:
        data.load("imagenet", data_dir=tmp_path / "empty")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "empty" / "imagenet") in msg
    assert "train/<wnid>/*.JPEG" in msg and "login" in msg
    # Validation images not yet sorted into class folders.
    flat = tmp_path / "flat"
    (flat / "train" / "n1").mkdir(parents=True)
    _write(flat / "train" / "n1" / "a", 20, 20, "JPEG", 0)
    (flat / "val").mkdir()
    _write(flat / "val" / "ILSVRC2012_val_00000001", 20, 20, "JPEG", 1)
    with pytest.raises(ValueError, match="sort the validation images"):
        data.load("imagenet", path=flat)
    # Train and val disagree on the classes.
    (tree / "val" / "n99999999").mkdir()
    with pytest.raises(ValueError, match="only in val: \\['n99999999'\\]"):
        data.load("imagenet", data_dir=tree.parent)
    with pytest.raises(ValueError, match="center or unit"):
        data.load("imagenet", data_dir=tree.parent, preprocess="ttq")


def test_a_truncated_image_is_named(tmp_path: Path) -> None:
    from lowbit.data import imagenet

    _write(tmp_path / "cut", 120, 90, "JPEG", 3)
    path = tmp_path / "cut.JPEG"
    path.write_bytes(path.read_bytes()[:300])  # one of 1.28M files cut short
    with pytest.raises(ValueError, match=r"cut.JPEG cannot be decoded .*replace or remove it"):
        imagenet._decode(str(path))


def test_ttq_imagenet_recipe_trains_one_step(tree: Path, tmp_path: Path) -> None:
    from lowbit.train.config import load_recipe
    from lowbit.train.runs import train_spec

    spec = load_recipe("ttq-imagenet-alexnet")
    assert spec["data"]["name"] == "imagenet" and spec["model"]["name"] == "alexnet"
    # One image per class (3 images: one batch of 3, BatchNorm1d needs more than one sample),
    # a narrow AlexNet so the CPU step takes seconds; everything else is the recipe's.
    spec["data"].update({"max_per_class": 1, "mean_images": 3, "threads": 2})
    spec["model"]["width"] = 0.25  # the full-width AlexNet takes about a minute here
    spec["train"].update({"epochs": 1, "batch_size": 3, "eval_batch_size": 3, "milestones": []})
    run = tmp_path / "run"
    summary = train_spec(spec, run, progress=False, data_dir=tree.parent)
    assert summary["status"] == "finished" and summary["steps"] == 1
    assert summary["dataset"] == "imagenet"
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert 0.0 <= rec["test_error"] <= 100.0 and np.isfinite(rec["train_loss"])
