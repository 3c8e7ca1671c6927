"""``data.load("arrays", path=...)``: a user's own .npz / .pt arrays, end to end through the CLI."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lowbit import data
from lowbit.cli import app


def _images(n: int, shape: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 4, n)


def _npz(path: Path, shape: tuple[int, ...] = (2, 5, 5), **extra: np.ndarray) -> Path:
    x, y = _images(60, shape)
    np.savez(path, x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:], **extra)
    return path


def test_uint8_images_scale_to_unit_range_and_hold_out_the_last_tenth(tmp_path: Path) -> None:
    path = _npz(tmp_path / "d.npz")
    raw = np.load(path)
    splits = data.load("arrays", path=str(path))
    assert splits.input_shape == (2, 5, 5) and splits.task == "classification"
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (36, 4, 20)
    # exactly x / 255 in float32, valid = the last 4 training samples in order
    expected = torch.from_numpy(raw["x_train"].astype(np.float32) / np.float32(255))
    assert torch.equal(splits.train.x, expected[:36]) and torch.equal(splits.valid.x, expected[36:])
    assert torch.equal(splits.valid.y, torch.from_numpy(raw["y_train"][36:]).long())
    assert splits.num_classes == int(max(raw["y_train"].max(), raw["y_test"].max())) + 1
    full = data.load("arrays", path=str(path), split="full")
    assert full.valid is None and len(full.train) == 40


def test_layouts_vectors_valid_arrays_and_torch_files(tmp_path: Path) -> None:
    x, y = _images(50, (4, 4, 3))
    np.savez(tmp_path / "hwc.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:], y_test=y[30:])
    nhwc = data.load("arrays", path=str(tmp_path / "hwc.npz"), layout="nhwc", valid_fraction=0)
    assert nhwc.input_shape == (3, 4, 4) and nhwc.valid is None
    assert torch.equal(nhwc.train.x[1, 2], torch.from_numpy(x[1, :, :, 2] / np.float32(255)))
    gray = data.load("arrays", path=str(_npz(tmp_path / "g.npz", (6, 6))))
    assert gray.input_shape == (1, 6, 6)
    feats = np.random.default_rng(1).standard_normal((30, 7))
    labels = np.arange(30) % 3
    np.savez(
        tmp_path / "v.npz",
        x_train=feats[:20], y_train=labels[:20], x_valid=feats[20:25], y_valid=labels[20:25],
        x_test=feats[25:], y_test=labels[25:],
    )  # fmt: skip
    vec = data.load("arrays", path=str(tmp_path / "v.npz"), classes=5)
    assert vec.input_shape == (7,) and vec.num_classes == 5 and len(vec.valid) == 5
    assert torch.equal(vec.train.x, torch.from_numpy(feats[:20]).float())  # floats as given
    assert vec.info["valid"] == "file"
    full = data.load("arrays", path=str(tmp_path / "v.npz"), split="full")
    assert len(full.train) == 25 and full.valid is None
    torch.save(
        {
            k: torch.from_numpy(np.load(tmp_path / "v.npz")[k])
            for k in np.load(tmp_path / "v.npz").files
        },
        tmp_path / "v.pt",
    )
    pt = data.load("arrays", path=str(tmp_path / "v.pt"))
    assert torch.equal(pt.test.x, vec.test.x) and torch.equal(pt.test.y, vec.test.y)
    std = data.load("arrays", path=str(tmp_path / "v.npz"), preprocess="standardize")
    assert abs(float(std.train.x.mean())) < 1e-6


@pytest.mark.parametrize(
    ("arrays", "options", "message"),
    [
        ({"y_train": None, "x_test": None, "y_test": None}, {}, "lacks y_train, x_test, y_test"),
        ({"y_valid": np.zeros(2)}, {}, "give both x_valid and y_valid"),
        ({"y_train": np.zeros(39)}, {}, "x_train has 40 samples but y_train has 39"),
        ({"y_train": np.full(40, 0.5)}, {}, "y_train must hold integer class ids"),
        ({"y_test": -np.ones(20, np.int64)}, {}, "y_test has negative class ids"),
        ({"x_test": np.full((20, 2, 5, 5), np.nan)}, {}, "x_test contains NaN"),
        ({"x_test": np.zeros((20, 3, 5, 5))}, {}, "sample shapes differ"),
        ({"x_train": np.array(["a"] * 40)}, {}, "x_train has dtype <U1"),
        (
            {"x_train": np.zeros((40, 2, 5, 5), np.int64)},
            {},
            r"x_train has integer dtype int64: for pixels 0..255 store it as uint8",
        ),
        ({}, {"classes": 2}, "does not fit classes=2"),
        ({}, {"layout": "hwc"}, "layout must be 'nchw' or 'nhwc'"),
        ({}, {"valid_fraction": 1.0}, "valid_fraction must be in"),
        ({}, {"valid_fraction": 0.001}, "too few to hold out"),
    ],
)
def test_bad_files_and_options_say_what_to_fix(tmp_path, arrays, options, message) -> None:
    x, y = _images(60, (2, 5, 5))
    base = {"x_train": x[:40], "y_train": y[:40], "x_test": x[40:], "y_test": y[40:]}
    base.update(arrays)
    base = {k: v for k, v in base.items() if v is not None}  # None: leave the array out
    np.savez(tmp_path / "bad.npz", **base)
    with pytest.raises(ValueError, match=message):
        data.load("arrays", path=str(tmp_path / "bad.npz"), **options)


def test_missing_or_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs path=FILE"):
        data.load("arrays")
    with pytest.raises(data.DataNotFoundError, match="not found"):
        data.load("arrays", path=str(tmp_path / "none.npz"))
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match="give a .npz file"):
        data.load("arrays", path=str(tmp_path / "x.csv"))
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable .npz"):
        data.load("arrays", path=str(tmp_path / "broken.npz"))
    with pytest.raises(ValueError, match="takes no option 'seq_len'"):
        data.load("arrays", path=str(tmp_path / "broken.npz"), seq_len=5)


def test_train_pack_and_run_on_your_own_arrays(tmp_path: Path) -> None:
    """The options recorded by `lowbit train` (here the NHWC layout) travel into the packed file,
    so `lowbit run` feeds the packed model the inputs it was trained on."""
    import lowbit
    from lowbit.data import synthetic

    x, y = synthetic.images(240, (6, 6, 3), classes=4, seed=3)  # learnable, channels last
    np.savez(tmp_path / "d.npz", x_train=x[:160], y_train=y[:160], x_test=x[160:], y_test=y[160:])
    run = tmp_path / "run"
    res = CliRunner().invoke(
        app,
        [
            "train", "--dataset", "arrays", "-D", f"path={tmp_path / 'd.npz'}", "-D", "layout=nhwc",
            "-D", "valid_fraction=0.2", "--model", "mlp", "-M", "widths=[32,32]", "--method", "ttq",
            "-Q", "keep=[]", "--epochs", "3", "--batch-size", "16", "--run-dir", str(run),
            "--no-progress",
        ],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert json.loads((run / "config.json").read_text())["data"]["layout"] == "nhwc"
    out = tmp_path / "m.lowbit"
    packed = CliRunner().invoke(app, ["pack", str(run), "-o", str(out)])
    assert packed.exit_code == 0, packed.output
    ran = CliRunner().invoke(app, ["run", str(out), "--reps", "1", "--json"])
    assert ran.exit_code == 0, ran.output
    # independent: the loaded packed model on the channels-first test inputs
    test = data.load("arrays", path=str(tmp_path / "d.npz"), layout="nhwc").test
    with torch.no_grad():
        pred = lowbit.load(out)(test.x).argmax(1)
    expected = 100.0 * float((pred == test.y).float().mean())
    assert expected > 60  # learnable data: far above chance, so a lost layout would show
    assert json.loads(ran.output)["accuracy"] == pytest.approx(expected)
    other = CliRunner().invoke(
        app, ["run", str(out), "-D", f"path={tmp_path / 'none.npz'}", "--reps", "1"]
    )
    assert other.exit_code != 0 and "none.npz not found" in other.output


def test_channels_last_images_without_the_layout_option_are_warned_about(tmp_path: Path) -> None:
    x, y = _images(60, (8, 8, 3))  # (N, H, W, C) pixels
    np.savez(tmp_path / "hwc.npz", x_train=x[:40], y_train=y[:40], x_test=x[40:], y_test=y[40:])
    with pytest.warns(UserWarning, match=r"pass layout=nhwc"):
        data.load("arrays", path=str(tmp_path / "hwc.npz"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert data.load("arrays", path=str(tmp_path / "hwc.npz"), layout="nhwc").input_shape == (
            3,
            8,
            8,
        )
