"""Kinematics presets: ranges as specified, smooth at the capture fps, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from liftavatar.errors import ConfigError
from liftavatar.face.rig import FaceRig
from liftavatar.synth.kinematics import EXTREME_LIBRARY, SPARSE_RANGE, sample_kinematics

NAMES = FaceRig.load().expression_names


def euler_deg(rotation: np.ndarray) -> np.ndarray:
    """(N, 3) pitch, yaw, roll in degrees."""
    return Rotation.from_rotvec(rotation).as_euler("xyz", degrees=True)


def test_sparse_stays_in_the_talking_range():
    k = sample_kinematics("sparse", 500, NAMES, seed=3)
    e = k.expression
    assert e[:, NAMES.index("jawOpen")].max() <= 0.3 + 1e-6
    blinks = {NAMES.index("eyeBlinkLeft"), NAMES.index("eyeBlinkRight")}
    for j, name in enumerate(NAMES):
        if j in blinks:
            continue
        assert e[:, j].max() <= SPARSE_RANGE.get(name, 0.0) + 1e-6, name
    assert e[:, NAMES.index("eyeBlinkLeft")].max() > 0.9, "a 20 s clip blinks"
    angles = euler_deg(k.rotation)
    assert np.abs(angles[:, 1]).max() <= 15 + 1e-3 and np.abs(angles[:, 0]).max() <= 10 + 1e-3


def test_extreme_reaches_what_sparse_lacks():
    k = sample_kinematics("extreme", 500, NAMES, seed=4)
    e = k.expression
    assert e[:, NAMES.index("jawOpen")].max() > 0.8
    assert e[:, NAMES.index("mouthSmileLeft")].max() > 0.8
    strong_outside_sparse = [n for n in NAMES if n not in SPARSE_RANGE and not n.startswith("eyeBlink")
                             and e[:, NAMES.index(n)].max() > 0.7]
    assert len(strong_outside_sparse) >= 8
    angles = euler_deg(k.rotation)
    assert np.abs(angles[:, 1]).max() > 30 and np.abs(angles[:, 1]).max() <= 45 + 1e-3
    assert np.abs(angles[:, 0]).max() <= 25 + 1e-3


def test_library_names_are_rig_names():
    for shapes in EXTREME_LIBRARY.values():
        assert set(shapes) <= set(NAMES)


@pytest.mark.parametrize("preset", ["sparse", "extreme", "full"])
def test_trajectories_are_smooth_and_deterministic(preset):
    k = sample_kinematics(preset, 250, NAMES, fps=25, seed=11)
    again = sample_kinematics(preset, 250, NAMES, fps=25, seed=11)
    np.testing.assert_array_equal(k.expression, again.expression)
    other = sample_kinematics(preset, 250, NAMES, fps=25, seed=12)
    assert not np.allclose(k.expression, other.expression)
    # Per-frame change at 25 fps: blinks are fast (≈ 0.1 s to close), everything else gentler.
    blink = [NAMES.index("eyeBlinkLeft"), NAMES.index("eyeBlinkRight")]
    steps = np.abs(np.diff(np.delete(k.expression, blink, axis=1), axis=0))
    assert steps.max() < 0.35
    assert np.degrees(np.linalg.norm(np.diff(k.rotation, axis=0), axis=1)).max() < 8
    assert k.expression.dtype == np.float32 and k.expression.min() >= 0 and k.expression.max() <= 1


def test_bad_preset_and_frame_count():
    with pytest.raises(ConfigError, match="preset"):
        sample_kinematics("wild", 10, NAMES)
    with pytest.raises(ConfigError, match="frames"):
        sample_kinematics("sparse", 0, NAMES)
