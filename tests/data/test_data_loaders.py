"""Every dataset loader on small synthetic files in the real formats, plus the embedded MNIST."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch

from lowbit import data
from lowbit.data import cifar, files, mnist, svhn, synthetic, text


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # No test may touch the network: any download attempt fails unless a test installs an opener.
    def refuse(url: str, timeout: float = 0) -> None:
        raise OSError(f"network disabled in tests ({url})")

    monkeypatch.setattr(files, "_opener", refuse)


# ---------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist_splits() -> data.DataSplits:
    return data.load("mnist")


def test_embedded_mnist_is_the_classic_split(mnist_splits: data.DataSplits) -> None:
    s = mnist_splits
    assert (len(s.train), len(s.valid), len(s.test)) == (50000, 10000, 10000)
    assert s.input_shape == (1, 28, 28) and s.num_classes == 10
    # The first training labels of MNIST are famous: 5 0 4 1 9 2 1 3 1 4.
    assert s.train.y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert s.train.x.dtype == torch.float32
    assert float(s.train.x.min()) == 0.0 and float(s.train.x.max()) <= 1.0
    # Every class is present in every split, roughly balanced.
    for part in (s.train, s.valid, s.test):
        counts = torch.bincount(part.y, minlength=10)
        assert counts.min() > 0.08 * len(part)


def test_embedded_mnist_found_without_importing_the_package() -> None:
    import sys

    path = mnist.embedded_path()
    assert path is not None and path.name == "mnist.pkl.gz"
    assert "mnist" not in sys.modules  # located through importlib.metadata only


def test_mnist_full_split_merges_valid(mnist_splits: data.DataSplits) -> None:
    s = data.load("mnist", split="full")
    assert s.valid is None and len(s.train) == 60000
    # The paper split's valid set is the last 10k of the 60k training images.
    assert torch.equal(s.train.x[50000:], mnist_splits.valid.x) and torch.equal(
        s.train.y[:50000], mnist_splits.train.y
    )


def test_idx_roundtrip_and_mnist_from_idx(tmp_path) -> None:
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    mnist.write_idx(tmp_path / "a.idx", arr)
    raw = (tmp_path / "a.idx").read_bytes()
    assert raw[:4] == bytes([0, 0, 8, 3]) and struct.unpack(">3i", raw[4:16]) == (2, 3, 4)
    np.testing.assert_array_equal(mnist.read_idx(tmp_path / "a.idx"), arr)

    synthetic.write_mnist_idx(tmp_path / "mnist", n_train=120, n_test=30)
    s = data.load("mnist", source="idx", data_dir=tmp_path, download=False)
    assert (len(s.train), len(s.valid), len(s.test)) == (100, 20, 30)
    xtr, ytr = synthetic.images(120, (28, 28), seed=0)
    np.testing.assert_array_equal(s.train.y.numpy(), ytr[:100])
    np.testing.assert_allclose(s.train.x[:, 0].numpy(), xtr[:100] / 256.0)


def test_mnist_idx_uncompressed_files_are_read(tmp_path) -> None:
    synthetic.write_mnist_idx(tmp_path / "mnist", n_train=60, n_test=12, gz=False)
    s = data.load("mnist", source="idx", data_dir=tmp_path, download=False, split="full")
    assert len(s.train) == 60 and len(s.test) == 12


def test_truncated_idx_is_refused(tmp_path) -> None:
    mnist.write_idx(tmp_path / "t.idx.gz", np.zeros((5, 28, 28), np.uint8))
    with gzip.open(tmp_path / "t.idx.gz") as f:
        body = f.read()
    with gzip.open(tmp_path / "t.idx.gz", "wb") as f:
        f.write(body[:-7])
    with pytest.raises(ValueError, match="truncated"):
        mnist.read_idx(tmp_path / "t.idx.gz")
    # a cut-off download: the gzip stream itself ends early (EOFError, which the CLI's click
    # would have turned into a bare "Aborted.")
    raw = (tmp_path / "t.idx.gz").read_bytes()
    (tmp_path / "cut.idx.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut.idx.gz is damaged .*download it again"):
        mnist.read_idx(tmp_path / "cut.idx.gz")


def test_missing_mnist_idx_names_file_and_directory(tmp_path) -> None:
    with pytest.raises(data.DataNotFoundError) as err:
        data.load("mnist", source="idx", data_dir=tmp_path)
    msg = str(err.value)
    assert (
        "\n" not in msg and "train-images-idx3-ubyte.gz" in msg and str(tmp_path / "mnist") in msg
    )


# ---------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("archive", [True, False])
def test_cifar10_from_archive_or_folder(tmp_path, archive: bool) -> None:
    synthetic.write_cifar(tmp_path / "cifar10", "cifar10", n_per_batch=40, archive=archive)
    s = data.load("cifar10", data_dir=tmp_path, preprocess="unit", download=False)
    # 5 x 40 training images -> 180 train / 20 valid (the last tenth), 40 test.
    assert (len(s.train), len(s.valid), len(s.test)) == (180, 20, 40)
    assert s.input_shape == (3, 32, 32)
    x0, y0 = synthetic.images(40, (3, 32, 32), seed=0)  # data_batch_1
    np.testing.assert_allclose(s.train.x[:40].numpy(), x0 / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(s.train.y[:40].numpy(), y0)
    x_last, y_last = synthetic.images(
        40, (3, 32, 32), seed=4
    )  # data_batch_5 -> its last 20 are valid
    np.testing.assert_array_equal(s.valid.y.numpy(), y_last[-20:])


def test_cifar100_fine_labels(tmp_path) -> None:
    synthetic.write_cifar(tmp_path / "cifar100", "cifar100", n_per_batch=20)
    s = data.load("cifar100", data_dir=tmp_path, split="full", download=False)
    assert s.num_classes == 100 and len(s.train) == 100 and s.valid is None
    _, y = synthetic.images(100, (3, 32, 32), classes=100, seed=0)
    np.testing.assert_array_equal(s.train.y.numpy(), y)


def test_cifar10_offline_error_is_one_line_naming_file_and_place(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(tmp_path))
    with pytest.raises(data.DataNotFoundError) as err:
        data.load("cifar10")
    msg = str(err.value)
    assert "\n" not in msg
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "cifar10") in msg
    assert "cifar-10-batches-py" in msg and "download failed" in msg


def test_cifar_pickle_with_code_is_refused(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for n in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (d / n).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        data.load("cifar10", data_dir=tmp_path)


# ---------------------------------------------------------------- downloads


def _serve(tmp_path, payload: bytes):
    src = tmp_path / "remote.bin"
    src.write_bytes(payload)
    return src.as_uri()


def test_download_verifies_checksum_and_lands_atomically(tmp_path, monkeypatch) -> None:
    import urllib.request

    monkeypatch.setattr(files, "_opener", urllib.request.urlopen)  # file:// works offline
    payload = os.urandom(3000)
    url = _serve(tmp_path, payload)
    good = files.RemoteFile("x.bin", (url,), hashlib.md5(payload).hexdigest(), "md5")
    got = files.require(good, tmp_path / "dl", "X")
    assert got.read_bytes() == payload
    bad = files.RemoteFile("y.bin", ("file:///nonexistent/y.bin", url), "0" * 32, "md5")
    with pytest.raises(data.DataNotFoundError, match="checksum mismatch"):
        files.require(bad, tmp_path / "dl", "Y")
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == ["x.bin"]  # no partial files left
    # a failed download into folders that did not exist leaves no empty folders behind
    with pytest.raises(data.DataNotFoundError):
        files.require(bad, tmp_path / "new" / "deeper", "Y")
    assert not (tmp_path / "new").exists()


def test_download_without_published_checksum_records_and_checks_sha256(
    tmp_path, monkeypatch
) -> None:
    import urllib.request

    monkeypatch.setattr(files, "_opener", urllib.request.urlopen)
    url = _serve(tmp_path, b"War and Peace\n" * 10)
    remote = files.RemoteFile("warpeace_input.txt", (url,), None, "sha256")
    path = files.require(remote, tmp_path / "text", "warpeace")
    side = path.with_name(path.name + ".sha256")
    assert side.read_text().strip() == hashlib.sha256(b"War and Peace\n" * 10).hexdigest()
    files.require(remote, tmp_path / "text", "warpeace", verify=True)
    path.write_text("tampered")
    with pytest.raises(OSError, match="corrupt"):
        files.require(remote, tmp_path / "text", "warpeace", verify=True)


def test_cifar10_download_through_a_patched_opener(tmp_path, monkeypatch) -> None:
    made = synthetic.write_cifar(tmp_path / "src", "cifar10", n_per_batch=10)
    payload = made.read_bytes()
    seen = []

    class Resp:
        def __init__(self) -> None:
            self.pos = 0

        def read(self, n: int) -> bytes:
            out = payload[self.pos : self.pos + n]
            self.pos += n
            return out

        def __enter__(self):
            return self

        def __exit__(self, *a) -> None:
            return None

    def opener(url: str, timeout: float = 0) -> Resp:
        seen.append(url)
        return Resp()

    monkeypatch.setattr(files, "_opener", opener)
    monkeypatch.setitem(
        cifar.ARCHIVES,
        "cifar10",
        files.RemoteFile(
            "cifar-10-python.tar.gz",
            cifar.ARCHIVES["cifar10"].urls,
            hashlib.md5(payload).hexdigest(),
        ),
    )
    s = data.load("cifar10", data_dir=tmp_path / "cache")
    assert seen == ["https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"]
    assert (
        len(s.train) + len(s.valid) == 50
        and (tmp_path / "cache" / "cifar10" / "cifar-10-python.tar.gz").exists()
    )


def test_offline_env_skips_download(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LOWBIT_OFFLINE", "1")
    with pytest.raises(data.DataNotFoundError, match="offline"):
        data.load("svhn", data_dir=tmp_path)


# ---------------------------------------------------------------- SVHN


def test_svhn_mat_labels_and_splits(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(svhn, "VALID_PER_CLASS_TRAIN", 8)
    monkeypatch.setattr(svhn, "VALID_PER_CLASS_EXTRA", 4)
    synthetic.write_svhn(tmp_path / "svhn", n_train=300, n_test=20, n_extra=120)
    x, y = svhn.read_mat(tmp_path / "svhn" / "train_32x32.mat")
    xs, ys = synthetic.images(300, (3, 32, 32), seed=0)
    np.testing.assert_array_equal(x, xs)
    np.testing.assert_array_equal(y, ys)  # label 10 in the file is the digit 0
    raw = scipy.io.loadmat(str(tmp_path / "svhn" / "train_32x32.mat"))
    assert raw["X"].shape == (32, 32, 3, 300) and raw["y"].min() == 1 and raw["y"].max() == 10

    small = data.load("svhn", data_dir=tmp_path, preprocess="unit", download=False)
    assert len(small.valid) == 80 and len(small.train) == 220 and len(small.test) == 20
    assert torch.bincount(small.valid.y, minlength=10).tolist() == [8] * 10
    # The held-out images are the first 8 of each class, in file order.
    first = np.concatenate([np.flatnonzero(ys == c)[:8] for c in range(10)])
    np.testing.assert_array_equal(small.valid.y.numpy(), ys[np.sort(first)])
    paper = data.load("svhn", split="paper", data_dir=tmp_path, preprocess="unit", download=False)
    _, y_extra = synthetic.images(120, (3, 32, 32), seed=2)
    held = sum(min(4, int((y_extra == c).sum())) for c in range(10))
    assert len(paper.valid) == 80 + held and len(paper.train) == 220 + 120 - held
    # too few images for the per-class hold-out: refused, not an empty training split
    monkeypatch.setattr(svhn, "VALID_PER_CLASS_TRAIN", 400)
    with pytest.raises(
        ValueError, match=r"holds out 400 training images per class .* split='full'"
    ):
        data.load("svhn", data_dir=tmp_path, download=False)
    assert len(data.load("svhn", split="full", data_dir=tmp_path, download=False).train) == 300
    # a cut-off .mat file names itself and the fix
    mat = tmp_path / "svhn" / "test_32x32.mat"
    mat.write_bytes(mat.read_bytes()[:2000])
    with pytest.raises(ValueError, match=r"test_32x32.mat is damaged .*download it again"):
        data.load("svhn", split="full", data_dir=tmp_path, download=False)


# ---------------------------------------------------------------- text


def test_text_corpus_sequences_and_splits(tmp_path) -> None:
    body = "abcdefghij" * 100  # 1000 characters
    p = tmp_path / "t.txt"
    p.write_text(body)
    s = data.load("text", path=str(p), seq_len=10)
    assert s.task == "sequence" and s.info["vocab"] == "abcdefghij" and s.num_classes == 10
    assert s.info["chars"] == [900, 50, 50]
    assert len(s.train) == (900 - 1) // 10 and s.input_shape == (10,)
    # y is x shifted by one character.
    assert torch.equal(s.train.y[:, :-1], s.train.x[:, 1:])
    assert torch.equal((s.train.x[0] + 1) % 10, s.train.y[0])
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin1") * 50)
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text .*iconv"):
        data.load("text", path=str(latin), seq_len=10)


def test_stdlib_corpus_is_embedded_and_deterministic() -> None:
    a = data.load("stdlib", max_chars=20000, seq_len=50)
    b = data.load("stdlib", max_chars=20000, seq_len=50)
    assert a.info["sha256_16"] == b.info["sha256_16"] and sum(a.info["chars"]) == 20000
    assert "def " in text.stdlib_text(20000)
    assert torch.equal(a.train.x, b.train.x)


def test_ptb_char_reads_standard_files(tmp_path) -> None:
    d = tmp_path / "text" / "ptb"
    d.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (d / f"ptb.char.{split}.txt").write_text("a _ c a t\nt h e _ d o g\n" * 30)
    s = data.load("ptb_char", data_dir=tmp_path, seq_len=8, download=False)
    assert set(s.info["vocab"]) == set("\n_acdeghot")
    assert s.info["chars"][0] == len("a_cat\nthe_dog\n") * 30


# ---------------------------------------------------------------- preprocessing and augmentation


def _tiny() -> data.DataSplits:
    return synthetic.load(n_train=64, n_valid=16, n_test=16, shape=(3, 4, 4))


def test_bnn_and_ttq_preprocessing_formulas() -> None:
    s = data.transforms.apply_preprocessing(_tiny(), "bnn")
    raw = _tiny()
    torch.testing.assert_close(s.test.x, raw.test.x * 2 - 1)
    assert float(s.train.x.min()) >= -1 and float(s.train.x.max()) <= 1
    t = data.transforms.apply_preprocessing(_tiny(), "ttq")
    mean = (raw.train.x * 255 / 128 - 1).mean(0)
    torch.testing.assert_close(t.valid.x, raw.valid.x * 255 / 128 - 1 - mean)
    torch.testing.assert_close(t.train.x.mean(0), torch.zeros(3, 4, 4), atol=1e-6, rtol=0)


def test_center_uses_training_statistics_only() -> None:
    raw = _tiny()
    s = data.transforms.apply_preprocessing(_tiny(), "center")
    torch.testing.assert_close(s.test.x, raw.test.x - raw.train.x.mean(0))


def test_gcn_and_zca() -> None:
    x = torch.rand(50, 3, 2, 2)
    g = data.transforms.gcn(x)
    flat = g.reshape(50, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(50), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.norm(dim=1), torch.full((50,), 55.0), rtol=1e-5, atol=0)
    z = torch.randn(2000, 6) @ torch.randn(6, 6)
    mean, w = data.transforms.zca_fit(z, filter_bias=0.0)
    white = (z - mean) @ w
    cov = white.T @ white / z.shape[0]
    torch.testing.assert_close(cov, torch.eye(6), atol=2e-3, rtol=0)
    torch.testing.assert_close(w, w.T)  # ZCA (not PCA) whitening is symmetric


def test_gcn_zca_preprocessing_runs_on_splits() -> None:
    s = data.transforms.apply_preprocessing(_tiny(), "gcn_zca")
    assert s.info["preprocess"] == "gcn_zca" and s.test.x.shape == (16, 3, 4, 4)
    assert torch.isfinite(s.test.x).all()


def test_pad_crop_flip_matches_a_per_image_reference() -> None:
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).reshape(2, 1, 5, 5)
    g = torch.Generator().manual_seed(7)
    out = data.transforms.pad_crop_flip(x, g, pad=2)
    g = torch.Generator().manual_seed(7)
    oy = torch.randint(0, 5, (2,), generator=g)
    ox = torch.randint(0, 5, (2,), generator=g)
    flip = torch.rand(2, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        ref = padded[i, :, oy[i] : oy[i] + 5, ox[i] : ox[i] + 5]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)


# ---------------------------------------------------------------- batches


def test_batches_cover_each_sample_once_and_replay_with_the_generator() -> None:
    ds = data.ArrayDataset(torch.arange(23).float()[:, None], torch.arange(23))
    g = torch.Generator().manual_seed(1)
    seen = torch.cat([y for _, y in ds.batches(5, shuffle=True, generator=g)])
    assert sorted(seen.tolist()) == list(range(23)) and seen.tolist() != list(range(23))
    g2 = torch.Generator().manual_seed(1)
    again = torch.cat([y for _, y in ds.batches(5, shuffle=True, generator=g2)])
    assert torch.equal(seen, again)
    assert [len(y) for _, y in ds.batches(5)] == [5, 5, 5, 5, 3]
    assert ds.num_batches(5, drop_last=True) == 4


def test_distributed_shares_partition_each_global_batch() -> None:
    ds = data.ArrayDataset(torch.zeros(22, 1), torch.arange(22))
    full = [y for _, y in ds.batches(8, shuffle=True, generator=torch.Generator().manual_seed(3))]
    shares = [
        [
            y
            for _, y in ds.batches(
                8, shuffle=True, generator=torch.Generator().manual_seed(3), rank=r, world_size=2
            )
        ]
        for r in (0, 1)
    ]
    assert len(shares[0]) == len(shares[1]) == len(full)
    for k, batch in enumerate(full):
        joined = torch.cat([shares[0][k], shares[1][k]])
        # The last global batch (6 samples) splits 3 + 3; the others 4 + 4.
        assert torch.equal(joined, batch[: len(batch) // 2 * 2])
    with pytest.raises(ValueError, match="not divisible"):
        next(ds.batches(7, world_size=2))


def test_unknown_names_list_the_valid_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match="valid: mnist, cifar10"):
        data.load("coco")
    with pytest.raises(ValueError, match="valid: paper, full"):
        data.load("mnist", split="weird")
    with pytest.raises(ValueError, match="gcn_zca"):
        data.load("mnist", preprocess="nope")


def test_status_reports_embedded_and_missing(tmp_path) -> None:
    rows = {r["name"]: r for r in data.status(tmp_path)}
    assert rows["mnist"]["available"] and rows["stdlib"]["available"]
    assert (
        not rows["cifar10"]["available"] and str(tmp_path / "cifar10") in rows["cifar10"]["where"]
    )
    synthetic.write_cifar(tmp_path / "cifar10", "cifar10", n_per_batch=2)
    assert {r["name"]: r for r in data.status(tmp_path)}["cifar10"]["available"]
    # an extracted folder counts only with all its batches in it
    folder = synthetic.write_cifar(
        tmp_path / "c" / "cifar10", "cifar10", n_per_batch=2, archive=False
    )
    assert {r["name"]: r for r in data.status(tmp_path / "c")}["cifar10"]["available"]
    (folder / "test_batch").unlink()
    assert not {r["name"]: r for r in data.status(tmp_path / "c")}["cifar10"]["available"]


def test_stdlib_splits_interleave_blocks_from_across_the_library() -> None:
    files = text.stdlib_files(400_000)
    assert not any(rel.startswith(("encodings/", "pydoc_data/", "test/")) for rel, _ in files)
    corpus = "".join(t for _, t in files)
    assert len(corpus) == 400_000  # the last file is cut at max_chars
    train, valid, test = text.interleaved_splits(corpus)
    # by hand: 200 blocks of 2000 characters; blocks 9, 29, ... -> valid; 19, 39, ... -> test
    assert valid == "".join(corpus[i * 2000 : (i + 1) * 2000] for i in range(9, 200, 20))
    assert test == "".join(corpus[i * 2000 : (i + 1) * 2000] for i in range(19, 200, 20))
    assert len(train) == 360_000 and len(valid) == len(test) == 20_000
    assert corpus.startswith(train[:18_000]) and valid[:2000] == corpus[18_000:20_000]
    loaded = data.load("stdlib", max_chars=400_000, seq_len=50)
    assert loaded.info["chars"] == [360_000, 20_000, 20_000]
    contiguous = data.load("stdlib", max_chars=400_000, seq_len=50, fractions=(0.9, 0.05, 0.05))
    assert contiguous.info["chars"] == [360_000, 20_000, 20_000]
    assert not torch.equal(contiguous.test.x, loaded.test.x)


def test_unknown_or_bad_loader_options_name_the_valid_ones() -> None:
    with pytest.raises(
        ValueError, match="dataset 'mnist' takes no option 'seq_len'; valid: source"
    ):
        data.load("mnist", seq_len=100)
    with pytest.raises(ValueError, match="valid: classes, n_test, n_train, n_valid, seed, shape"):
        data.load("synthetic", seq_len=10)
    with pytest.raises(ValueError, match="seq_len must be a positive integer, got 0"):
        data.load("stdlib", seq_len=0)


def test_cifar_batches_pickled_by_python_2_or_3_both_load(tmp_path) -> None:
    # The official files come from Python 2's cPickle: their keys load as str ('data'), not bytes.
    raw = synthetic.py2_pickle({"data": np.zeros((1, 3072), np.uint8), "labels": [3]})
    assert raw[:5] == b"\x80\x02}q\x00" and b"U\x04data" in raw  # SHORT_BINSTRING key, as cPickle
    for py2 in (True, False):
        root = tmp_path / f"py2-{py2}"
        synthetic.write_cifar(root / "cifar10", "cifar10", n_per_batch=20, py2=py2)
        s = data.load("cifar10", data_dir=root, preprocess="unit", download=False)
        x0, y0 = synthetic.images(20, (3, 32, 32), seed=0)
        np.testing.assert_allclose(s.train.x[:20].numpy(), x0 / 255.0, rtol=0, atol=1e-7)
        np.testing.assert_array_equal(s.train.y[:20].numpy(), y0)


def test_damaged_cifar_files_are_named_with_the_fix(tmp_path) -> None:
    # a truncated archive (a broken download), a truncated batch, a missing batch, a bad label
    made = synthetic.write_cifar(tmp_path / "a" / "cifar10", "cifar10", n_per_batch=10)
    made.write_bytes(made.read_bytes()[: made.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz is damaged .*download it again"):
        data.load("cifar10", data_dir=tmp_path / "a", download=False)
    folder = synthetic.write_cifar(
        tmp_path / "b" / "cifar10", "cifar10", n_per_batch=10, archive=False
    )
    batch = folder / "data_batch_2"
    good = batch.read_bytes()
    batch.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"data_batch_2 is damaged .*extract it again"):
        data.load("cifar10", data_dir=tmp_path / "b", download=False)
    batch.unlink()
    with pytest.raises(ValueError, match=r"data_batch_2 is missing: extract"):
        data.load("cifar10", data_dir=tmp_path / "b", download=False)
    batch.write_bytes(synthetic.py2_pickle({"data": np.zeros((1, 3072), np.uint8), "labels": [57]}))
    with pytest.raises(ValueError, match=r"data_batch_2 has labels outside 0..9 \(min 57"):
        data.load("cifar10", data_dir=tmp_path / "b", download=False)
