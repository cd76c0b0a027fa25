"""Kinematic-space completion (`liftavatar lift`): add the expressions and poses a capture lacks.

1. **Targets.** From an expression library (the rig's extreme presets and their combinations, or
   another capture's expressions) pick ``num_expressions`` targets by farthest-point sampling
   against what the capture already holds: each pick is the library entry farthest from every
   observed frame and every earlier pick, so the targets cover the empty regions first.
2. **Trajectories.** Each target is reached by a short, smooth clip (cosine ease) that starts at
   the observed frame nearest to it, in expression and pose; with ``poses="wide"`` the head also
   turns toward a wider pose than the capture shows.
3. **Generation.** The rig, with the capture's tracked identity and camera, is rendered into
   shading maps and masks; the prior generates the person from K reference frames of the capture.
4. **Output.** A new Capture: the original frames, then the lifted ones (provenance 1) with the
   kinematics they were generated from. Clips are written as they finish; ``resume`` keeps them.

Coverage before and after is the share of a held-out set of library expressions that lies within
``coverage_radius`` (L2 distance in coefficient space) of some frame.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy.spatial.transform import Rotation, Slerp
from tqdm import tqdm

import liftavatar
from liftavatar.capture import PROVENANCE_LIFTED, Capture, CaptureMeta, CaptureWriter, Kinematics
from liftavatar.errors import ConfigError
from liftavatar.io import write_json


@dataclass
class LiftConfig:
    num_expressions: int = 100
    """Target expressions to add (the paper's gains plateau at about 100)."""
    poses: Literal["observed", "wide"] = "observed"
    """Keep the capture's head poses, or also turn toward wider ones."""
    refs: int = 5
    """Reference frames K."""
    ref_selection: Literal["kmeans", "random", "uniform", "farthest"] = "kmeans"
    steps: int = 10
    """Solver steps. UniPC at 10 steps lost 0.23 dB against Euler at 25 (2 held-out subjects) at 2.5× the speed."""
    guidance: float = 1.0
    solver: Literal["euler", "unipc"] = "unipc"
    seed: int = 0
    library_size: int = 2000
    """Expression library entries drawn from the rig's extreme presets (ignored with expressions_from)."""
    coverage_radius: float = 0.5
    """Coverage counts held-out expressions within this L2 distance of some frame."""


def farthest_targets(library: np.ndarray, observed: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` library rows chosen by farthest-point sampling against ``observed`` (L2)."""
    if count > len(library):
        raise ConfigError(f"--num-expressions {count}: the expression library has only {len(library)} entries.")
    nearest = np.full(len(library), np.inf) if len(observed) == 0 else \
        np.min(np.linalg.norm(library[:, None] - observed[None], axis=-1), axis=1)
    picks = []
    for _ in range(count):
        i = int(np.argmax(nearest))
        picks.append(i)
        nearest = np.minimum(nearest, np.linalg.norm(library - library[i], axis=1))
    return np.array(picks)


def coverage(query: np.ndarray, frames: np.ndarray, radius: float) -> float:
    """Share of ``query`` expressions within ``radius`` (L2) of some row of ``frames``."""
    if len(frames) == 0:
        return 0.0
    d = np.min(np.linalg.norm(query[:, None] - frames[None], axis=-1), axis=1)
    return float(np.mean(d <= radius))


def target_trajectories(kinematics: Kinematics, targets: np.ndarray, frames: int, poses: str,
                        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T·frames, E) expression, rotation, translation: from the nearest observed frame to each target."""
    valid = np.flatnonzero(kinematics.valid & (kinematics.provenance != PROVENANCE_LIFTED))
    obs = kinematics.expression[valid]
    ease = (1 - np.cos(np.linspace(0, math.pi, frames))) / 2  # 0 → 1, smooth at both ends
    expressions, rotations, translations = [], [], []
    for target in targets:
        start = valid[int(np.argmin(np.linalg.norm(obs - target, axis=1)))]
        e0, r0, t0 = kinematics.expression[start], kinematics.rotation[start], kinematics.translation[start]
        expressions.append(e0[None] + ease[:, None] * (target - e0)[None])
        if poses == "wide":
            turn = Rotation.from_euler("xyz", [rng.uniform(-20, 20), rng.choice([-1, 1]) * rng.uniform(20, 40),
                                               rng.uniform(-8, 8)], degrees=True)
            key = Rotation.from_rotvec(np.stack([r0, (turn * Rotation.from_rotvec(r0)).as_rotvec()]))
            rotations.append(Slerp([0, 1], key)(ease).as_rotvec())
        else:
            rotations.append(np.repeat(r0[None], frames, 0))
        translations.append(np.repeat(t0[None], frames, 0))
    return (np.concatenate(expressions).astype(np.float32), np.concatenate(rotations).astype(np.float32),
            np.concatenate(translations).astype(np.float32))


def lift(capture_path: str | Path, out: str | Path, prior: str | Path | None = None,
         config: LiftConfig | None = None, expressions_from: str | Path | None = None, device: str = "cpu",
         overwrite: bool = False, resume: bool = False, progress: bool = True) -> tuple[Capture, dict]:
    """Lift ``capture_path`` into ``out`` (see the module docstring). Returns the new capture and a report."""
    from liftavatar.face.control import render_controls
    from liftavatar.face.rig import FaceRig
    from liftavatar.generator.data import _images, kinematic_controls, reference_indices, reference_inputs
    from liftavatar.generator.pipeline import GenerationInputs, LiftAvatarPipeline, video_to_uint8
    from liftavatar.generator.prior import resolve_prior
    from liftavatar.synth.kinematics import expression_keyframes

    config = config or LiftConfig()
    capture = Capture.load(capture_path)
    rig = FaceRig.load()
    if list(capture.meta.expression_names) != list(rig.expression_names):
        raise ConfigError(f"{capture.path}: its expression coefficients are not this rig's; lift captures made by "
                          "`liftavatar track` or `synth`.")
    kin = capture.kinematics
    observed = kin.expression[kin.valid & (kin.provenance != PROVENANCE_LIFTED)]
    if len(observed) == 0:
        raise ConfigError(f"{capture.path}: no valid observed frames to lift from; track a video with a visible face.")
    pipe = LiftAvatarPipeline.from_pretrained(resolve_prior(prior), device=device)
    frames = pipe.window

    if expressions_from is not None:
        library = Capture.load(expressions_from).kinematics
        library = library.expression[library.valid]
    else:
        library = expression_keyframes("extreme", config.library_size, rig.expression_names, seed=config.seed)
    held_out = expression_keyframes("extreme", 500, rig.expression_names, seed=config.seed + 1)
    picks = farthest_targets(library, observed, config.num_expressions)
    rng = np.random.default_rng(config.seed)
    expression, rotation, translation = target_trajectories(kin, library[picks], frames, config.poses, rng)
    ref_idx, note = reference_indices(capture, config.refs, config.ref_selection, config.seed)
    if note and progress:
        print(note)

    n0, n_new = capture.num_frames, len(expression)
    meta = CaptureMeta(**{**asdict(capture.meta), "num_frames": n0 + n_new,
                          "creator": {"verb": "lift", "version": liftavatar.__version__,
                                      "config": {**asdict(config), "prior": str(resolve_prior(prior)),
                                                 "source": str(capture.path)}}})
    refs = reference_inputs(capture, ref_idx)
    with CaptureWriter(out, meta, overwrite=overwrite, resume=resume) as writer:
        for i in range(n0):
            if not writer.has_frame(i):
                writer.add_frame(i, capture.frame(i), capture.mask(i), capture.shading(i))
        clips = config.num_expressions
        bar = tqdm(total=clips, desc="lift", unit="expression", disable=not progress)
        for c in range(clips):
            sl = slice(c * frames, (c + 1) * frames)
            if all(writer.has_frame(n0 + j) for j in range(sl.start, sl.stop)):
                bar.update(1)
                continue
            verts = rig.vertices(kin.identity, expression[sl], rotation[sl], translation[sl]).to(device)
            maps = render_controls(verts, capture.meta.intrinsics, capture.size, rig)
            shading, masks = maps.shading, maps.mask
            inputs = GenerationInputs(**refs, shading=_images(shading),
                                      controls=torch.from_numpy(kinematic_controls(expression[sl], rotation[sl],
                                                                                   translation[sl])))
            video = pipe(inputs, steps=config.steps, guidance=config.guidance, seed=config.seed + c,
                         solver=config.solver)
            rgb = video_to_uint8(video)
            for j in range(frames):
                writer.add_frame(n0 + c * frames + j, rgb[j], masks[j], shading[j])
            bar.update(1)
        bar.close()
        lifted = Kinematics(
            expression=np.concatenate([kin.expression, expression]),
            rotation=np.concatenate([kin.rotation, rotation]),
            translation=np.concatenate([kin.translation, translation]),
            valid=np.concatenate([kin.valid, np.ones(n_new, bool)]),
            provenance=np.concatenate([kin.provenance, np.full(n_new, PROVENANCE_LIFTED, np.uint8)]),
            identity=kin.identity,
        )
        result = writer.finalize(lifted, reference_indices=ref_idx.tolist())
    report = {
        "source": str(capture.path), "lifted_expressions": config.num_expressions, "lifted_frames": n_new,
        "frames_per_expression": frames, "coverage_radius": config.coverage_radius,
        "coverage_before": coverage(held_out, observed, config.coverage_radius),
        "coverage_after": coverage(held_out, np.concatenate([observed, expression]), config.coverage_radius),
    }
    write_json(result.path / "lift_report.json", report)
    return result, report
