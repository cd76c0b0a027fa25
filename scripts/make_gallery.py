#!/usr/bin/env python
"""The subject gallery under docs/: subjects × (neutral, a sparse frame, three extreme expressions).

    python scripts/make_gallery.py [--subjects 8] [--size 160] [--out docs/subjects.jpg]

Each subject gets two rows: the rendered frames and their shading maps. The extreme columns walk
through the named extreme library (wide-open mouth, big grin, scream, pout, squeezed eyes, …) at
the top of their ranges, with yaw and pitch from the extreme preset. Seeds 1000.. are gallery-only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.spatial.transform import Rotation

from liftavatar.face.rig import FaceRig
from liftavatar.report import grid
from liftavatar.synth.kinematics import CAMERA_DISTANCE_M, EXTREME_LIBRARY, sample_kinematics
from liftavatar.synth.subject import make_subject
from liftavatar.synth.world import render_subject

GALLERY_ORDER = ["wide_open_mouth", "big_grin", "squeezed_eyes", "scream", "pout", "surprise", "anger",
                 "cheek_puff", "jaw_left", "disgust", "sad", "funnel_o", "smirk_left", "jaw_right", "smirk_right"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--subjects", type=int, default=8)
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "subjects.jpg")
    args = parser.parse_args()
    rig = FaceRig.load()
    rng = np.random.default_rng(7)
    rows, labels, row_labels = [], [], []
    for k in range(args.subjects):
        seed = 1000 + k
        subject = make_subject(seed, rig)
        sparse = sample_kinematics("sparse", 50, rig.expression_names, seed=seed)
        pick = int(np.argmax(sparse.expression[:, rig.expression_index("jawOpen")]))
        names = [GALLERY_ORDER[(3 * k + j) % len(GALLERY_ORDER)] for j in range(3)]
        expression = [np.zeros(rig.num_expressions), sparse.expression[pick]]
        rotation = [np.zeros(3), sparse.rotation[pick]]
        for name in names:
            e = np.zeros(rig.num_expressions)
            for shape, (_, hi) in EXTREME_LIBRARY[name].items():
                e[rig.expression_index(shape)] = hi
            expression.append(e)
            euler = [rng.uniform(-20, 20), rng.choice([-1, 1]) * rng.uniform(10, 40), rng.uniform(-8, 8)]
            rotation.append(Rotation.from_euler("xyz", euler, degrees=True).as_rotvec())
        translation = np.tile([0.0, 0.0, CAMERA_DISTANCE_M], (5, 1))
        out = render_subject(subject, np.array(expression, np.float32), np.array(rotation, np.float32),
                             translation.astype(np.float32), args.size, rig=rig)
        rows += [list(out.rgb), list(out.shading)]
        captions = ["neutral", f"sparse (jaw {sparse.expression[pick, 0]:.2f})"] + names
        labels += [captions, captions]
        row_labels += [f"seed {seed}", "shading"]
    sheet = grid(rows, labels, row_labels)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(args.out, quality=88)
    print(f"wrote {args.out} ({sheet.shape[1]}x{sheet.shape[0]})")


if __name__ == "__main__":
    main()
