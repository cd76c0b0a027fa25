"""What the prior is given, built from Captures: references, target shading maps, kinematic controls.

Used by `generate`, `lift`, the training clips (:mod:`liftavatar.generator.data`) and the benchmarks.

What crosses this border: Captures on disk (uint8 PNGs, kinematics in the rig's units) become the
pipeline's tensors: images float in [0, 1], channels first, (N, C, H, W); kinematic controls (N, E + 6)
float32 (:func:`kinematic_controls`).

Resolution: a capture keeps the resolution the user tracked at (`track` writes 512² by default), while a
prior generates at the one square size it was trained at (the embedded prior: 128²). Captures of any
square size work: what the prior sees (reference frames and shading maps, target shading maps) is resized
to the prior's size, and what it generates is resized back to the capture's (:func:`resize_images`: area
filtering when shrinking, bicubic when enlarging). Non-square captures are refused (:func:`square_side`):
squeezing them to a square would distort the face the prior was trained on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from liftavatar.capture import Capture
from liftavatar.errors import ConfigError
from liftavatar.generator.pipeline import GenerationInputs
from liftavatar.synth.kinematics import CAMERA_DISTANCE_M

__all__ = ["generation_inputs", "image_tensor", "kinematic_controls", "num_controls", "reference_indices",
           "reference_inputs", "resize_images", "square_side"]

logger = logging.getLogger(__name__)

# Translation enters the controls relative to the usual head position, in decimetres, so that all
# control components are of order one.
_TRANSLATION_ORIGIN = np.array([0.0, 0.0, CAMERA_DISTANCE_M], np.float32)
_TRANSLATION_SCALE = 10.0


def kinematic_controls(expression: np.ndarray, rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """Per-frame control vectors (N, E + 6): expression, axis-angle rotation (rad), translation (dm from rest)."""
    expression = np.asarray(expression, np.float32)
    t = (np.asarray(translation, np.float32) - _TRANSLATION_ORIGIN) * _TRANSLATION_SCALE
    return np.concatenate([expression, np.asarray(rotation, np.float32), t], axis=-1)


def num_controls(num_expressions: int) -> int:
    """Length of a control vector for a rig of ``num_expressions`` coefficients (+ 3 rotation + 3 translation)."""
    return num_expressions + 6


def image_tensor(array: np.ndarray) -> torch.Tensor:
    """(N, H, W[, C]) uint8 → (N, C, H, W) float in [0, 1]."""
    if array.ndim == 3:
        array = array[..., None]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float() / 255.0


def resize_images(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) float images in [0, 1] → (N, C, *size): unchanged when already that size; area-averaged
    when shrinking (no aliasing: every source pixel counts); bicubic, clamped to [0, 1], when enlarging."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(images.shape[-2:]) == size:
        return images
    if size[0] <= images.shape[-2] and size[1] <= images.shape[-1]:
        return F.interpolate(images, size=size, mode="area")
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def square_side(capture: Capture, verb: str) -> int:
    """The side of a capture's square frames; a non-square capture is a :class:`ConfigError` naming it."""
    height, width = capture.size
    if height != width:
        raise ConfigError(f"{capture.path}: its frames are {height}x{width} (HxW), not square; `{verb}` needs "
                          "square frames, as `liftavatar track` writes them: crop or pad the capture to a square.")
    return height


def reference_indices(capture: Capture, k: int, method: str = "kmeans", seed: int = 0) -> tuple[np.ndarray, str | None]:
    """The capture's stored references when there are ``k`` of them, else chosen now (with a note saying so)."""
    stored = capture.meta.reference_indices
    if stored is not None and len(stored) == k and method == "kmeans":
        return np.asarray(stored), None
    from liftavatar.refs import select_references

    idx = select_references(capture.kinematics, k, method, seed=seed)
    why = "none stored; store them with `liftavatar refs`" if stored is None else f"{len(stored)} stored"
    return idx, f"{capture.path}: references {idx.tolist()} chosen by {method} ({why})"


def reference_inputs(capture: Capture, indices: np.ndarray, size: int | None = None) -> dict[str, torch.Tensor]:
    """``ref_frames``, ``ref_shading`` (K, 3, H, W) and ``ref_controls`` (K, D) of these frames of a capture;
    images resized to ``size``² when given (the prior's resolution)."""
    k, idx = capture.kinematics, np.asarray(indices)
    frames, shading = image_tensor(capture.frames(idx.tolist())), image_tensor(capture.shadings(idx.tolist()))
    if size is not None:
        frames, shading = resize_images(frames, size), resize_images(shading, size)
    return dict(ref_frames=frames, ref_shading=shading,
                ref_controls=torch.from_numpy(kinematic_controls(k.expression[idx], k.rotation[idx], k.translation[idx])))


def generation_inputs(ref_capture: Capture, target_capture: Capture, k: int = 5, method: str = "kmeans",
                      seed: int = 0, frames: Sequence[int] | None = None, size: int | None = None) -> GenerationInputs:
    """GenerationInputs from two Captures: K references from one, target shading + kinematics from the other.

    ``size``: the prior's resolution (:attr:`LiftAvatarPipeline.size`); both captures' images are resized to
    it, so captures of any square size, and of two sizes, work. None keeps their sizes."""
    if list(ref_capture.meta.expression_names) != list(target_capture.meta.expression_names):
        raise ConfigError(f"{target_capture.path}: its {len(target_capture.meta.expression_names)} expression "
                          f"coefficients differ from the references' {len(ref_capture.meta.expression_names)}; "
                          "use kinematics made with the same rig.")
    if size is not None:
        square_side(ref_capture, "generate")
        square_side(target_capture, "generate")
    ref_idx, note = reference_indices(ref_capture, k, method, seed)
    if note:
        logger.info(note)
    idx = list(range(target_capture.num_frames)) if frames is None else list(frames)
    tk = target_capture.kinematics
    shading = image_tensor(target_capture.shadings(idx))
    return GenerationInputs(
        **reference_inputs(ref_capture, ref_idx, size),
        shading=shading if size is None else resize_images(shading, size),
        controls=torch.from_numpy(kinematic_controls(tk.expression[idx], tk.rotation[idx], tk.translation[idx])),
    )
