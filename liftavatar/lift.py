"""Kinematic-space completion (`liftavatar lift`): add the expressions and poses a capture lacks.

1. **Targets.** From a kinematic library (:mod:`liftavatar.targets`: by default the expressions and head poses
   tracked from real people, independent of how any test take is made; or another capture's frames) pick
   ``num_expressions`` targets, expression and pose jointly, by farthest-point sampling against what the capture
   already holds: each pick is the library entry farthest from every observed frame and every earlier pick, so the
   targets cover the empty regions first.
2. **Trajectories.** Each target is reached by a short, smooth clip (cosine ease) that starts at
   the observed frame nearest to it and ends at its expression and its pose (relative to the capture's typical
   pose); ``poses="observed"`` keeps the start frame's pose, ``poses="wide"`` turns toward a random wider one
   (ablations).
3. **Generation.** The rig, with the capture's tracked identity and camera, is rendered into
   shading maps at the capture's size; the lifted frames' masks follow the rule of the capture's own frames
   (filmed frames: :mod:`liftavatar.face.masks`' head-and-neck masks, segmented from the generated picture;
   synthetic ones: the rig's silhouette, as the renderer gives them); the prior generates the person from K reference
   frames of the capture at its own resolution (references and target shading maps resized to it,
   the generated frames resized back: :mod:`liftavatar.generator.inputs`), so a capture of any
   square size can be lifted and keeps its resolution. With ``adapt`` the prior is first fine-tuned on the
   capture itself (:mod:`liftavatar.generator.adapt`, into ``OUT_prior``, with lift's references) and
   lifts with that.
4. **Output.** A new Capture: the original frames, then the lifted ones (provenance 1) with the
   kinematics they were generated from. Clips are written as they finish; ``resume`` keeps them,
   and only them: the staging directory records what the clips are made from (settings, prior,
   source capture, expression library) and a resume with anything else is refused.

Coverage before and after is the share of held-out library entries (whole source clips the targets were not
picked from) that some frame covers, in expression (within ``coverage_radius``, L2 in coefficient space), in pose
(within ``pose_radius_deg``) and jointly.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

import liftavatar
from liftavatar.capture import PROVENANCE_LIFTED, PROVENANCE_OBSERVED, Capture, CaptureMeta, CaptureWriter, Kinematics
from liftavatar.errors import ConfigError, LiftAvatarError
from liftavatar.generator.pipeline import SamplerConfig, Solver
from liftavatar.generator.prior import PriorConfig
from liftavatar.io import write_json
from liftavatar.targets import (coverage_report, farthest_targets, joint_features, load_library,
                                relative_rotations, target_trajectories, typical_rotation)

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
    library: Literal["tracked", "rig"] = "tracked"
    """Kinematic library the targets come from: tracked (expressions and head poses of real people, from the
    permissively licensed train/ clips) or rig (the rig's extreme presets: the synthetic extreme test's own
    generator, an ablation that flatters lifting on that test). --expressions-from CAPTURE overrides it."""
    poses: Literal["library", "observed", "wide"] = "library"
    """Head poses of the lifted clips: the targets' own (picked jointly with the expression), the start frame's
    (observed), or a random wider turn (wide); the last two pick targets by expression alone."""
    turn_deg: float = 40.0
    """The library's poses are widened by a seeded turn within ±this yaw (±half pitch, ±a fifth roll): talking clips
    turn little, and lifting should add the poses a capture lacks (library poses only)."""
    pose_weight: float = 2.0
    """Radians of relative head rotation → expression-coefficient units when picking targets (2: a 20° turn counts
    like 0.7 of expression distance)."""
    refs: int = 5
    """Reference frames K."""
    ref_selection: Literal["kmeans", "random", "uniform", "farthest"] = "kmeans"
    """How references are chosen when the capture does not store K of them: kmeans over expression + rotation;
    random, uniform, farthest for ablations."""
    library_size: int = 2000
    """Entries drawn from the rig's extreme presets (library rig only)."""
    coverage_radius: float = 0.5
    """Coverage counts held-out expressions within this L2 distance of some frame."""
    pose_radius_deg: float = 10.0
    """Coverage counts held-out poses within this angle of some frame's."""
    adapt: bool = False
    """Adapt the prior to this capture first (`liftavatar adapt` with its defaults and this lift's
    refs, reference selection, seed and device) into OUT_prior beside the output, then lift with
    the adapted prior. Off by default: with the CPU defaults it raised PSNR but not expression
    fidelity on the real validation clips (benchmarks/results/generator_real.md); the CUDA defaults
    are not measured yet. Resumable, and reused while
    the capture, prior and settings are the same; with --force it adapts again."""


# LiftConfig fields that do not change the lifted frames: a resume may change them. (`adapt` changes the prior, whose
# content identity is in the fingerprint.)
_NOT_IN_FINGERPRINT = ("batch_size", "coverage_radius", "pose_radius_deg", "adapt")


def adapted_prior_path(out: str | Path) -> Path:
    """Where `lift --adapt` writes the prior it adapts: beside the lifted capture OUT, as OUT_prior."""
    out = Path(out)
    return out.with_name(f"{out.name}_prior")


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
    own = kin.valid & (kin.provenance != PROVENANCE_LIFTED)
    observed = kin.expression[own]
    if len(observed) == 0:
        raise ConfigError(f"{capture.path}: no valid observed frames to lift from; track a video with a visible face.")
    library = load_library(config.library, rig.expression_names, config.library_size, config.seed, expressions_from)
    joint = config.poses == "library"
    if joint:
        library = library.widened(config.turn_deg, config.seed)
    pool, held_out = library.split(config.seed)
    typical = typical_rotation(kin.rotation[own])
    observed_rotation = relative_rotations(kin.rotation[own], typical)
    weight = config.pose_weight if joint else 0.0  # observed / wide poses: targets picked by expression alone
    picks = farthest_targets(joint_features(pool.expression, pool.rotation, weight),
                             joint_features(observed, observed_rotation, weight), config.num_expressions)
    ref_idx, note = reference_indices(capture, config.refs, config.ref_selection, config.seed)
    if note and progress:
        logger.info(note)
    adapted = None
    if config.adapt:
        from liftavatar.capture import check_capture_target
        from liftavatar.generator.adapt import AdaptConfig, adapt

        check_capture_target(out, overwrite)  # before minutes of adaptation, not after
        settings = AdaptConfig(refs=config.refs, ref_method=config.ref_selection, seed=config.seed, device=prior.device)
        adapted = adapt(capture.path, adapted_prior_path(out), settings, prior, force=overwrite, progress=progress)
        prior = replace(prior, prior=adapted)
    pipe = LiftAvatarPipeline.from_pretrained(prior)
    pipe.check_controls(num_controls(len(rig.expression_names)), f"{capture.path} (with the prior {prior.path})")
    frames = pipe.window
    size = pipe.size or side  # the prior generates at its own resolution; the capture keeps its own

    expression, rotation, translation = target_trajectories(
        kin, pool.expression[picks], pool.rotation[picks] if joint else None, frames, weight, typical,
        np.random.default_rng(config.seed) if config.poses == "wide" else None)
    n0, n_new = capture.num_frames, len(expression)
    meta = CaptureMeta(**{**asdict(capture.meta), "num_frames": n0 + n_new,
                          "creator": {"verb": "lift", "version": liftavatar.__version__,
                                      "config": {**asdict(config), "prior": str(prior.path),
                                                 "source": str(capture.path)}}})
    refs = reference_inputs(capture, ref_idx, size)
    fingerprint = {**{k: v for k, v in asdict(config).items() if k not in _NOT_IN_FINGERPRINT},
                   **prior.identity(), "source": capture_identity(capture.path),
                   "expressions_from": None if expressions_from is None else capture_identity(expressions_from),
                   "library_contents": library.identity()}
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
    cover = lambda e, r: coverage_report(held_out.expression, held_out.rotation, e, r,  # noqa: E731
                                         config.coverage_radius, config.pose_radius_deg)
    before = cover(observed, observed_rotation)
    after = cover(np.concatenate([observed, expression]),
                  np.concatenate([observed_rotation, relative_rotations(rotation, typical)]))
    report = {
        "source": str(capture.path), "lifted_expressions": config.num_expressions, "lifted_frames": n_new,
        "frames_per_expression": frames, "generated_size": size, "prior": str(prior.path),
        "adapted_prior": None if adapted is None else str(adapted), "library": library.source,
        "library_entries": len(library), "held_out_entries": len(held_out), "poses": config.poses,
        "coverage_radius": config.coverage_radius, "pose_radius_deg": config.pose_radius_deg,
        "coverage_before": before["joint"], "coverage_after": after["joint"],
        "coverage": {"before": before, "after": after},
    }
    write_json(result.path / "lift_report.json", report)
    return result, report
