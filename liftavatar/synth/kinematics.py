"""Kinematics presets of the synthetic world: smooth expression and head-pose trajectories.

``sparse``  what an everyday phone video holds: talking-range mouth (jawOpen ≤ 0.3), mild smiles,
            blinks, yaw within ±15°, pitch within ±10°.
``extreme`` strong expressions and combinations absent from ``sparse`` (a wide-open mouth, a big
            grin, a scream, a pout, squeezed eyes, …), yaw to ±45°, pitch to ±25°.
``full``    the whole range (a mixture of both and of random combinations), for training.

A trajectory is a sequence of random keyframes joined by smooth (C¹, monotone cubic) interpolation
at the capture's fps, with blinks overlaid as short events. Rotations are axis-angle in radians
(head frame to OpenCV camera), translations in metres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import PchipInterpolator
from scipy.spatial.transform import Rotation

from liftavatar.errors import ConfigError

PRESETS = ("sparse", "extreme", "full")
CAMERA_DISTANCE_M = 0.62

# Named extreme expressions: blendshape -> (low, high) coefficient range.
EXTREME_LIBRARY: dict[str, dict[str, tuple[float, float]]] = {
    "wide_open_mouth": {"jawOpen": (0.8, 1.0), "mouthLowerDownLeft": (0.4, 0.8), "mouthLowerDownRight": (0.4, 0.8),
                        "mouthUpperUpLeft": (0.3, 0.7), "mouthUpperUpRight": (0.3, 0.7)},
    "big_grin": {"mouthSmileLeft": (0.85, 1.0), "mouthSmileRight": (0.85, 1.0), "jawOpen": (0.1, 0.35),
                 "mouthUpperUpLeft": (0.3, 0.6), "mouthUpperUpRight": (0.3, 0.6), "eyeSquintLeft": (0.3, 0.7),
                 "eyeSquintRight": (0.3, 0.7)},
    "scream": {"jawOpen": (0.85, 1.0), "mouthStretchLeft": (0.6, 1.0), "mouthStretchRight": (0.6, 1.0),
               "browInnerUp": (0.6, 1.0), "eyeWideLeft": (0.6, 1.0), "eyeWideRight": (0.6, 1.0),
               "mouthLowerDownLeft": (0.5, 1.0), "mouthLowerDownRight": (0.5, 1.0)},
    "pout": {"mouthPucker": (0.85, 1.0), "browDownLeft": (0.0, 0.4), "browDownRight": (0.0, 0.4)},
    "squeezed_eyes": {"eyeBlinkLeft": (0.9, 1.0), "eyeBlinkRight": (0.9, 1.0), "eyeSquintLeft": (0.8, 1.0),
                      "eyeSquintRight": (0.8, 1.0), "browDownLeft": (0.6, 1.0), "browDownRight": (0.6, 1.0),
                      "noseSneerLeft": (0.4, 0.8), "noseSneerRight": (0.4, 0.8), "mouthPress": (0.3, 0.8)},
    "surprise": {"browInnerUp": (0.8, 1.0), "browOuterUpLeft": (0.8, 1.0), "browOuterUpRight": (0.8, 1.0),
                 "eyeWideLeft": (0.8, 1.0), "eyeWideRight": (0.8, 1.0), "jawOpen": (0.5, 0.8), "mouthFunnel": (0.2, 0.6)},
    "anger": {"browDownLeft": (0.8, 1.0), "browDownRight": (0.8, 1.0), "noseSneerLeft": (0.5, 1.0),
              "noseSneerRight": (0.5, 1.0), "mouthPress": (0.5, 1.0), "mouthFrownLeft": (0.4, 0.8), "mouthFrownRight": (0.4, 0.8)},
    "disgust": {"noseSneerLeft": (0.8, 1.0), "noseSneerRight": (0.8, 1.0), "mouthUpperUpLeft": (0.6, 1.0),
                "mouthUpperUpRight": (0.6, 1.0), "mouthFrownLeft": (0.3, 0.7), "mouthFrownRight": (0.3, 0.7)},
    "cheek_puff": {"cheekPuff": (0.85, 1.0), "mouthPress": (0.3, 0.7), "mouthPucker": (0.0, 0.3)},
    "jaw_left": {"jawLeft": (0.7, 1.0), "mouthLeft": (0.3, 0.8), "jawOpen": (0.0, 0.3)},
    "jaw_right": {"jawRight": (0.7, 1.0), "mouthRight": (0.3, 0.8), "jawOpen": (0.0, 0.3)},
    "smirk_left": {"mouthSmileLeft": (0.8, 1.0), "mouthDimpleLeft": (0.4, 0.8), "eyeSquintLeft": (0.3, 0.7), "browOuterUpRight": (0.3, 0.8)},
    "smirk_right": {"mouthSmileRight": (0.8, 1.0), "mouthDimpleRight": (0.4, 0.8), "eyeSquintRight": (0.3, 0.7), "browOuterUpLeft": (0.3, 0.8)},
    "sad": {"mouthFrownLeft": (0.8, 1.0), "mouthFrownRight": (0.8, 1.0), "browInnerUp": (0.7, 1.0), "mouthRollLower": (0.2, 0.6),
            "mouthShrugLower": (0.3, 0.8)},
    "funnel_o": {"mouthFunnel": (0.85, 1.0), "jawOpen": (0.3, 0.6), "browInnerUp": (0.0, 0.5)},
}

# Talking-range shapes of the sparse preset: blendshape -> upper bound.
SPARSE_RANGE = {
    "jawOpen": 0.3, "mouthSmileLeft": 0.35, "mouthSmileRight": 0.35, "mouthFunnel": 0.25, "mouthPucker": 0.25,
    "mouthLowerDownLeft": 0.25, "mouthLowerDownRight": 0.25, "mouthUpperUpLeft": 0.2, "mouthUpperUpRight": 0.2,
    "mouthPress": 0.3, "mouthRollLower": 0.2, "mouthRollUpper": 0.2, "mouthStretchLeft": 0.2, "mouthStretchRight": 0.2,
    "browInnerUp": 0.25, "browOuterUpLeft": 0.2, "browOuterUpRight": 0.2, "eyeSquintLeft": 0.2, "eyeSquintRight": 0.2,
}


@dataclass(frozen=True)
class PoseRange:
    """Head-pose limits in degrees and translation jitter in metres."""

    yaw: float
    pitch: float
    roll: float
    shift: float


POSE_RANGES = {
    "sparse": PoseRange(yaw=15, pitch=10, roll=5, shift=0.01),
    "extreme": PoseRange(yaw=45, pitch=25, roll=10, shift=0.015),
    "full": PoseRange(yaw=45, pitch=25, roll=10, shift=0.015),
}


@dataclass
class KinematicsSequence:
    expression: np.ndarray  # (N, E) float32 in [0, 1]
    rotation: np.ndarray  # (N, 3) float32 axis-angle, radians
    translation: np.ndarray  # (N, 3) float32 metres

    def __len__(self) -> int:
        return len(self.expression)


def _keyframe_sparse(names: list[str], rng: np.random.Generator) -> np.ndarray:
    e = np.zeros(len(names), np.float32)
    for name, hi in SPARSE_RANGE.items():
        if rng.random() < (0.9 if name == "jawOpen" else 0.3):
            e[names.index(name)] = rng.uniform(0, hi)
    if rng.random() < 0.4:  # smiles are mostly symmetric
        s = rng.uniform(0, SPARSE_RANGE["mouthSmileLeft"])
        e[names.index("mouthSmileLeft")] = s
        e[names.index("mouthSmileRight")] = np.clip(s + rng.normal(0, 0.05), 0, SPARSE_RANGE["mouthSmileRight"])
    return e


def _keyframe_extreme(names: list[str], rng: np.random.Generator) -> np.ndarray:
    e = np.zeros(len(names), np.float32)
    picks = rng.choice(list(EXTREME_LIBRARY), size=1 + int(rng.random() < 0.3), replace=False)
    for k, pick in enumerate(picks):
        scale = 1.0 if k == 0 else rng.uniform(0.4, 0.8)
        for name, (lo, hi) in EXTREME_LIBRARY[pick].items():
            e[names.index(name)] = max(e[names.index(name)], scale * rng.uniform(lo, hi))
    return e


def _keyframe_random(names: list[str], rng: np.random.Generator) -> np.ndarray:
    e = np.zeros(len(names), np.float32)
    chosen = rng.choice(len(names), size=rng.integers(2, 7), replace=False)
    e[chosen] = rng.uniform(0, 1, len(chosen))
    return e


def _keyframe(preset: str, names: list[str], rng: np.random.Generator) -> np.ndarray:
    if preset == "sparse":
        return _keyframe_sparse(names, rng)
    if preset == "extreme":
        return _keyframe_extreme(names, rng)
    draw = rng.random()
    if draw < 0.35:
        return _keyframe_sparse(names, rng)
    if draw < 0.7:
        return _keyframe_extreme(names, rng)
    return _keyframe_random(names, rng)


def _pose_keyframe(preset: str, rng: np.random.Generator) -> np.ndarray:
    r = POSE_RANGES[preset]
    if preset == "extreme" and rng.random() < 0.6:  # favour the wide poses the sparse capture lacks
        yaw = rng.choice([-1, 1]) * rng.uniform(r.yaw / 3, r.yaw)
    else:
        yaw = rng.uniform(-r.yaw, r.yaw)
    return np.array([rng.uniform(-r.pitch, r.pitch), yaw, rng.uniform(-r.roll, r.roll),
                     *rng.uniform(-r.shift, r.shift, 2), rng.uniform(-2 * r.shift, 2 * r.shift)])


def sample_kinematics(
    preset: str, num_frames: int, expression_names: list[str] | tuple[str, ...], fps: float = 25.0, seed: int = 0
) -> KinematicsSequence:
    """A smooth random trajectory of ``num_frames`` frames from ``preset`` (deterministic in ``seed``)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset {preset!r} is not one of {', '.join(PRESETS)}; pick one of those.")
    if num_frames < 1:
        raise ConfigError(f"--frames {num_frames}: a capture needs at least one frame.")
    names = list(expression_names)
    rng = np.random.default_rng([seed, 0x41E])
    duration = num_frames / fps
    # Expression keyframes 0.3–1.0 s apart; head-pose keyframes slower (0.7–1.6 s), as heads move.
    t = np.arange(num_frames) / fps
    expr_times = _keyframe_times(duration, (0.3, 0.8) if preset != "sparse" else (0.35, 1.0), rng)
    pose_times = _keyframe_times(duration, (0.7, 1.6), rng)
    expr_keys = np.stack([_keyframe(preset, names, rng) for _ in expr_times])
    pose_keys = np.stack([_pose_keyframe(preset, rng) for _ in pose_times])
    expression = np.clip(PchipInterpolator(expr_times, expr_keys)(t), 0, 1)
    pose = PchipInterpolator(pose_times, pose_keys)(t)
    expression = _add_blinks(expression, names, t, rng)

    euler = pose[:, :3]  # pitch (about x), yaw (about y), roll (about z), degrees
    rotation = Rotation.from_euler("xyz", euler, degrees=True).as_rotvec()
    translation = pose[:, 3:] + np.array([0.0, 0.0, CAMERA_DISTANCE_M])
    return KinematicsSequence(expression.astype(np.float32), rotation.astype(np.float32), translation.astype(np.float32))


def _keyframe_times(duration: float, gap: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    """Times from 0 past ``duration`` (at least two), ``gap`` seconds apart."""
    times = [0.0]
    while times[-1] < duration or len(times) < 2:
        times.append(times[-1] + rng.uniform(*gap))
    return np.array(times)


def _add_blinks(expression: np.ndarray, names: list[str], t: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blinks every 2–5 s, 0.15–0.3 s long, both eyes together."""
    left, right = names.index("eyeBlinkLeft"), names.index("eyeBlinkRight")
    when = rng.uniform(0.3, 2.0)
    while when < t[-1] + 1:
        length = rng.uniform(0.15, 0.3)
        profile = np.clip(1 - np.abs(t - when) / (length / 2), 0, 1)
        profile = np.sin(0.5 * np.pi * profile) ** 2
        for k in (left, right):
            expression[:, k] = np.maximum(expression[:, k], profile)
        when += rng.uniform(2.0, 5.0)
    return expression


def neutral_kinematics(num_expressions: int, num_frames: int = 1) -> KinematicsSequence:
    """Neutral face, frontal, at the default camera distance."""
    return KinematicsSequence(
        np.zeros((num_frames, num_expressions), np.float32),
        np.zeros((num_frames, 3), np.float32),
        np.tile(np.array([0.0, 0.0, CAMERA_DISTANCE_M], np.float32), (num_frames, 1)),
    )


def expression_keyframes(preset: str, count: int, expression_names: list[str] | tuple[str, ...],
                         seed: int = 0) -> np.ndarray:
    """(count, E) expression keyframes drawn from ``preset``'s library (the poses a trajectory visits)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset {preset!r} is not one of {', '.join(PRESETS)}; pick one of those.")
    names = list(expression_names)
    rng = np.random.default_rng([seed, 0x11B])
    return np.stack([_keyframe(preset, names, rng) for _ in range(count)]).astype(np.float32)
