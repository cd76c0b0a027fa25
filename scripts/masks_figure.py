#!/usr/bin/env python
"""The head-region masks on train/ clips of ../shared/real_videos: the neck alone below the jaw line against
the rig's whole silhouette (what liftavatar.face.masks keeps); writes docs/masks_train_clips.png.

    python scripts/masks_figure.py [--clips retalking_face1:60 liveportrait_d20:90 liveportrait_d12:100]

Each clip is tracked at 256² (its first 150 frames, in a temporary folder: nothing made from the clips stays);
per chosen frame the picture shows the frame with what the neck-only region cuts (red) and the person mask
under it, then the same with the rig's silhouette. Only ``train/`` clips may be shown (never ``eval/``).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from liftavatar.face import masks
from liftavatar.face.masks import SelfieSegmenter, head_masks, head_region
from liftavatar.face.rig import FaceRig
from liftavatar.face.track import TrackConfig, track

ROOT = Path(__file__).resolve().parents[1]
# The clips sit beside the repository (../shared), or beside the main checkout when this runs in a worktree.
VIDEOS = next((p for p in (ROOT.parent / "shared" / "real_videos", Path("/work/shared/real_videos")) if p.is_dir()),
              ROOT.parent / "shared" / "real_videos")
TILE = 128


def _tile(frame: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The frame with what the mask leaves out tinted red, over the mask; both TILE² wide."""
    a = mask[..., None].astype(np.float32) / 255
    tinted = (frame * (0.4 + 0.6 * a) + np.array([255, 0, 0]) * 0.35 * (1 - a)).clip(0, 255).astype(np.uint8)
    pair = np.concatenate([tinted, np.repeat(mask[..., None], 3, -1)], 0)
    return np.asarray(Image.fromarray(pair).resize((TILE, 2 * TILE), Image.LANCZOS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", nargs="+", default=["retalking_face1:60", "liveportrait_d20:90",
                                                        "liveportrait_d12:100"])
    parser.add_argument("--videos", type=Path, default=VIDEOS, help="the real_videos folder")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "docs" / "masks_train_clips.png")
    args = parser.parse_args()
    rig = FaceRig.load()
    columns = []
    with tempfile.TemporaryDirectory() as tmp, SelfieSegmenter() as segmenter:
        for spec in args.clips:
            name, index = spec.split(":")
            clip = next((args.videos / "train").glob(f"{name}.*"))
            capture, _ = track(clip, Path(tmp) / name, TrackConfig(size=256, max_frames=150), progress=False)
            i = [int(index)]
            frame = capture.frames(i)[0]
            person = segmenter(frame)[None]  # at 256² the written crop is what the tracker segmented
            k = capture.kinematics
            pose = (k.identity, k.expression[i], k.rotation[i], k.translation[i], capture.meta.intrinsics, (256, 256))
            parts = masks._SILHOUETTE_PARTS
            try:
                masks._SILHOUETTE_PARTS = ("neck",)
                neck_only = head_masks(person, head_region(*pose, rig))[0]
            finally:
                masks._SILHOUETTE_PARTS = parts
            columns.append(np.concatenate([_tile(frame, neck_only), _tile(frame, head_masks(person, head_region(
                *pose, rig))[0])], 1))
            label = Image.fromarray(np.zeros((16, 2 * TILE, 3), np.uint8))
            ImageDraw.Draw(label).text((3, 2), f"{name} {index}", fill=(255, 255, 255))
            columns[-1] = np.concatenate([np.asarray(label), columns[-1]], 0)
    sheet = np.concatenate([np.pad(c, ((0, 0), (0, 6), (0, 0))) for c in columns], 1)[:, :-6]
    head = Image.fromarray(np.zeros((16, sheet.shape[1], 3), np.uint8))
    ImageDraw.Draw(head).text((3, 2), "each clip: neck only below the jaw line | the rig's silhouette (kept)",
                              fill=(255, 255, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([np.asarray(head), sheet], 0)).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
