"""MediaPipe FaceMesh (``mediapipe==0.10.21``, whose wheel bundles the models): 478 image landmarks.

Landmark ids are the rig's vertex ids 0–477 (DESIGN.md §5), so a detection can be compared with
projected rig vertices directly. Coordinates are pixels, x right, y down, the image's top-left
corner at (0, 0).
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ start-up chatter
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


class FaceMeshDetector:
    """Per-image FaceMesh with iris refinement. Use as a context manager, or call :meth:`close`."""

    def __init__(self, static_images: bool = True, min_confidence: float = 0.5, max_faces: int = 1):
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=static_images,
            refine_landmarks=True,
            max_num_faces=max_faces,
            min_detection_confidence=min_confidence,
        )

    def detect_all(self, image: np.ndarray) -> list[np.ndarray]:
        """Every face found in an (H, W, 3) uint8 RGB image, each (478, 2) float32 pixels."""
        h, w = image.shape[:2]
        result = self._mesh.process(np.ascontiguousarray(image[..., :3]))
        faces = result.multi_face_landmarks or []
        return [np.array([[p.x * w, p.y * h] for p in f.landmark], np.float32) for f in faces]

    def detect(self, image: np.ndarray) -> np.ndarray | None:
        """The first face's (478, 2) landmarks in pixels, or None when no face is found."""
        faces = self.detect_all(image)
        return faces[0] if faces else None

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> "FaceMeshDetector":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
