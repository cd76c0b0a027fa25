"""Tracker: a monocular head video (or a folder of images) becomes a Capture in the rig's space.

Stages (each timed, see :class:`TrackReport`):

1. **decode** the input (PyAV for video files; Pillow for a folder of same-sized images);
2. **landmarks**: MediaPipe FaceMesh with iris refinement on every full frame; when several faces
   are found, the most prominent one is followed (nearest to where it was, largest at the start);
   and, per face found, a pose-normalised face crop read by the appearance network
   (:mod:`liftavatar.face.appearance`, batched), whose expression estimate enters the fit as a prior;
3. **crop**: one square crop for the whole capture, from the robust centre and extent of the face
   over all frames, so the crop's intrinsics are constant; the head fills about half of it, as in
   the synthetic world;
4. **fitting**: :func:`liftavatar.face.fit.fit_rig` on the landmarks in crop pixels;
5. **masks**: MediaPipe selfie segmentation of each crop;
6. **shading**: the fitted rig rendered by :func:`liftavatar.face.control.render_controls` (the control signal);
7. **writing**: PNGs on background threads, then an atomic rename into place.

Camera: the input's horizontal field of view is ``fov`` degrees (default 60°, a phone's front
camera); the principal point is the image centre. Pixel coordinates have the image's top-left
corner at (0, 0), OpenCV axes.

Frames with no face are kept, marked invalid (``valid = False``) with kinematics interpolated
from their neighbours for smoothness; the summary counts them. An interrupted run resumes with
``resume=True``: landmarks of frames already processed and finished PNGs are kept.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

import liftavatar
from liftavatar.capture import PROVENANCE_OBSERVED, Capture, CaptureMeta, CaptureWriter, Kinematics
from liftavatar.errors import LiftAvatarError
from liftavatar.face.appearance import AppearanceModel
from liftavatar.face.landmarks import FaceMeshDetector
from liftavatar.face.control import render_controls
from liftavatar.face.rig import FaceRig
from liftavatar.io import save_npz, to_uint8
from liftavatar.video import IMAGE_SUFFIXES, read_image

STATE_FILE = "track_state.npz"  # lives in the staging directory only, removed before finalize


class TrackError(LiftAvatarError):
    """The input cannot be tracked (no face, faces too small, unreadable input)."""


@dataclass
class TrackConfig:
    """Options of ``liftavatar track`` (recorded in the capture's creator.config)."""

    size: int = 512
    """Side of the square output frames, pixels."""
    fps: float | None = None
    """Resample the video to at most this frame rate (None: keep every frame)."""
    max_frames: int | None = None
    """Stop after this many frames."""
    fov: float = 60.0
    """Horizontal field of view of the input camera, degrees (a phone's front camera is ~60°)."""
    head_fraction: float = 0.5
    """Forehead-to-chin height of the face as a fraction of the crop side (the synthetic world's framing)."""
    min_face_px: float = 40.0
    """Faces smaller than this (forehead to chin, input pixels) are refused as too small to fit."""
    device: str = "cpu"
    """Torch device for fitting and rendering."""
    appearance: bool = True
    """Use the packaged appearance network's expression estimate as a prior in the fit (it reads some
    blendshapes that barely move the landmarks: wide eyes, brow raise, upper-lip raise)."""


@dataclass
class TrackReport:
    """What a tracking run did: counts and seconds per stage."""

    frames: int = 0
    valid: int = 0
    multi_face_frames: int = 0
    interpolated: int = 0
    median_reprojection_px: float = float("nan")
    crop: tuple[float, float, float] = (0.0, 0.0, 0.0)  # x0, y0, side in input pixels
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def frames_per_second(self) -> float:
        total = sum(self.seconds.values())
        return self.frames / total if total > 0 else float("nan")

    def summary(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        lines = [
            f"{self.frames} frames, {self.valid} with a face, {self.frames - self.valid} without "
            f"(marked invalid; {self.interpolated} of them in short gaps, kinematics interpolated)",
            f"median landmark reprojection error {self.median_reprojection_px:.2f} px; "
            f"{self.frames_per_second:.1f} frames/s ({stages})",
        ]
        if self.multi_face_frames:
            lines.append(f"several faces in {self.multi_face_frames} frames: followed the most prominent one")
        return "\n".join(lines)


class _Timer:
    def __init__(self, report: TrackReport, stage: str):
        self.report, self.stage = report, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.report.seconds[self.stage] += time.perf_counter() - self.start


# ----------------------------------------------------------------------------- input


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrackError(f"{folder}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a video or a folder of frames.")
    return files


def iter_frames(source: Path, config: TrackConfig) -> Iterator[np.ndarray]:
    """RGB uint8 frames of a video file or of a folder of same-sized images, in order."""
    if not source.exists():
        raise TrackError(f"{source}: no such file or folder; pass a video file or a folder of images.")
    if source.is_dir():
        files = _image_files(source)
        if config.max_frames is not None:
            files = files[: config.max_frames]
        first = None
        for path in files:
            frame = read_image(path)
            if first is None:
                first = frame.shape
            elif frame.shape != first:
                raise TrackError(
                    f"{path}: is {frame.shape[1]}x{frame.shape[0]} but the folder's first image is "
                    f"{first[1]}x{first[0]}; the frames of one capture must share a size (resize them)."
                )
            yield frame
        return
    from liftavatar.video import read_video

    yield from read_video(source, max_frames=config.max_frames, fps=config.fps)


# ----------------------------------------------------------------------------- landmarks


def _face_height(landmarks: np.ndarray) -> float:
    """Forehead (10) to chin (152) distance in pixels."""
    return float(np.linalg.norm(landmarks[152] - landmarks[10]))


def _pick_face(faces: list[np.ndarray], previous: np.ndarray | None) -> np.ndarray:
    """The face to follow: nearest to the previous one, else the largest."""
    if previous is not None:
        centre = previous[:468].mean(0)
        return min(faces, key=lambda f: np.linalg.norm(f[:468].mean(0) - centre))
    return max(faces, key=_face_height)


@dataclass
class _LandmarkState:
    landmarks: np.ndarray  # (N, 478, 2) input pixels
    valid: np.ndarray  # (N,) bool
    multi: np.ndarray  # (N,) bool: several faces were found
    frame_shape: tuple[int, int]  # (H, W) of the input frames
    appearance: np.ndarray | None = None  # (N, E) the appearance network's estimate (NaN rows: no face)

    def save(self, path: Path) -> None:
        extra = {} if self.appearance is None else {"appearance": self.appearance}
        save_npz(path, compressed=False, landmarks=self.landmarks, valid=self.valid, multi=self.multi,
                 frame_shape=np.array(self.frame_shape), **extra)

    @classmethod
    def load(cls, path: Path) -> "_LandmarkState | None":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["landmarks"], z["valid"], z["multi"], tuple(int(x) for x in z["frame_shape"]),
                           z["appearance"] if "appearance" in z.files else None)
        except (OSError, KeyError, ValueError):
            return None


def detect_landmarks(source: Path, config: TrackConfig, report: TrackReport, state_path: Path | None,
                     progress: bool, appearance: AppearanceModel | None = None,
                     batch_size: int = 32) -> _LandmarkState:
    """FaceMesh on every frame (resuming from ``state_path`` when it holds earlier frames), and the
    ``appearance`` network's estimate of each found face's expression (batched over frames)."""
    done = _LandmarkState.load(state_path) if state_path is not None and state_path.exists() else None
    if done is not None and appearance is not None and done.appearance is None:
        done = None  # made without the appearance network: start over
    landmarks, valid, multi = ([], [], []) if done is None else (list(done.landmarks), list(done.valid), list(done.multi))
    num_e = 0 if appearance is None else len(appearance.expression_names)
    estimates = [] if done is None or appearance is None else list(done.appearance)
    pending: list[tuple[int, np.ndarray]] = []  # (frame index, crop) awaiting the network

    def flush() -> None:
        if pending:
            with _Timer(report, "appearance"):
                predicted = appearance.predict(np.stack([c for _, c in pending]))
            for (i, _), row in zip(pending, predicted):
                estimates[i] = row
            pending.clear()

    def state() -> _LandmarkState:
        flush()
        return _LandmarkState(np.array(landmarks, np.float32), np.array(valid, bool), np.array(multi, bool),
                              frame_shape, None if appearance is None else np.array(estimates, np.float32).reshape(-1, num_e))
    frame_shape = None if done is None else done.frame_shape
    previous = next((lm for lm, ok in zip(reversed(landmarks), reversed(valid)) if ok), None)
    frames = iter_frames(source, config)
    with FaceMeshDetector(static_images=source.is_dir(), max_faces=2) as detector, \
            tqdm(desc="landmarks", unit="frame", disable=not progress, initial=len(landmarks)) as bar:
        index = 0
        while True:
            with _Timer(report, "decode"):
                frame = next(frames, None)
            if frame is None:
                break
            frame_shape = frame.shape[:2] if frame_shape is None else frame_shape
            if index < len(landmarks):  # done before an interruption
                index += 1
                continue
            with _Timer(report, "landmarks"):
                faces = detector.detect_all(frame)
            if faces:
                chosen = _pick_face(faces, previous)
                previous = chosen
            landmarks.append(chosen if faces else np.zeros((478, 2), np.float32))
            valid.append(bool(faces))
            multi.append(len(faces) > 1)
            if appearance is not None:
                estimates.append(np.full(num_e, np.nan, np.float32))
                if faces:
                    with _Timer(report, "appearance"):
                        pending.append((index, appearance.crop(frame, chosen)))
                    if len(pending) == batch_size:
                        flush()
            index += 1
            bar.update()
            if state_path is not None and index % 100 == 0:
                state().save(state_path)
    if not landmarks:
        raise TrackError(f"{source}: no frames could be read; pass a video or folder with at least one frame.")
    result = state()
    if state_path is not None:
        result.save(state_path)
    return result


# ----------------------------------------------------------------------------- crop


def stable_crop(landmarks: np.ndarray, valid: np.ndarray, head_fraction: float) -> tuple[float, float, float]:
    """One square crop (x0, y0, side) in input pixels for the whole capture.

    Centred on the median face centre; the side makes the median forehead-to-chin height
    ``head_fraction`` of it, enlarged if needed so that the face stays inside in 95% of frames.
    """
    faces = landmarks[valid, :468]
    centres = 0.5 * (faces.min(1) + faces.max(1))
    centre = np.median(centres, axis=0)
    # The face mesh ends at the forehead: centre the crop a little higher, on the whole head.
    heights = np.linalg.norm(faces[:, 152] - faces[:, 10], axis=-1)
    centre = centre - np.array([0.0, 0.08 * np.median(heights)])
    side = np.median(heights) / head_fraction
    reach = np.percentile(np.abs(faces - centre).max(axis=(1, 2)), 95)
    side = max(side, 2.2 * reach)
    return float(centre[0] - side / 2), float(centre[1] - side / 2), float(side)


def crop_frame(frame: np.ndarray, crop: tuple[float, float, float], size: int) -> np.ndarray:
    """The square crop resized to ``size``² (areas outside the frame are black)."""
    import cv2  # OpenCV comes with mediapipe; its warp is several times faster than Pillow's

    x0, y0, side = crop
    s = size / side
    # Corner-origin pixels: input u maps to (u - x0) * s; OpenCV warps pixel centres (integer
    # coordinates), hence the half-pixel shifts.
    matrix = np.array([[s, 0.0, (0.5 - x0) * s - 0.5], [0.0, s, (0.5 - y0) * s - 0.5]])
    interpolation = cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR
    return cv2.warpAffine(frame, matrix, (size, size), flags=interpolation, borderMode=cv2.BORDER_CONSTANT)


def crop_intrinsics(frame_shape: tuple[int, int], fov: float, crop: tuple[float, float, float], size: int):
    """(fx, fy, cx, cy) of the crop at ``size``² for an input camera of horizontal field of view ``fov``."""
    height, width = frame_shape
    f = width / (2 * math.tan(math.radians(fov) / 2))
    x0, y0, side = crop
    s = size / side
    return (f * s, f * s, (width / 2 - x0) * s, (height / 2 - y0) * s)


# ----------------------------------------------------------------------------- masks and shading


class SelfieSegmenter:
    """MediaPipe selfie segmentation (bundled model): foreground probability per pixel. MediaPipe's own log lines
    are kept off the terminal (see :func:`liftavatar.face.landmarks.quiet_native_logs`)."""

    def __init__(self):
        from liftavatar.face.landmarks import quiet_native_logs

        self._quiet = quiet_native_logs
        with quiet_native_logs():
            import mediapipe as mp

            self._model = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
            # Its graph opens (and logs) on background threads: one blank frame waits for that, inside the block.
            self._model.process(np.zeros((64, 64, 3), np.uint8))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        with self._quiet():
            mask = self._model.process(np.ascontiguousarray(image)).segmentation_mask
        return to_uint8(mask)

    def close(self) -> None:
        with self._quiet():
            self._model.close()


# ----------------------------------------------------------------------------- the tracker


def _check_faces(source: Path, state: _LandmarkState, config: TrackConfig) -> None:
    if not state.valid.any():
        raise TrackError(
            f"{source}: no face found in any of its {len(state.valid)} frames; film the face from the front, "
            f"well lit and large in the frame (faces under about a tenth of the frame's height are missed)."
        )
    heights = np.linalg.norm(state.landmarks[state.valid, 152] - state.landmarks[state.valid, 10], axis=-1)
    if np.median(heights) < config.min_face_px:
        raise TrackError(
            f"{source}: the face is only {np.median(heights):.0f} px tall (forehead to chin; at least "
            f"{config.min_face_px:.0f} needed); film closer or at a higher resolution."
        )


def _short_gaps(valid: np.ndarray, longest: int = 5) -> int:
    """How many invalid frames sit in gaps of at most ``longest`` frames between valid ones."""
    count, run, seen_valid = 0, 0, False
    for ok in valid:
        if ok:
            if seen_valid and 0 < run <= longest:
                count += run
            run, seen_valid = 0, True
        else:
            run += 1
    return count


def track(source: str | Path, out_dir: str | Path, config: TrackConfig | None = None, *, overwrite: bool = False,
          resume: bool = False, progress: bool = True, batch_size: int = 16) -> tuple[Capture, TrackReport]:
    """Track ``source`` (video file or image folder) into a Capture at ``out_dir``."""
    config = config or TrackConfig()
    if config.size < 16 or config.size % 2:
        raise TrackError(f"--size {config.size}: use an even size of at least 16 pixels.")
    source = Path(source)
    rig = FaceRig.load()
    report = TrackReport()
    meta = CaptureMeta(
        subject=source.stem or source.name, fps=1.0, size=(config.size, config.size), intrinsics=(1.0, 1.0, 0.0, 0.0),
        rig={"name": rig.name, "version": rig.version}, expression_names=list(rig.expression_names),
        creator={"verb": "track", "version": liftavatar.__version__, "config": {**asdict(config), "input": str(source)}},
    )
    if not source.exists():
        raise TrackError(f"{source}: no such file or folder; pass a video file or a folder of images.")
    writer = CaptureWriter(out_dir, meta, overwrite=overwrite, resume=resume, workers=2,
                           fingerprint=_fingerprint(source, config))
    state_path = writer.staging / STATE_FILE
    appearance = AppearanceModel.default(rig) if config.appearance else None
    try:
        state = detect_landmarks(source, config, report, state_path, progress, appearance)
        _check_faces(source, state, config)
    except LiftAvatarError:
        if not resume:  # nothing worth resuming: leave no staging directory behind
            writer.discard()
        raise
    num = len(state.valid)
    report.frames, report.valid = num, int(state.valid.sum())
    report.multi_face_frames = int(state.multi.sum())
    report.interpolated = _short_gaps(state.valid)

    crop = stable_crop(state.landmarks, state.valid, config.head_fraction)
    report.crop = crop
    intrinsics = crop_intrinsics(state.frame_shape, config.fov, crop, config.size)
    scale = config.size / crop[2]
    crop_landmarks = ((state.landmarks - np.array(crop[:2], np.float32)) * scale).astype(np.float32)
    from liftavatar.face.fit import fit_rig

    with _Timer(report, "fitting"):  # fit_rig runs torch and BLAS single-threaded (see single_threaded_math)
        prior = {} if appearance is None or state.appearance is None else {"prior_mean": state.appearance,
                                                     "prior_weight": appearance.precision}
        fit = fit_rig(crop_landmarks, state.valid, intrinsics, rig=rig, device=config.device, **prior)
    report.median_reprojection_px = float(np.nanmedian(fit.reprojection_px))

    fps = _source_fps(source, config)
    with writer:
        # Now known: the frame rate, the crop (input pixels: x0, y0, side) and its intrinsics.
        creator = {**meta.creator, "config": {**meta.creator["config"], "crop": [round(c, 3) for c in crop]}}
        writer.meta = CaptureMeta(**{**asdict(meta), "fps": fps, "intrinsics": tuple(float(k) for k in intrinsics),
                                     "creator": creator})
        segmenter = SelfieSegmenter()
        frames = iter_frames(source, config)
        bar = tqdm(total=num, desc="writing", unit="frame", disable=not progress)
        batch: list[tuple[int, np.ndarray]] = []
        for index in range(num):
            with _Timer(report, "decode"):
                frame = next(frames)
            if writer.has_frame(index):
                bar.update()
                continue
            with _Timer(report, "crop"):
                batch.append((index, crop_frame(frame, crop, config.size)))
            if len(batch) == batch_size or index == num - 1:
                _write_batch(writer, batch, segmenter, rig, fit, intrinsics, config, report)
                bar.update(len(batch))
                batch = []
        if batch:
            _write_batch(writer, batch, segmenter, rig, fit, intrinsics, config, report)
        bar.close()
        segmenter.close()
        kinematics = Kinematics(
            expression=fit.expression, rotation=fit.rotation, translation=fit.translation,
            valid=state.valid.copy(), provenance=np.full(num, PROVENANCE_OBSERVED, np.uint8),
            identity=fit.identity, landmarks2d=crop_landmarks,
        )
        with _Timer(report, "writing"):
            writer.flush()
            state_path.unlink(missing_ok=True)
            capture = writer.finalize(kinematics)
    return capture, report


def _fingerprint(source: Path, config: TrackConfig) -> dict:
    """What a tracked capture is made from, recorded by its CaptureWriter so that ``resume`` reuses landmarks and
    frames of the same input and settings only: the config (but the device, which changes results by float
    rounding only) and the input's identity (:func:`liftavatar.fingerprint.input_identity`: a video's path,
    size and content hash; a folder's path and its images' names and sizes)."""
    from liftavatar.fingerprint import input_identity

    settings = {k: v for k, v in asdict(config).items() if k != "device"}
    return {**settings, "input": input_identity(source, IMAGE_SUFFIXES if source.is_dir() else None)}


def _write_batch(writer: CaptureWriter, batch, segmenter, rig, fit, intrinsics, config: TrackConfig,
                 report: TrackReport) -> None:
    indices = [i for i, _ in batch]
    with _Timer(report, "masks"):
        masks = [segmenter(image) for _, image in batch]
    with _Timer(report, "shading"):
        verts = rig.vertices(fit.identity, fit.expression[indices], fit.rotation[indices], fit.translation[indices])
        shading = render_controls(verts.to(config.device), intrinsics, (config.size, config.size), rig).shading
    with _Timer(report, "writing"):
        for (index, image), mask, shade in zip(batch, masks, shading):
            writer.add_frame(index, image, mask, shade)


def _source_fps(source: Path, config: TrackConfig) -> float:
    """Frame rate of the capture: the video's (or the requested lower one); 1 for image folders."""
    if source.is_dir():
        return 1.0
    from liftavatar.video import probe_video

    fps = probe_video(source).fps
    return float(min(fps, config.fps) if config.fps else fps)
