"""The Capture: the on-disk directory every stage reads and writes (DESIGN.md section 3).

Layout::

    capture/
      capture.json        metadata (:class:`CaptureMeta`)
      frames/000000.png   RGB uint8, H×W
      masks/000000.png    foreground alpha, 8-bit grayscale (mode L), H×W
      shading/000000.png  rendered shading map of the tracked mesh, RGB, H×W
      kinematics.npz      per-frame kinematics and the subject's identity (:class:`Kinematics`)

Conventions: the camera is OpenCV's (x right, y down, z forward), translations are in metres,
rotations are axis-angle in radians, and pixel coordinates put the top-left corner of the image at
(0, 0), so the centre of the top-left pixel is (0.5, 0.5).

Loading validates everything and names the first problem with its file. Writing goes through
:class:`CaptureWriter`, which builds the capture in a sibling ``<out>.partial/`` directory, writes
``capture.json`` last and moves the directory into place, so no half-written capture validates.
"""

from __future__ import annotations

import json
import math
import operator
import os
import shutil
import struct
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from liftavatar.errors import CaptureError
from liftavatar.io import atomic_path, differences, save_png, write_json

__all__ = [
    "SCHEMA_VERSION",
    "PROVENANCE_OBSERVED",
    "PROVENANCE_LIFTED",
    "PROVENANCE_SYNTHETIC",
    "Kinematics",
    "CaptureMeta",
    "Capture",
    "CaptureWriter",
    "check_capture_target",
    "validate_capture",
    "write_capture",
]

SCHEMA_VERSION = 1

PROVENANCE_OBSERVED = 0
PROVENANCE_LIFTED = 1
PROVENANCE_SYNTHETIC = 2
_PROVENANCES = (PROVENANCE_OBSERVED, PROVENANCE_LIFTED, PROVENANCE_SYNTHETIC)

META_FILE = "capture.json"
KINEMATICS_FILE = "kinematics.npz"
# Image folder -> PIL mode of its PNGs.
IMAGE_DIRS: dict[str, str] = {"frames": "RGB", "masks": "L", "shading": "RGB"}

_RERUN = "re-run the stage that wrote this capture"
# Marks a staging directory as a CaptureWriter's own, so that clearing it can never delete a
# user's folder that merely happens to be called <out>.partial.
_STAGING_MARKER = ".liftavatar-partial"
# Slack on the axis-angle norm so that an angle of exactly pi survives float32 rounding.
_ANGLE_TOLERANCE = 1e-3
_BOUNDS_TOLERANCE = 1e-4


def _error(where: Path | str, problem: str, fix: str = _RERUN) -> CaptureError:
    return CaptureError(f"{where}: {problem}; {fix}.")


# zlib level 1: about 3x faster than Pillow's default (6) for ~10% larger files; frame writing
# is a large share of `track` and `synth` time.
PNG_COMPRESS_LEVEL = 1


def _write_png(path: Path, image: np.ndarray) -> None:
    save_png(image, path, compress_level=PNG_COMPRESS_LEVEL)


def _frame_name(index: int) -> str:
    return f"{index:06d}.png"


# --------------------------------------------------------------------------------------------
# Kinematics


# Array name -> (dtype, shape pattern). "N" is the frame count, "E" the expression count; other
# letters are free sizes.
_ARRAY_SPECS: dict[str, tuple[type[np.generic], tuple[str | int, ...]]] = {
    "expression": (np.float32, ("N", "E")),
    "rotation": (np.float32, ("N", 3)),
    "translation": (np.float32, ("N", 3)),
    "valid": (np.bool_, ("N",)),
    "provenance": (np.uint8, ("N",)),
    "identity": (np.float32, ("I",)),
    "landmarks2d": (np.float32, ("N", "L", 2)),
}
_OPTIONAL_ARRAYS = frozenset({"landmarks2d"})
_PER_FRAME_ARRAYS = tuple(name for name, (_, shape) in _ARRAY_SPECS.items() if shape[0] == "N")


@dataclass(eq=False)
class Kinematics:
    """Per-frame face kinematics of one subject, as stored in ``kinematics.npz``.

    Attributes:
        expression: (N, E) float32 expression coefficients of the rig (unitless, bounded by the
            rig), in the order of ``CaptureMeta.expression_names``.
        rotation: (N, 3) float32 head rotation, axis-angle in radians (angle ≤ π), mapping head
            (rig) coordinates to the OpenCV camera frame: ``x_cam = R(rotation) @ x_head + t``.
        translation: (N, 3) float32 head translation ``t`` in metres, OpenCV camera frame
            (x right, y down, z forward).
        valid: (N,) bool; False where tracking failed and the frame's kinematics mean nothing.
        provenance: (N,) uint8, one of ``PROVENANCE_OBSERVED`` (0), ``PROVENANCE_LIFTED`` (1),
            ``PROVENANCE_SYNTHETIC`` (2, synthetic ground truth).
        identity: (I,) float32 identity coefficients of the rig (unitless), one per subject.
        landmarks2d: optional (N, L, 2) float32 image landmarks in pixels, (x, y) with x right,
            y down and the image's top-left corner at (0, 0).
    """

    expression: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    valid: np.ndarray
    provenance: np.ndarray
    identity: np.ndarray
    landmarks2d: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.expression.shape[0])

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays by their ``kinematics.npz`` names (``landmarks2d`` only when present)."""
        return {
            name: getattr(self, name)
            for name in _ARRAY_SPECS
            if getattr(self, name) is not None
        }

    def validate(
        self,
        num_expressions: int | None = None,
        expression_bounds: tuple[float, float] | None = None,
        *,
        source: Path | str = "kinematics",
    ) -> None:
        """Check dtypes, shapes, finiteness and ranges; errors name ``source``.

        Args:
            num_expressions: the expected E, when known (``len(meta.expression_names)``).
            expression_bounds: (low, high) bounds of the rig's expression coefficients; values
                may exceed them by 1e-4 to allow for rounding.
            source: what the error messages name (the ``kinematics.npz`` path when loading).
        """
        arrays = self.arrays()
        for name, (dtype, pattern) in _ARRAY_SPECS.items():
            array = arrays.get(name)
            if array is None:
                if name not in _OPTIONAL_ARRAYS:
                    raise _error(source, f"array '{name}' is missing")
                continue
            if not isinstance(array, np.ndarray):
                raise _error(source, f"'{name}' is a {type(array).__name__}, not a numpy array")
            if array.dtype != dtype:
                raise _error(
                    source, f"'{name}' has dtype {array.dtype}, expected {np.dtype(dtype)}"
                )
            if array.ndim != len(pattern):
                raise _error(
                    source,
                    f"'{name}' has shape {array.shape}, expected {len(pattern)} dimensions "
                    f"{_format_pattern(pattern, {})}",
                )

        sizes = {"N": len(self)}
        if num_expressions is not None:
            sizes["E"] = num_expressions
        for name, array in arrays.items():
            pattern = _ARRAY_SPECS[name][1]
            expected = [sizes.get(dim, dim) if isinstance(dim, str) else dim for dim in pattern]
            if any(not isinstance(e, str) and e != s for e, s in zip(expected, array.shape)):
                raise _error(
                    source,
                    f"'{name}' has shape {array.shape}, expected {_format_pattern(pattern, sizes)}"
                    f" (N = frames, E = expressions)",
                )

        for name, array in arrays.items():
            if array.dtype == np.float32 and not np.isfinite(array).all():
                where = tuple(int(i) for i in np.argwhere(~np.isfinite(array))[0])
                raise _error(source, f"'{name}' contains NaN or inf at index {where}")

        bad = np.flatnonzero(~np.isin(self.provenance, _PROVENANCES))
        if bad.size:
            i = int(bad[0])
            raise _error(
                source,
                f"provenance[{i}] is {self.provenance[i]}, expected 0 (observed), 1 (lifted) "
                f"or 2 (synthetic)",
            )

        angles = np.linalg.norm(self.rotation.astype(np.float64), axis=1)
        bad = np.flatnonzero(angles > math.pi + _ANGLE_TOLERANCE)
        if bad.size:
            i = int(bad[0])
            raise _error(
                source,
                f"rotation[{i}] has an axis-angle norm of {angles[i]:.4f} rad, more than π "
                f"(store the equivalent rotation with angle ≤ π)",
            )

        if expression_bounds is not None:
            low, high = expression_bounds
            outside = (self.expression < low - _BOUNDS_TOLERANCE) | (
                self.expression > high + _BOUNDS_TOLERANCE
            )
            if outside.any():
                i, j = (int(k) for k in np.argwhere(outside)[0])
                raise _error(
                    source,
                    f"expression[{i}, {j}] is {self.expression[i, j]:.4g}, outside the rig's "
                    f"bounds [{low}, {high}]",
                )

    def select(self, indices: Sequence[int] | np.ndarray) -> Kinematics:
        """The frames at ``indices`` (integer frame indices, in that order); identity is kept."""
        idx = np.asarray(indices, dtype=np.intp)
        return self._map_frames(lambda name, array: array[idx])

    def concatenate(self, other: Kinematics) -> Kinematics:
        """This sequence followed by ``other``; both must be of the same subject and layout."""
        if not np.array_equal(self.identity, other.identity):
            raise CaptureError(
                "Kinematics.concatenate: the two sequences have different identity vectors "
                "(different subjects); concatenate kinematics of one subject only."
            )
        if self.expression.shape[1:] != other.expression.shape[1:]:
            raise CaptureError(
                f"Kinematics.concatenate: expression sizes differ ({self.expression.shape[1]} vs "
                f"{other.expression.shape[1]}); concatenate kinematics of the same rig only."
            )
        mine, theirs = self.landmarks2d, other.landmarks2d
        if (mine is None) != (theirs is None) or (
            mine is not None and mine.shape[1:] != theirs.shape[1:]
        ):
            raise CaptureError(
                "Kinematics.concatenate: one sequence has landmarks2d the other lacks or has in "
                "another shape; drop or recompute the landmarks so that both match."
            )
        others = other.arrays()
        return self._map_frames(lambda name, array: np.concatenate([array, others[name]]))

    def _map_frames(self, fn: Callable[[str, np.ndarray], np.ndarray]) -> Kinematics:
        """Apply ``fn(name, array)`` to every per-frame array; the identity is copied unchanged."""
        mapped = {
            name: fn(name, array)
            for name, array in self.arrays().items()
            if name in _PER_FRAME_ARRAYS
        }
        return Kinematics(**mapped, identity=self.identity.copy())

    def save_npz(self, path: Path | str) -> None:
        """Validate, then write the arrays to ``path`` (uncompressed .npz) atomically."""
        path = Path(path)
        self.validate(source=path)
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            np.savez(f, **self.arrays())

    @classmethod
    def load_npz(cls, path: Path | str) -> Kinematics:
        """Read and validate ``path``; a corrupt archive, missing array or wrong dtype raises
        :class:`CaptureError` naming the file."""
        path = Path(path)
        try:
            # Opened here, not by np.load, which leaks its handle when the archive is corrupt.
            with path.open("rb") as f:
                npz = np.load(f, allow_pickle=False)
                if not isinstance(npz, np.lib.npyio.NpzFile):
                    raise _error(path, "holds a single .npy array, not an .npz archive")
                with npz:
                    arrays = {name: npz[name] for name in npz.files}
        except FileNotFoundError:
            raise _error(path, "missing") from None
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
            raise _error(path, f"cannot be read as an .npz archive ({exc})") from None
        unknown = sorted(set(arrays) - set(_ARRAY_SPECS))
        if unknown:
            raise _error(path, f"holds unknown array '{unknown[0]}'")
        missing = [
            name for name in _ARRAY_SPECS if name not in arrays and name not in _OPTIONAL_ARRAYS
        ]
        if missing:
            raise _error(path, f"array '{missing[0]}' is missing")
        kinematics = cls(**arrays)
        kinematics.validate(source=path)
        return kinematics


def _format_pattern(pattern: tuple[str | int, ...], sizes: Mapping[str, int]) -> str:
    dims = [str(sizes.get(dim, dim)) if isinstance(dim, str) else str(dim) for dim in pattern]
    return f"({', '.join(dims)}{',' if len(dims) == 1 else ''})"


# --------------------------------------------------------------------------------------------
# Metadata


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class CaptureMeta:
    """The contents of ``capture.json``.

    Attributes:
        subject: name of the filmed (or synthetic) person.
        fps: frame rate of the frame sequence, frames per second (> 0).
        size: (H, W) of every image, in pixels.
        intrinsics: (fx, fy, cx, cy) of the OpenCV pinhole camera, in pixels, for images of
            ``size``; the image's top-left corner is (0, 0), so a centred principal point is
            (W / 2, H / 2).
        rig: ``{"name": str, "version": str | int}`` of the face rig the kinematics refer to.
        expression_names: the E expression coefficient names, unique, in ``Kinematics.expression``
            column order.
        creator: ``{"verb": str, "version": str, "config": dict}``: the stage that wrote the
            capture, the liftavatar version and the stage's configuration.
        num_frames: N, the number of frames.
        reference_indices: the K reference frames (unique valid frame indices), or None until
            chosen.
        schema_version: the layout version; this code reads :data:`SCHEMA_VERSION` only.
    """

    subject: str
    fps: float
    size: tuple[int, int]
    intrinsics: tuple[float, float, float, float]
    rig: dict[str, Any]
    expression_names: list[str]
    creator: dict[str, Any]
    num_frames: int = 0
    reference_indices: list[int] | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, keys in the documented order (numpy scalars become Python ones)."""
        return {
            "schema_version": operator.index(self.schema_version),
            "subject": self.subject,
            "fps": float(self.fps),
            "size": [operator.index(v) for v in self.size],
            "intrinsics": [float(v) for v in self.intrinsics],
            "rig": dict(self.rig),
            "expression_names": list(self.expression_names),
            "num_frames": operator.index(self.num_frames),
            "reference_indices": (
                None
                if self.reference_indices is None
                else [operator.index(i) for i in self.reference_indices]
            ),
            "creator": dict(self.creator),
        }

    @classmethod
    def from_json(cls, data: Any, source_path: Path | str) -> CaptureMeta:
        """Parse and check a decoded ``capture.json``; errors name ``source_path``."""
        src = source_path

        def bad(key: str, expected: str) -> CaptureError:
            return _error(src, f"'{key}' must be {expected}, got {data[key]!r}")

        if not isinstance(data, dict):
            raise _error(src, "must hold a JSON object")
        if "schema_version" not in data:
            raise _error(src, "key 'schema_version' is missing")
        if data["schema_version"] != SCHEMA_VERSION or not _is_int(data["schema_version"]):
            raise _error(
                src,
                f"schema_version {data['schema_version']!r} is not supported (this liftavatar "
                f"reads schema_version {SCHEMA_VERSION})",
                "use the liftavatar version that wrote it, or re-create the capture",
            )
        keys = {f.name for f in fields(cls)}
        missing = [key for key in keys if key not in data]
        if missing:
            raise _error(src, f"key '{sorted(missing)[0]}' is missing")
        unknown = sorted(set(data) - keys)
        if unknown:
            raise _error(src, f"key '{unknown[0]}' is not part of schema_version {SCHEMA_VERSION}")

        if not isinstance(data["subject"], str):
            raise bad("subject", "a string")
        if not _is_number(data["fps"]) or data["fps"] <= 0:
            raise bad("fps", "a positive number")
        size = data["size"]
        if not (
            isinstance(size, list) and len(size) == 2 and all(_is_int(v) and v > 0 for v in size)
        ):
            raise bad("size", "[H, W], two positive integers")
        intrinsics = data["intrinsics"]
        if not (
            isinstance(intrinsics, list)
            and len(intrinsics) == 4
            and all(_is_number(v) for v in intrinsics)
            and intrinsics[0] > 0
            and intrinsics[1] > 0
        ):
            raise bad("intrinsics", "[fx, fy, cx, cy], four finite numbers with fx, fy > 0")
        rig = data["rig"]
        if not (
            isinstance(rig, dict)
            and set(rig) == {"name", "version"}
            and isinstance(rig["name"], str)
            and (isinstance(rig["version"], str) or _is_int(rig["version"]))
        ):
            raise bad("rig", '{"name": string, "version": string or integer}')
        names = data["expression_names"]
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise bad("expression_names", "a list of strings")
        if len(set(names)) != len(names):
            raise bad("expression_names", "a list of unique names")
        num_frames = data["num_frames"]
        if not (_is_int(num_frames) and num_frames >= 0):
            raise bad("num_frames", "a non-negative integer")
        refs = data["reference_indices"]
        if refs is not None:
            if not (isinstance(refs, list) and all(_is_int(i) for i in refs)):
                raise bad("reference_indices", "null or a list of frame indices")
            outside = [i for i in refs if not 0 <= i < num_frames]
            if outside:
                raise _error(
                    src,
                    f"reference index {outside[0]} is out of range (num_frames={num_frames})",
                    "choose the references again (liftavatar refs)",
                )
            if len(set(refs)) != len(refs):
                raise _error(
                    src,
                    f"reference_indices {refs} repeat a frame",
                    "choose the references again (liftavatar refs)",
                )
        creator = data["creator"]
        if not (
            isinstance(creator, dict)
            and set(creator) == {"verb", "version", "config"}
            and isinstance(creator["verb"], str)
            and isinstance(creator["version"], str)
            and isinstance(creator["config"], dict)
        ):
            raise bad("creator", '{"verb": string, "version": string, "config": object}')

        return cls(
            subject=data["subject"],
            fps=float(data["fps"]),
            size=(size[0], size[1]),
            intrinsics=tuple(float(v) for v in intrinsics),
            rig=dict(rig),
            expression_names=list(names),
            creator=dict(creator),
            num_frames=num_frames,
            reference_indices=None if refs is None else list(refs),
            schema_version=data["schema_version"],
        )


def _read_meta(path: Path) -> CaptureMeta:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _error(
            path,
            "missing, so this directory is not a finished capture (a writer adds capture.json "
            "last)",
            "point at a finished capture, or re-run the stage that writes it",
        ) from None
    except IsADirectoryError:
        raise _error(path, "is a directory, not a JSON file") from None
    except UnicodeDecodeError as exc:
        raise _error(
            path,
            f"is not UTF-8 text ({exc.reason} at byte {exc.start})",
            "save it as UTF-8 (without a byte-order mark), or re-run the stage that wrote it",
        ) from None
    except OSError as exc:
        raise _error(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise _error(path, f"is not valid JSON ({exc})") from None
    return CaptureMeta.from_json(data, path)


# --------------------------------------------------------------------------------------------
# Validation


def _check_inside(root_real: Path, path: Path) -> None:
    """Raise unless ``path``, with symlinks resolved, lies inside the capture directory."""
    real = path.resolve()
    if not real.is_relative_to(root_real):
        raise _error(
            path,
            f"resolves to {real}, which escapes the capture directory {root_real}",
            "copy the file into the capture instead of linking to it",
        )


# What Pillow raises for a damaged PNG: OSError ("image file is truncated", "broken data stream"),
# SyntaxError ("broken PNG file", a chunk checksum), and the decoder's lower-level errors.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


def _damaged(path: Path, exc: BaseException) -> CaptureError:
    return _error(path, f"is damaged (truncated or corrupt: {exc})")


@contextmanager
def _open_png(path: Path, mode: str, size: tuple[int, int]) -> Iterator[Image.Image]:
    """Open ``path`` (reading only its header) and check it is a PNG of ``mode`` and ``size``."""
    try:
        image = Image.open(path)
    except FileNotFoundError:
        raise _error(path, "missing") from None
    except UnidentifiedImageError:
        raise _error(path, "is damaged or not an image (Pillow cannot identify it)") from None
    except OSError as exc:
        raise _error(path, f"cannot be read as an image ({exc.strerror or exc})") from None
    with image:
        height, width = size
        if image.format != "PNG":
            raise _error(path, f"is a {image.format} image, not a PNG")
        if image.size != (width, height):
            raise _error(
                path,
                f"is {image.height}×{image.width} (H×W), but capture.json says size "
                f"[{height}, {width}]",
            )
        if image.mode != mode:
            raise _error(path, f"has image mode {image.mode}, expected {mode}")
        yield image


def _read_png(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """The pixels of ``path`` (checked as :func:`_open_png` does); a damaged file raises CaptureError."""
    with _open_png(path, mode, size) as image:
        try:
            return np.array(image)
        except _DECODE_ERRORS as exc:
            raise _damaged(path, exc) from None


def _check_png(path: Path, mode: str, size: tuple[int, int], decode: bool) -> None:
    """Check the header of ``path``, then every chunk's CRC through IEND (``decode`` False), or
    decode its pixels (``decode`` True).

    The CRC walk reads the whole file without inflating it: it finds a truncated or bit-flipped
    PNG at about 1.5x the cost of reading headers only (900 PNGs, 300 frames at 512²: 0.06 s
    against 0.03 s; a full decode takes 2.3 s), so every load can afford it. Only a file whose chunks
    are intact but whose compressed pixels are not (a broken writer) needs the full decode.
    """
    with _open_png(path, mode, size) as image:
        try:
            if decode:
                image.load()
            else:
                image.verify()
        except _DECODE_ERRORS as exc:
            raise _damaged(path, exc) from None


def _validate(
    path: Path | str,
    expression_bounds: tuple[float, float] | None,
    check_images: bool,
    decode: bool = False,
) -> tuple[CaptureMeta, Kinematics]:
    root = Path(path)
    if not root.is_dir():
        problem = "is not a directory" if root.exists() else "no such directory"
        raise _error(root, problem, "pass the path of a capture directory")
    root_real = root.resolve()

    meta_path = root / META_FILE
    _check_inside(root_real, meta_path)
    meta = _read_meta(meta_path)

    kinematics_path = root / KINEMATICS_FILE
    _check_inside(root_real, kinematics_path)
    kinematics = Kinematics.load_npz(kinematics_path)
    if len(kinematics) != meta.num_frames:
        raise _error(
            kinematics_path,
            f"holds {len(kinematics)} frames, but capture.json says num_frames={meta.num_frames}",
        )
    kinematics.validate(len(meta.expression_names), expression_bounds, source=kinematics_path)
    for i in meta.reference_indices or ():
        if not kinematics.valid[i]:
            raise _error(
                meta_path,
                f"reference index {i} points at a frame that kinematics.npz marks invalid",
                "choose the references again among valid frames (liftavatar refs)",
            )

    expected = [_frame_name(i) for i in range(meta.num_frames)]
    for folder_name, mode in IMAGE_DIRS.items():
        folder = root / folder_name
        if not folder.is_dir():
            raise _error(folder, "missing folder")
        _check_inside(root_real, folder)
        entries = {entry.name: entry for entry in os.scandir(folder)}
        for name in expected:
            entry = entries.get(name)
            if entry is not None and entry.is_symlink():
                _check_inside(root_real, folder / name)
            if entry is None or not entry.is_file():
                raise _error(
                    folder / name, f"missing (capture.json says num_frames={meta.num_frames})"
                )
        extra = sorted(set(name for name in entries if name.endswith(".png")) - set(expected))
        if extra:
            raise _error(
                folder / extra[0],
                f"is not one of the frames capture.json lists (num_frames={meta.num_frames})",
            )
        if check_images or decode:
            for name in expected:
                _check_png(folder / name, mode, meta.size, decode)
    return meta, kinematics


def validate_capture(
    path: Path | str,
    expression_bounds: tuple[float, float] | None = None,
    check_images: bool = True,
    decode: bool = False,
) -> CaptureMeta:
    """Check a capture directory completely and return its metadata.

    Checks ``capture.json`` (UTF-8, keys, types, schema version), ``kinematics.npz`` (every
    array, its shape against num_frames and the expression names, dtype, finiteness, provenance
    codes, rotation angle ≤ π, expressions within ``expression_bounds`` ± 1e-4 when given), the
    reference indices (in range, unique, valid frames), and that ``frames/``, ``masks/`` and
    ``shading/`` hold exactly one ``{i:06d}.png`` per frame, resolving inside the directory.
    With ``check_images`` it also reads each PNG's header (size, mode) and checks the CRC of
    every chunk through the end of the file, which finds truncated and bit-flipped files; with
    ``decode`` it decompresses every image instead (about 40x slower: what ``liftavatar
    validate`` does, since it vouches for the pixels).

    Raises:
        CaptureError: one sentence naming the first problem, its file, and what to do.
    """
    return _validate(path, expression_bounds, check_images, decode)[0]


# --------------------------------------------------------------------------------------------
# Reading


@dataclass(eq=False)
class Capture:
    """A validated capture directory: its metadata and kinematics; images are read on demand.

    Build one with :meth:`load` (or :meth:`CaptureWriter.finalize`); the constructor trusts its
    arguments.
    """

    path: Path
    meta: CaptureMeta
    kinematics: Kinematics

    @classmethod
    def load(
        cls,
        path: Path | str,
        expression_bounds: tuple[float, float] | None = None,
        *,
        decode: bool = False,
    ) -> Capture:
        """Validate the capture at ``path`` (see :func:`validate_capture`; images by their chunk
        checksums, or fully decoded with ``decode``) and open it."""
        meta, kinematics = _validate(path, expression_bounds, check_images=True, decode=decode)
        return cls(Path(path), meta, kinematics)

    @property
    def num_frames(self) -> int:
        return self.meta.num_frames

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of every image, in pixels."""
        return self.meta.size

    def _read(self, folder: str, index: int) -> np.ndarray:
        if not 0 <= index < self.num_frames:
            raise IndexError(f"frame {index} is out of range for {self.num_frames} frames")
        return _read_png(self.path / folder / _frame_name(index), IMAGE_DIRS[folder], self.size)

    def _stack(self, folder: str, indices: Iterable[int] | None) -> np.ndarray:
        indices = range(self.num_frames) if indices is None else indices
        images = [self._read(folder, i) for i in indices]
        if images:
            return np.stack(images)
        channels = (3,) if IMAGE_DIRS[folder] == "RGB" else ()
        return np.empty((0, *self.size, *channels), dtype=np.uint8)

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` as (H, W, 3) uint8 RGB."""
        return self._read("frames", index)

    def mask(self, index: int) -> np.ndarray:
        """Foreground mask of frame ``index`` as (H, W) uint8, 255 = foreground."""
        return self._read("masks", index)

    def shading(self, index: int) -> np.ndarray:
        """Shading map of frame ``index`` as (H, W, 3) uint8 RGB."""
        return self._read("shading", index)

    def frames(self, indices: Iterable[int] | None = None) -> np.ndarray:
        """Frames at ``indices`` (all by default) as (n, H, W, 3) uint8."""
        return self._stack("frames", indices)

    def masks(self, indices: Iterable[int] | None = None) -> np.ndarray:
        """Masks at ``indices`` (all by default) as (n, H, W) uint8."""
        return self._stack("masks", indices)

    def shadings(self, indices: Iterable[int] | None = None) -> np.ndarray:
        """Shading maps at ``indices`` (all by default) as (n, H, W, 3) uint8."""
        return self._stack("shading", indices)

    def set_reference_indices(self, indices: Sequence[int] | None) -> None:
        """Store the reference frames (unique, valid frame indices; None clears them).

        ``capture.json`` is rewritten atomically, so a crash leaves the old or the new file.
        """
        meta_path = self.path / META_FILE
        refs = None if indices is None else [operator.index(i) for i in indices]
        meta = CaptureMeta.from_json({**self.meta.to_json(), "reference_indices": refs}, meta_path)
        for i in refs or ():
            if not self.kinematics.valid[i]:
                raise _error(
                    meta_path,
                    f"reference index {i} points at a frame that kinematics.npz marks invalid",
                    "choose references among valid frames",
                )
        write_json(meta_path, meta.to_json())
        self.meta = meta


# --------------------------------------------------------------------------------------------
# Writing


def check_capture_target(out_dir: Path | str, overwrite: bool = False) -> None:
    """Raise a :class:`CaptureError` unless a capture may be written to ``out_dir``: nothing there, an empty
    directory, or (with ``overwrite``) a capture. Anything else is never replaced. :class:`CaptureWriter` checks
    this when it starts and again before it moves the finished capture into place; a stage that does long work
    before it starts its writer checks it first."""
    out = Path(out_dir)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        return
    if out.is_symlink() or not out.is_dir() or not (out / META_FILE).is_file():
        raise _error(
            out,
            "exists and is not a capture, so it will not be replaced",
            "choose another output directory (-o)",
        )
    if not overwrite:
        raise _error(
            out,
            "a capture already exists here",
            "pass overwrite=True (--force) to replace it, or choose another output "
            "directory (-o)",
        )


class CaptureWriter:
    """Writes a capture atomically: into ``<out_dir>.partial/``, then moved into place.

    ``capture.json`` is written last, by :meth:`finalize`, so the staging directory never
    validates as a capture before it is complete. Used as a context manager, leaving the block by
    an exception keeps the staging directory (to resume) and leaves ``out_dir`` untouched.

    Args:
        out_dir: where the finished capture goes.
        meta: its metadata; :meth:`finalize` sets ``num_frames`` and, when given there,
            ``reference_indices``.
        overwrite: replace an existing capture at ``out_dir``. A directory there that is not a
            capture (no ``capture.json``) is never replaced; an empty one is.
        resume: keep the frames an interrupted writer left in the staging directory (see
            :meth:`has_frame`); otherwise the staging directory starts empty.
        workers: write PNGs on this many background threads (0: in the calling thread);
            :meth:`finalize` waits for them.
        fingerprint: what the capture is made from (settings and input identities, JSON values;
            see :mod:`liftavatar.fingerprint`), recorded in the staging directory's marker when it
            is created. Resuming a staging directory recorded with another fingerprint (or none)
            raises a :class:`CaptureError` naming the entries that differ, and keeps it as it is:
            frames made from other inputs are never mixed with new ones. None: not checked.

    Attributes:
        resumed: True when an interrupted writer's staging directory was kept (``resume``).
    """

    def __init__(
        self,
        out_dir: Path | str,
        meta: CaptureMeta,
        overwrite: bool = False,
        resume: bool = False,
        workers: int = 0,
        fingerprint: Mapping[str, Any] | None = None,
    ) -> None:
        from liftavatar.io import json_safe

        self.out_dir = Path(out_dir)
        # PNG encoding (zlib) releases the GIL, so a few threads overlap it with the caller's work.
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="png") if workers > 0 else None
        self._pending: list[Future] = []
        self.staging = self.out_dir.with_name(self.out_dir.name + ".partial")
        self.overwrite = overwrite
        # Checked now, not at finalize, so a bad meta fails before any frame is rendered.
        CaptureMeta.from_json(
            replace(meta, num_frames=0, reference_indices=None).to_json(), "CaptureWriter meta"
        )
        try:
            json.dumps(meta.creator)
        except TypeError as exc:
            raise CaptureError(
                f"CaptureWriter meta: creator.config is not JSON-serialisable ({exc}); "
                f"pass plain numbers, strings, lists and dicts."
            ) from None
        self.meta = meta
        self._check_target()
        # Compared as it reads back from JSON (tuples become lists, paths strings).
        self.fingerprint = None if fingerprint is None else json.loads(json.dumps(json_safe(dict(fingerprint))))

        self.resumed = False
        if self.staging.exists():
            if not (self.staging / _STAGING_MARKER).is_file():
                raise _error(
                    self.staging,
                    "exists but was not made by a CaptureWriter, so it is left alone",
                    "move it away or choose another output directory (-o)",
                )
            if resume:
                self._check_fingerprint()
                self.resumed = True
            else:
                shutil.rmtree(self.staging)
        if not self.resumed:
            self.staging.mkdir(parents=True)
            write_json(self.staging / _STAGING_MARKER, {"fingerprint": self.fingerprint})
        # A staging directory from a finalize that failed validation may hold capture.json.
        (self.staging / META_FILE).unlink(missing_ok=True)
        for folder in IMAGE_DIRS:
            (self.staging / folder).mkdir(exist_ok=True)

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown()

    def discard(self) -> None:
        """Give up: wait for background writes, then delete the staging directory."""
        try:
            self.flush()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
            shutil.rmtree(self.staging, ignore_errors=True)

    def flush(self) -> None:
        """Wait for background PNG writes (``workers`` > 0); re-raise the first that failed."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def _check_fingerprint(self) -> None:
        """Raise unless the staging directory was started from what this writer is given (``fingerprint``)."""
        if self.fingerprint is None:
            return
        try:
            recorded = json.loads((self.staging / _STAGING_MARKER).read_text(encoding="utf-8"))["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError):
            recorded = None  # an empty marker: staged by a version that did not record its inputs
        if recorded == self.fingerprint:
            return
        if not isinstance(recorded, dict):
            raise _error(self.staging, "was staged without a record of its inputs, so it cannot be resumed safely",
                         "run without --resume to start over")
        raise _error(self.staging, f"was staged from other inputs ({differences(recorded, self.fingerprint)})",
                     "run without --resume to start over, or resume with the inputs and settings it was started with")

    def _check_target(self) -> None:
        """Raise if finalize would have to replace something it must not."""
        check_capture_target(self.out_dir, self.overwrite)

    def _image_path(self, folder: str, index: int) -> Path:
        return self.staging / folder / _frame_name(index)

    def has_frame(self, index: int) -> bool:
        """True when the frame, mask and shading map of ``index`` are all written."""
        return all(self._image_path(folder, index).is_file() for folder in IMAGE_DIRS)

    def add_frame(
        self, index: int, frame: np.ndarray, mask: np.ndarray, shading: np.ndarray
    ) -> None:
        """Write frame ``index``: ``frame`` (H, W, 3) uint8 RGB, ``mask`` (H, W) uint8,
        ``shading`` (H, W, 3) uint8, with (H, W) = ``meta.size``.

        Each PNG is written under a temporary name and renamed, so an interrupted call leaves
        no truncated PNG under its final name.
        """
        index = operator.index(index)
        if index < 0:
            raise CaptureError(
                f"CaptureWriter.add_frame: index {index} is negative; frames are numbered from 0."
            )
        height, width = self.meta.size
        images = {"frames": frame, "masks": mask, "shading": shading}
        for folder, image in images.items():
            shape = (height, width, 3) if IMAGE_DIRS[folder] == "RGB" else (height, width)
            if not (
                isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == shape
            ):
                got = (
                    f"{image.dtype} {image.shape}"
                    if isinstance(image, np.ndarray)
                    else type(image).__name__
                )
                raise CaptureError(
                    f"CaptureWriter.add_frame({index}): the {folder} image is {got}, expected "
                    f"uint8 {shape} (meta.size is [{height}, {width}]); convert it before writing."
                )
        for folder, image in images.items():
            path = self._image_path(folder, index)
            if self._pool is None:
                _write_png(path, image)
            else:
                self._pending.append(self._pool.submit(_write_png, path, image))

    def finalize(
        self, kinematics: Kinematics, reference_indices: Sequence[int] | None = None
    ) -> Capture:
        """Write ``kinematics.npz`` and ``capture.json``, validate, and move into ``out_dir``.

        ``num_frames`` becomes ``len(kinematics)``; ``reference_indices``, when given, replace
        the meta's. An existing capture at ``out_dir`` (``overwrite=True``) is moved aside and
        deleted only once the new one is in place.
        """
        self.flush()
        refs = (
            self.meta.reference_indices
            if reference_indices is None
            else [operator.index(i) for i in reference_indices]
        )
        meta = replace(self.meta, num_frames=len(kinematics), reference_indices=refs)
        kinematics.save_npz(self.staging / KINEMATICS_FILE)
        write_json(self.staging / META_FILE, meta.to_json())
        meta, kinematics = _validate(self.staging, None, check_images=True)

        self._check_target()
        old = None
        if self.out_dir.is_dir():
            if any(self.out_dir.iterdir()):
                old = self.out_dir.with_name(f"{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}")
                os.replace(self.out_dir, old)
            else:
                self.out_dir.rmdir()
        try:
            os.replace(self.staging, self.out_dir)
        except BaseException:
            if old is not None:
                os.replace(old, self.out_dir)
            raise
        if old is not None:
            shutil.rmtree(old)
        (self.out_dir / _STAGING_MARKER).unlink()
        return Capture(self.out_dir, meta, kinematics)


def write_capture(
    out_dir: Path | str,
    meta: CaptureMeta,
    kinematics: Kinematics,
    frames: Iterable[np.ndarray],
    masks: Iterable[np.ndarray],
    shadings: Iterable[np.ndarray],
    overwrite: bool = False,
    progress: bool = False,
) -> Capture:
    """Write a whole capture atomically (see :class:`CaptureWriter`) and return it.

    ``frames``, ``masks`` and ``shadings`` yield, per frame in order, (H, W, 3), (H, W) and
    (H, W, 3) uint8 arrays; (N, ...) stacked arrays work too. There must be ``len(kinematics)``
    of each.
    """
    writer = CaptureWriter(out_dir, meta, overwrite=overwrite)
    items = zip(frames, masks, shadings, strict=True)
    bar = tqdm(
        items, total=len(kinematics), desc=f"writing {out_dir}", unit="frame", disable=not progress
    )
    for index, (frame, mask, shading) in enumerate(bar):
        writer.add_frame(index, frame, mask, shading)
    return writer.finalize(kinematics)
