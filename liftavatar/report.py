"""Pictures people would rather look at than read: contact sheets of captures and subjects."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from liftavatar.capture import Capture
from liftavatar.io import save_png


def grid(images: Sequence[Sequence[np.ndarray]], labels: Sequence[Sequence[str]] | None = None,
         row_labels: Sequence[str] | None = None, pad: int = 2, label_height: int = 14,
         max_cell: int = 256) -> np.ndarray:
    """Tile rows of equally sized (H, W, 3) uint8 images into one image, with optional captions.

    Images larger than ``max_cell`` pixels on a side are shrunk to it.
    """
    if max(images[0][0].shape[:2]) > max_cell:
        images = [[_shrink(image, max_cell) for image in row] for row in images]
    rows = len(images)
    cols = max(len(r) for r in images)
    h, w = images[0][0].shape[:2]
    left = 90 if row_labels else 0
    cell_h = h + (label_height if labels else 0)
    sheet = Image.new("RGB", (left + cols * (w + pad) + pad, rows * (cell_h + pad) + pad), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(images):
        y = pad + r * (cell_h + pad)
        if row_labels:
            draw.text((4, y + h // 2 - 6), row_labels[r], fill=(230, 230, 230))
        for c, image in enumerate(row):
            x = left + pad + c * (w + pad)
            sheet.paste(Image.fromarray(np.ascontiguousarray(image[..., :3])), (x, y))
            if labels:
                draw.text((x + 2, y + h + 1), labels[r][c], fill=(230, 230, 230))
    return np.asarray(sheet)


def _shrink(image: np.ndarray, side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = side / max(h, w)
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.LANCZOS))


def capture_contact_sheet(capture: Capture, path: str | Path, num: int = 8) -> Path:
    """Frames of a capture (evenly spaced) above their masks and shading maps, as a PNG."""
    indices = np.linspace(0, capture.num_frames - 1, min(num, capture.num_frames)).round().astype(int)
    frames = list(capture.frames(indices))
    masks = [np.repeat(m[..., None], 3, -1) for m in capture.masks(indices)]
    shadings = list(capture.shadings(indices))
    labels = [[f"frame {i}" for i in indices]] * 3
    sheet = grid([frames, masks, shadings], labels, row_labels=["frame", "mask", "shading"])
    return save_png(sheet, path)


def machine_info(device: str = "cpu") -> dict[str, object]:
    """What a benchmark ran on: CPU model and count, platform, torch, and the GPU when used."""
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, object] = {
        "device": str(device),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def machine_name(info: dict[str, object]) -> str:
    """A :func:`machine_info` in words: the GPU, else the CPU model and its cores."""
    return str(info["gpu"]) if info.get("gpu") else f"{info.get('cpu', '?')} ({info.get('cpu_count', '?')} cores)"


def wireframe_overlay(frame: np.ndarray, points: np.ndarray, faces: np.ndarray, colour=(80, 255, 120)) -> np.ndarray:
    """The frame with the edges of ``faces`` drawn between projected ``points`` (V, 2) pixels."""
    image = Image.fromarray(frame.copy())
    draw = ImageDraw.Draw(image)
    edges = {tuple(sorted((int(t[a]), int(t[b])))) for t in faces for a, b in ((0, 1), (1, 2), (2, 0))}
    for a, b in edges:
        draw.line([tuple(points[a]), tuple(points[b])], fill=colour, width=1)
    return np.asarray(image)


def tracking_contact_sheet(capture: Capture, path: str | Path, num: int = 8) -> Path:
    """Frames of a tracked capture: as filmed, with the fitted face mesh overlaid, what the mask keeps (the rest
    dimmed to a quarter), and shading maps."""
    import torch

    from liftavatar.face.render import project
    from liftavatar.face.rig import FaceRig

    rig = FaceRig.load()
    k = capture.kinematics
    valid = np.flatnonzero(k.valid)
    indices = valid[np.linspace(0, len(valid) - 1, min(num, len(valid))).round().astype(int)] if len(valid) else []
    verts = rig.vertices(k.identity, k.expression[indices], k.rotation[indices], k.translation[indices])
    points = project(verts, torch.tensor(capture.meta.intrinsics))[..., :2].numpy()
    surface = rig.faces[rig.part_mask("face")]
    frames = list(capture.frames(indices))
    overlays = [wireframe_overlay(f, p, surface) for f, p in zip(frames, points)]
    kept = [(f * (0.25 + 0.75 * m[..., None] / 255.0)).round().astype(np.uint8)
            for f, m in zip(frames, capture.masks(indices))]
    shadings = list(capture.shadings(indices))
    labels = [[f"frame {i}" for i in indices]] * 4
    sheet = grid([frames, overlays, kept, shadings], labels, row_labels=["frame", "fitted mesh", "mask", "shading"])
    return save_png(sheet, path)
