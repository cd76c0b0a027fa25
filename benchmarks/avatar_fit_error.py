#!/usr/bin/env python
"""Where an avatar misses the frames it was trained on: by region, by distance to the mask's edge, by head turn.

    python benchmarks/avatar_fit_error.py --capture WORK/NAME/train --avatar WORK/NAME/avatar_default \\
        --out benchmarks/results/avatar_fit_error.json --figure docs/avatar_fit_error.png

(``WORK/NAME/...``: what ``benchmarks/avatar_real.py --work WORK`` leaves for a tracked clip.) Every frame of the
capture is rendered by the avatar at its tracked kinematics and compared with the frame times its mask over black,
the benchmark's convention, over the pixels the mask or the render covers. The squared error is split

- by region: the rig's face surface (its ``face`` part, rasterized at each frame's kinematics) against the rest of
  the mask (hair, ears, neck, whatever the segmentation kept), and that rest split by the masks' jaw line
  (:data:`liftavatar.face.masks.JAW_Y`, projected with each frame's head pose): above it hair and ears, below it the
  neck, which in the rig turns with the head while a real neck turns less;
- by distance to the mask's edge: bands of ±1…4 px around the mask's outline (dilation minus erosion of mask > ½),
  with the PSNR of the pixels outside each band;
- by head turn: per-frame PSNR against |yaw| from the clip's median, and against the expression's norm;
- by tracking: per-frame PSNR against the tracker's own landmark residual (the median distance of the fitted rig's
  surface landmarks to FaceMesh's detections, in pixels of the capture; :func:`liftavatar.face.fit.surface_reprojection_px`),
  when the capture keeps its detections (``landmarks2d``). A small residual says the rig sits on the detections,
  not that the detections sit on the face.

The figure shows the worst and the best frames: ground truth | render | error (×4, white = 64 levels or more).
Read it for ``train/`` clips when choosing what to change; it chooses nothing by itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _psnr(err: np.ndarray) -> float:
    """PSNR of squared errors pooled over a set of pixels: the regions cut across frames, so not
    :func:`liftavatar.metrics.image.psnr`, which scores one image at a time."""
    return float(10 * np.log10(255.0 ** 2 / max(float(err.mean()), 1e-9)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capture", type=Path, required=True, help="the capture the avatar was trained on")
    parser.add_argument("--avatar", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="JSON written here")
    parser.add_argument("--figure", type=Path, default=None, help="PNG grid of the worst and best frames")
    args = parser.parse_args(argv)

    import cv2
    import torch
    from scipy.spatial.transform import Rotation

    from liftavatar.avatar.export import render_frames
    from liftavatar.avatar.model import load_avatar
    from liftavatar.bench.layout import over_black
    from liftavatar.capture import Capture
    from liftavatar.face.masks import JAW_Y, below_head_line
    from liftavatar.face.render import rasterize
    from liftavatar.face.rig import FaceRig
    from liftavatar.io import save_png, write_json
    from liftavatar.report import machine_info, machine_name

    capture, avatar = Capture.load(args.capture), load_avatar(args.avatar, device="cpu")
    idx = np.flatnonzero(capture.kinematics.valid)
    kin = capture.kinematics.select(idx)
    intrinsics, size = tuple(capture.meta.intrinsics), tuple(capture.size)
    render = np.stack(list(render_frames(avatar, kin, intrinsics, size))).astype(np.float32)
    masks = capture.masks(idx)
    truth = over_black(capture.frames(idx), masks).astype(np.float32)
    mask = masks.astype(np.float32) / 255
    err = ((render - truth) ** 2).mean(-1)
    inside = mask > 0.5
    scored = inside | (render.sum(-1) > 0)

    rig = FaceRig.load()
    verts = rig.vertices(kin.identity, kin.expression, kin.rotation, kin.translation)
    k = torch.as_tensor(intrinsics, dtype=torch.float32).expand(len(idx), 4)
    face = (rasterize(verts, torch.as_tensor(rig.faces[rig.part_mask("face")]), k, size).face_index >= 0).numpy()
    below_jaw = below_head_line(torch.as_tensor(kin.rotation), torch.as_tensor(kin.translation), k, JAW_Y,
                                size).numpy()
    rest = inside & ~face

    bands = {}
    for px in (1, 2, 3, 4):
        kernel = np.ones((2 * px + 1, 2 * px + 1), np.uint8)
        band = np.stack([cv2.dilate(m, kernel) > cv2.erode(m, kernel) for m in inside.astype(np.uint8)]) & scored
        bands[f"{px}px"] = {"share_of_pixels": float(band.sum() / scored.sum()),
                            "share_of_squared_error": float(err[band].sum() / err[scored].sum()),
                            "psnr_outside_band": _psnr(err[scored & ~band])}
    per_frame = np.array([_psnr(err[i][scored[i]]) for i in range(len(idx))])
    yaw = np.degrees(Rotation.from_rotvec(kin.rotation).as_euler("YXZ")[:, 0])
    yaw = np.abs(yaw - np.median(yaw))
    tracking = {}
    if kin.landmarks2d is not None:
        from liftavatar.face.fit import LandmarkModel, surface_reprojection_px

        residual = surface_reprojection_px(LandmarkModel.default(rig), kin.expression, kin.identity, kin.rotation,
                                           kin.translation, kin.landmarks2d, intrinsics)
        tracking = {"landmark_residual_px_median": float(np.median(residual)),
                    "landmark_residual_px_p90": float(np.percentile(residual, 90)),
                    "corr_with_landmark_residual": float(np.corrcoef(per_frame, residual)[0, 1])}
    result = {
        "capture": str(args.capture), "avatar": str(args.avatar), "frames": int(len(idx)),
        "machine": machine_name(machine_info("cpu")),
        "psnr_scored": _psnr(err[scored]), "psnr_inside_mask": _psnr(err[inside]),
        "face_surface": {"share_of_mask": float((inside & face).sum() / inside.sum()),
                         "psnr": _psnr(err[inside & face])},
        "rest_of_mask": {"share_of_mask": float(rest.sum() / inside.sum()),
                         "psnr": _psnr(err[rest]),
                         "share_of_squared_error": float(err[rest].sum() / err[inside].sum()),
                         **{part: {"share_of_mask": float((rest & where).sum() / inside.sum()),
                                   "psnr": _psnr(err[rest & where]),
                                   "share_of_squared_error": float(err[rest & where].sum() / err[inside].sum())}
                            for part, where in (("above_jaw_line", ~below_jaw), ("below_jaw_line", below_jaw))}},
        "mask_edge_bands": bands,
        "per_frame": {"psnr_mean": float(per_frame.mean()), "psnr_min": float(per_frame.min()),
                      "corr_with_abs_yaw": float(np.corrcoef(per_frame, yaw)[0, 1]),
                      "abs_yaw_max_deg": float(yaw.max()),
                      "corr_with_expression_norm": float(np.corrcoef(per_frame,
                                                                     np.linalg.norm(kin.expression, axis=1))[0, 1]),
                      **tracking},
    }
    write_json(args.out, result)
    print(json.dumps(result, indent=1))
    if args.figure is not None:
        order = np.argsort(per_frame)
        rows = []
        for i in [*order[:3], order[-1]]:
            shown = np.repeat(np.clip(np.sqrt(err[i]) * 4, 0, 255)[..., None], 3, -1)
            rows.append(np.concatenate([truth[i], render[i], shown], 1))
        grid = np.concatenate(rows, 0).astype(np.uint8)
        from PIL import Image, ImageDraw

        header = Image.new("RGB", (grid.shape[1], 14))
        for col, text in enumerate(("frame x mask", "avatar", "error x4")):
            ImageDraw.Draw(header).text((col * size[1] + 3, 1), text, fill=(255, 255, 0))
        save_png(np.concatenate([np.asarray(header), grid], 0), args.figure)
        print(f"wrote {args.figure} (rows: the 3 worst frames, then the best; columns: ground truth | render | error)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
