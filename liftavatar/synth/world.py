"""The synthetic world: render subjects performing kinematics into Captures with ground truth.

Camera: OpenCV pinhole at the origin looking down +z, square images, a default field of view of
30° (a phone's selfie view cropped to the head), principal point at the image centre. Subjects
sit about 0.62 m away. Frames are rendered at ``supersample``× and box-filtered (anti-aliasing).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

import liftavatar
from liftavatar.capture import PROVENANCE_SYNTHETIC, Capture, CaptureMeta, CaptureWriter, Kinematics
from liftavatar.errors import CaptureError, ConfigError
from liftavatar.face.control import raster_plan, render_controls, shading_albedo
from liftavatar.face.render import Lighting, project, render_mesh
from liftavatar.face.rig import FaceRig
from liftavatar.io import to_uint8
from liftavatar.synth.kinematics import KinematicsSequence, sample_kinematics
from liftavatar.synth.subject import Subject, make_subject

DEFAULT_FOV_DEG = 30.0
DEFAULT_FPS = 25.0


def default_intrinsics(size: int, fov_deg: float = DEFAULT_FOV_DEG) -> tuple[float, float, float, float]:
    """(fx, fy, cx, cy) in pixels for a square ``size`` image with horizontal field of view ``fov_deg``."""
    f = size / (2 * math.tan(math.radians(fov_deg) / 2))
    return (f, f, size / 2, size / 2)


def background_image(subject: Subject, size: int) -> torch.Tensor:
    """(size, size, 3) vertical gradient with soft blotches: a plain room wall."""
    rng = np.random.default_rng([subject.seed, 0xB6])
    top, bottom = subject.background
    t = np.linspace(0, 1, size)[:, None, None]
    image = (1 - t) * top + t * bottom
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.15, 0.4)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
        image = image * (1 - 0.25 * blob) + 0.25 * blob * rng.uniform(0, 1, 3)
    return torch.as_tensor(np.clip(image, 0, 1), dtype=torch.float32)


@dataclass
class RenderedBatch:
    rgb: np.ndarray  # (B, H, W, 3) uint8
    mask: np.ndarray  # (B, H, W) uint8
    shading: np.ndarray  # (B, H, W, 3) uint8
    landmarks2d: np.ndarray  # (B, 478, 2) float32 pixels, top-left corner at (0, 0)


def render_subject_tensors(
    subject: Subject,
    expression: np.ndarray,
    rotation: np.ndarray,
    translation: np.ndarray,
    size: int,
    intrinsics: tuple[float, float, float, float] | None = None,
    rig: FaceRig | None = None,
    supersample: int = 2,
    device: str | torch.device = "cpu",
):
    """Render one batch and keep it on ``device``: (rgb, mask, shading, landmarks2d) tensors, images
    (B, H, W, C) float in [0, 1], landmarks (B, 478, 2) pixels. Expression (B, E), rotation (B, 3)
    axis-angle, translation (B, 3) metres. The shading maps follow :mod:`liftavatar.face.control`'s policy:
    from the same raster as the frames where the policy asks for ``supersample`` at ``size``, else their own."""
    rig = rig or FaceRig.load()
    device = torch.device(device)
    intrinsics = intrinsics or default_intrinsics(size)
    expression = torch.as_tensor(expression, dtype=torch.float32, device=device)
    batch = expression.shape[0]
    verts = rig.vertices(subject.identity, expression, rotation, translation).to(device)
    to_dev = lambda a: torch.as_tensor(a, dtype=torch.float32, device=device)  # noqa: E731
    lighting = Lighting(to_dev(subject.light_direction), to_dev(subject.light_colour), to_dev(subject.ambient))
    out = render_mesh(
        verts,
        torch.as_tensor(rig.faces, device=device),
        torch.tensor(intrinsics, device=device),
        (size, size),
        face_uvs=to_dev(rig.face_uvs),
        texture=to_dev(subject.texture),
        lighting=lighting,
        shading_albedo=shading_albedo(rig).to(device),
        background=background_image(subject, size).to(device).expand(batch, -1, -1, -1),
        supersample=supersample,
    )
    landmarks = project(rig.landmarks(verts), torch.tensor(intrinsics, device=device))[..., :2]
    shading = out.shading
    if raster_plan((size, size)) != ((size, size), supersample):
        shading = torch.from_numpy(render_controls(verts, intrinsics, (size, size), rig).shading).to(device) / 255
    return out.rgb, out.mask, shading, landmarks


def render_subject(
    subject: Subject,
    expression: np.ndarray,
    rotation: np.ndarray,
    translation: np.ndarray,
    size: int,
    intrinsics: tuple[float, float, float, float] | None = None,
    rig: FaceRig | None = None,
    supersample: int = 2,
    device: str | torch.device = "cpu",
) -> RenderedBatch:
    """Render one batch as 8-bit images: expression (B, E), rotation (B, 3) axis-angle, translation (B, 3) metres."""
    rgb, mask, shading, landmarks = render_subject_tensors(subject, expression, rotation, translation, size,
                                                           intrinsics, rig, supersample, device)
    return RenderedBatch(to_uint8(rgb), to_uint8(mask), to_uint8(shading),
                         landmarks.cpu().numpy().astype(np.float32))


def render_sequence(
    subject: Subject, kinematics: KinematicsSequence, size: int, intrinsics=None, rig: FaceRig | None = None,
    batch_size: int = 8, supersample: int = 2, device: str = "cpu", skip: set[int] | None = None,
    progress: bool = False,
) -> Iterator[tuple[int, RenderedBatch]]:
    """Yield (first frame index, batch) over a sequence, skipping batches whose frames are all in ``skip``."""
    skip = skip or set()
    n = len(kinematics)
    bar = tqdm(total=n, desc=f"rendering {subject.name}", unit="frame", disable=not progress)
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        if all(i in skip for i in range(start, stop)):
            bar.update(stop - start)
            continue
        sl = slice(start, stop)
        yield start, render_subject(subject, kinematics.expression[sl], kinematics.rotation[sl],
                                    kinematics.translation[sl], size, intrinsics, rig, supersample, device)
        bar.update(stop - start)
    bar.close()


def kinematics_from_capture(path: str | Path, rig: FaceRig) -> tuple[KinematicsSequence, Capture]:
    """Another capture's kinematics, checked against this rig (the ground-truth oracle's input)."""
    capture = Capture.load(path, expression_bounds=rig.expression_bounds)
    if list(capture.meta.expression_names) != list(rig.expression_names):
        raise CaptureError(
            f"{capture.path}/capture.json: its {len(capture.meta.expression_names)} expression coefficients are not "
            f"this rig's {rig.num_expressions} ({rig.name}); use a capture made with the same rig."
        )
    k = capture.kinematics
    return KinematicsSequence(k.expression, k.rotation, k.translation), capture


@dataclass
class SynthSpec:
    """What `liftavatar synth` makes (recorded in the capture's creator.config)."""

    seed: int = 0
    preset: str = "sparse"
    frames: int = 100
    size: int = 256
    fps: float = DEFAULT_FPS
    fov: float = DEFAULT_FOV_DEG
    supersample: int = 2
    kinematics_from: str | None = None


def spec_fingerprint(spec: SynthSpec) -> dict:
    """What a synthesized capture is made from, recorded by its CaptureWriter so that ``resume`` continues only
    the same spec: the spec, with the content (not the path) of the capture whose kinematics it performs."""
    from liftavatar.fingerprint import capture_identity

    fingerprint = asdict(spec)
    if spec.kinematics_from is not None:
        fingerprint["kinematics_from"] = capture_identity(spec.kinematics_from)
    return fingerprint


def synthesize(
    spec: SynthSpec, out_dir: str | Path, overwrite: bool = False, resume: bool = False, device: str = "cpu",
    progress: bool = True, batch_size: int = 8,
) -> Capture:
    """Render subject ``spec.seed`` performing ``spec.preset`` (or another capture's kinematics) into a Capture."""
    if spec.size < 16 or spec.size % 2:
        raise ConfigError(f"--size {spec.size}: use an even image size of at least 16 pixels.")
    if spec.supersample < 1:
        raise ConfigError(f"--supersample {spec.supersample}: use 1 or more.")
    rig = FaceRig.load()
    subject = make_subject(spec.seed, rig)
    intrinsics = default_intrinsics(spec.size, spec.fov)
    fps = spec.fps
    if spec.kinematics_from is not None:
        kin, source = kinematics_from_capture(spec.kinematics_from, rig)
        # Same camera as the source, rescaled to this size, so frames line up with its frames.
        scale = spec.size / source.meta.size[1]
        intrinsics = tuple(float(x) * scale for x in source.meta.intrinsics)
        fps = source.meta.fps
        valid = source.kinematics.valid.copy()
    else:
        kin = sample_kinematics(spec.preset, spec.frames, rig.expression_names, fps, seed=spec.seed)
        valid = np.ones(len(kin), bool)
    meta = CaptureMeta(
        subject=subject.name,
        fps=float(fps),
        size=(spec.size, spec.size),
        intrinsics=intrinsics,
        rig={"name": rig.name, "version": rig.version},
        expression_names=list(rig.expression_names),
        creator={"verb": "synth", "version": liftavatar.__version__, "config": asdict(spec)},
    )
    landmarks = np.zeros((len(kin), rig.num_landmarks, 2), np.float32)
    with CaptureWriter(out_dir, meta, overwrite=overwrite, resume=resume, workers=2,
                       fingerprint=spec_fingerprint(spec)) as writer:
        done = {i for i in range(len(kin)) if writer.has_frame(i)} if resume else set()
        for start, batch in render_sequence(subject, kin, spec.size, intrinsics, rig, batch_size,
                                            spec.supersample, device, skip=done, progress=progress):
            for k in range(len(batch.rgb)):
                if start + k not in done:
                    writer.add_frame(start + k, batch.rgb[k], batch.mask[k], batch.shading[k])
            landmarks[start:start + len(batch.rgb)] = batch.landmarks2d
        if done:  # landmarks of skipped frames are cheap to recompute without rendering
            verts = rig.vertices(subject.identity, kin.expression, kin.rotation, kin.translation)
            landmarks = project(rig.landmarks(verts), torch.tensor(intrinsics))[..., :2].numpy().astype(np.float32)
        kinematics = Kinematics(
            expression=kin.expression.astype(np.float32),
            rotation=kin.rotation.astype(np.float32),
            translation=kin.translation.astype(np.float32),
            valid=valid,
            provenance=np.full(len(kin), PROVENANCE_SYNTHETIC, np.uint8),
            identity=subject.identity.astype(np.float32),
            landmarks2d=landmarks,
        )
        return writer.finalize(kinematics)
