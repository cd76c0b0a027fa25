"""Realism check of the synthetic world: does MediaPipe see our subjects as faces, where we put them?

For each rendered frame, MediaPipe FaceMesh either finds a face or not (the detection rate), and
its 478 landmarks are compared with the rig's projected landmark vertices (pixel error). A high
rate shows the subjects look like faces; a small error shows that the rig topology and the camera
conventions (OpenCV axes, corner-origin pixels) agree with MediaPipe's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from liftavatar.face.landmarks import FaceMeshDetector
from liftavatar.face.rig import FaceRig
from liftavatar.synth.kinematics import sample_kinematics
from liftavatar.synth.subject import make_subject
from liftavatar.synth.world import render_sequence


@dataclass
class RealismResult:
    preset: str
    size: int
    seeds: list[int]
    frames: int = 0
    detected: int = 0
    frame_median_errors: list[float] = field(default_factory=list)  # px, surface landmarks 0–467
    frame_iris_errors: list[float] = field(default_factory=list)  # px, iris landmarks 468–477

    @property
    def detection_rate(self) -> float:
        return self.detected / max(self.frames, 1)

    def summary(self) -> dict:
        errs = np.asarray(self.frame_median_errors)
        iris = np.asarray(self.frame_iris_errors)
        return {
            "preset": self.preset,
            "size": self.size,
            "seeds": self.seeds,
            "frames": self.frames,
            "detected": self.detected,
            "detection_rate": round(self.detection_rate, 4),
            "median_landmark_error_px": round(float(np.median(errs)), 3) if len(errs) else None,
            "p90_frame_median_error_px": round(float(np.percentile(errs, 90)), 3) if len(errs) else None,
            "median_iris_error_px": round(float(np.median(iris)), 3) if len(iris) else None,
        }


def measure_realism(seeds: list[int], preset: str, frames_per_subject: int, size: int = 256,
                    progress: bool = False) -> RealismResult:
    """Render ``frames_per_subject`` frames of ``preset`` for each seed and run FaceMesh on them."""
    rig = FaceRig.load()
    result = RealismResult(preset=preset, size=size, seeds=list(seeds))
    with FaceMeshDetector(static_images=True) as detector:
        for seed in seeds:
            subject = make_subject(seed, rig)
            kinematics = sample_kinematics(preset, frames_per_subject, rig.expression_names, seed=seed)
            for _, batch in render_sequence(subject, kinematics, size, rig=rig, progress=progress):
                for rgb, truth in zip(batch.rgb, batch.landmarks2d):
                    result.frames += 1
                    found = detector.detect(rgb)
                    if found is None:
                        continue
                    result.detected += 1
                    err = np.linalg.norm(found - truth, axis=-1)
                    result.frame_median_errors.append(float(np.median(err[:468])))
                    result.frame_iris_errors.append(float(np.median(err[468:])))
    return result
