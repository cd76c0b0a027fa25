"""Pixel metrics: PSNR and SSIM, each optionally restricted to a foreground mask.

Images are (H, W, 3) RGB, uint8 in [0, 255] or float in [0, 1]; both are compared as floats in
[0, 1] (data range 1). Masks are (H, W): uint8 alpha (foreground where > 127), bool, or float in
[0, 1] (foreground where > 0.5).
"""

from __future__ import annotations

import math

import numpy as np

from liftavatar.metrics.errors import MetricsError

__all__ = ["PSNR_CAP_DB", "to_float", "to_mask", "psnr", "ssim", "ssim_map"]

# PSNR of identical images is infinite; the MSE is floored at 1e-10, which caps it at 100 dB and
# keeps means and JSON finite.
PSNR_CAP_DB = 100.0
_MSE_FLOOR = 10 ** (-PSNR_CAP_DB / 10)

# The standard SSIM of Wang et al. (2004): an 11×11 Gaussian window of σ = 1.5 pixels,
# K1 = 0.01, K2 = 0.03, population (not sample) covariances.
SSIM_SIGMA = 1.5


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float64 [0, 1]; float images are returned as float64 unchanged."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float64)
    raise MetricsError(f"image of dtype {image.dtype}: pass uint8 in [0, 255] or float in [0, 1].")


def to_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool foreground from uint8 alpha (> 127), bool, or float in [0, 1] (> 0.5)."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return mask
    if mask.dtype == np.uint8:
        return mask > 127
    return mask > 0.5


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = to_float(pred), to_float(gt)
    if pred.shape != gt.shape:
        raise MetricsError(f"prediction {pred.shape} and ground truth {gt.shape} differ in shape; compare images of one size.")
    return pred, gt


def psnr(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB, data range 1: ``10 log10(1 / MSE)``.

    The MSE is the mean over all pixels and channels, or over the pixels where ``mask`` is
    foreground (all channels). It is floored at 1e-10, so identical images score
    :data:`PSNR_CAP_DB` (100 dB). An empty mask gives NaN.
    """
    pred, gt = _pair(pred, gt)
    err = (pred - gt) ** 2
    if mask is not None:
        m = to_mask(mask)
        if not m.any():
            return float("nan")
        err = err[m]
    return float(10.0 * math.log10(1.0 / max(float(err.mean()), _MSE_FLOOR)))


def ssim_map(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The (H, W, C) local SSIM map (skimage's Gaussian-window SSIM, see :data:`SSIM_SIGMA`)."""
    from skimage.metrics import structural_similarity

    pred, gt = _pair(pred, gt)
    if min(pred.shape[:2]) < 11:
        raise MetricsError(f"images of {pred.shape[0]}x{pred.shape[1]} px are smaller than SSIM's 11x11 window; "
                           f"compare images of at least 11x11.")
    channel_axis = -1 if pred.ndim == 3 else None
    _, smap = structural_similarity(gt, pred, data_range=1.0, channel_axis=channel_axis, gaussian_weights=True,
                                    sigma=SSIM_SIGMA, use_sample_covariance=False, full=True)
    return smap


def ssim(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Structural similarity (unitless, ≤ 1; 1 for identical images), Wang et al. 2004.

    Gaussian window σ = 1.5 px (11×11), K1 = 0.01, K2 = 0.03, data range 1, computed per channel
    and averaged. As in skimage (and the reference MATLAB code), the 5-pixel border where the
    window does not fit is left out of the mean; with ``mask``, the mean is over the foreground
    pixels inside that border. An empty mask gives NaN.
    """
    smap = ssim_map(pred, gt)
    pad = 5  # (11 - 1) // 2
    inner = smap[pad:-pad, pad:-pad]
    if mask is None:
        return float(inner.mean())
    m = to_mask(mask)[pad:-pad, pad:-pad]
    if not m.any():
        return float("nan")
    return float(inner[m].mean())
