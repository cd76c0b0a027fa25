"""The face rig: topology from FaceMesh, named bounded blendshapes, parts that render as they should."""

from __future__ import annotations

import collections
import subprocess
import sys
from pathlib import Path

import mediapipe as mp
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from liftavatar.face.render import rasterize
from liftavatar.face.rig import FaceRig, axis_angle_to_matrix, matrix_to_axis_angle
from liftavatar.synth.world import default_intrinsics

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def rig() -> FaceRig:
    return FaceRig.load()


def surface_faces(rig: FaceRig) -> np.ndarray:
    return rig.faces[rig.part_mask("face")]


def test_surface_triangles_come_from_the_tessellation(rig):
    faces = surface_faces(rig)
    assert len(faces) == 852
    assert faces.max() < 468
    tess = {tuple(sorted(e)) for e in mp.solutions.face_mesh.FACEMESH_TESSELATION}
    mesh_edges = {tuple(sorted((t[a], t[b]))) for t in faces for a, b in ((0, 1), (1, 2), (2, 0))}
    assert tess <= mesh_edges, "every tessellation edge belongs to a triangle"
    assert mesh_edges <= tess, "no triangle invents an edge"


def test_surface_is_consistently_oriented_and_faces_the_camera(rig):
    faces = surface_faces(rig)
    directed = collections.Counter((t[a], t[b]) for t in faces for a, b in ((0, 1), (1, 2), (2, 0)))
    assert max(directed.values()) == 1, "an edge is traversed twice in the same direction"
    undirected = collections.Counter(tuple(sorted(e)) for e in directed)
    for (a, b), count in undirected.items():
        if count == 2:
            assert (a, b) in directed and (b, a) in directed
    v = rig.template
    n = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    assert (n[:, 2] < 0).mean() > 0.9  # the face looks toward -z: at the camera


def test_named_bounded_parameters(rig):
    assert rig.num_expressions >= 24 and rig.num_identity >= 10
    assert len(set(rig.expression_names)) == rig.num_expressions
    for name in ["jawOpen", "jawLeft", "jawRight", "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft",
                 "mouthPucker", "mouthFunnel", "mouthStretchLeft", "cheekPuff", "eyeBlinkLeft", "eyeBlinkRight",
                 "eyeWideLeft", "browInnerUp", "browDownLeft", "browOuterUpLeft", "noseSneerLeft", "mouthPress"]:
        assert name in rig.expression_names
    assert rig.expression_bounds == (0.0, 1.0) and rig.identity_bounds == (-1.0, 1.0)
    assert rig.expression_basis.shape == (rig.num_expressions, rig.num_vertices, 3)
    # Every blendshape moves something, and by a plausible amount (millimetres to centimetres).
    peak = np.abs(rig.expression_basis).max(axis=(1, 2))
    assert (peak > 0.0015).all() and (peak < 0.05).all()


def test_left_and_right_blendshapes_mirror_each_other(rig):
    pairs = rig.mirror_pairs
    flip = np.array([-1.0, 1.0, 1.0])
    for name in rig.expression_names:
        if not name.endswith("Left"):
            continue
        left = rig.expression_basis[rig.expression_index(name), :468]
        right = rig.expression_basis[rig.expression_index(name[:-4] + "Right"), :468]
        np.testing.assert_allclose(left, right[pairs] * flip, atol=2e-4, err_msg=name)


def test_template_is_symmetric(rig):
    v = rig.template[:468]
    np.testing.assert_allclose(v, v[rig.mirror_pairs] * np.array([-1.0, 1.0, 1.0]), atol=1e-6)


def test_vertices_apply_pose_in_the_opencv_camera(rig):
    expression = np.zeros((2, rig.num_expressions), np.float32)
    expression[1, rig.expression_index("jawOpen")] = 1
    identity = np.zeros(rig.num_identity, np.float32)
    rotation = np.array([[0.0, 0.3, 0.0], [0.1, -0.2, 0.05]], np.float32)
    translation = np.array([[0.0, 0.0, 0.6], [0.01, -0.02, 0.7]], np.float32)
    verts = rig.vertices(identity, expression, rotation, translation).numpy()
    for b in range(2):
        local = rig.template + np.tensordot(expression[b], rig.expression_basis, 1)
        expected = local @ Rotation.from_rotvec(rotation[b]).as_matrix().T + translation[b]
        np.testing.assert_allclose(verts[b], expected, atol=1e-5)


def test_axis_angle_round_trip():
    aa = torch.tensor([[0.0, 0.0, 0.0], [0.3, -0.2, 0.1], [0.0, 3.0, 0.0]])
    mats = axis_angle_to_matrix(aa)
    np.testing.assert_allclose(mats.numpy(), Rotation.from_rotvec(aa.numpy()).as_matrix(), atol=1e-6)
    np.testing.assert_allclose(matrix_to_axis_angle(mats).numpy(), aa.numpy(), atol=1e-5)


def visible_parts(rig: FaceRig, expression: np.ndarray, size: int = 256) -> collections.Counter:
    """How many pixels of each part a frontal render shows."""
    verts = rig.vertices(np.zeros(rig.num_identity, np.float32), expression[None].astype(np.float32),
                         np.zeros((1, 3), np.float32), np.array([[0.0, 0.0, 0.62]], np.float32))
    frags = rasterize(verts, torch.as_tensor(rig.faces), torch.tensor(default_intrinsics(size)), (size, size))
    ids = frags.face_index[0].flatten()
    ids = ids[ids >= 0].numpy()
    parts = rig.face_part[ids]
    return collections.Counter({name: int((parts == k).sum()) for k, name in enumerate(rig.part_names)})


def test_open_mouth_shows_teeth_and_cavity_closed_mouth_hides_them(rig):
    neutral = visible_parts(rig, np.zeros(rig.num_expressions))
    for part in ("upper_teeth", "lower_teeth", "tongue", "cavity"):
        assert neutral[part] == 0, f"{part} shows through a closed mouth"
    open_mouth = np.zeros(rig.num_expressions)
    open_mouth[rig.expression_index("jawOpen")] = 1.0
    seen = visible_parts(rig, open_mouth)
    assert seen["upper_teeth"] > 30 and seen["cavity"] > 200
    grin = np.zeros(rig.num_expressions)
    for name in ("mouthSmileLeft", "mouthSmileRight", "mouthUpperUpLeft", "mouthUpperUpRight"):
        grin[rig.expression_index(name)] = 1.0
    grin[rig.expression_index("jawOpen")] = 0.3
    assert visible_parts(rig, grin)["upper_teeth"] > 30


def test_blinks_close_the_eyes(rig):
    open_eyes = visible_parts(rig, np.zeros(rig.num_expressions))["eyeball"]
    assert open_eyes > 150
    closed = np.zeros(rig.num_expressions)
    closed[rig.expression_index("eyeBlinkLeft")] = 1.0
    closed[rig.expression_index("eyeBlinkRight")] = 1.0
    assert visible_parts(rig, closed)["eyeball"] <= 0.03 * open_eyes
    one = np.zeros(rig.num_expressions)
    one[rig.expression_index("eyeBlinkLeft")] = 1.0
    assert 0.35 * open_eyes < visible_parts(rig, one)["eyeball"] < 0.65 * open_eyes


def test_interior_parts_stay_inside_the_head_when_turned(rig):
    """At wide yaw with a closed mouth no interior part pokes through the cheeks."""
    size = 256
    for yaw in (-0.8, 0.8):
        verts = rig.vertices(np.zeros(rig.num_identity, np.float32), np.zeros((1, rig.num_expressions), np.float32),
                             np.array([[0.0, yaw, 0.0]], np.float32), np.array([[0.0, 0.0, 0.62]], np.float32))
        frags = rasterize(verts, torch.as_tensor(rig.faces), torch.tensor(default_intrinsics(size)), (size, size))
        ids = frags.face_index[0][frags.face_index[0] >= 0].numpy()
        interior = rig.part_mask("upper_teeth", "lower_teeth", "tongue", "cavity")
        assert interior[ids].sum() == 0


def test_packaged_rig_is_what_the_build_script_makes(rig, tmp_path):
    """The shipped data file is reproducible from registry data by scripts/build_rig.py."""
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_rig.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    rebuilt = FaceRig.load(tmp_path / "rig.npz")
    assert rebuilt.expression_names == rig.expression_names
    assert rebuilt.identity_names == rig.identity_names
    np.testing.assert_array_equal(rebuilt.faces, rig.faces)
    np.testing.assert_allclose(rebuilt.template, rig.template, atol=1e-5)
    np.testing.assert_allclose(rebuilt.expression_basis, rig.expression_basis, atol=1e-5)
    np.testing.assert_allclose(rebuilt.identity_basis, rig.identity_basis, atol=1e-5)
