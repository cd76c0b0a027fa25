#!/usr/bin/env python
"""What the pixel codec's 8×8 seams cost (issue 20 item 2): does a learned codec or a decoder refinement pay for
itself at 128²?

The embedded prior's pixel codec unshuffles 4×4 pixels into channels and its transformer patches 2×2 latents into
one token, so every token is an 8×8 pixel block, and generated frames show seams on the block grid. This measures
how much of the generated frames' error sits on that grid: per pixel position modulo 8, the mean squared error
against the real frame inside its mask (both composited over black, as `generator_real.py` scores), over a
`generator_real.py` work folder's clips. The seam pixels are the block's outer ring (x or y ≡ 0 or 7 mod 8: 43.75 %
of the pixels). The bound reported is the PSNR if the seam pixels erred no more than the block's interior does —
what a perfect deblocking (a learned codec or decoder refinement that removes the seams and nothing else) could
add. What it cannot bound is the blur inside the blocks, which a codec might also change.

    python benchmarks/codec_seams.py --work DIR [--variants base base@generic] [--out benchmarks/results/codec_seams.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BLOCK = 8


def seam_mask(block: int = BLOCK) -> np.ndarray:
    """(block, block) bool: the block's outer ring of pixels."""
    edge = np.zeros(block, bool)
    edge[[0, -1]] = True
    return edge[:, None] | edge[None, :]


def position_errors(pred: np.ndarray, gt: np.ndarray, block: int = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Sum of squared errors (over frames, rows, channels) and pixel counts per position modulo ``block``:
    two (block, block) arrays. Images (N, H, W, 3) uint8 with H and W multiples of ``block``."""
    n, h, w, _ = gt.shape
    err = ((pred.astype(np.float64) - gt.astype(np.float64)) / 255.0) ** 2
    err = err.mean(-1).reshape(n, h // block, block, w // block, block)
    return err.sum((0, 1, 3)), np.full((block, block), n * (h // block) * (w // block), np.float64)


def seam_summary(sse: np.ndarray, count: np.ndarray) -> dict[str, float]:
    ring = seam_mask(len(sse))
    with np.errstate(divide="ignore"):  # error-free interiors give infinite ratios and PSNRs, as they should
        return _summary(sse, count, ring)


def _summary(sse: np.ndarray, count: np.ndarray, ring: np.ndarray) -> dict[str, float]:
    mse = sse.sum() / count.sum()
    seam, inner = sse[ring].sum() / count[ring].sum(), sse[~ring].sum() / count[~ring].sum()
    fixed = (np.minimum(seam, inner) * count[ring].sum() + sse[~ring].sum()) / count.sum()
    return {"psnr": float(10 * np.log10(1 / mse)), "seam_mse_over_inner": float(seam / inner),
            "seam_share_of_error": float(sse[ring].sum() / sse.sum()), "seam_share_of_pixels": float(ring.mean()),
            "psnr_seams_at_inner_level": float(10 * np.log10(1 / fixed)),
            "bound_gain_db": float(10 * np.log10(mse / fixed))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="a generator_real.py work folder with gen_*.npz")
    parser.add_argument("--variants", nargs="+", default=["base", "base@generic"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "codec_seams.json")
    args = parser.parse_args()

    from liftavatar.bench.layout import gt_frames, over_black
    from liftavatar.capture import Capture

    result = {"block": BLOCK, "work": args.work.name, "variants": {}}
    totals = {v: [np.zeros((BLOCK, BLOCK)), np.zeros((BLOCK, BLOCK))] for v in args.variants}
    per_clip = {v: {} for v in args.variants}
    for clip in sorted(p for p in args.work.iterdir() if (p / "role.json").is_file()):
        gt, masks = gt_frames(Capture.load(clip / "test_extreme"))
        for v in args.variants:
            path = clip / f"gen_{v}.npz"
            if not path.is_file():
                continue
            sse, count = position_errors(over_black(np.load(path)["frames"], masks), gt)
            totals[v][0] += sse
            totals[v][1] += count
            per_clip[v][clip.name] = seam_summary(sse, count)
    for v, (sse, count) in totals.items():
        result["variants"][v] = {"all_clips": seam_summary(sse, count), "clips": per_clip[v],
                                 "mse_by_position": (sse / count).round(7).tolist()}
        s = result["variants"][v]["all_clips"]
        print(f"{v:14s} PSNR {s['psnr']:.2f} dB, seam ring MSE {s['seam_mse_over_inner']:.3f}× the interior's, "
              f"{100 * s['seam_share_of_error']:.1f} % of the error on {100 * s['seam_share_of_pixels']:.2f} % of "
              f"the pixels; seams at the interior's level: {s['psnr_seams_at_inner_level']:.2f} dB "
              f"(+{s['bound_gain_db']:.2f})")
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
