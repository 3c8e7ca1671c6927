"""Where dataset files live, how they are downloaded and verified, and a safe unpickler.

Every loader asks :func:`require` for the files it needs. ``require`` returns the local path when the
file is in the data directory; otherwise it downloads it (when allowed) into a temporary file, checks
the published checksum and renames it into place. When the file is missing and cannot be downloaded
it raises :class:`DataNotFoundError` whose message is one line naming the file and where to put it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import pickle
import tempfile
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DataNotFoundError",
    "RemoteFile",
    "checksum",
    "default_data_dir",
    "download",
    "require",
    "safe_pickle_load",
    "set_opener",
]

#: ``urlopen``-compatible callable used for downloads; tests replace it with :func:`set_opener`.
_opener: Callable[..., Any] = urllib.request.urlopen


class DataNotFoundError(FileNotFoundError):
    """A dataset file is missing and could not be downloaded. ``str(err)`` is one line."""


@dataclass(frozen=True)
class RemoteFile:
    """A file a loader needs: its name, where to download it, and its published checksum.

    ``algo`` is the hash the publisher gives (``md5`` for MNIST/CIFAR/SVHN, ``sha256`` otherwise);
    ``digest=None`` means no checksum is published: the first download is trusted and its sha256
    is written next to it (``<name>.sha256``) as a record. Checksums are verified when a file is
    downloaded; a file already in place is read as it is (a damaged one fails at decoding, with
    its name: delete it and the next load downloads it again).
    """

    name: str
    urls: tuple[str, ...]
    digest: str | None = None
    algo: str = "md5"


def default_data_dir() -> Path:
    """``$LOWBIT_DATA_DIR`` if set, else ``~/.cache/lowbit``."""
    env = os.environ.get("LOWBIT_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lowbit"


def set_opener(opener: Callable[..., Any] | None) -> Callable[..., Any]:
    """Replace the URL opener (``urllib.request.urlopen`` by default); returns the previous one."""
    global _opener
    previous = _opener
    _opener = opener if opener is not None else urllib.request.urlopen
    return previous


def checksum(path: str | os.PathLike[str], algo: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _offline_allowed() -> bool:
    return os.environ.get("LOWBIT_OFFLINE", "").lower() not in ("1", "true", "yes")


def download(remote: RemoteFile, dest: Path, timeout: float = 60.0) -> Path:
    """Download ``remote`` to ``dest`` (temp file, verify, fsync, rename). Raises OSError on failure.

    A checksum mismatch raises ``OSError`` and leaves nothing at ``dest``.
    """
    created = []  # the folders made here, deepest first: removed again if every mirror fails
    d = dest.parent
    while not d.exists():
        created.append(d)
        d = d.parent
    dest.parent.mkdir(parents=True, exist_ok=True)
    errors: list[str] = []
    for url in remote.urls:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            h = hashlib.new(remote.algo if remote.digest else "sha256")
            with os.fdopen(fd, "wb") as out, _opener(url, timeout=timeout) as resp:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    h.update(chunk)
                out.flush()
                os.fsync(out.fileno())
            got = h.hexdigest()
            if remote.digest and got != remote.digest:
                raise OSError(
                    f"checksum mismatch for {url}: {remote.algo} {got}, expected {remote.digest}"
                )
            os.replace(tmp, dest)
            if not remote.digest:
                dest.with_name(dest.name + ".sha256").write_text(got + "\n")
            return dest
        except Exception as exc:  # try the next mirror, report all failures together
            errors.append(f"{url}: {exc}")
            if os.path.exists(tmp):
                os.unlink(tmp)
    for folder in created:
        try:
            folder.rmdir()  # only if still empty
        except OSError:
            break
    raise OSError("; ".join(errors))


def _verify_local(path: Path, remote: RemoteFile) -> None:
    if remote.digest:
        got = checksum(path, remote.algo)
        if got != remote.digest:
            raise OSError(
                f"{path} is corrupt: {remote.algo} {got}, expected {remote.digest}; delete it and retry"
            )
        return
    side = path.with_name(path.name + ".sha256")
    if side.exists():
        want = side.read_text().strip()
        got = checksum(path, "sha256")
        if got != want:
            raise OSError(
                f"{path} is corrupt: sha256 {got}, expected {want} (from {side.name}); delete it and retry"
            )


def require(
    remote: RemoteFile,
    directory: Path,
    what: str,
    download_ok: bool = True,
    verify: bool = False,
    hint: str = "",
) -> Path:
    """Return ``directory / remote.name``, downloading it when missing and allowed.

    ``verify=True`` re-checks the checksum of a file already present (large files: off by default;
    downloads are always verified). ``what`` names the dataset in the error message.
    """
    path = directory / remote.name
    if path.exists():
        if verify:
            _verify_local(path, remote)
        return path
    reason = "offline (LOWBIT_OFFLINE is set)"
    if download_ok and _offline_allowed():
        try:
            return download(remote, path)
        except OSError as exc:
            reason = f"download failed: {exc}"
    elif not download_ok:
        reason = "download disabled"
    url = remote.urls[0] if remote.urls else "its publisher"
    extra = f" ({hint})" if hint else ""
    raise DataNotFoundError(
        f"{what} not found: put {remote.name} (from {url}) in {directory}/{extra} — {reason}"
    )


# Only these globals may appear in the dataset pickles we read (MNIST pkl.gz, CIFAR batches):
# NumPy array reconstruction and nothing else, so a tampered file cannot run code.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("copy_reg", "_reconstructor"),
    ("copyreg", "_reconstructor"),
    ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
    ("__builtin__", "object"),
    ("builtins", "object"),
}


_NUMPY2 = importlib.util.find_spec("numpy._core") is not None


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name}: dataset pickles may only hold arrays"
            )
        if module.startswith("numpy.core") and _NUMPY2:
            module = module.replace("numpy.core", "numpy._core", 1)
        elif module == "copy_reg":
            module = "copyreg"
        elif module == "__builtin__":
            module = "builtins"
        return super().find_class(module, name)


def safe_pickle_load(f: IO[bytes] | Any, encoding: str = "latin1") -> Any:
    """Unpickle a dataset file allowing only NumPy arrays, lists, dicts, tuples, numbers, bytes, str."""
    if isinstance(f, bytes):
        f = io.BytesIO(f)
    return _SafeUnpickler(f, encoding=encoding).load()


def first_existing(paths: Sequence[Path]) -> Path | None:
    """The first path in ``paths`` that exists, else None."""
    for p in paths:
        if p.exists():
            return p
    return None
