"""LPIPS (Zhang et al. 2018), version 0.1 with the AlexNet trunk: the standard configuration.

The network is written out here (torchvision is not a dependency) with the layer names of the
reference implementation, so the standard weight files load unchanged:

- trunk: torchvision's AlexNet ``features`` (conv 11/4 → 64, maxpool, conv 5 → 192, maxpool,
  conv 3 → 384, conv 3 → 256, conv 3 → 256, each conv followed by ReLU), tapped after each of the
  5 ReLUs; weights ``alexnet-owt-7be5be79.pth`` (keys ``features.{0,3,6,8,10}.{weight,bias}``).
- heads: LPIPS v0.1 ``alex.pth``: per tap a 1×1 conv without bias to one channel (keys
  ``lin{0..4}.model.1.weight``).

Distance: inputs in [0, 1] are mapped to [-1, 1], then through the scaling layer
(shift (-.030, -.088, -.188), scale (.458, .448, .450)); per tap the features are unit-normalised
over channels (eps 1e-10), their squared difference weighted by the head, averaged over space;
the 5 taps are summed. 0 for identical images; typically 0–0.7.

Without the weight files the metric is skipped (:class:`MissingWeightsError`), never replaced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from liftavatar.metrics.errors import MetricsError
from liftavatar.metrics.weights import LpipsWeights, find_lpips_weights

__all__ = ["LPIPS", "lpips"]

CHANNELS = (64, 192, 384, 256, 256)
# torchvision AlexNet.features indices: conv layers and where each LPIPS tap ends (after a ReLU).
_SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))


def _alexnet_features() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(inplace=True),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(inplace=True),
    )


class _Head(nn.Module):
    """LPIPS ``NetLinLayer``: (dropout, unused in eval) + 1×1 conv to one channel, no bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


class LPIPS(nn.Module):
    """LPIPS v0.1 / AlexNet. ``forward(a, b)`` takes (B, 3, H, W) floats in [0, 1] and returns (B,)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _alexnet_features()
        self.lins = nn.ModuleList(_Head(c) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.eval()

    @classmethod
    def from_files(cls, weights: LpipsWeights) -> LPIPS:
        """Load the standard files (see the module docstring); every weight must be present."""
        model = cls()
        trunk = _load(weights.backbone)
        trunk = {k.removeprefix("features."): v for k, v in trunk.items() if k.startswith("features.")}
        heads = _load(weights.heads)
        heads = {k.replace("lin", "", 1): v for k, v in heads.items() if k.startswith("lin")}
        try:
            model.features.load_state_dict(trunk, strict=True)
            model.lins.load_state_dict(heads, strict=True)
        except RuntimeError as exc:
            raise MetricsError(f"{weights.backbone} / {weights.heads}: not torchvision's AlexNet and LPIPS v0.1's "
                               f"alex.pth ({str(exc).splitlines()[0]}); pass the standard files.") from None
        return model

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (2.0 * x - 1.0 - self.shift) / self.scale
        out = []
        for start, stop in _SLICES:
            for layer in self.features[start:stop]:
                h = layer(h)
            out.append(h)
        return out

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(a.shape[0], device=a.device, dtype=a.dtype)
        for fa, fb, head in zip(self.taps(a), self.taps(b), self.lins):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + head.model((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise MetricsError(f"{path}: cannot be read as a PyTorch state dict ({exc}); pass the standard file.") from None
    if not isinstance(state, dict):
        raise MetricsError(f"{path}: holds a {type(state).__name__}, not a state dict; pass the standard file.")
    return state


def _to_tensor(frames: np.ndarray, device: str) -> torch.Tensor:
    x = torch.as_tensor(np.ascontiguousarray(frames))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.permute(0, 3, 1, 2).to(device)


def lpips(
    pred: np.ndarray,
    gt: np.ndarray,
    masks: np.ndarray | None = None,
    weights: str | Path | LpipsWeights | LPIPS | None = None,
    device: str = "cpu",
    batch_size: int = 16,
) -> np.ndarray:
    """Per-frame LPIPS distance (unitless, 0 for identical frames) of (N, H, W, 3) frames.

    Args:
        pred, gt: uint8 [0, 255] or float [0, 1] RGB frames.
        masks: optional (N, H, W) foreground; both frames are composited on black outside it
            (the usual masked LPIPS).
        weights: a loaded :class:`LPIPS`, the weight files, or where to look for them (see
            :mod:`liftavatar.metrics.weights`).

    Raises:
        MissingWeightsError: the standard weights are not on this machine.
    """
    if isinstance(weights, LPIPS):
        model = weights
    else:
        files = weights if isinstance(weights, LpipsWeights) else find_lpips_weights(weights)
        model = LPIPS.from_files(files)
    model = model.to(device)
    out = []
    for start in range(0, len(pred), batch_size):
        a = _to_tensor(pred[start:start + batch_size], device)
        b = _to_tensor(gt[start:start + batch_size], device)
        if masks is not None:
            m = torch.as_tensor(np.asarray(masks[start:start + batch_size]))
            m = (m > 127 if m.dtype == torch.uint8 else m > 0.5).to(device=device, dtype=a.dtype)[:, None]
            a, b = a * m, b * m
        out.append(model(a, b).cpu().numpy())
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
