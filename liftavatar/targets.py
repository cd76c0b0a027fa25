"""What `lift` adds: a kinematic library (expressions with the head poses they came with), the targets picked from
it, the trajectories that reach them, and how much of a held-out set the frames then cover.

**The library** is independent of how any test take is made. The default, ``tracked``, is the expressions and
head poses `liftavatar track` read from real people: the permissively licensed ``train/`` clips of the project's
real-video set (the shipped file's metadata lists them; ``scripts/build_kinematic_library.py`` rebuilds it). The
synthetic benchmark's extreme test is drawn from the rig's extreme presets (:mod:`liftavatar.synth.kinematics`);
a library drawn from those presets (``rig``, kept for ablations) flatters lifting on that test, as it did before
this module. A capture can serve as the library too (``expressions_from``).

**Poses are relative.** A library entry's head rotation is stored relative to its source clip's typical pose
(``R_rel = R · R_typical⁻¹``, camera frame), so it means "turned this far from how that person faced the camera";
a target applies it to the lifted capture's own typical pose. Talking clips turn little (the tracked library's
relative rotations: median 3.5°, 95th percentile 10.6°), so :meth:`KinematicLibrary.widened` adds to every entry a
seeded turn drawn uniformly within ``turn_deg`` of yaw (half of it in pitch, a fifth in roll), the range lift's
earlier ``wide`` poses used: the joint picking then decides which expressions go with which wide poses.

**Targets** are picked jointly in expression and pose by farthest-point sampling against what the capture holds,
in one space: the expression coefficients (unitless, L2) and the relative rotation's axis-angle (radians) times
``pose_weight`` (2: a 20° turn counts like 0.7 of expression distance, about one strong expression unit).

**Coverage** of a held-out set is reported three ways: expression (within ``radius`` in coefficient space),
pose (within ``pose_radius_deg`` of relative rotation) and joint (both for the same frame).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from liftavatar.capture import PROVENANCE_LIFTED, Capture, Kinematics
from liftavatar.errors import ConfigError

__all__ = ["KinematicLibrary", "LIBRARY_FILE", "coverage", "coverage_report", "farthest_targets", "joint_features",
           "load_library", "relative_rotations", "target_trajectories", "typical_rotation"]

LIBRARY_FILE = "kinematic_library.safetensors"
"""The shipped tracked library, in ``liftavatar/data/``."""


@dataclass(frozen=True)
class KinematicLibrary:
    """Kinematic targets: (N, E) expression coefficients and (N, 3) head rotations relative to their source's
    typical pose (axis-angle, radians); ``clip`` (N,) says which source each entry came from (held-out coverage
    holds out whole sources); ``source`` names the library for fingerprints and reports."""

    expression: np.ndarray
    rotation: np.ndarray
    clip: np.ndarray
    source: str
    clips: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.expression)

    def identity(self) -> str:
        """A content hash: what a resumed lift compares."""
        h = hashlib.sha256()
        for a in (self.expression, self.rotation, self.clip):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def subset(self, rows: np.ndarray) -> KinematicLibrary:
        return KinematicLibrary(self.expression[rows], self.rotation[rows], self.clip[rows], self.source, self.clips)

    def widened(self, turn_deg: float, seed: int) -> KinematicLibrary:
        """Every entry turned by a seeded random pose within ±``turn_deg`` yaw, ±half pitch, ±a fifth roll."""
        if turn_deg <= 0:
            return self
        rng = np.random.default_rng([seed, 0x7A2])
        turn = Rotation.from_euler("xyz", rng.uniform(-1, 1, (len(self), 3)) * [turn_deg / 2, turn_deg, turn_deg / 5],
                                   degrees=True)
        rotation = (turn * Rotation.from_rotvec(self.rotation.astype(np.float64))).as_rotvec().astype(np.float32)
        return KinematicLibrary(self.expression, rotation, self.clip, f"{self.source}, turned ≤ {turn_deg:g}°",
                                self.clips)

    def split(self, seed: int, share: float = 0.2) -> tuple[KinematicLibrary, KinematicLibrary]:
        """(to pick from, held out): whole sources held out (``share`` of them, at least one when there are two),
        so held-out coverage is not met by a neighbouring frame of the same clip. One source: entries alternate."""
        ids = np.unique(self.clip)
        if len(ids) < 2:
            held = np.arange(len(self)) % 5 == 4
        else:
            count = max(1, int(round(share * len(ids))))
            out = np.random.default_rng([seed, 0x11B2]).choice(ids, size=count, replace=False)
            held = np.isin(self.clip, out)
        return self.subset(np.flatnonzero(~held)), self.subset(np.flatnonzero(held))


def typical_rotation(rotation: np.ndarray) -> Rotation:
    """The typical head pose of a set of rotations (axis-angle rows): their chordal mean."""
    return Rotation.from_rotvec(np.asarray(rotation, np.float64)).mean()


def relative_rotations(rotation: np.ndarray, typical: Rotation) -> np.ndarray:
    """(N, 3) axis-angle of ``R · typical⁻¹``: each pose as a turn away from the typical one (camera frame)."""
    return (Rotation.from_rotvec(np.asarray(rotation, np.float64)) * typical.inv()).as_rotvec()


def joint_features(expression: np.ndarray, rotation: np.ndarray, pose_weight: float) -> np.ndarray:
    """(N, E + 3) expression coefficients and ``pose_weight`` × relative axis-angle: the space targets are picked
    and reached in."""
    return np.concatenate([np.asarray(expression, np.float64), pose_weight * np.asarray(rotation, np.float64)], 1)


def library_from_kinematics(kinematics: Kinematics, source: str) -> KinematicLibrary:
    """A library of a capture's valid frames that a generator did not make, poses relative to their typical one."""
    keep = np.asarray(kinematics.valid, bool) & (np.asarray(kinematics.provenance) != PROVENANCE_LIFTED)
    if not keep.any():
        raise ConfigError(f"{source}: no valid observed frames to serve as a kinematic library; use a tracked capture "
                          "with a visible face.")
    rot = kinematics.rotation[keep]
    return KinematicLibrary(kinematics.expression[keep].astype(np.float32),
                            relative_rotations(rot, typical_rotation(rot)).astype(np.float32),
                            np.zeros(int(keep.sum()), np.int32), source, (source,))


def rig_library(expression_names, count: int, seed: int) -> KinematicLibrary:
    """The rig's extreme expression presets (the synthetic extreme test's own generator) at the typical pose: an
    ablation that reproduces lifting before the tracked library."""
    from liftavatar.synth.kinematics import expression_keyframes

    expression = expression_keyframes("extreme", count, list(expression_names), seed=seed)
    # Eight pseudo-sources so that held-out coverage holds out whole groups as it does for tracked clips.
    return KinematicLibrary(expression, np.zeros((count, 3), np.float32), np.arange(count, dtype=np.int32) % 8,
                            "rig extreme presets", ())


def tracked_library(expression_names) -> KinematicLibrary:
    """The shipped library (``liftavatar/data/kinematic_library.safetensors``): tracked real people."""
    from safetensors.numpy import load_file
    from safetensors import safe_open

    path = resources.files("liftavatar") / "data" / LIBRARY_FILE
    with resources.as_file(path) as file:
        if not Path(file).is_file():
            raise ConfigError(f"the tracked kinematic library {file} is missing from this installation; reinstall "
                              "liftavatar, or pass --library rig or --expressions-from CAPTURE.")
        tensors = load_file(str(file))
        with safe_open(str(file), "np") as f:
            meta = f.metadata() or {}
    names = json.loads(meta.get("expression_names", "[]"))
    if names != list(expression_names):
        raise ConfigError(f"{file}: its expression coefficients are not this rig's; rebuild it with "
                          "scripts/build_kinematic_library.py.")
    return KinematicLibrary(tensors["expression"], tensors["rotation"], tensors["clip"].astype(np.int32),
                            "tracked train/ clips", tuple(json.loads(meta.get("clips", "[]"))))


def load_library(kind: str, expression_names, count: int, seed: int,
                 expressions_from: str | Path | None = None) -> KinematicLibrary:
    """The library ``lift`` picks from: a capture's frames when ``expressions_from`` is given, else ``kind``
    (``tracked`` or ``rig``)."""
    if expressions_from is not None:
        capture = Capture.load(expressions_from)
        if list(capture.meta.expression_names) != list(expression_names):
            raise ConfigError(f"--expressions-from {expressions_from}: its expression coefficients are not this rig's; "
                              "use a capture made by `liftavatar track` or `synth`.")
        return library_from_kinematics(capture.kinematics, str(capture.path))
    if kind == "tracked":
        return tracked_library(expression_names)
    if kind == "rig":
        return rig_library(expression_names, count, seed)
    raise ConfigError(f"--library {kind!r}: use tracked (expressions and poses of real people) or rig (the rig's "
                      "extreme presets, an ablation).")


def farthest_targets(library: np.ndarray, observed: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` rows of ``library`` (feature rows) chosen by farthest-point sampling against
    ``observed`` (L2): each pick is the row farthest from every observed row and every earlier pick."""
    if count > len(library):
        raise ConfigError(f"--num-expressions {count}: the kinematic library has only {len(library)} entries to pick "
                          "from.")
    nearest = np.full(len(library), np.inf) if len(observed) == 0 else \
        np.min(np.linalg.norm(library[:, None] - observed[None], axis=-1), axis=1)
    picks = []
    for _ in range(count):
        i = int(np.argmax(nearest))
        picks.append(i)
        nearest = np.minimum(nearest, np.linalg.norm(library - library[i], axis=1))
    return np.array(picks)


def coverage(query: np.ndarray, frames: np.ndarray, radius: float) -> float:
    """Share of ``query`` rows within ``radius`` (L2) of some row of ``frames``."""
    if len(frames) == 0 or len(query) == 0:
        return 0.0
    d = np.min(np.linalg.norm(query[:, None] - frames[None], axis=-1), axis=1)
    return float(np.mean(d <= radius))


def coverage_report(query_expression: np.ndarray, query_rotation: np.ndarray, expression: np.ndarray,
                    rotation: np.ndarray, radius: float, pose_radius_deg: float) -> dict[str, float]:
    """Share of the query (expression, relative rotation) rows that some frame covers: in expression (coefficient
    L2 ≤ ``radius``), in pose (relative rotation ≤ ``pose_radius_deg`` apart) and jointly (one frame both)."""
    if len(expression) == 0 or len(query_expression) == 0:
        return {"expression": 0.0, "pose": 0.0, "joint": 0.0}
    de = np.linalg.norm(query_expression[:, None].astype(np.float64) - expression[None], axis=-1)
    q = Rotation.from_rotvec(np.asarray(query_rotation, np.float64))
    r = Rotation.from_rotvec(np.asarray(rotation, np.float64))
    # Angle between every query pose and every frame pose, from the quaternions' dot product.
    dot = np.abs(q.as_quat() @ r.as_quat().T).clip(0, 1)
    dr = np.degrees(2 * np.arccos(dot))
    e_ok, r_ok = de <= radius, dr <= pose_radius_deg
    return {"expression": float(e_ok.any(1).mean()), "pose": float(r_ok.any(1).mean()),
            "joint": float((e_ok & r_ok).any(1).mean())}


def target_trajectories(kinematics: Kinematics, expression: np.ndarray, rotation: np.ndarray | None, frames: int,
                        pose_weight: float, typical: Rotation | None = None, wide_turns: np.random.Generator | None = None,
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T·frames, E) expression, (T·frames, 3) rotation, (T·frames, 3) translation: one short clip per target,
    from the observed frame nearest to it (in the joint space) to the target, with a cosine ease.

    ``rotation`` (T, 3): the targets' poses relative to the typical one (None: every clip keeps its start frame's
    pose); they are applied to ``typical`` (default: the capture's typical pose). ``wide_turns``: instead of the
    targets' poses, turn each clip by a random wider pose (an ablation kept from before the joint library)."""
    valid = np.flatnonzero(kinematics.valid & (kinematics.provenance != PROVENANCE_LIFTED))
    typical = typical or typical_rotation(kinematics.rotation[valid])
    obs = joint_features(kinematics.expression[valid], relative_rotations(kinematics.rotation[valid], typical),
                         pose_weight if rotation is not None else 0.0)
    ease = (1 - np.cos(np.linspace(0, math.pi, frames))) / 2  # 0 → 1, smooth at both ends
    expressions, rotations, translations = [], [], []
    for t, target in enumerate(expression):
        goal = joint_features(target[None], np.zeros((1, 3)) if rotation is None else rotation[t:t + 1],
                              pose_weight if rotation is not None else 0.0)
        start = valid[int(np.argmin(np.linalg.norm(obs - goal, axis=1)))]
        e0, r0, t0 = kinematics.expression[start], kinematics.rotation[start], kinematics.translation[start]
        expressions.append(e0[None] + ease[:, None] * (target - e0)[None])
        if wide_turns is not None:
            rng = wide_turns
            end = Rotation.from_euler("xyz", [rng.uniform(-20, 20), rng.choice([-1, 1]) * rng.uniform(20, 40),
                                              rng.uniform(-8, 8)], degrees=True) * Rotation.from_rotvec(r0)
        elif rotation is not None:
            end = Rotation.from_rotvec(rotation[t]) * typical
        else:
            end = None
        if end is None:
            rotations.append(np.repeat(r0[None], frames, 0))
        else:
            key = Rotation.from_rotvec(np.stack([r0, end.as_rotvec()]))
            rotations.append(Slerp([0, 1], key)(ease).as_rotvec())
        translations.append(np.repeat(t0[None], frames, 0))
    return (np.concatenate(expressions).astype(np.float32), np.concatenate(rotations).astype(np.float32),
            np.concatenate(translations).astype(np.float32))
