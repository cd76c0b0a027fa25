"""Calibrate the rig's landmarks to MediaPipe FaceMesh: writes liftavatar/face/data/landmark_model.npz.

Renders synthetic subjects at 256², 100 frames each, runs FaceMesh on every frame in video
(tracking) mode, as ``liftavatar track`` does on a video, and fits
:func:`liftavatar.face.fit.calibrate_landmark_model` to the detections against the known kinematics:

- ``full`` preset, seeds 7200–7219, and ``sparse`` / ``extreme``, seeds 7001–7012: the poses and
  expressions the tracker meets;
- ``independent``, seeds 7100–7129: smooth trajectories through random keyframes in which every
  blendshape is on (uniform in [0, 1]) with probability 0.15, independently of the others, at
  the ``extreme`` pose range. In the presets blendshapes come in fixed combinations (a scream
  raises the brows, opens the eyes and stretches the mouth together), so a calibration on them
  alone cannot tell which blendshape moves which landmark and smears each one's response over
  its companions; these clips decouple them.

The calibrated model is then averaged with its mirror image
(:func:`liftavatar.face.fit.symmetrise_landmark_model`): face, detector and data are left-right
symmetric, so the calibration's asymmetries are estimation noise.

None of these seeds is in the benchmark ranges (5000–5999, 9000–9999) or the tracker's tuning
seeds (7300–7399). About 8 minutes on 2 CPU cores.

Usage: python scripts/calibrate_landmarks.py [--out PATH]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from scipy.interpolate import PchipInterpolator
from scipy.spatial.transform import Rotation

from liftavatar.face.fit import LANDMARK_MODEL_FILE, calibrate_landmark_model, symmetrise_landmark_model
from liftavatar.face.landmarks import FaceMeshDetector
from liftavatar.face.rig import DATA, FaceRig
from liftavatar.synth.kinematics import CAMERA_DISTANCE_M, POSE_RANGES, KinematicsSequence, sample_kinematics
from liftavatar.synth.subject import make_subject
from liftavatar.synth.world import DEFAULT_FPS, default_intrinsics, render_sequence

SIZE, FRAMES = 256, 100
RUNS = ([("full", s) for s in range(7200, 7220)] + [(p, s) for p in ("sparse", "extreme") for s in range(7001, 7013)]
        + [("independent", s) for s in range(7100, 7130)])
ACTIVE = 0.15  # probability that a blendshape is on in an independent keyframe


def independent_kinematics(num_expressions: int, frames: int, seed: int) -> KinematicsSequence:
    """Smooth trajectory through keyframes 0.25–0.6 s apart whose blendshapes are independent."""
    rng = np.random.default_rng([seed, 77])
    t = np.arange(frames) / DEFAULT_FPS

    def times(gap: tuple[float, float]) -> np.ndarray:
        out = [0.0]
        while out[-1] < t[-1] or len(out) < 2:
            out.append(out[-1] + rng.uniform(*gap))
        return np.array(out)

    expr_t = times((0.25, 0.6))
    keys = np.where(rng.random((len(expr_t), num_expressions)) < ACTIVE,
                    rng.uniform(0, 1, (len(expr_t), num_expressions)), 0.0)
    expression = np.clip(PchipInterpolator(expr_t, keys)(t), 0, 1)
    r = POSE_RANGES["extreme"]
    pose_t = times((0.6, 1.4))
    n = len(pose_t)
    euler = np.stack([rng.uniform(-r.pitch, r.pitch, n), rng.uniform(-r.yaw, r.yaw, n), rng.uniform(-r.roll, r.roll, n)], 1)
    shift = rng.uniform(-r.shift, r.shift, (n, 3)) * np.array([1.0, 1.0, 2.0])
    pose = PchipInterpolator(pose_t, np.concatenate([euler, shift], 1))(t)
    return KinematicsSequence(expression.astype(np.float32),
                              Rotation.from_euler("xyz", pose[:, :3], degrees=True).as_rotvec().astype(np.float32),
                              (pose[:, 3:] + np.array([0.0, 0.0, CAMERA_DISTANCE_M])).astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DATA / LANDMARK_MODEL_FILE))
    args = parser.parse_args()
    torch.set_num_threads(1)  # MediaPipe and the renderer share the cores
    rig = FaceRig.load()
    found, identity, expression, rotation, translation = [], [], [], [], []
    for preset, seed in RUNS:
        subject = make_subject(seed, rig)
        if preset == "independent":
            kin = independent_kinematics(rig.num_expressions, FRAMES, seed)
        else:
            kin = sample_kinematics(preset, FRAMES, rig.expression_names, seed=seed)
        points = np.full((FRAMES, rig.num_landmarks, 2), np.nan, np.float32)
        with FaceMeshDetector(static_images=False) as detector:  # one track per clip, as on a video
            for start, batch in render_sequence(subject, kin, SIZE, rig=rig):
                for i, rgb in enumerate(batch.rgb):
                    detected = detector.detect(rgb)
                    if detected is not None:
                        points[start + i] = detected
        found.append(points)
        identity.append(np.tile(subject.identity, (FRAMES, 1)))
        expression.append(kin.expression)
        rotation.append(kin.rotation)
        translation.append(kin.translation)
        print(f"{preset} {seed}: {np.isfinite(points).all(axis=(1, 2)).mean():.0%} detected", flush=True)
    model = calibrate_landmark_model(rig, np.concatenate(found), np.concatenate(identity), np.concatenate(expression),
                                     np.concatenate(rotation), np.concatenate(translation), default_intrinsics(SIZE),
                                     ridge=1.0, source=f"mediapipe 0.10.21 (video mode), {len(RUNS)} synthetic subjects "
                                     f"x {FRAMES} frames (presets and independent blendshapes)")
    symmetrise_landmark_model(model, rig).save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
