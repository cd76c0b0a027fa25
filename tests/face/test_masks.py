"""Masks of what the avatar models: person segmentation × head region (liftavatar.face.masks), and the tracker
writing them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liftavatar.face.masks import (BLOB_FRINGE, COLLAR_Y, JAW_Y, SEGMENT_SIZE, SelfieSegmenter, head_blob, head_masks,
                                   head_region)
from liftavatar.face.render import project
from liftavatar.face.rig import FaceRig

SIZE = 128
FOCAL = 0.5 * SIZE / np.tan(np.radians(15))  # the synthetic world's 30° field of view
K = (FOCAL, FOCAL, SIZE / 2, SIZE / 2)


@pytest.fixture(scope="module")
def rig() -> FaceRig:
    return FaceRig.load()


def _region(rig: FaceRig, rotation=(0.0, 0.0, 0.0), translation=(0.0, 0.0, 0.6)) -> np.ndarray:
    """(H, W) head region of the neutral mean head at ``rotation`` (axis-angle) and ``translation`` (metres)."""
    return head_region(np.zeros(len(rig.identity_names), np.float32), rig.neutral_expression(1),
                       np.array([rotation], np.float32), np.array([translation], np.float32), K, (SIZE, SIZE), rig)[0]


def _pixels(points: np.ndarray, rotation=(0.0, 0.0, 0.0), translation=(0.0, 0.0, 0.6)) -> np.ndarray:
    """(P, 2) integer (row, col) of head-frame ``points`` (P, 3) metres posed and projected as in :func:`_region`."""
    from liftavatar.face.rig import axis_angle_to_matrix

    r = axis_angle_to_matrix(torch.tensor([rotation], dtype=torch.float32))[0]
    cam = torch.as_tensor(points, dtype=torch.float32) @ r.T + torch.tensor(translation)
    uv = project(cam[None], torch.tensor(K, dtype=torch.float32))[0, :, :2].numpy()
    return np.floor(uv[:, ::-1]).astype(int)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_the_region_moves_with_the_head(rig):
    import cv2

    # Compared: what the region leaves out (the sides of the neck, below the collar), the part that has a shape.
    still = ~_region(rig)
    # 3 cm to the right at 0.6 m is FOCAL * 0.03 / 0.6 ≈ 12 px.
    shift = round(FOCAL * 0.03 / 0.6)
    moved = ~_region(rig, translation=(0.03, 0.0, 0.6))
    inner = np.s_[:, shift:-shift]  # away from the columns np.roll wraps around
    assert _iou(moved[inner], still[inner]) < 0.85
    assert _iou(moved[inner], np.roll(still, shift, axis=1)[inner]) > 0.97
    # A roll about the camera's axis keeps every depth, so it turns the picture about the principal point: the
    # region turns with it (cv2 counts angles counter-clockwise as displayed, a positive roll turns clockwise).
    angle = 25.0
    rolled = ~_region(rig, rotation=(0.0, 0.0, np.radians(angle)))
    turn = cv2.getRotationMatrix2D((SIZE / 2 - 0.5, SIZE / 2 - 0.5), -angle, 1.0)
    expected = cv2.warpAffine(still.astype(np.uint8), turn, (SIZE, SIZE), flags=cv2.INTER_NEAREST,
                              borderValue=1) > 0
    inside = cv2.warpAffine(np.ones((SIZE, SIZE), np.uint8), turn, (SIZE, SIZE), flags=cv2.INTER_NEAREST) > 0
    assert _iou(rolled[inside], still[inside]) < 0.85
    assert _iou(rolled[inside], expected[inside]) > 0.95


def test_the_collar_line_removes_the_torso_and_what_hangs_beside_the_neck(rig):
    person = np.full((1, SIZE, SIZE), 255, np.uint8)  # a segmentation that takes in the whole upper body
    mask = head_masks(person, _region(rig)[None])[0]
    below_collar = _pixels(np.array([[0.0, COLLAR_Y + 0.015, 0.0], [0.05, COLLAR_Y + 0.025, 0.0]]))
    beside_neck = _pixels(np.array([[-0.13, JAW_Y + 0.04, 0.0], [0.13, JAW_Y + 0.04, 0.0]]))  # shoulders, long hair
    for r, c in np.concatenate([below_collar, beside_neck]):
        assert 0 <= r < SIZE and 0 <= c < SIZE and mask[r, c] == 0
    assert mask[-8:].max() == 0, "the bottom of the picture (the chest) is cut"
    assert (mask == 255).mean() > 0.2


@pytest.mark.parametrize("rotation", [(0.0, 0.0, 0.0), (0.0, 0.45, 0.0), (0.0, -0.45, 0.0), (0.25, 0.0, 0.0),
                                      (-0.25, 0.2, 0.1)], ids=["frontal", "yaw+", "yaw-", "pitch", "mixed"])
def test_the_whole_face_survives_whatever_the_pose(rig, rotation):
    """The chin and the jaw hang below the jaw line (which runs at the jaw's angles): the face of the rig is kept
    wherever it lands, turned or tilted."""
    region = _region(rig, rotation=rotation)
    verts = rig.vertices(np.zeros(len(rig.identity_names), np.float32), rig.neutral_expression(1),
                         np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32))[0].numpy()
    rows, cols = _pixels(verts[:468], rotation=rotation).T
    assert region[rows, cols].all(), f"{(~region[rows, cols]).sum()} face landmarks cut"


def test_the_head_and_the_neck_survive(rig):
    region = _region(rig)
    verts = rig.vertices(np.zeros(len(rig.identity_names), np.float32), rig.neutral_expression(1),
                         np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32))[0].numpy()
    neck = verts[np.unique(rig.faces[rig.part_mask("neck")])]
    neck = neck[(neck[:, 1] > JAW_Y + 0.005) & (neck[:, 1] < COLLAR_Y - 0.005) & (np.abs(neck[:, 0]) < 0.06)]
    assert len(neck) > 10
    face = verts[:468]
    hair = np.array([[0.0, -0.15, 0.0], [-0.09, -0.05, 0.02], [0.09, 0.0, 0.02]])  # above the head, at the ears
    for name, points in (("neck", neck), ("face", face), ("hair and ears", hair)):
        rows, cols = _pixels(points).T
        assert region[rows, cols].all(), f"the {name} is cut"


def test_head_region_rasterizes_the_neck_at_no_more_than_128_pixels(rig, monkeypatch):
    """The region runs for every frame: what it costs is bounded by a small neck raster, whatever the size."""
    from liftavatar.face import masks

    sizes = []
    real = masks.rasterize

    def recording(vertices, faces, intrinsics, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real(vertices, faces, intrinsics, size, *args, **kwargs)

    monkeypatch.setattr(masks, "rasterize", recording)
    region = head_region(np.zeros(len(rig.identity_names), np.float32), rig.neutral_expression(2),
                         np.zeros((2, 3), np.float32), np.array([[0, 0, 0.6]] * 2, np.float32),
                         tuple(4 * np.array(K)), (512, 512), rig)
    assert region.shape == (2, 512, 512) and region.dtype == bool
    assert sizes == [(128, 128)]


def _soft_disc(size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    """uint8 probability of a disc with a soft edge 3 px wide, as the segmentation makes edges."""
    yy, xx = np.mgrid[:size, :size] + 0.5
    distance = np.hypot(yy - centre[0], xx - centre[1])
    return (255 * np.clip((radius - distance) / 3 + 0.5, 0, 1)).astype(np.uint8)


def test_only_the_head_blob_is_kept():
    """A bottle beside the head that the segmentation took for the person is removed, whether it lies in the
    head region or not; the head's blob, soft edge included, is left exactly as segmented; a mask of one blob, or
    of none, is returned unchanged."""
    size = 128
    head = _soft_disc(size, (60, 56), 30)
    bottle = np.zeros_like(head)
    bottle[30:70, 116:124] = 200
    person = np.maximum(head, bottle)
    region = np.ones((1, size, size), bool)
    region[:, 50:, 120:] = False  # the region's edge crosses the bottle: what is left of it is a blob still
    masks = head_masks(person[None], region)
    assert masks.shape == (1, size, size) and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks[0], head)
    np.testing.assert_array_equal(head_blob(head), head)
    np.testing.assert_array_equal(head_blob(np.zeros_like(head)), np.zeros_like(head))
    # A faint haze between the two (below the level blobs are told apart at) does not join them; the haze near
    # the head, within the kept fringe, stays as segmented.
    haze = np.maximum(person, 20).astype(np.uint8)
    kept = head_blob(haze)
    assert kept[30:70, 116:124].max() == 0 and (kept[head > 0] == haze[head > 0]).all()
    fringe = round(BLOB_FRINGE * size)
    assert kept[60, 56 + 30 + fringe - 1] == 20 and kept[60, 56 + 30 + fringe + 4] == 0


def test_tracked_masks_are_the_person_within_the_head_region(tmp_path, monkeypatch):
    """A synthetic subject in a shirt, tracked: each mask is the person segmentation of its frame, within what the
    picture filmed, times the head region of its fitted kinematics (the plain segmentation where no face was found), and nothing below the
    collar line of the true pose is kept, though the segmentation takes in the shirt there."""
    from liftavatar.face import track as track_module
    from liftavatar.face.track import TrackConfig, track
    from liftavatar.synth.world import SynthSpec, synthesize
    from liftavatar.video import write_video

    truth = synthesize(SynthSpec(seed=7402, preset="sparse", frames=8, size=SEGMENT_SIZE), tmp_path / "truth",
                       progress=False)
    write_video(tmp_path / "clip.mp4", truth.frames(), truth.meta.fps)
    real_detect = track_module.FaceMeshDetector.detect_all
    seen = {"frames": 0}

    def miss_one(self, image):
        seen["frames"] += 1
        faces = real_detect(self, image)
        return [] if seen["frames"] == 6 else faces  # frame 5 shows "no face"

    monkeypatch.setattr(track_module.FaceMeshDetector, "detect_all", miss_one)
    capture, report = track(tmp_path / "clip.mp4", tmp_path / "cap", TrackConfig(size=SEGMENT_SIZE, fov=30.0),
                            progress=False)
    k = capture.kinematics
    assert k.valid.tolist() == [True] * 5 + [False] + [True] * 2
    frames, masks = capture.frames(), capture.masks()
    with SelfieSegmenter() as segmenter:
        person = np.stack([segmenter(f) for f in frames])  # at SEGMENT_SIZE² the written crop is what was segmented
    # Only what the picture filmed: the crop's black border is not the person.
    coverage = track_module.picture_coverage(tuple(truth.size), report.crop, SEGMENT_SIZE)
    person = (person.astype(np.uint16) * coverage // 255).astype(np.uint8)
    region = head_region(k.identity, k.expression, k.rotation, k.translation, capture.meta.intrinsics,
                         (SEGMENT_SIZE, SEGMENT_SIZE))
    expected = np.where(k.valid[:, None, None], head_masks(person, region), person)
    np.testing.assert_array_equal(masks, expected)

    # Below the true collar line (a little lower, for the fit's error): the shirt, segmented, and cut. The true
    # pose is seen through the capture's camera: the tracker's (30° field of view, as passed) is the synthetic
    # world's, cropped.
    from liftavatar.face.masks import below_head_line

    t = truth.kinematics
    below = below_head_line(torch.as_tensor(t.rotation), torch.as_tensor(t.translation),
                   torch.tensor(capture.meta.intrinsics, dtype=torch.float32).expand(len(t.rotation), 4),
                   COLLAR_Y + 0.01, (SEGMENT_SIZE, SEGMENT_SIZE)).numpy()
    assert (person[below] > 128).sum() > 0.05 * below.sum(), "the segmentation takes in the shirt"
    assert masks[k.valid][below[k.valid]].max() == 0
    assert (masks[k.valid] > 128).mean() > 0.15
