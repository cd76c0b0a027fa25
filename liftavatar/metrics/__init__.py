"""Quality metrics of generated / rendered frames against ground truth (DESIGN.md §4).

PSNR, SSIM (:mod:`.image`), LPIPS (:mod:`.lpips`), FID (:mod:`.fid`), AED and APD
(:mod:`.kinematic`), CSIM (:mod:`.identity`); :func:`evaluate` runs them all on two frame
sequences (``liftavatar eval``). Submodules load torch, MediaPipe and dlib only when used.
"""

from liftavatar.metrics.errors import MetricsError, MissingWeightsError
from liftavatar.metrics.evaluate import ALL_METRICS, EvalConfig, evaluate, evaluate_paths, format_report, write_report
from liftavatar.metrics.image import psnr, ssim
from liftavatar.metrics.kinematic import aed, apd, rotation_angle_deg
from liftavatar.metrics.sources import FrameSet, load_frames

__all__ = [
    "ALL_METRICS", "EvalConfig", "FrameSet", "MetricsError", "MissingWeightsError", "aed", "apd", "evaluate",
    "evaluate_paths", "format_report", "load_frames", "psnr", "rotation_angle_deg", "ssim", "write_report",
]
