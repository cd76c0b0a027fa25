"""FID (Heusel et al. 2017) with pytorch-fid's port of the TensorFlow FID Inception-v3.

The network is written out here (torchvision is not a dependency) with torchvision's Inception-v3
layer names and pytorch-fid's FID patches (average pools that exclude padding in the A, C and
first E blocks; a max pool in the last E block), so ``pt_inception-2015-12-05-6726825d.pth`` loads
unchanged. Frames in [0, 1] are resized to 299² (bilinear), mapped to [-1, 1], and the 2048
pool features compared as Gaussians::

    FID = |μ1 − μ2|² + Tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½)

Without the weight file FID is skipped (:class:`MissingWeightsError`), never replaced. FID is
biased for small sets (its usual protocol uses ≥ 2,048 images a side); compare values only at
equal set sizes.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from liftavatar.metrics.errors import MetricsError
from liftavatar.metrics.weights import find_fid_weights

__all__ = ["FIDInception", "frechet_distance", "activation_statistics", "fid"]


class _Conv(nn.Module):
    """torchvision's BasicConv2d: conv (no bias) + batch norm (eps 1e-3) + ReLU."""

    def __init__(self, cin: int, cout: int, **kwargs) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # FID patch: TensorFlow's average pool leaves the zero padding out of the average.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class _A(nn.Module):
    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, kernel_size=1)
        self.branch5x5_1 = _Conv(cin, 48, kernel_size=1)
        self.branch5x5_2 = _Conv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _B(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, kernel_size=3, stride=2),
        ], 1)


class _C(nn.Module):
    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7_2 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool(x))], 1)


class _D(nn.Module):
    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch3x3_2 = _Conv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = _Conv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class _E(nn.Module):
    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, kernel_size=1)
        self.branch3x3_1 = _Conv(cin, 384, kernel_size=1)
        self.branch3x3_2a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = _Conv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # FID patch: the last block max-pools (an error in the original graph, kept for comparability).
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d),
            self.branch_pool(pooled),
        ], 1)


class FIDInception(nn.Module):
    """The FID Inception-v3 up to its 2048-d average pool. ``forward`` takes (B, 3, H, W) in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, kernel_size=3)
        self.Mixed_5b = _A(192, 32)
        self.Mixed_5c = _A(256, 64)
        self.Mixed_5d = _A(288, 64)
        self.Mixed_6a = _B(288)
        self.Mixed_6b = _C(768, 128)
        self.Mixed_6c = _C(768, 160)
        self.Mixed_6d = _C(768, 160)
        self.Mixed_6e = _C(768, 192)
        self.Mixed_7a = _D(768)
        self.Mixed_7b = _E(1280, max_pool=False)
        self.Mixed_7c = _E(2048, max_pool=True)
        self.eval()

    @classmethod
    def from_file(cls, path: str | Path) -> FIDInception:
        """Load ``pt_inception-2015-12-05-6726825d.pth`` (its 1008-way ``fc`` is not used)."""
        path = Path(path)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise MetricsError(f"{path}: cannot be read as a PyTorch state dict ({exc}); pass {path.name} "
                               f"from pytorch-fid.") from None
        if not isinstance(state, dict):
            raise MetricsError(f"{path}: holds a {type(state).__name__}, not a state dict; pass pytorch-fid's file.")
        model = cls()
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}
        result = model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
        if missing or result.unexpected_keys:
            what = f"lacks {missing[0]}" if missing else f"has unexpected {result.unexpected_keys[0]}"
            raise MetricsError(f"{path}: {what}, so it is not the FID Inception; pass pytorch-fid's "
                               f"pt_inception-2015-12-05-6726825d.pth.")
        return model

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians N(mu1, sigma1) and N(mu2, sigma2) (squared feature units).

    ``|mu1 − mu2|² + Tr(sigma1 + sigma2 − 2 sqrtm(sigma1 sigma2))``; as in pytorch-fid, when the
    product is singular ``eps`` is added to both diagonals, and a negligible imaginary part of
    the square root (numerical error) is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise MetricsError(f"Fréchet distance of statistics of different sizes ({mu1.shape} vs {mu2.shape}); "
                           f"compute both with the same network.")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Fewer samples than feature dimensions make the product singular: expected, and handled below.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise MetricsError(f"Fréchet distance: the covariance product's square root has an imaginary part of "
                               f"{np.max(np.abs(covmean.imag)):.3g}; use more frames per set.")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def activation_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of (N, D) features (sample covariance, as pytorch-fid)."""
    features = np.asarray(features, np.float64)
    if len(features) < 2:
        raise MetricsError(f"FID needs at least 2 frames per set to estimate a covariance, got {len(features)}; "
                           f"evaluate more frames.")
    return features.mean(0), np.cov(features, rowvar=False)


def _features(model: nn.Module, frames: np.ndarray, device: str, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(frames), batch_size):
        x = torch.as_tensor(np.ascontiguousarray(frames[start:start + batch_size]))
        x = (x.float() / 255.0 if x.dtype == torch.uint8 else x.float()).permute(0, 3, 1, 2).to(device)
        out.append(model(x).cpu().numpy())
    return np.concatenate(out)


def fid(pred: np.ndarray, gt: np.ndarray, weights: str | Path | nn.Module | None = None,
        device: str = "cpu", batch_size: int = 16) -> float:
    """FID between two sets of (N, H, W, 3) RGB frames (uint8 or float in [0, 1]); 0 for equal sets.

    Args:
        weights: a loaded :class:`FIDInception` (any module mapping (B, 3, H, W) in [0, 1] to
            (B, D) features is accepted), or where to find its weight file (see
            :func:`liftavatar.metrics.weights.find_fid_weights`).

    Raises:
        MissingWeightsError: the FID Inception weights are not on this machine.
    """
    model = weights if isinstance(weights, nn.Module) else FIDInception.from_file(find_fid_weights(weights))
    model = model.to(device)
    stats = [activation_statistics(_features(model, frames, device, batch_size)) for frames in (pred, gt)]
    return frechet_distance(*stats[0], *stats[1])
