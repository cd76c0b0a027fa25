"""What a result is made from: content identities of inputs, so that a resumed stage never mixes runs.

A stage that can resume (``--resume``) records a *fingerprint* of its settings and inputs when it starts
(:class:`liftavatar.capture.CaptureWriter` keeps it in its staging directory) and refuses to continue work
that was started from other ones. The identities here are small JSON values that change when the content
does; they are computed from the files' bytes, so a copied or moved input that holds the same content keeps
its identity, and hashing stays cheap: the shipped 42 MB prior hashes in about 0.1 s, and a file over
:data:`WHOLE_FILE_LIMIT` is identified by its size and its first and last MiB (a video of several GB in
milliseconds; an edit that keeps the size and both ends intact is not a case resuming needs to survive).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["WHOLE_FILE_LIMIT", "capture_identity", "file_digest", "input_identity", "tree_digest"]

MIB = 1 << 20
WHOLE_FILE_LIMIT = 256 * MIB
"""Files up to this size (bytes) are hashed whole; larger ones by size, first and last MiB."""


def file_digest(path: str | Path) -> str:
    """sha256 (hex) of a file's bytes; of its size and first and last MiB when it is over :data:`WHOLE_FILE_LIMIT`."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        if size <= WHOLE_FILE_LIMIT:
            return hashlib.file_digest(f, "sha256").hexdigest()
        digest = hashlib.sha256(f"{size}:".encode())
        digest.update(f.read(MIB))
        f.seek(size - MIB)
        digest.update(f.read(MIB))
        return digest.hexdigest()


def _digest_of(named: Iterable[tuple[str, Path]]) -> str:
    digest = hashlib.sha256()
    for name, path in named:
        digest.update(f"{name}\0{file_digest(path)}\0".encode())
    return digest.hexdigest()


def tree_digest(path: str | Path, patterns: tuple[str, ...] = ("*.json", "*.safetensors")) -> str:
    """One sha256 over a file, or over the files of a folder (and its subfolders) matching ``patterns``, by
    their relative names: a prior directory (``config.json`` and its weights) or a diffusers checkpoint."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    files = sorted({p for pattern in patterns for p in path.rglob(pattern) if p.is_file()})
    return _digest_of((p.relative_to(path).as_posix(), p) for p in files)


def capture_identity(path: str | Path) -> str:
    """sha256 over a Capture's ``capture.json`` and ``kinematics.npz``: its metadata (size, camera, reference
    frames) and every frame's kinematics (its images are not read)."""
    from liftavatar.capture import KINEMATICS_FILE, META_FILE

    path = Path(path)
    return _digest_of((name, path / name) for name in (META_FILE, KINEMATICS_FILE))


def input_identity(path: str | Path, suffixes: tuple[str, ...] | None = None) -> dict[str, Any]:
    """A tracker input's identity: for a file its resolved path, size in bytes and :func:`file_digest`; for a
    folder its resolved path and the sorted names and sizes of its files (of ``suffixes``, when given)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and (suffixes is None or p.suffix.lower() in suffixes))
        return {"path": str(path.resolve()), "files": [[p.name, p.stat().st_size] for p in files]}
    return {"path": str(path.resolve()), "bytes": path.stat().st_size, "sha256": file_digest(path)}
