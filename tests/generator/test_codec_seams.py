"""benchmarks/codec_seams.py: error on the 8×8 block grid's ring is told apart from error inside the blocks."""

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "codec_seams.py"
spec = importlib.util.spec_from_file_location("codec_seams", SCRIPT)
seams = importlib.util.module_from_spec(spec)
spec.loader.exec_module(seams)


def test_seam_error_is_bounded_and_uniform_error_gains_nothing():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    ring = np.tile(seams.seam_mask(), (4, 4))
    seamed = gt.astype(np.int16)
    seamed[:, ring] += 40
    summary = seams.seam_summary(*seams.position_errors(np.clip(seamed, 0, 255).astype(np.uint8), gt))
    assert summary["seam_share_of_pixels"] == 0.4375 and summary["seam_share_of_error"] == 1.0
    assert summary["psnr_seams_at_inner_level"] == np.inf or summary["bound_gain_db"] > 10

    gt = rng.integers(0, 256, (8, 128, 128, 3), dtype=np.uint8)
    noisy = np.clip(gt.astype(np.int16) + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
    uniform = seams.seam_summary(*seams.position_errors(noisy, gt))
    assert abs(uniform["seam_share_of_error"] - 0.4375) < 0.02 and uniform["bound_gain_db"] < 0.05
