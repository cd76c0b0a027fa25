"""Foreground masks of what the avatar models: the head (face, hair, ears) and the neck, never the torso.

One rule for every mask a Capture holds of a real person, so that training, lifting and evaluation agree:

    mask = the largest blob of (person segmentation × head region)

- **Person segmentation**: MediaPipe's selfie segmentation (its model ships inside the ``mediapipe`` wheel),
  the probability that a pixel shows the person, run on the frame at no less than :data:`SEGMENT_SIZE`² and
  area-resized to the capture's size, so that a small capture gets smooth, sub-pixel edges; only where the input
  picture was filmed (``track`` multiplies it by :func:`liftavatar.face.track.picture_coverage`: the black border
  of a crop that leaves the picture is not the person, even where it continues a neck).
- **Head region**: the pixels above the *jaw line*, plus the rig's silhouette (face, head shell and neck)
  widened by :data:`NECK_MARGIN` of the image side, all above the *collar line*. The two lines are horizontal
  lines of the head frame (the rig's y axis points down: jaw at :data:`JAW_Y`, collar at :data:`COLLAR_Y` metres
  from the rig's origin) projected with the frame's head pose and camera, so the region moves with the head, as
  the avatar's Gaussians do. The jaw line runs at the height of the jaw's angles, above the chin (the rig's chin
  is at y = 0.083): the silhouette of the rig's face keeps the chin and the lower jaw, which the neck alone
  did not (on ``train/retalking_face1`` and ``train/liveportrait_d20`` the sides of the jaw were cut; see
  ``docs/masks_train_clips.png``).

Why the torso is excluded rather than modelled: the avatar binds every Gaussian to a rig triangle, and the rig
has no shoulders; shoulders and clothes do not turn with the head, so an avatar cannot learn them from the
head's kinematics, and they would dominate its error (on a training clip, 31 % of the error of a whole-person
mask sat on the sweater). Hair that hangs below the jaw line beside the neck is excluded by the same rule.
The lines were placed on ``train/`` clips of ``../shared/real_videos`` (never the ``eval/`` ones).

Synthetic subjects have no torso (the rig's neck ends in a painted collar): ``synth`` captures keep the
renderer's coverage as their masks; a synthetic video run through ``track`` gets this rule like any other.
"""

from __future__ import annotations

import numpy as np
import torch

from liftavatar.face.render import rasterize
from liftavatar.face.rig import FaceRig
from liftavatar.io import to_uint8

__all__ = ["BLOB_FRINGE", "BLOB_LEVEL", "COLLAR_Y", "JAW_Y", "NECK_MARGIN", "SEGMENT_SIZE", "SelfieSegmenter",
           "below_head_line", "head_blob", "head_masks", "head_region"]

JAW_Y = 0.05
"""Head-frame height (metres, y down) of the jaw line: below it only the rig's silhouette, widened, is kept."""
COLLAR_Y = 0.12
"""Head-frame height of the collar line: below it nothing is kept."""
NECK_MARGIN = 0.04
"""How far the region below the jaw line reaches beyond the rig's silhouette (face, head, neck), as a share of
the image side."""
BLOB_LEVEL = 64
"""Person probability (of 255) at which blobs are told apart: lower, and the segmentation's faint haze joins
everything."""
BLOB_FRINGE = 0.02
"""How far (share of the image side) beyond the head's blob the soft mask is kept."""
SEGMENT_SIZE = 256
"""The selfie segmentation model's own input size: frames are segmented at least this large."""
_LINE_HALF_WIDTH = 0.1  # metres: the two head-frame points whose projection gives a line's direction
_SILHOUETTE_PARTS = ("face", "head", "neck")  # the rig's outer surface (eyes and mouth lie inside it)


class SelfieSegmenter:
    """MediaPipe selfie segmentation (bundled model): foreground probability per pixel. MediaPipe's own log lines
    are kept off the terminal (see :func:`liftavatar.face.landmarks.quiet_native_logs`)."""

    def __init__(self):
        from liftavatar.face.landmarks import quiet_native_logs

        self._quiet = quiet_native_logs
        with quiet_native_logs():
            import mediapipe as mp

            self._model = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
            # Its graph opens (and logs) on background threads: one blank frame waits for that, inside the block.
            self._model.process(np.zeros((64, 64, 3), np.uint8))

    def __call__(self, image: np.ndarray, size: int | None = None) -> np.ndarray:
        """(H, W) uint8 person probability of an (H, W, 3) uint8 RGB image, resized (area) to ``size``² if given."""
        with self._quiet():
            mask = self._model.process(np.ascontiguousarray(image)).segmentation_mask
        if size is not None and mask.shape != (size, size):
            import cv2  # comes with mediapipe

            mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_AREA)
        return to_uint8(mask)

    def close(self) -> None:
        with self._quiet():
            self._model.close()

    def __enter__(self) -> SelfieSegmenter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def below_head_line(rotation: torch.Tensor, translation: torch.Tensor, intrinsics: torch.Tensor, height: float,
                    size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) bool: pixels below the projection of the head frame's horizontal line at ``height`` (metres, y
    down; :data:`JAW_Y`, :data:`COLLAR_Y`), for (B, 3) axis-angle ``rotation`` and ``translation`` and (B, 4)
    ``intrinsics`` at ``size`` (H, W)."""
    from liftavatar.face.rig import axis_angle_to_matrix

    b = rotation.shape[0]
    points = torch.tensor([[-_LINE_HALF_WIDTH, height, 0.0], [_LINE_HALF_WIDTH, height, 0.0]])
    cam = points[None] @ axis_angle_to_matrix(rotation).transpose(1, 2) + translation[:, None]  # (B, 2, 3)
    fx, fy, cx, cy = intrinsics.unbind(-1)
    z = cam[..., 2].clamp_min(1e-6)
    u = fx[:, None] * cam[..., 0] / z + cx[:, None]
    v = fy[:, None] * cam[..., 1] / z + cy[:, None]
    du, dv = u[:, 1] - u[:, 0], v[:, 1] - v[:, 0]
    # Normal of the line, pointing down the image for an upright head (flip it where it points up).
    nu, nv = -dv, du
    flip = nv < 0
    nu, nv = torch.where(flip, -nu, nu), torch.where(flip, -nv, nv)
    h, w = size
    rows = torch.arange(h, dtype=torch.float32) + 0.5
    cols = torch.arange(w, dtype=torch.float32) + 0.5
    side = (cols[None, None, :] - u[:, 0, None, None]) * nu[:, None, None] + \
        (rows[None, :, None] - v[:, 0, None, None]) * nv[:, None, None]
    return side.view(b, h, w) > 0


@torch.no_grad()
def head_region(identity: np.ndarray, expression: np.ndarray, rotation: np.ndarray, translation: np.ndarray,
                intrinsics, size: tuple[int, int], rig: FaceRig | None = None,
                vertices: torch.Tensor | None = None) -> np.ndarray:
    """(B, H, W) bool: where the head and the neck may be, for frames of this subject's kinematics (expression
    (B, E), axis-angle rotation (B, 3), translation (B, 3) metres) seen through ``intrinsics`` (fx, fy, cx, cy)
    in pixels at ``size`` (H, W). See the module docstring. ``vertices``: the posed rig of these frames (B, V, 3),
    camera frame in metres, when the caller has it already.

    It runs for every tracked frame, so it is made cheap: the silhouette is rasterized at no more than 128² (it is
    widened anyway), widened with OpenCV's dilation and nearest-upsampled by indexing; only the two lines are
    tested at every pixel (about 2 ms a frame at 512² on one core, `benchmarks/tracking.py`)."""
    import cv2  # comes with mediapipe

    rig = rig or FaceRig.load()
    rot = torch.as_tensor(np.asarray(rotation, np.float32))
    trans = torch.as_tensor(np.asarray(translation, np.float32))
    b = rot.shape[0]
    k = torch.as_tensor(intrinsics, dtype=torch.float32).expand(b, 4)
    h, w = size
    scale = min(1.0, 128 / max(h, w))
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    outer = torch.as_tensor(rig.faces[rig.part_mask(*_SILHOUETTE_PARTS)])
    verts = rig.vertices(identity, expression, rotation, translation) if vertices is None else vertices.cpu()
    frag = rasterize(verts, outer, k * torch.tensor([sw / w, sh / h, sw / w, sh / h]), (sh, sw))
    silhouette = (frag.face_index >= 0).numpy().astype(np.uint8)
    radius = max(1, round(NECK_MARGIN * max(sh, sw)))
    disk = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)  # a square: max pooling's window
    grown = np.stack([cv2.dilate(one, disk) for one in silhouette]).astype(bool)
    # Nearest upsampling as torch's F.interpolate(mode="nearest") picks: source index floor(i * in / out).
    rows = np.minimum((np.arange(h) * (sh / h)).astype(np.int64), sh - 1)
    cols = np.minimum((np.arange(w) * (sw / w)).astype(np.int64), sw - 1)
    grown = grown[:, rows][:, :, cols]
    below_jaw = below_head_line(rot, trans, k, JAW_Y, size).numpy()
    below_collar = below_head_line(rot, trans, k, COLLAR_Y, size).numpy()
    return (~below_jaw | grown) & ~below_collar


def head_masks(person: np.ndarray, region: np.ndarray) -> np.ndarray:
    """(B, H, W) uint8 masks: the person probability (uint8) where the head region (bool) allows, else 0, and
    of that only the head's own blob (:func:`head_blob`)."""
    return np.stack([head_blob(m) for m in np.where(region, person, 0).astype(np.uint8)])


def head_blob(mask: np.ndarray) -> np.ndarray:
    """(H, W) uint8: ``mask`` (a person probability within the head region) with every blob apart from the
    largest removed. The segmentation takes anything person-like for the person, and above the jaw line the head
    region spans the whole frame, so a bottle or a lamp beside the head came into the mask (seen on a clip with a
    bottle at the frame's edge), and an avatar cannot learn an object that does not move with the head. In a crop
    framed on the face the head is the largest blob; blobs are cut at :data:`BLOB_LEVEL`, and the kept one is
    widened by :data:`BLOB_FRINGE` of the side so that its soft edge stays as the segmentation made it."""
    import cv2  # comes with mediapipe

    solid = (mask >= BLOB_LEVEL).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(solid, connectivity=8)
    if count <= 2:  # background and at most one blob: nothing to remove
        return mask
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    radius = max(1, round(BLOB_FRINGE * max(mask.shape)))
    keep = cv2.dilate((labels == largest).astype(np.uint8), np.ones((2 * radius + 1,) * 2, np.uint8))
    return np.where(keep > 0, mask, 0).astype(np.uint8)
