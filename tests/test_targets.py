"""Lift's kinematic library and targets: the shipped tracked library, widened poses, held-out sources, joint picking
and coverage in expression and pose."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from liftavatar.errors import ConfigError
from liftavatar.face.rig import FaceRig
from liftavatar.targets import (KinematicLibrary, coverage_report, farthest_targets, joint_features, load_library,
                                relative_rotations, typical_rotation)


def test_the_shipped_library_is_tracked_real_people_and_not_the_rig_presets():
    names = FaceRig.load().expression_names
    tracked = load_library("tracked", names, 100, 0)
    assert len(tracked) >= 1000 and tracked.expression.shape == (len(tracked), len(names))
    assert len(tracked.clips) >= 10 and all(c.endswith((".mp4", ".mov")) for c in tracked.clips)
    assert set(np.unique(tracked.clip)) == set(range(len(tracked.clips)))
    assert ((tracked.expression >= -1e-4) & (tracked.expression <= 1 + 1e-4)).all()
    # Relative poses: turns away from each clip's typical pose, small for talking clips.
    angles = np.degrees(np.linalg.norm(tracked.rotation, axis=1))
    assert np.median(angles) < 15
    # Not the synthetic extreme test's generator: no rig-preset entry lies on a tracked one.
    rig = load_library("rig", names, 200, 0)
    d = np.linalg.norm(rig.expression[:, None] - tracked.expression[None], axis=-1).min(1)
    assert np.median(d) > 0.1
    with pytest.raises(ConfigError, match="--library 'nope'"):
        load_library("nope", names, 10, 0)


def test_widened_poses_stay_within_the_turn_and_keep_the_expressions():
    rng = np.random.default_rng(0)
    lib = KinematicLibrary(rng.uniform(0, 1, (400, 4)).astype(np.float32), np.zeros((400, 3), np.float32),
                           np.arange(400) % 4, "test")
    wide = lib.widened(40, seed=1)
    euler = Rotation.from_rotvec(wide.rotation).as_euler("xyz", degrees=True)
    assert np.abs(euler[:, 1]).max() <= 40 + 1e-3 and np.abs(euler[:, 1]).max() > 35
    assert np.abs(euler[:, 0]).max() <= 20 + 1e-3 and np.abs(euler[:, 2]).max() <= 8 + 1e-3
    assert np.array_equal(wide.expression, lib.expression)
    assert np.array_equal(lib.widened(40, seed=1).rotation, wide.rotation)  # seeded
    assert lib.widened(0, seed=1) is lib


def test_split_holds_out_whole_sources():
    lib = KinematicLibrary(np.zeros((50, 2)), np.zeros((50, 3)), np.arange(50) // 5, "test")
    pool, held = lib.split(seed=0)
    assert len(pool) + len(held) == 50 and len(held) == 10  # 2 of 10 sources
    assert not set(pool.clip) & set(held.clip)
    one = KinematicLibrary(np.zeros((10, 2)), np.zeros((10, 3)), np.zeros(10, int), "one")
    assert len(one.split(seed=0)[1]) == 2  # one source: every 5th entry


def test_joint_picking_takes_the_wide_pose_when_expressions_tie():
    observed_e, observed_r = np.zeros((3, 2)), np.zeros((3, 3))
    library_e = np.array([[0.5, 0.0], [0.5, 0.0]])
    library_r = np.array([[0.0, 0.0, 0.0], [0.0, np.radians(30), 0.0]])
    pick = farthest_targets(joint_features(library_e, library_r, 2.0), joint_features(observed_e, observed_r, 2.0), 1)
    assert pick.tolist() == [1]
    pick = farthest_targets(joint_features(library_e, library_r, 0.0), joint_features(observed_e, observed_r, 0.0), 1)
    assert pick.tolist() == [0]  # by expression alone the two tie, and the first wins


def test_coverage_report_separates_expression_pose_and_joint():
    yaw = lambda deg: Rotation.from_euler("y", deg, degrees=True).as_rotvec()  # noqa: E731
    query_e = np.array([[0.0, 0.0], [1.0, 0.0]])
    query_r = np.stack([yaw(0), yaw(30)])
    # one frame matches the first query in both; of the second, one frame has its expression, another its pose
    frames_e = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]])
    frames_r = np.stack([yaw(5), yaw(0), yaw(28)])
    report = coverage_report(query_e, query_r, frames_e, frames_r, radius=0.5, pose_radius_deg=10)
    assert report == {"expression": 1.0, "pose": 1.0, "joint": 0.5}
    assert coverage_report(query_e, query_r, frames_e[:0], frames_r[:0], 0.5, 10)["joint"] == 0.0


def test_relative_rotations_undo_the_typical_pose():
    base = Rotation.from_euler("xyz", [5, 20, 0], degrees=True)
    turns = Rotation.from_euler("y", [[-10], [0], [10]], degrees=True)
    rotations = (turns * base).as_rotvec()
    typical = typical_rotation(rotations)
    assert np.allclose(typical.as_rotvec(), base.as_rotvec(), atol=1e-6)
    assert np.allclose(relative_rotations(rotations, typical), turns.as_rotvec(), atol=1e-6)
