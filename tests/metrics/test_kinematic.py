"""AED and APD against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from liftavatar.metrics import MetricsError, aed, apd, rotation_angle_deg


def axis_angle(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, float)
    return axis / np.linalg.norm(axis) * math.radians(degrees)


def test_apd_of_known_rotations():
    pred = np.array([axis_angle([0, 1, 0], 10), axis_angle([1, 0, 0], 50), axis_angle([1, 0, 0], 90),
                     axis_angle([0, 0, 1], 170)])
    gt = np.array([[0, 0, 0], axis_angle([1, 0, 0], 30), axis_angle([0, 1, 0], 90), axis_angle([0, 0, 1], -170)])
    # 10° yaw vs none; 50° vs 30° about one axis; 90° about x vs 90° about y: R = Rx Ryᵀ has
    # trace 0, so angle = acos((0 − 1) / 2) = 120°; 170° vs −170° about z is 20° the short way.
    np.testing.assert_allclose(rotation_angle_deg(pred, gt), [10, 20, 120, 20], atol=1e-9)
    assert apd(pred, gt)["rotation_deg"] == pytest.approx((10 + 20 + 120 + 20) / 4)


def test_apd_translation_in_millimetres_and_valid_frames():
    rot = np.zeros((3, 3))
    pred_t = np.array([[0.003, 0.004, 0.6], [0, 0, 0.61], [1, 1, 1]])
    gt_t = np.array([[0, 0, 0.6], [0, 0, 0.6], [0, 0, 0.6]])
    out = apd(rot, rot, pred_t, gt_t, valid=np.array([True, True, False]))
    assert out["rotation_deg"] == 0.0
    assert out["translation_mm"] == pytest.approx((5 + 10) / 2)  # 3-4-5 mm, and 10 mm in depth


def test_aed_on_given_kinematics():
    gt = np.array([[0.0, 0.5, 1.0, 0.2], [0.1, 0.1, 0.1, 0.1]])
    pred = np.array([[0.1, 0.5, 0.8, 0.2], [0.1, 0.5, 0.1, 0.5]])
    # frame 0: (0.1 + 0 + 0.2 + 0) / 4 = 0.075; frame 1: (0 + 0.4 + 0 + 0.4) / 4 = 0.2
    assert aed(pred, gt) == pytest.approx((0.075 + 0.2) / 2)
    assert aed(pred, gt, valid=np.array([False, True])) == pytest.approx(0.2)
    assert aed(gt, gt) == 0.0
    assert math.isnan(aed(pred, gt, valid=np.zeros(2, bool)))


def test_mismatched_shapes_are_refused():
    with pytest.raises(MetricsError, match="same rig"):
        aed(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(MetricsError, match="axis-angle"):
        apd(np.zeros((3, 3)), np.zeros((2, 3)))
    with pytest.raises(MetricsError, match="one flag per frame"):
        aed(np.zeros((3, 4)), np.zeros((3, 4)), valid=np.ones(2, bool))
