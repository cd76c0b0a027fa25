"""MediaPipe FaceMesh (``mediapipe==0.10.21``, whose wheel bundles the models): 478 image landmarks.

Landmark ids are the rig's vertex ids 0–477 (DESIGN.md §5), so a detection can be compared with
projected rig vertices directly. Coordinates are pixels, x right, y down, the image's top-left
corner at (0, 0).

MediaPipe's C++ side logs through absl (``W0000 … inference_feedback_manager.cc …``) and TFLite's
(``INFO: Created TensorFlow Lite XNNPACK delegate for CPU.``) straight to the process's stderr,
which no environment variable of this version turns off (absl ignores ``GLOG_minloglevel``). So
every MediaPipe graph is built and run inside :func:`quiet_native_logs`, which points file
descriptor 2 at a temporary file for the duration: the user sees our messages, not the library's.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")  # for builds that still log through glog
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

logger = logging.getLogger(__name__)

__all__ = ["FaceMeshDetector", "quiet_native_logs"]

_STDERR_FD = 2
_quiet_lock = threading.RLock()  # fd 2 is one per process: one redirection at a time
_quiet_depth = 0  # > 0 inside a block (a nested block changes nothing)
_sink = None  # the temporary file fd 2 points at while quiet (one per process, reused)


@contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Send what native code writes to stderr (file descriptor 2) to a temporary file for the block.

    On leaving normally, the text is logged at DEBUG level on this module's logger (so it is there for whoever
    asks for it); on leaving by an exception, it is written back to stderr, so a failure inside MediaPipe keeps
    its explanation. Python's ``sys.stderr`` is flushed first, so nothing written before the block is caught.
    Other threads wait for the block to end (fd 2 belongs to the whole process); a nested block is a no-op.
    """
    global _quiet_depth, _sink
    with _quiet_lock:
        if _quiet_depth:
            yield
            return
        if _sink is None:
            _sink = tempfile.TemporaryFile()
        sys.stderr.flush()
        _sink.seek(0)
        _sink.truncate()
        saved = os.dup(_STDERR_FD)
        os.dup2(_sink.fileno(), _STDERR_FD)
        _quiet_depth = 1
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            _quiet_depth = 0
            os.dup2(saved, _STDERR_FD)
            os.close(saved)
            size = os.fstat(_sink.fileno()).st_size
            if size:
                _sink.seek(0)
                text = _sink.read(size)
                if failed:
                    os.write(_STDERR_FD, text)
                else:
                    logger.debug("MediaPipe: %s", text.decode("utf-8", "replace").rstrip())


class FaceMeshDetector:
    """Per-image FaceMesh with iris refinement. Use as a context manager, or call :meth:`close`."""

    def __init__(self, static_images: bool = True, min_confidence: float = 0.5, max_faces: int = 1):
        with quiet_native_logs():
            import mediapipe as mp

            self._mesh = mp.solutions.face_mesh.FaceMesh(
                static_image_mode=static_images,
                refine_landmarks=True,
                max_num_faces=max_faces,
                min_detection_confidence=min_confidence,
            )
            # The graph opens its calculators (and logs) on background threads after the constructor returns; one
            # blank frame waits for them, inside the quiet block. No face is found, so no tracking state is kept.
            self._mesh.process(np.zeros((64, 64, 3), np.uint8))

    def detect_all(self, image: np.ndarray) -> list[np.ndarray]:
        """Every face found in an (H, W, 3) uint8 RGB image, each (478, 2) float32 pixels."""
        h, w = image.shape[:2]
        with quiet_native_logs():  # the graph logs on its first frames with a face too
            result = self._mesh.process(np.ascontiguousarray(image[..., :3]))
        faces = result.multi_face_landmarks or []
        return [np.array([[p.x * w, p.y * h] for p in f.landmark], np.float32) for f in faces]

    def detect(self, image: np.ndarray) -> np.ndarray | None:
        """The first face's (478, 2) landmarks in pixels, or None when no face is found."""
        faces = self.detect_all(image)
        return faces[0] if faces else None

    def close(self) -> None:
        with quiet_native_logs():
            self._mesh.close()

    def __enter__(self) -> "FaceMeshDetector":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
