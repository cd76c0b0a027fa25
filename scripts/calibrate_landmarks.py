"""Calibrate the rig's landmarks to MediaPipe FaceMesh: writes liftavatar/face/data/landmark_model.npz.

Renders synthetic subjects (seeds 7200–7219 on the ``full`` preset and 7001–7012 on ``sparse`` and
``extreme``, 100 frames each at 256²; none in the benchmark ranges 5000–5999 / 9000–9999), runs
FaceMesh on every frame and fits :func:`liftavatar.face.fit.calibrate_landmark_model` to the
detections against the known kinematics. About 5 minutes on 2 CPU cores.

Usage: python scripts/calibrate_landmarks.py [--out PATH]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from liftavatar.face.fit import LANDMARK_MODEL_FILE, calibrate_landmark_model
from liftavatar.face.landmarks import FaceMeshDetector
from liftavatar.face.rig import DATA, FaceRig
from liftavatar.synth.kinematics import sample_kinematics
from liftavatar.synth.subject import make_subject
from liftavatar.synth.world import default_intrinsics, render_sequence

SIZE, FRAMES = 256, 100
RUNS = [("full", s) for s in range(7200, 7220)] + [(p, s) for p in ("sparse", "extreme") for s in range(7001, 7013)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(DATA / LANDMARK_MODEL_FILE))
    args = parser.parse_args()
    torch.set_num_threads(1)  # MediaPipe and the renderer share the cores
    rig = FaceRig.load()
    found, identity, expression, rotation, translation = [], [], [], [], []
    with FaceMeshDetector(static_images=True) as detector:
        for preset, seed in RUNS:
            subject = make_subject(seed, rig)
            kin = sample_kinematics(preset, FRAMES, rig.expression_names, seed=seed)
            points = np.full((FRAMES, rig.num_landmarks, 2), np.nan, np.float32)
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
                                     ridge=1.0, source=f"mediapipe 0.10.21, {len(RUNS)} synthetic subjects x {FRAMES} frames")
    model.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
