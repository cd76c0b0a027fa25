"""Kinematic-space completion (`liftavatar lift`): add the expressions and poses a capture lacks.

1. **Targets.** From an expression library (the rig's extreme presets and their combinations, or
   another capture's expressions) pick ``num_expressions`` targets by farthest-point sampling
   against what the capture already holds: each pick is the library entry farthest from every
   observed frame and every earlier pick, so the targets cover the empty regions first.
2. **Trajectories.** Each target is reached by a short, smooth clip (cosine ease) that starts at
   the observed frame nearest to it, in expression and pose; with ``poses="wide"`` the head also
   turns toward a wider pose than the capture shows.
3. **Generation.** The rig, with the capture's tracked identity and camera, is rendered into
   shading maps at the capture's size; the lifted frames' masks follow the rule of the capture's own frames
   (filmed frames: :mod:`liftavatar.face.masks`' head-and-neck masks, segmented from the generated picture;
   synthetic ones: the rig's silhouette, as the renderer gives them); the prior generates the person from K reference
   frames of the capture at its own resolution (references and target shading maps resized to it,
   the generated frames resized back: :mod:`liftavatar.generator.inputs`), so a capture of any
   square size can be lifted and keeps its resolution.
4. **Output.** A new Capture: the original frames, then the lifted ones (provenance 1) with the
   kinematics they were generated from. Clips are written as they finish; ``resume`` keeps them,
   and only them: the staging directory records what the clips are made from (settings, prior,
   source capture, expression library) and a resume with anything else is refused.

Coverage before and after is the share of a held-out set of library expressions that lies within
``coverage_radius`` (L2 distance in coefficient space) of some frame.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from scipy.spatial.transform import Rotation, Slerp
from tqdm import tqdm

import liftavatar
from liftavatar.capture import PROVENANCE_LIFTED, PROVENANCE_OBSERVED, Capture, CaptureMeta, CaptureWriter, Kinematics
from liftavatar.errors import ConfigError, LiftAvatarError
from liftavatar.generator.pipeline import SamplerConfig, Solver
from liftavatar.generator.prior import PriorConfig
from liftavatar.io import write_json

logger = logging.getLogger(__name__)


@dataclass
class LiftConfig(SamplerConfig):
    """What `lift` adds, and how it samples: the sampler's fields (:class:`SamplerConfig`) with lift's defaults."""

    steps: int = 10
    """Solver steps. UniPC at 10 steps lost 0.23 dB against Euler at 25 (2 held-out subjects) at 2.5× the speed."""
    solver: Solver = "unipc"
    """Flow-matching solver: unipc, or euler."""
    seed: int = 0
    """Seed of what lift draws: the expression library, the wider poses, the references when chosen now, and the
    noise (clip c: seed + c)."""
    batch_size: int = 1
    """Clips sampled at once: faster on a GPU, more memory; the frames are the same up to float rounding."""
    num_expressions: int = 100
    """Target expressions to add (the paper's gains plateau at about 100)."""
    poses: Literal["observed", "wide"] = "observed"
    """Keep the capture's head poses, or also turn toward wider ones."""
    refs: int = 5
    """Reference frames K."""
    ref_selection: Literal["kmeans", "random", "uniform", "farthest"] = "kmeans"
    """How references are chosen when the capture does not store K of them: kmeans over expression + rotation;
    random, uniform, farthest for ablations."""
    library_size: int = 2000
    """Expression library entries drawn from the rig's extreme presets (ignored with expressions_from)."""
    coverage_radius: float = 0.5
    """Coverage counts held-out expressions within this L2 distance of some frame."""


# LiftConfig fields that do not change the lifted frames: a resume may change them.
_NOT_IN_FINGERPRINT = ("batch_size", "coverage_radius")


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


def _mask_rule(kinematics: Kinematics):
    """How lifted frames get their masks: as the capture's own frames got theirs. Filmed frames (provenance
    observed) carry :mod:`liftavatar.face.masks`' head-and-neck masks (person segmentation × head region), so the
    generated ones get the same, segmented from the generated picture: returns a :class:`SelfieSegmenter`. Rendered
    ground truth (provenance synthetic) carries the renderer's silhouette, so the generated frames get the rig's
    silhouette at their kinematics: returns None."""
    observed = kinematics.provenance[kinematics.valid] == PROVENANCE_OBSERVED
    if not observed.any():
        return None
    from liftavatar.face.masks import SelfieSegmenter

    return SelfieSegmenter()


def lift(capture_path: str | Path, out: str | Path, prior: PriorConfig | str | Path | None = None,
         config: LiftConfig | None = None, expressions_from: str | Path | None = None, device: str | None = None,
         overwrite: bool = False, resume: bool = False, progress: bool = True) -> tuple[Capture, dict]:
    """Lift ``capture_path`` into ``out`` (see the module docstring). Returns the new capture and a report.

    ``prior``: a :class:`PriorConfig`, or a prior directory (None: the embedded prior); ``device``, when given,
    overrides the config's. Every refusal (bad settings, capture, prior or library) comes before anything is
    written; ``resume`` continues only a staging directory made from the same settings and inputs."""
    from liftavatar.face.control import render_controls
    from liftavatar.face.masks import head_masks, head_region
    from liftavatar.face.rig import FaceRig
    from liftavatar.fingerprint import capture_identity
    from liftavatar.generator.inputs import (
        image_tensor,
        kinematic_controls,
        num_controls,
        reference_indices,
        reference_inputs,
        resize_images,
        square_side,
    )
    from liftavatar.generator.pipeline import GenerationInputs, LiftAvatarPipeline, check_sampling, video_to_uint8
    from liftavatar.synth.kinematics import expression_keyframes

    config = config or LiftConfig()
    if config.num_expressions < 1:
        raise ConfigError(f"--num-expressions {config.num_expressions}: lift adds at least 1 expression; to use the "
                          "capture as it is, skip lifting.")
    check_sampling(config.steps, config.guidance, config.solver, config.batch_size)
    prior = prior if isinstance(prior, PriorConfig) else PriorConfig(prior=prior)
    if device is not None:
        prior = replace(prior, device=device)
    capture = Capture.load(capture_path)
    rig = FaceRig.load()
    if list(capture.meta.expression_names) != list(rig.expression_names):
        raise ConfigError(f"{capture.path}: its expression coefficients are not this rig's; lift captures made by "
                          "`liftavatar track` or `synth`.")
    side = square_side(capture, "lift")
    kin = capture.kinematics
    observed = kin.expression[kin.valid & (kin.provenance != PROVENANCE_LIFTED)]
    if len(observed) == 0:
        raise ConfigError(f"{capture.path}: no valid observed frames to lift from; track a video with a visible face.")
    if expressions_from is not None:
        library = Capture.load(expressions_from).kinematics
        library = library.expression[library.valid]
    else:
        library = expression_keyframes("extreme", config.library_size, rig.expression_names, seed=config.seed)
    held_out = expression_keyframes("extreme", 500, rig.expression_names, seed=config.seed + 1)
    picks = farthest_targets(library, observed, config.num_expressions)
    ref_idx, note = reference_indices(capture, config.refs, config.ref_selection, config.seed)
    if note and progress:
        logger.info(note)
    pipe = LiftAvatarPipeline.from_pretrained(prior)
    pipe.check_controls(num_controls(len(rig.expression_names)), f"{capture.path} (with the prior {prior.path})")
    frames = pipe.window
    size = pipe.size or side  # the prior generates at its own resolution; the capture keeps its own

    rng = np.random.default_rng(config.seed)
    expression, rotation, translation = target_trajectories(kin, library[picks], frames, config.poses, rng)
    n0, n_new = capture.num_frames, len(expression)
    meta = CaptureMeta(**{**asdict(capture.meta), "num_frames": n0 + n_new,
                          "creator": {"verb": "lift", "version": liftavatar.__version__,
                                      "config": {**asdict(config), "prior": str(prior.path),
                                                 "source": str(capture.path)}}})
    refs = reference_inputs(capture, ref_idx, size)
    fingerprint = {**{k: v for k, v in asdict(config).items() if k not in _NOT_IN_FINGERPRINT},
                   **prior.identity(), "source": capture_identity(capture.path),
                   "expressions_from": None if expressions_from is None else capture_identity(expressions_from)}
    writer = CaptureWriter(out, meta, overwrite=overwrite, resume=resume, fingerprint=fingerprint)
    clips = config.num_expressions
    span = lambda c: range(c * frames, (c + 1) * frames)  # noqa: E731  (clip c's rows of the lifted arrays)
    todo = [c for c in range(clips) if not all(writer.has_frame(n0 + j) for j in span(c))]
    generated = False
    segment = _mask_rule(kin)  # lifted frames get the masks their capture's frames have (None: the rig's)
    with writer, segment or contextlib.nullcontext():
        try:
            for i in range(n0):
                if not writer.has_frame(i):
                    writer.add_frame(i, capture.frame(i), capture.mask(i), capture.shading(i))
            bar = tqdm(total=clips, initial=clips - len(todo), desc="lift", unit="expression", disable=not progress)
            for chunk in range(0, len(todo), config.batch_size):
                chosen = todo[chunk:chunk + config.batch_size]
                rows = np.concatenate([span(c) for c in chosen])
                verts = rig.vertices(kin.identity, expression[rows], rotation[rows], translation[rows])
                maps = render_controls(verts.to(prior.device), capture.meta.intrinsics, capture.size, rig)
                controls = kinematic_controls(expression[rows], rotation[rows], translation[rows])
                inputs = GenerationInputs(**refs, shading=resize_images(image_tensor(maps.shading), size),
                                          controls=torch.from_numpy(controls))
                video = pipe.generate_clips(inputs, frames, [config.seed + c for c in chosen], config.steps,
                                            config.guidance, config.solver, config.batch_size)
                generated = True
                rgb = video_to_uint8(resize_images(video, capture.size))
                masks = maps.mask
                if segment is not None:
                    region = head_region(kin.identity, expression[rows], rotation[rows], translation[rows],
                                         capture.meta.intrinsics, capture.size, rig)
                    masks = head_masks(np.stack([segment(frame) for frame in rgb]), region)
                for k, row in enumerate(rows):
                    writer.add_frame(n0 + row, rgb[k], masks[k], maps.shading[k])
                bar.update(len(chosen))
            bar.close()
        except LiftAvatarError:
            if not generated and not writer.resumed:
                writer.discard()  # a refusal before any generation leaves nothing behind
            raise
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
        "frames_per_expression": frames, "generated_size": size, "coverage_radius": config.coverage_radius,
        "coverage_before": coverage(held_out, observed, config.coverage_radius),
        "coverage_after": coverage(held_out, np.concatenate([observed, expression]), config.coverage_radius),
    }
    write_json(result.path / "lift_report.json", report)
    return result, report
