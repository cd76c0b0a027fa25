"""Gaussians bound to rig triangles follow the mesh; initialisation; saving and loading."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from liftavatar.avatar.model import (
    AvatarError,
    AvatarMeta,
    gaussians_world,
    init_avatar,
    load_avatar,
    matrix_to_quaternion,
    save_avatar,
    triangle_frames,
)
from liftavatar.face.rig import axis_angle_to_matrix



@pytest.fixture(scope="module")
def avatar(rig):
    meta = AvatarMeta("synth-006003", {"name": rig.name, "version": rig.version}, list(rig.expression_names),
                      (64, 64), (119.4, 119.4, 32.0, 32.0))
    av = init_avatar(rig, np.full(rig.num_identity, 0.2, np.float32), meta)
    gen = torch.Generator().manual_seed(6003)
    n = av.num_gaussians
    # Arbitrary local state, so that the checks cover offsets, rotations and anisotropy.
    av.params["means"] = torch.randn(n, 3, generator=gen) * 0.3
    av.params["quats"] = torch.randn(n, 4, generator=gen)
    av.params["scales"] = torch.randn(n, 3, generator=gen) * 0.3 - 1
    av.params["shN"] = torch.randn(n, 3, 3, generator=gen) * 0.3
    return av


def _rotmat(q: torch.Tensor) -> torch.Tensor:
    from gsplat.cuda._torch_impl import _quat_to_rotmat

    return _quat_to_rotmat(q)


def _world(avatar, expression, rotation, translation):
    verts = avatar.vertices(expression, rotation, translation)
    cfg = avatar.meta.config
    return verts, gaussians_world(avatar.params, avatar.binding, verts, avatar.faces, cfg.sh_degree, cfg.sh_frame)


def test_gaussians_move_rigidly_with_the_head_pose(avatar, rig):
    expr = torch.zeros(1, rig.num_expressions)
    _, rest = _world(avatar, expr, torch.zeros(1, 3), torch.zeros(1, 3))
    pose, t = torch.tensor([[0.3, -0.5, 0.2]]), torch.tensor([[0.02, -0.01, 0.6]])
    _, moved = _world(avatar, expr, pose, t)
    r = axis_angle_to_matrix(pose)[0]
    torch.testing.assert_close(moved.means[0], rest.means[0] @ r.T + t[0], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(moved.scales, rest.scales, atol=1e-7, rtol=1e-4)
    # float32: mm-sized triangles 0.6 m from the origin lose ~1e-4 of their edge directions.
    torch.testing.assert_close(_rotmat(moved.quats[0]), r @ _rotmat(rest.quats[0]), atol=3e-4, rtol=0)
    # Colours (SH in the triangle frame) are unchanged when the camera turns with the head, and
    # change when the head turns in front of a fixed camera.
    assert not torch.allclose(moved.colors, rest.colors, atol=1e-3)
    cam_rest = torch.tensor([0.1, -0.05, -0.5])
    verts = avatar.vertices(expr, torch.zeros(1, 3), torch.zeros(1, 3))
    verts_moved = avatar.vertices(expr, pose, t)
    cfg = avatar.meta.config
    a = gaussians_world(avatar.params, avatar.binding, verts, avatar.faces, cfg.sh_degree, "local", cam_rest)
    b = gaussians_world(avatar.params, avatar.binding, verts_moved, avatar.faces, cfg.sh_degree, "local",
                        r @ cam_rest + t[0])
    torch.testing.assert_close(a.colors, b.colors, atol=2e-4, rtol=0)


def test_gaussians_follow_expression_deformation(avatar, rig):
    expr = torch.zeros(1, rig.num_expressions)
    expr[0, rig.expression_index("jawOpen")] = 1.0
    verts, world = _world(avatar, expr, torch.zeros(1, 3), torch.zeros(1, 3))
    cen, rot, k = triangle_frames(verts, avatar.faces[avatar.binding])
    local = avatar.params["means"]
    torch.testing.assert_close(world.means[0], cen[0] + k[0, :, None] * (rot[0] @ local[..., None])[..., 0],
                               atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(world.scales[0], k[0, :, None] * avatar.params["scales"].exp(), rtol=1e-5, atol=1e-8)
    # The jaw moved: Gaussians on lower teeth moved down (+y), those on upper teeth did not.
    _, rest = _world(avatar, torch.zeros_like(expr), torch.zeros(1, 3), torch.zeros(1, 3))
    part = torch.as_tensor(rig.face_part)[avatar.binding]
    lower, upper = rig.part_names.index("lower_teeth"), rig.part_names.index("upper_teeth")
    dy = (world.means - rest.means)[0, :, 1]
    assert dy[part == lower].mean() > 0.005 and dy[part == upper].abs().max() < 1e-5


def test_initial_gaussians_lie_on_their_triangles(rig):
    meta = AvatarMeta("s", {"name": rig.name, "version": rig.version}, list(rig.expression_names), (64, 64),
                      (119.4, 119.4, 32.0, 32.0))
    av = init_avatar(rig, np.zeros(rig.num_identity, np.float32), meta)
    from liftavatar.avatar.model import degenerate_triangles

    usable = int((~degenerate_triangles(rig)).sum())
    assert 3000 < usable < len(rig.faces)  # only the eyeballs' pole triangles are left out
    assert av.num_gaussians == usable * av.meta.config.gaussians_per_triangle
    verts, world = _world(av, torch.zeros(1, rig.num_expressions), torch.zeros(1, 3), torch.zeros(1, 3))
    corners = verts[0][av.faces[av.binding]]
    p = world.means[0]
    # Barycentric coordinates of each mean in its triangle's plane: all inside, plane distance ~0.
    e1, e2, d = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], p - corners[:, 0]
    n = torch.nn.functional.normalize(torch.cross(e1, e2, dim=-1), dim=-1)
    assert (d * n).sum(-1).abs().max() < 1e-6
    d11, d12, d22 = (e1 * e1).sum(-1), (e1 * e2).sum(-1), (e2 * e2).sum(-1)
    d1, d2 = (d * e1).sum(-1), (d * e2).sum(-1)
    den = d11 * d22 - d12 * d12
    keep = den > 1e-14  # skip degenerate triangles
    b1, b2 = (d22 * d1 - d12 * d2) / den, (d11 * d2 - d12 * d1) / den
    assert (b1[keep] > -1e-4).all() and (b2[keep] > -1e-4).all() and (b1 + b2)[keep].max() < 1 + 1e-4
    # Flat along the normal: the smallest axis is the local z axis.
    assert (av.params["scales"][:, 2] < av.params["scales"][:, 0]).all()


def test_matrix_to_quaternion_round_trips_including_half_turns():
    gen = torch.Generator().manual_seed(6004)
    aa = torch.randn(200, 3, generator=gen)
    aa = torch.cat((aa, math.pi * torch.nn.functional.normalize(torch.randn(20, 3, generator=gen), dim=-1)))
    r = axis_angle_to_matrix(aa)
    torch.testing.assert_close(_rotmat(matrix_to_quaternion(r)), r, atol=1e-5, rtol=1e-5)


def test_save_and_load_round_trip(avatar, tmp_path):
    save_avatar(avatar, tmp_path / "a")
    back = load_avatar(tmp_path / "a")
    for key, value in avatar.params.items():
        torch.testing.assert_close(back.params[key], value)
    assert torch.equal(back.binding, avatar.binding)
    assert back.meta == avatar.meta


def test_loading_a_missing_checkpoint_names_it(tmp_path):
    with pytest.raises(AvatarError, match="no such avatar directory"):
        load_avatar(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AvatarError, match="avatar.safetensors: missing"):
        load_avatar(tmp_path / "empty")


def _to_legacy_layout(folder) -> None:
    """Rewrite an avatar folder as this package wrote it before the one-file checkpoint: avatar.safetensors without
    a header, avatar.json without iters, the training state in train_state.safetensors + train_state.json."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = folder / "avatar.safetensors"
    with safe_open(str(path), "pt") as f:
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v for k, v in tensors.items() if not k.startswith("train.")}, str(path))
    save_file({k[len("train."):]: v for k, v in tensors.items() if k.startswith("train.")},
              str(folder / "train_state.safetensors"))
    meta = json.loads(header["avatar"])
    del meta["iters"], meta["finished"]
    (folder / "avatar.json").write_text(json.dumps(meta))
    (folder / "train_state.json").write_text(header["train_state"])


def test_avatars_saved_before_the_one_file_checkpoint_load_and_resume(capture, tmp_path):
    from liftavatar.avatar.train import TrainConfig, train_avatar

    cfg = TrainConfig(iters=6, size=32, val_every=0, checkpoint_every=0, progress=False)
    whole = tmp_path / "whole"
    train_avatar([capture], whole, cfg)
    old = tmp_path / "old"
    train_avatar([capture], old, cfg, max_steps=3)
    _to_legacy_layout(old)
    legacy = load_avatar(old)  # no target recorded: taken as finished, as before
    assert legacy.meta.iters is None and legacy.meta.step == 3
    train_avatar([capture], old, cfg, resume=True)
    assert not (old / "train_state.safetensors").exists(), "superseded by the one-file checkpoint"
    a, b = load_avatar(whole), load_avatar(old)
    assert b.meta.step == 6 and b.meta.iters == 6 and torch.equal(a.binding, b.binding)
    for key in a.params:
        torch.testing.assert_close(a.params[key], b.params[key], atol=1e-6, rtol=1e-5)


def test_a_checkpoint_missing_a_tensor_or_with_misfit_tensors_is_named(avatar, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_avatar(avatar, tmp_path / "a")
    path = tmp_path / "a" / "avatar.safetensors"
    with safe_open(str(path), "pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v for k, v in tensors.items() if k != "opacities"}, str(path), metadata=header)
    with pytest.raises(AvatarError, match="holds no tensor 'opacities'"):
        load_avatar(tmp_path / "a")
    save_file({**tensors, "opacities": tensors["opacities"][:-1]}, str(path), metadata=header)
    with pytest.raises(AvatarError, match="do not fit together"):
        load_avatar(tmp_path / "a")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AvatarError, match="cannot be read"):
        load_avatar(tmp_path / "a")
