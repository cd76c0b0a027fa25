"""The control signal: one policy, so the synthetic world, the tracker and lift render the same maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liftavatar.face.control import MAX_RASTER, raster_plan, render_controls
from liftavatar.face.rig import FaceRig
from liftavatar.synth.kinematics import sample_kinematics
from liftavatar.synth.subject import make_subject
from liftavatar.synth.world import default_intrinsics, render_subject


@pytest.mark.parametrize("size, plan", [((128, 128), ((128, 128), 2)), ((64, 96), ((64, 96), 2)),
                                        ((256, 256), ((256, 256), 1)), ((512, 512), ((256, 256), 1)),
                                        ((1024, 512), ((256, 128), 1))])
def test_raster_plan_keeps_one_map_under_the_raster_budget(size, plan):
    assert raster_plan(size) == plan
    (h, w), s = plan
    assert max(h, w) * s <= MAX_RASTER


def _pose(rig, frames=3, seed=0):
    kin = sample_kinematics("extreme", frames, rig.expression_names, seed=seed)
    subject = make_subject(11, rig)
    verts = rig.vertices(subject.identity, kin.expression, kin.rotation, kin.translation)
    return subject, kin, verts


def test_synthetic_world_and_control_render_the_same_maps_at_the_priors_size():
    rig = FaceRig.load()
    subject, kin, verts = _pose(rig)
    k = default_intrinsics(128)
    frames = render_subject(subject, kin.expression, kin.rotation, kin.translation, 128, k, rig)
    maps = render_controls(verts, k, (128, 128), rig)
    assert np.array_equal(frames.shading, maps.shading)
    assert np.array_equal(frames.mask, maps.mask)
    assert (maps.shading > 0).mean() > 0.05, "the head is drawn"


def test_large_maps_are_the_budget_render_resized():
    rig = FaceRig.load()
    subject, kin, verts = _pose(rig, frames=1)
    big = render_controls(verts, default_intrinsics(512), (512, 512), rig)
    small = render_controls(verts, default_intrinsics(256), (256, 256), rig)
    assert big.shading.shape == (1, 512, 512, 3)
    down = torch.nn.functional.avg_pool2d(torch.from_numpy(big.shading).float().permute(0, 3, 1, 2), 2)
    err = (down - torch.from_numpy(small.shading).float().permute(0, 3, 1, 2)).abs().mean()
    assert err < 2.0, f"the 512² map is the 256² map upsampled (mean difference {err:.2f} levels)"
    # The resize is bilinear on the uint8 raster: within one grey level of resizing the float render.
    from liftavatar.face.control import shading_albedo
    from liftavatar.face.render import render_mesh
    from liftavatar.io import to_uint8

    raster = render_mesh(verts, torch.as_tensor(rig.faces), default_intrinsics(256), (256, 256),
                         shading_albedo=shading_albedo(rig)).shading.permute(0, 3, 1, 2)
    float_path = to_uint8(torch.nn.functional.interpolate(raster, size=(512, 512), mode="bilinear").permute(0, 2, 3, 1))
    assert np.abs(float_path.astype(int) - big.shading).max() <= 1
    # A synthetic capture larger than the budget gets the policy's maps too, not its own supersampled ones.
    frames = render_subject(subject, kin.expression, kin.rotation, kin.translation, 512, default_intrinsics(512), rig)
    assert np.array_equal(frames.shading, big.shading)


def test_render_shading_is_render_controls_shading_without_the_masks():
    """The tracker writes only the shading maps: render_shading gives the same pixels as render_controls."""
    from liftavatar.face.control import render_shading

    rig = FaceRig.load()
    verts = rig.vertices(np.zeros(len(rig.identity_names), np.float32), rig.neutral_expression(2),
                         np.array([[0.0, 0.2, 0.0], [0.1, -0.3, 0.05]], np.float32),
                         np.array([[0.0, 0.0, 0.6]] * 2, np.float32))
    for size in (64, 300):  # supersampled, and rendered smaller then resized
        k = (size * 1.8, size * 1.8, size / 2, size / 2)
        shading = render_shading(verts, k, (size, size), rig)
        assert shading.dtype == np.uint8 and shading.shape == (2, size, size, 3) and shading.max() > 0
        np.testing.assert_array_equal(shading, render_controls(verts, k, (size, size), rig).shading)
