"""The 3DGS .ply export reads back with plyfile and matches the avatar."""

from __future__ import annotations

import numpy as np
import torch

from liftavatar.avatar.export import export_ply, read_ply
from liftavatar.avatar.model import bake_deformation, deform_condition, gaussians_world, load_avatar


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
    np.testing.assert_allclose(xyz, world.means[0].detach().numpy(), atol=1e-7)
    np.testing.assert_allclose(np.exp(np.stack([data[f"scale_{i}"] for i in range(3)], -1)),
                               world.scales[0].detach().numpy(), rtol=1e-5)
    rot = np.stack([data[f"rot_{i}"] for i in range(4)], -1)
    np.testing.assert_allclose(np.linalg.norm(rot, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(data["binding"], avatar.binding.numpy())
    np.testing.assert_allclose(data["opacity"], avatar.params["opacities"].numpy())
    np.testing.assert_allclose(np.stack([data[f"f_dc_{i}"] for i in range(3)], -1), avatar.params["sh0"][:, 0].numpy())
    rest = np.stack([data[f"f_rest_{i}"] for i in range(3 * (k - 1))], -1).reshape(n, 3, k - 1)
    np.testing.assert_allclose(rest.transpose(0, 2, 1), avatar.params["shN"].numpy())
    np.testing.assert_allclose(np.stack([data[f"local_{c}"] for c in "xyz"], -1), avatar.params["means"].numpy())
    normals = np.stack([data[c] for c in ("nx", "ny", "nz")], -1)
    np.testing.assert_allclose(np.linalg.norm(normals, axis=-1), 1.0, atol=1e-5)
