"""Training checkpoints: atomic writes, integrity checks, ``weights_only`` loading.

A run directory keeps ``checkpoints/epoch-NNNN.pt`` files and ``checkpoints/manifest.json``, which
names the latest good checkpoint (``last``) and the best-validation weights (``best``) with their
sha256. Writing goes: temp file -> fsync -> rename -> fsync dir, then the manifest the same way.
A crash at any point leaves the manifest pointing at a complete, verified file (the previous
one is deleted only after the manifest has moved on). Loading checks the sha256 against the
manifest and loads with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "atomic_write_bytes",
    "latest",
    "load_checkpoint",
    "read_manifest",
    "save_checkpoint",
]

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated or corrupt; it is refused rather than half-loaded."""


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The checkpoint manifest of ``directory`` (a run's ``checkpoints/``), ``{}`` if none."""
    p = Path(directory) / MANIFEST
    if not p.exists():
        return {}
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{p} is corrupt ({exc}); the checkpoints next to it cannot be trusted"
        ) from exc


def save_checkpoint(
    directory: str | os.PathLike[str],
    state: dict[str, Any],
    epoch: int,
    kind: str = "last",
    keep: int = 2,
) -> Path:
    """Save ``state`` (tensors and plain containers) as ``epoch-NNNN.pt`` (or ``best-NNNN.pt`` for
    ``kind="best"``) and point the manifest's ``kind`` entry at it. Older ``last`` checkpoints
    beyond ``keep`` are removed after the manifest is updated. Returns the file path."""
    directory = Path(directory)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    # A new name per epoch: the file the manifest points at is never overwritten in place.
    name = f"epoch-{epoch:04d}.pt" if kind == "last" else f"{kind}-{epoch:04d}.pt"
    path = directory / name
    atomic_write_bytes(path, data)
    manifest = read_manifest(directory)
    previous = manifest.get(kind)
    history = (
        [h for h in manifest.get("history", []) if h != name]
        if kind == "last"
        else manifest.get("history", [])
    )
    if kind == "last":
        history.append(name)
    manifest[kind] = {
        "file": name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "epoch": epoch,
        "bytes": len(data),
    }
    manifest["history"] = history
    atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
    # Only now is it safe to delete what the manifest no longer references.
    referenced = {e["file"] for k, e in manifest.items() if k != "history" and isinstance(e, dict)}
    if kind == "last":
        for old in history[:-keep]:
            if old not in referenced and (directory / old).exists():
                (directory / old).unlink()
        manifest["history"] = history[-keep:]
        atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=2).encode())
    elif (
        previous
        and previous["file"] != name
        and previous["file"] not in referenced
        and (directory / previous["file"]).exists()
    ):
        (directory / previous["file"]).unlink()
    return path


def latest(directory: str | os.PathLike[str], kind: str = "last") -> Path | None:
    """Path of the manifest's ``kind`` checkpoint in ``directory``, or None when there is none."""
    entry = read_manifest(directory).get(kind)
    return Path(directory) / entry["file"] if entry else None


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint file with ``torch.load(weights_only=True)`` after checking its sha256
    against the manifest next to it (when there is one). Truncated or corrupt files raise
    :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    data = path.read_bytes()
    manifest = read_manifest(path.parent)
    for key, entry in manifest.items():
        if isinstance(entry, dict) and entry.get("file") == path.name:
            if len(data) != entry["bytes"]:
                raise CheckpointError(
                    f"checkpoint {path} is truncated: {len(data)} bytes, the manifest says {entry['bytes']}"
                )
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise CheckpointError(
                    f"checkpoint {path} is corrupt: its sha256 differs from the manifest ({key})"
                )
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated and was refused: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict")
    return state
