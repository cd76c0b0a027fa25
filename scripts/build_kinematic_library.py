"""Build lift's tracked kinematic library (liftavatar/data/kinematic_library.safetensors) from tracked clips.

    liftavatar track ../shared/real_videos/train/CLIP -o TRACKED/CLIP --size 128      # each learnable clip
    python scripts/build_kinematic_library.py TRACKED/* --manifest ../shared/real_videos/MANIFEST.tsv

Only clips whose MANIFEST.tsv row is in ``train/`` and says shipped weights may learn from them are accepted:
the library ships with the package. Each clip's valid frames give (expression, head rotation relative to the
clip's typical pose); neighbouring frames of a video are near copies, so the pooled frames are thinned by
farthest-point sampling (in lift's joint space) to ``--entries`` rows, which keeps the spread and drops repeats.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from liftavatar.capture import Capture
from liftavatar.face.rig import FaceRig
from liftavatar.targets import LIBRARY_FILE, farthest_targets, joint_features, library_from_kinematics


def learnable_clips(manifest: Path) -> dict[str, str]:
    """{clip stem: file name} of train/ clips whose last MANIFEST column says yes."""
    rows = csv.reader(manifest.read_text().replace("\r", "").splitlines(), delimiter="\t")
    header = next(rows)
    return {Path(r[1]).stem: r[1] for r in rows if len(r) == len(header) and r[0] == "train" and r[-1] == "yes"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("captures", nargs="+", type=Path, help="tracked captures, each named by its clip's stem")
    ap.add_argument("--manifest", type=Path, required=True, help="the real-video set's MANIFEST.tsv")
    ap.add_argument("--entries", type=int, default=1500, help="rows kept after farthest-point thinning")
    ap.add_argument("--pose-weight", type=float, default=2.0, help="as lift's --pose-weight")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "liftavatar" / "data" / LIBRARY_FILE)
    args = ap.parse_args(argv)
    allowed = learnable_clips(args.manifest)
    names = FaceRig.load().expression_names
    parts, clips = [], []
    for path in sorted(args.captures):
        if path.name not in allowed:
            print(f"{path}: not a train/ clip that shipped data may learn from (MANIFEST.tsv); left out", file=sys.stderr)
            continue
        capture = Capture.load(path)
        if list(capture.meta.expression_names) != list(names):
            print(f"{path}: another rig's expressions; left out", file=sys.stderr)
            continue
        lib = library_from_kinematics(capture.kinematics, path.name)
        parts.append((lib.expression, lib.rotation, np.full(len(lib), len(clips), np.int32)))
        clips.append(allowed[path.name])
        print(f"{allowed[path.name]}: {len(lib)} valid frames")
    if not parts:
        print("no learnable clip among the captures", file=sys.stderr)
        return 2
    expression, rotation, clip = (np.concatenate(p) for p in zip(*parts))
    keep = np.sort(farthest_targets(joint_features(expression, rotation, args.pose_weight), np.zeros((0, 1)),
                                    min(args.entries, len(expression))))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"expression": expression[keep].astype(np.float32), "rotation": rotation[keep].astype(np.float32),
               "clip": clip[keep]}, str(args.out),
              metadata={"expression_names": json.dumps(list(names)), "clips": json.dumps(clips),
                        "made_by": "scripts/build_kinematic_library.py", "pose_weight": str(args.pose_weight),
                        "frames_pooled": str(len(expression))})
    angles = np.degrees(np.linalg.norm(rotation[keep], axis=1))
    print(f"{args.out}: {len(keep)} of {len(expression)} frames from {len(clips)} clips; relative head rotation "
          f"median {np.median(angles):.1f}°, 95th percentile {np.percentile(angles, 95):.1f}°")
    return 0


if __name__ == "__main__":
    sys.exit(main())
