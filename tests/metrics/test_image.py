"""PSNR and SSIM against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from liftavatar.metrics import MetricsError, psnr, ssim
from liftavatar.metrics.image import PSNR_CAP_DB

C1, C2 = 0.01**2, 0.03**2  # SSIM constants for data range 1


def test_psnr_of_a_constant_offset():
    rng = np.random.default_rng(0)
    gt = rng.uniform(0.2, 0.8, (32, 32, 3))
    assert psnr(gt + 0.1, gt) == pytest.approx(20.0)  # MSE 0.01 -> 10 log10(1/0.01)
    assert psnr(gt - 0.05, gt) == pytest.approx(10 * math.log10(1 / 0.0025))
    # uint8: an offset of 10 levels everywhere is 20 log10(255 / 10) = 28.13 dB.
    g8 = rng.integers(20, 200, (24, 24, 3), dtype=np.uint8)
    assert psnr(g8 + np.uint8(10), g8) == pytest.approx(20 * math.log10(255 / 10))


def test_psnr_of_one_bad_pixel():
    gt = np.zeros((10, 10, 3))
    pred = gt.copy()
    pred[3, 4] = 1.0  # 3 channel values off by 1 among 300: MSE 0.01
    assert psnr(pred, gt) == pytest.approx(20.0)


def test_psnr_identical_is_capped_and_masked_ignores_background():
    gt = np.full((16, 16, 3), 0.5)
    assert psnr(gt, gt) == PSNR_CAP_DB
    pred = gt.copy()
    pred[:, 8:] += 0.2  # wrong only on the right half
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255
    assert psnr(pred, gt, mask) == PSNR_CAP_DB  # the error is all background
    assert psnr(pred, gt, 255 - mask) == pytest.approx(10 * math.log10(1 / 0.04))  # all foreground
    assert psnr(pred, gt) == pytest.approx(10 * math.log10(1 / 0.02))  # half the pixels
    assert math.isnan(psnr(pred, gt, np.zeros((16, 16), bool)))


def test_ssim_identical_is_one():
    img = np.random.default_rng(1).uniform(0, 1, (40, 40, 3))
    assert ssim(img, img) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("a, b", [(0.2, 0.6), (0.5, 0.45), (0.9, 0.1)])
def test_ssim_of_two_constant_images(a, b):
    """No variance anywhere: SSIM is the luminance term (2ab + C1) / (a² + b² + C1)."""
    expected = (2 * a * b + C1) / (a * a + b * b + C1)
    assert ssim(np.full((32, 32, 3), a), np.full((32, 32, 3), b)) == pytest.approx(expected, rel=1e-9)


def test_ssim_matches_its_definition():
    """Gaussian window σ = 1.5 (truncated at 3.5σ: 11×11), population statistics, 5-px border left out."""
    rng = np.random.default_rng(2)
    x = gaussian_filter(rng.uniform(0, 1, (48, 40)), 1.0)
    y = np.clip(x + rng.normal(0, 0.05, x.shape), 0, 1)
    f = lambda im: gaussian_filter(im, 1.5, truncate=3.5)  # noqa: E731
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    smap = (2 * mx * my + C1) * (2 * cxy + C2) / ((mx**2 + my**2 + C1) * (vx + vy + C2))
    expected = smap[5:-5, 5:-5].mean()
    assert ssim(y[..., None].repeat(3, -1), x[..., None].repeat(3, -1)) == pytest.approx(expected, rel=1e-6)
    assert ssim(y, x) == pytest.approx(expected, rel=1e-6)  # grayscale too


def test_ssim_masked_is_one_where_the_images_agree():
    gt = np.full((32, 32, 3), 0.5)
    pred = gt.copy()
    pred[:, 16:] = 0.3
    mask = np.zeros((32, 32), bool)
    mask[:, :8] = True  # more than a window's half-width away from the change at column 16
    assert ssim(pred, gt, mask) == pytest.approx(1.0, abs=1e-12)
    assert ssim(pred, gt) < 0.95


def test_uint8_and_float_agree_and_bad_shapes_are_refused():
    g8 = np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    p8 = np.clip(g8.astype(int) + 5, 0, 255).astype(np.uint8)
    assert psnr(p8, g8) == pytest.approx(psnr(p8 / 255.0, g8 / 255.0))
    assert ssim(p8, g8) == pytest.approx(ssim(p8 / 255.0, g8 / 255.0))
    with pytest.raises(MetricsError, match="differ in shape"):
        psnr(g8[:10], g8)
    with pytest.raises(MetricsError, match="11x11"):
        ssim(g8[:8, :8], g8[:8, :8])
