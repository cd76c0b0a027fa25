"""The 3DGS .ply export reads back with plyfile and matches the avatar."""

from __future__ import annotations

import numpy as np
import torch

from liftavatar.avatar.export import export_ply, read_ply
from liftavatar.avatar.model import (
    bake_deformation,
    deform_condition,
    gaussians_world,
    load_avatar,
)


def test_ply_round_trip(trained, tmp_path):
    from plyfile import PlyData

    avatar = load_avatar(trained)
    path = export_ply(avatar, tmp_path / "out" / "avatar.ply")
    ply = PlyData.read(str(path))
    assert [e.name for e in ply.elements] == ["vertex"] and not ply.text
    data = read_ply(path)
    n, k = avatar.num_gaussians, (avatar.meta.config.sh_degree + 1) ** 2
    standard = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    standard += [f"f_rest_{i}" for i in range(3 * (k - 1))]
    standard += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    names = list(data)
    assert names[: len(standard)] == standard  # the reference 3DGS order, then the binding
    assert {"binding", "local_x", "local_scale_0", "local_rot_3"} <= set(names)
    assert all(len(v) == n for v in data.values())

    zeros = torch.zeros(1, 3)
    assert avatar.deform is not None  # the default avatar deforms: the file holds the neutral head's Gaussians
    neutral = torch.zeros(1, len(avatar.meta.expression_names))
    avatar = bake_deformation(avatar, deform_condition(neutral, zeros))
    verts = avatar.vertices(neutral, zeros, zeros)
    world = gaussians_world(avatar.params, avatar.binding, verts, avatar.faces, 0)
    xyz = np.stack([data[c] for c in "xyz"], -1)
    np.testing.assert_allclose(xyz, world.means[0].detach().numpy() * [1, -1, -1], atol=1e-7)  # y up
    np.testing.assert_allclose(np.exp(np.stack([data[f"scale_{i}"] for i in range(3)], -1)),
                               world.scales[0].detach().numpy(), rtol=1e-5)
    rot = np.stack([data[f"rot_{i}"] for i in range(4)], -1)
    np.testing.assert_allclose(np.linalg.norm(rot, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(data["binding"], avatar.binding.numpy())
    np.testing.assert_allclose(data["opacity"], avatar.params["opacities"].numpy())
    np.testing.assert_allclose(np.stack([data[f"f_dc_{i}"] for i in range(3)], -1), avatar.params["sh0"][:, 0].numpy())
    np.testing.assert_allclose(np.stack([data[f"local_{c}"] for c in "xyz"], -1), avatar.params["means"].numpy())
    normals = np.stack([data[c] for c in ("nx", "ny", "nz")], -1)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)


def _sh1_colour(data: dict, campos: np.ndarray) -> np.ndarray:
    """(N, 3) colour of every Gaussian of a 3DGS .ply seen from ``campos``, as standard 3DGS viewers evaluate
    it (degree 1; direction from the camera to the Gaussian, in the file's world), clamped at 0."""
    c0, c1 = 0.28209479177387814, 0.4886025119029199
    xyz = np.stack([data[c] for c in "xyz"], -1)
    d = xyz - campos
    x, y, z = (d / np.linalg.norm(d, axis=-1, keepdims=True)).T
    dc = np.stack([data[f"f_dc_{i}"] for i in range(3)], -1)
    rest = np.stack([data[f"f_rest_{i}"] for i in range(9)], -1).reshape(-1, 3, 3)  # (N, channel, coefficient)
    colour = c0 * dc + 0.5 - c1 * y[:, None] * rest[:, :, 0] + c1 * z[:, None] * rest[:, :, 1] \
        - c1 * x[:, None] * rest[:, :, 2]
    return np.maximum(colour, 0.0)


def test_ply_is_y_up_world_space_with_world_sh(trained, rig, tmp_path):
    """Read back with plyfile alone: the head stands upright (y up), faces +z, and a standard 3DGS evaluation of
    its SH from cameras around it gives the colours the avatar itself renders from there."""
    from plyfile import PlyData

    avatar = load_avatar(trained)
    torch.manual_seed(0)
    avatar.params["shN"] = 0.3 * torch.randn_like(avatar.params["shN"])  # view-dependent colour to rotate
    assert avatar.meta.config.sh_frame == "local"
    path = export_ply(avatar, tmp_path / "a.ply")
    vertex = PlyData.read(str(path))["vertex"]
    data = {p.name: np.asarray(vertex[p.name]) for p in vertex.properties}
    part = rig.face_part[avatar.binding.numpy()]
    y, z = data["y"], data["z"]
    head, neck, face = (part == rig.part_names.index(name) for name in ("head", "neck", "face"))
    assert y[head].mean() > y[neck].mean() + 0.05  # the hair shell above the neck
    assert z[face].mean() > z[head].mean() + 0.02  # the face in front (+z) of the shell's centre

    zeros = torch.zeros(1, 3)
    neutral = torch.zeros(1, len(avatar.meta.expression_names))
    baked = bake_deformation(avatar, deform_condition(neutral, zeros))
    verts = baked.vertices(neutral, zeros, zeros)
    for campos in ([0.0, 0.05, 0.6], [0.4, -0.1, 0.3], [-0.5, 0.2, 0.1]):
        campos = np.array(campos)
        world = gaussians_world(baked.params, baked.binding, verts, baked.faces, 1, "local",
                                campos=torch.tensor(campos * [1, -1, -1], dtype=torch.float32))
        np.testing.assert_allclose(_sh1_colour(data, campos), world.colors[0].numpy(), atol=2e-5)


def test_ply_sequence_of_a_captures_kinematics(trained, capture, tmp_path):
    import json

    from liftavatar.avatar.export import export_ply_sequence
    from liftavatar.avatar.model import AvatarError

    avatar = load_avatar(trained)
    out, n = export_ply_sequence(avatar, capture, tmp_path / "seq", progress=False)
    index = json.loads((out / "frames.json").read_text())
    assert n == 12 and [f["file"] for f in index["frames"]] == [f"{i:06d}.ply" for i in range(n)]
    first, last = read_ply(out / "000000.ply"), read_ply(out / f"{n - 1:06d}.ply")
    assert len(first["x"]) == avatar.num_gaussians
    assert not np.allclose(first["x"], last["x"])  # the kinematics move the head
    try:
        export_ply_sequence(avatar, capture, out, progress=False)
    except AvatarError as exc:
        assert "--force" in str(exc)
    else:
        raise AssertionError("an existing sequence was replaced without force")
    export_ply_sequence(avatar, capture, out, force=True, progress=False)
