"""The control signal: the rig rendered untextured, what the generator is conditioned on (DESIGN.md §1, §6).

A **shading map** is the posed rig of one subject (its identity, a frame's expression and head pose,
the capture's camera) rendered without texture: every part a fixed grey (:data:`SHADING_ALBEDO`:
skin 0.8, eyes and teeth 0.95, tongue 0.5, mouth cavity 0.2, head shell and neck 0.7), lit by the
renderer's canonical light (:data:`liftavatar.face.render.CANONICAL_LIGHTING`) whatever the scene's
lighting, over black. Eyes, teeth and the inside of the mouth stay distinguishable, as they are in
the geometry a tracker fits. The **rig mask** is the same render's coverage.

One function renders them for every stage, so the prior is conditioned at run time on the signal it
was trained on: the synthetic world (the prior's training stream and ground-truth captures), the
tracker (observed frames and the references' own shading) and ``lift`` (the target frames).

Resolution policy: the raster of one map is at most :data:`MAX_RASTER` pixels on a side. Up to half
that (128², the prior's resolution) maps are rendered with 2× supersampling; larger images are
rendered at up to :data:`MAX_RASTER`² without supersampling and resized bilinearly. So a map brought to
the prior's 128² is always at least 2× supersampled, as the prior's training maps are, and a 512²
capture costs a 256² raster a frame (a 1024² one would take ~180 ms a frame on a 2-core CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from liftavatar.face.render import render_mesh
from liftavatar.face.rig import FaceRig
from liftavatar.io import to_uint8

__all__ = ["MAX_RASTER", "SHADING_ALBEDO", "SUPERSAMPLE", "ControlMaps", "raster_plan", "render_controls",
           "render_shading", "shading_albedo"]

SHADING_ALBEDO = {"face": 0.8, "eyeball": 0.95, "upper_teeth": 0.95, "lower_teeth": 0.95, "tongue": 0.5,
                  "cavity": 0.2, "head": 0.7, "neck": 0.7}
SUPERSAMPLE = 2
MAX_RASTER = 256


def shading_albedo(rig: FaceRig) -> torch.Tensor:
    """(F,) grey albedo of every rig face in the shading map."""
    per_part = torch.tensor([SHADING_ALBEDO[p] for p in rig.part_names])
    return per_part[torch.as_tensor(rig.face_part.astype(np.int64))]


def raster_plan(size: tuple[int, int]) -> tuple[tuple[int, int], int]:
    """(render size (H, W), supersampling) of the maps of an image of ``size`` (H, W) under the policy above."""
    h, w = size
    if max(h, w) * SUPERSAMPLE <= MAX_RASTER:
        return (h, w), SUPERSAMPLE
    if max(h, w) <= MAX_RASTER:
        return (h, w), 1
    scale = MAX_RASTER / max(h, w)
    return (max(1, round(h * scale)), max(1, round(w * scale))), 1


@dataclass
class ControlMaps:
    """Shading maps (B, H, W, 3) and rig masks (B, H, W), uint8."""

    shading: np.ndarray
    mask: np.ndarray


def render_controls(vertices: torch.Tensor, intrinsics, size: tuple[int, int], rig: FaceRig | None = None
                    ) -> ControlMaps:
    """Shading maps and rig masks of posed rig ``vertices`` (B, V, 3), camera frame in metres (on the device
    to render on), seen through ``intrinsics`` (fx, fy, cx, cy) in pixels at ``size`` (H, W)."""
    shading, mask = _render(vertices, intrinsics, size, rig, with_mask=True)
    return ControlMaps(shading, mask)


def render_shading(vertices: torch.Tensor, intrinsics, size: tuple[int, int], rig: FaceRig | None = None
                   ) -> np.ndarray:
    """The shading maps (B, H, W, 3) uint8 of :func:`render_controls`, the same pixels, without the rig masks:
    for a stage that writes only the maps (the tracker: a quarter less time a frame at 512²)."""
    return _render(vertices, intrinsics, size, rig, with_mask=False)[0]


def _render(vertices: torch.Tensor, intrinsics, size: tuple[int, int], rig: FaceRig | None, with_mask: bool
            ) -> tuple[np.ndarray, np.ndarray | None]:
    rig = rig or FaceRig.load()
    device = vertices.device
    (rh, rw), supersample = raster_plan(size)
    k = torch.as_tensor(intrinsics, dtype=torch.float32, device=device).clone()
    k[..., 0::2] *= rw / size[1]
    k[..., 1::2] *= rh / size[0]
    out = render_mesh(vertices, torch.as_tensor(rig.faces, device=device), k, (rh, rw),
                      shading_albedo=shading_albedo(rig).to(device), supersample=supersample)
    shading, mask = to_uint8(out.shading), to_uint8(out.mask) if with_mask else None
    if (rh, rw) != tuple(size):
        shading = _upsample(shading, size)
        mask = _upsample(mask, size) if with_mask else None
    return shading, mask


def _upsample(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 images (B, h, w[, C]) resized bilinearly (pixel-centre aligned) to ``size`` (H, W). In uint8 with
    OpenCV (it comes with MediaPipe) rather than in float with torch: a 512² shading map takes 22 ms instead of 26
    on one core of a 2-core Intel Xeon (most of the rest is the rasterizer); pixels differ from the float path's by
    at most one grey level."""
    import cv2

    return np.stack([cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR) for image in images])
