"""Small file idioms every stage shares: atomic writes, JSON-safe values, 8-bit images.

An output is written under a temporary sibling name and renamed into place, so an interrupted
write never leaves a truncated file under the final name (DESIGN.md §2). The temporary name starts
with a dot and ends in ``.partial`` (``.000001.png.partial``), so it never matches what a reader
looks for; writers that choose the format from the suffix (FFmpeg, ``np.savez``) get
``keep_suffix=True`` (``.clip.partial.mp4``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_path", "atomic_write", "differences", "differing_keys", "json_safe", "save_npz", "save_png", "temporary_name", "to_uint8",
           "write_json", "write_text"]


def temporary_name(path: Path, keep_suffix: bool = False) -> Path:
    """The sibling ``path`` is written under before it is renamed into place."""
    if keep_suffix:
        return path.with_name(f".{path.stem}.partial{path.suffix}")
    return path.with_name(f".{path.name}.partial")


@contextmanager
def atomic_path(path: str | Path, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it replaces ``path``, on failure it is removed.

    The parent folder must exist. A directory at ``path`` is never replaced (``os.replace`` refuses).
    """
    path = Path(path)
    tmp = temporary_name(path, keep_suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], Any], keep_suffix: bool = False) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place; returns ``path``."""
    path = Path(path)
    with atomic_path(path, keep_suffix) as tmp:
        write(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 text atomically; the parent folder is created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """Write ``json_safe(data)`` atomically (non-finite floats become null); the parent folder is created."""
    return write_text(path, json.dumps(json_safe(data), indent=indent, allow_nan=False) + "\n")


def save_npz(path: str | Path, compressed: bool = True, **arrays: np.ndarray) -> Path:
    """Write arrays to an ``.npz`` atomically (``np.savez_compressed`` unless ``compressed`` is False)."""
    save = np.savez_compressed if compressed else np.savez
    return atomic_write(path, lambda tmp: save(tmp, **arrays), keep_suffix=True)


def save_png(image: np.ndarray, path: str | Path, compress_level: int = 6) -> Path:
    """Write an (H, W[, C]) uint8 image as a PNG atomically (zlib ``compress_level``: 1 fast, 9 small)."""
    from PIL import Image

    return atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG",
                                                                      compress_level=compress_level))


def to_uint8(images: Any) -> np.ndarray:
    """Float images in [0, 1] (numpy array or torch tensor, any layout) → uint8, clamped and rounded half up.

    The one conversion every renderer and generator output goes through, so that a frame rendered in
    memory and the same frame read back from its PNG are equal.
    """
    if hasattr(images, "detach"):  # a torch tensor: convert where it is, then copy the bytes
        import torch

        # In place on the clamped copy: the same arithmetic, two fewer full-size temporaries (a large share of the
        # time of converting a batch of 512² maps).
        scaled = images.detach().clamp(0, 1)
        if not scaled.is_floating_point():
            scaled = scaled.float()
        return scaled.mul_(255).add_(0.5).to(torch.uint8).cpu().numpy()
    return (np.clip(np.asarray(images, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)


def json_safe(value: Any) -> Any:
    """JSON-safe copy: tuples → lists, mappings → dicts, Path → str, numpy scalars and arrays → Python
    values, non-finite floats → null, private (``_``-prefixed) keys (diffusers' config internals) dropped."""
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def differing_keys(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the entries two JSON records (fingerprints of what a result is made from) disagree on;
    nested mappings are followed."""
    keys = list(a) + [k for k in b if k not in a]
    out = []
    for key in keys:
        x, y = a.get(key), b.get(key)
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            out += differing_keys(x, y, f"{prefix}{key}.")
        elif x != y or (key in a) != (key in b):
            out.append(f"{prefix}{key}")
    return out


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> str:
    """:func:`differing_keys` as the words of an error message: ``"seed, prior differ"``."""
    differ = differing_keys(a, b)
    shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
    return f"{shown} differ{'s' if len(differ) == 1 else ''}"
