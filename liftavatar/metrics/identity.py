"""CSIM: cosine similarity of dlib face-recognition embeddings (identity preservation).

The standard dlib pipeline, as the ``face_recognition`` package runs it: HOG frontal face detector
(image upsampled once), 5-point shape predictor, and the ResNet face-recognition model
(``dlib_face_recognition_resnet_model_v1.dat``) giving a 128-d descriptor per face. The model
files come from the ``face-recognition-models`` package, located on disk without importing it
(its ``__init__`` needs ``pkg_resources``).

CSIM of a frame pair = cos(e_pred, e_gt), unitless in [-1, 1]; 1 for the same image. dlib's
descriptors are not zero-mean, so different people still score about 0.85–0.9 (astronaut vs
Grace Hopper: 0.88) and the same person about 0.99; the dlib distance ``|e_pred − e_gt|`` is
reported too (dlib's rule: < 0.6 is the same person).

Faces: detected in each frame; where a frame's detector finds none, the face box found in the
other frame of the pair is used (the frames are aligned renders of one view); a pair with no box
on either side is left out and counted.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from liftavatar.metrics.errors import MetricsError

__all__ = ["face_model_dir", "FaceEmbedder", "CsimResult", "csim"]


def face_model_dir() -> Path:
    """The ``models`` folder of the installed ``face-recognition-models`` package."""
    spec = importlib.util.find_spec("face_recognition_models")  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        raise MetricsError("CSIM needs the face-recognition-models package, which is not installed; "
                           "install it (pip install face-recognition-models==0.3.0).")
    return Path(next(iter(spec.submodule_search_locations))) / "models"


class FaceEmbedder:
    """dlib face detection + 128-d face-recognition descriptors (see the module docstring)."""

    def __init__(self, upsample: int = 1) -> None:
        try:
            import dlib
        except ImportError:
            raise MetricsError("CSIM needs dlib, which is not installed; install it (pip install "
                               "dlib-bin==20.0.1.post1).") from None
        models = face_model_dir()
        self.upsample = upsample
        self._detector = dlib.get_frontal_face_detector()
        self._shape = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._encoder = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self._dlib = dlib
        # Boxes and descriptors by image content: a benchmark scores every avatar of a subject against the same
        # ground-truth frames, and the descriptor network is most of an evaluation's time on a CPU.
        self._memo: OrderedDict[tuple, object] = OrderedDict()

    def _remembered(self, key: tuple, compute):
        if key in self._memo:
            self._memo.move_to_end(key)
            return self._memo[key]
        value = self._memo[key] = compute()
        if len(self._memo) > MEMO_ENTRIES:
            self._memo.popitem(last=False)
        return value

    def detect(self, image: np.ndarray) -> tuple[int, int, int, int] | None:
        """The largest face's box (left, top, right, bottom) in pixels of the (H, W, 3) uint8 image, or None."""
        image = np.ascontiguousarray(image)
        return self._remembered(("box", _digest(image)), lambda: self._detect(image))

    def _detect(self, image: np.ndarray) -> tuple[int, int, int, int] | None:
        boxes = self._detector(image, self.upsample)
        if len(boxes) == 0:
            return None
        box = max(boxes, key=lambda r: r.width() * r.height())
        return box.left(), box.top(), box.right(), box.bottom()

    def embed(self, image: np.ndarray, box: tuple[int, int, int, int] | None = None) -> np.ndarray | None:
        """(128,) float64 descriptor of the face in ``box`` (detected when None), or None without a face."""
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise MetricsError(f"CSIM takes (H, W, 3) uint8 RGB images, got {image.dtype} {image.shape}; convert first.")
        box = box if box is not None else self.detect(image)
        if box is None:
            return None
        return self._remembered(("descriptor", _digest(image), tuple(box)), lambda: self._embed(image, box)).copy()

    def _embed(self, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        shape = self._shape(image, self._dlib.rectangle(*box))
        return np.array(self._encoder.compute_face_descriptor(image, shape), np.float64)


MEMO_ENTRIES = 4096
"""Boxes and descriptors a :class:`FaceEmbedder` remembers (the most recently used; a few hundred bytes each)."""


def _digest(image: np.ndarray) -> tuple:
    return image.shape, image.dtype.str, hashlib.blake2b(image.tobytes(), digest_size=16).digest()


@lru_cache(maxsize=1)
def _embedder() -> FaceEmbedder:
    return FaceEmbedder()


@dataclass
class CsimResult:
    """Per-pair results: ``similarity`` and ``distance`` (N,), NaN where no face was found."""

    similarity: np.ndarray
    distance: np.ndarray
    missed: list[int] = field(default_factory=list)  # pairs with no face on either side

    @property
    def mean(self) -> float:
        ok = np.isfinite(self.similarity)
        return float(self.similarity[ok].mean()) if ok.any() else float("nan")


def csim(pred: np.ndarray, gt: np.ndarray, embedder: FaceEmbedder | None = None) -> CsimResult:
    """CSIM of (N, H, W, 3) uint8 frame pairs (see the module docstring for faces not found)."""
    embedder = embedder or _embedder()
    if len(pred) != len(gt):
        raise MetricsError(f"CSIM of {len(pred)} predicted and {len(gt)} ground-truth frames; pass as many of each.")
    sim = np.full(len(pred), np.nan)
    dist = np.full(len(pred), np.nan)
    missed = []
    for i, (a, b) in enumerate(zip(pred, gt)):
        box_a, box_b = embedder.detect(a), embedder.detect(b)
        box_a, box_b = box_a or box_b, box_b or box_a
        if box_a is None:
            missed.append(i)
            continue
        ea, eb = embedder.embed(a, box_a), embedder.embed(b, box_b)
        sim[i] = float(ea @ eb / (np.linalg.norm(ea) * np.linalg.norm(eb)))
        dist[i] = float(np.linalg.norm(ea - eb))
    return CsimResult(sim, dist, missed)
