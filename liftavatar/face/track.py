"""Tracker: a monocular head video (or a folder of images) becomes a Capture in the rig's space.

Stages (each timed, see :class:`TrackReport`):

1. **decode** the input: PyAV for video files, upright (a phone's display rotation applied) and at its own frame
   times (a variable frame rate is resampled by time; the capture's fps is the average rate); Pillow for a folder
   of images (:func:`liftavatar.video.read_image`, EXIF orientation applied). The frames decoded for the
   landmarks are kept for the writing pass when they fit in :data:`FRAME_CACHE_BYTES`, else decoded again;
2. **landmarks**: MediaPipe FaceMesh with iris refinement on every full frame; when several faces
   are found, the most prominent one is followed (nearest to where it was, largest at the start);
   and, per face found, a pose-normalised face crop read by the appearance network
   (:mod:`liftavatar.face.appearance`, batched), whose expression estimate enters the fit as a prior;
3. **crop**: a video (or a folder of same-sized frames) gets one square crop for the whole capture, from the
   robust centre and extent of the face over all frames, so the crop's intrinsics are constant; the head fills
   about ``head_fraction`` of it, as in the synthetic world. A folder of photos of different sizes gets a crop
   around each photo's own face at the same framing, and one camera for all: the median of the photos' crop
   intrinsics, so differences in distance and focal length between photos are absorbed into the head's
   distance. Whatever the input's aspect, the crop is square, black where it leaves the picture;
4. **fitting**: :func:`liftavatar.face.fit.fit_rig` on the landmarks in crop pixels;
5. **masks**: :mod:`liftavatar.face.masks`: the person segmentation of each crop (run at no less than
   :data:`~liftavatar.face.masks.SEGMENT_SIZE`²), within what the picture covers (never the black border of a
   crop that leaves it: :func:`picture_coverage`), times the head region of the frame's fitted kinematics, so a
   mask holds what the avatar models (head and neck, never the torso) and was filmed; frames without a face keep
   the plain person mask;
6. **shading**: the fitted rig rendered by :func:`liftavatar.face.control.render_shading` (the control signal);
7. **writing**: PNGs on background threads, then an atomic rename into place.

The stages overlap on threads, since one pass of Python over the frames would leave the second core idle: frames
are decoded a few ahead of FaceMesh, the appearance network reads its batches beside it, the fit runs while the
frames are cropped and segmented, :data:`RENDER_THREADS` workers make head regions and shading maps, and the
writer's threads encode PNGs (zlib releases the GIL). Torch runs on one thread per worker: small tensor ops on two
threads of a busy 2-core machine spin against each other (measured: 80–290 ms against 20–30 ms a frame for the
shading). The outputs are the same as a plain loop's, bit for bit.

Camera: the input's horizontal field of view is ``fov`` degrees (default 60°, a phone's front
camera); the principal point is the image centre. Pixel coordinates have the image's top-left
corner at (0, 0), OpenCV axes.

Frames with no face are kept, marked invalid (``valid = False``) with kinematics interpolated
from their neighbours for smoothness; the summary counts them. An input where fewer than half of the
frames show a face is refused, as is one that gives fewer than ``min_frames`` frames. An interrupted run
resumes with ``resume=True``: landmarks of frames already processed and finished PNGs are kept.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

import liftavatar
from liftavatar.capture import PROVENANCE_OBSERVED, Capture, CaptureMeta, CaptureWriter, Kinematics
from liftavatar.errors import ConfigError, LiftAvatarError
from liftavatar.face.appearance import AppearanceModel
from liftavatar.face.control import render_shading
from liftavatar.face.landmarks import FaceMeshDetector
from liftavatar.face.masks import SEGMENT_SIZE, SelfieSegmenter, head_masks, head_region
from liftavatar.face.rig import FaceRig
from liftavatar.io import save_npz
from liftavatar.video import IMAGE_SUFFIXES, read_image

STATE_FILE = "track_state.npz"  # lives in the staging directory only, removed before finalize
FRAME_CACHE_BYTES = 1 << 30
"""Decoded frames up to this many bytes in all (a 512² clip of 1,300 frames, a 1080p one of 170) are kept from
the landmark pass for the writing pass; a larger input is decoded twice rather than held in memory."""
RENDER_THREADS = 2
"""Worker threads that make head regions and shading maps, a batch each (of ``track``'s ``batch_size``, 8 frames:
measured faster than 4 or 16 on a 2-core CPU, where larger batches leave the caches): the longest chain of the
writing pass, so it gets both cores when the others wait (on liveportrait_d3 at 512², 16.0–17.6 s for the whole
command against 19.8–23.5 s with one thread)."""
_FPS_SNAP = 0.01  # a measured average frame rate this close (relative) to the nominal one is the nominal one


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
    min_frames: int = 1
    """Refuse an input that gives fewer frames than this (after --fps and --max-frames)."""


@dataclass
class TrackReport:
    """What a tracking run did: counts and seconds per stage."""

    frames: int = 0
    valid: int = 0
    multi_face_frames: int = 0
    interpolated: int = 0
    median_reprojection_px: float = float("nan")
    crop: tuple[float, float, float] = (0.0, 0.0, 0.0)  # x0, y0, side in input pixels (photos: the first's)
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    """Seconds spent in each stage; the writing stages overlap on threads, so they add up to more than
    :attr:`wall_seconds`."""
    wall_seconds: float = 0.0
    """Wall-clock seconds of the whole run (0 until it ends)."""

    @property
    def frames_per_second(self) -> float:
        total = self.wall_seconds or sum(self.seconds.values())
        return self.frames / total if total > 0 else float("nan")

    def summary(self) -> str:
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in self.seconds.items())
        lines = [
            f"{self.frames} frames, {self.valid} with a face, {self.frames - self.valid} without "
            f"(marked invalid; {self.interpolated} of them in short gaps, kinematics interpolated)",
            f"median landmark reprojection error {self.median_reprojection_px:.2f} px; "
            f"{self.frames_per_second:.1f} frames/s in {self.wall_seconds:.1f}s (per stage, overlapping: {stages})",
        ]
        if self.multi_face_frames:
            lines.append(f"several faces in {self.multi_face_frames} frames: followed the most prominent one")
        return "\n".join(lines)


_timer_lock = threading.Lock()  # stages are timed on several threads


class _Timer:
    def __init__(self, report: TrackReport, stage: str):
        self.report, self.stage = report, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        with _timer_lock:
            self.report.seconds[self.stage] += elapsed


# ----------------------------------------------------------------------------- input


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise TrackError(f"{folder}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a video or a folder of frames.")
    return files


def iter_frames(source: Path, config: TrackConfig) -> Iterator[tuple[float, np.ndarray]]:
    """``(time in seconds, RGB uint8 frame)`` of a video file (upright, at its frames' own times, resampled to
    ``config.fps`` by time) or of a folder of images (in name order, any sizes, one a second)."""
    if not source.exists():
        raise TrackError(f"{source}: no such file or folder; pass a video file or a folder of images.")
    if source.is_dir():
        files = _image_files(source)
        if config.max_frames is not None:
            files = files[: config.max_frames]
        for index, path in enumerate(files):
            yield float(index), read_image(path)
        return
    from liftavatar.video import read_video_timed

    yield from read_video_timed(source, max_frames=config.max_frames, fps=config.fps)


class _prefetch:
    """Iterate ``items`` produced on a background thread, up to ``depth`` ahead, so that decoding overlaps the
    caller's work (FFmpeg and zlib release the GIL); what the producer raises is raised here, in order. Use as a
    context manager (or call :meth:`close`) so that the thread stops when the caller stops early."""

    _END = object()

    def __init__(self, items: Iterator, depth: int = 8):
        import queue

        self._queue: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, args=(items,), name="track-decode", daemon=True)
        self._thread.start()

    def _put(self, entry: tuple) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self, items: Iterator) -> None:
        try:
            for item in items:
                if not self._put((item, None)):
                    return
            self._put((self._END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((self._END, exc))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> "_prefetch":
        return self

    def __next__(self):
        item, exc = self._queue.get()
        if exc is not None:
            self._stop.set()
            raise exc
        if item is self._END:
            self._stop.set()
            raise StopIteration
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "_prefetch":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FrameCache:
    """The frames one pass decodes, kept for the next while they fit in ``budget`` bytes; past it, none are."""

    def __init__(self, budget: int = FRAME_CACHE_BYTES):
        self.budget, self.bytes, self.frames = budget, 0, {}
        self.overflowed = False

    def put(self, index: int, frame: np.ndarray) -> None:
        if self.overflowed:
            return
        self.bytes += frame.nbytes
        if self.bytes > self.budget:
            self.frames.clear()
            self.overflowed = True
        else:
            self.frames[index] = frame

    def holds(self, count: int) -> bool:
        """True when frames 0..count-1 are all kept."""
        return not self.overflowed and len(self.frames) == count and all(i in self.frames for i in range(count))


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
    appearance: np.ndarray | None = None  # (N, E) the appearance network's estimate (NaN rows: no face)
    # Of every frame decoded in this run (all of them, resumed or not), so not saved:
    shapes: np.ndarray | None = None  # (N, 2) int (H, W) of each input frame
    times: np.ndarray | None = None  # (N,) float64 seconds since the first frame

    def save(self, path: Path) -> None:
        extra = {} if self.appearance is None else {"appearance": self.appearance}
        save_npz(path, compressed=False, landmarks=self.landmarks, valid=self.valid, multi=self.multi, **extra)

    @classmethod
    def load(cls, path: Path) -> "_LandmarkState | None":
        try:
            with np.load(path, allow_pickle=False) as z:
                return cls(z["landmarks"], z["valid"], z["multi"], z["appearance"] if "appearance" in z.files else None)
        except (OSError, KeyError, ValueError):
            return None


def detect_landmarks(source: Path, config: TrackConfig, report: TrackReport, state_path: Path | None,
                     progress: bool, appearance: AppearanceModel | None = None,
                     batch_size: int = 32, cache: _FrameCache | None = None) -> _LandmarkState:
    """FaceMesh on every frame (resuming from ``state_path`` when it holds earlier frames), and the
    ``appearance`` network's estimate of each found face's expression (batched over frames). Every decoded
    frame goes into ``cache`` when one is given."""
    done = _LandmarkState.load(state_path) if state_path is not None and state_path.exists() else None
    if done is not None and appearance is not None and done.appearance is None:
        done = None  # made without the appearance network: start over
    landmarks, valid, multi = ([], [], []) if done is None else (list(done.landmarks), list(done.valid), list(done.multi))
    num_e = 0 if appearance is None else len(appearance.expression_names)
    estimates = [] if done is None or appearance is None else list(done.appearance)
    pending: list[tuple[int, np.ndarray, np.ndarray]] = []  # (frame index, frame, face) awaiting the network
    jobs: list[Future] = []
    # The network reads its batches on a worker thread, beside FaceMesh (which holds the GIL little).
    reader = ThreadPoolExecutor(1, thread_name_prefix="track-appearance") if appearance is not None else None

    def read(batch: list[tuple[int, np.ndarray, np.ndarray]]) -> None:
        with _Timer(report, "appearance"):
            predicted = appearance.predict(np.stack([appearance.crop(frame, face) for _, frame, face in batch]))
        for (i, _, _), row in zip(batch, predicted):
            estimates[i] = row

    def flush(wait: bool = True) -> None:
        if pending:
            jobs.append(reader.submit(read, list(pending)))
            pending.clear()
        while jobs and (wait or jobs[0].done()):
            jobs.pop(0).result()

    def state() -> _LandmarkState:
        flush()
        return _LandmarkState(np.array(landmarks, np.float32).reshape(-1, 478, 2), np.array(valid, bool),
                              np.array(multi, bool),
                              None if appearance is None else np.array(estimates, np.float32).reshape(-1, num_e),
                              np.array(shapes, np.int64).reshape(-1, 2), np.array(times, np.float64))
    shapes: list[tuple[int, int]] = []
    times: list[float] = []
    previous = next((lm for lm, ok in zip(reversed(landmarks), reversed(valid)) if ok), None)
    frames = _prefetch(iter_frames(source, config))
    try:
        with FaceMeshDetector(static_images=source.is_dir(), max_faces=2) as detector, frames, \
                tqdm(desc="landmarks", unit="frame", disable=not progress, initial=len(landmarks)) as bar:
            index = 0
            while True:
                with _Timer(report, "decode"):
                    item = next(frames, None)
                if item is None:
                    break
                when, frame = item
                shapes.append(frame.shape[:2])
                times.append(when)
                if cache is not None:
                    cache.put(index, frame)
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
                        pending.append((index, frame, chosen))
                        if len(pending) == batch_size:
                            flush(wait=len(jobs) > 1)  # at most two batches in flight
                index += 1
                bar.update()
                if state_path is not None and index % 100 == 0:
                    state().save(state_path)
        result = state()
    finally:  # the reader's thread ends, whatever happened
        if reader is not None:
            reader.shutdown()
    if not landmarks:
        raise TrackError(f"{source}: no frames could be read; pass a video or folder with at least one frame.")
    if len(shapes) < len(landmarks):  # the state of an input that has since lost frames
        raise TrackError(f"{source}: gives {len(shapes)} frames but an interrupted run found {len(landmarks)}; "
                         "run without --resume to start over.")
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


def photo_crops(landmarks: np.ndarray, valid: np.ndarray, shapes: np.ndarray, head_fraction: float) -> np.ndarray:
    """(N, 3) crops (x0, y0, side), one per photo, each around its own face at the standard framing
    (:func:`stable_crop` of that photo alone); a photo without a face gets its largest centred square."""
    crops = np.zeros((len(valid), 3), np.float64)
    for i, ((h, w), ok) in enumerate(zip(shapes, valid)):
        if ok:
            crops[i] = stable_crop(landmarks[i : i + 1], valid[i : i + 1], head_fraction)
        else:
            side = min(h, w)
            crops[i] = ((w - side) / 2, (h - side) / 2, side)
    return crops


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


@functools.lru_cache(maxsize=8)
def picture_coverage(frame_shape: tuple[int, int], crop: tuple[float, float, float], size: int) -> np.ndarray:
    """(size, size) uint8: how much of each pixel of the crop the input picture covers (255 inside, 0 in the black
    border :func:`crop_frame` adds where the crop leaves the picture, partial along the edge): what a mask may
    keep. Without it the segmentation takes the border below a neck for more neck, and an avatar is asked to draw
    black there (on ``train/dreamtalk_mead_W009_surprised`` at 128², 0.8 % of the mask pixels were border). One
    array per crop, shared (cached) and read-only."""
    coverage = crop_frame(np.full(frame_shape, 255, np.uint8), crop, size)
    coverage.flags.writeable = False
    return coverage


def crop_intrinsics(frame_shape: tuple[int, int], fov: float, crop: tuple[float, float, float], size: int):
    """(fx, fy, cx, cy) of the crop at ``size``² for an input camera of horizontal field of view ``fov``."""
    height, width = frame_shape
    f = width / (2 * math.tan(math.radians(fov) / 2))
    x0, y0, side = crop
    s = size / side
    return (f * s, f * s, (width / 2 - x0) * s, (height / 2 - y0) * s)


# ----------------------------------------------------------------------------- the tracker


def _check_faces(source: Path, state: _LandmarkState, config: TrackConfig) -> None:
    """Refuse an input too short for what was asked, without a face, with a face too small to fit, or where the
    face is missing in most frames."""
    num, found = len(state.valid), int(state.valid.sum())
    what = "folder" if source.is_dir() else "clip"
    if num < config.min_frames:
        limits = [f"--{k.replace('_', '-')} {v:g}" for k, v in (("fps", config.fps), ("max_frames", config.max_frames))
                  if v is not None]
        raise TrackError(
            f"{source}: gives {num} frame{'s' * (num != 1)}{' with ' + ' and '.join(limits) if limits else ''}, "
            f"fewer than the {config.min_frames} needed (--min-frames); use a longer {what}"
            f"{', or raise ' + ' or '.join(x.split()[0] for x in limits) if limits else ''}."
        )
    if not found:
        raise TrackError(
            f"{source}: no face found in any of its {num} frames; film the face from the front, "
            f"well lit and large in the frame (faces under about a tenth of the frame's height are missed)."
        )
    heights = np.linalg.norm(state.landmarks[state.valid, 152] - state.landmarks[state.valid, 10], axis=-1)
    if np.median(heights) < config.min_face_px:
        raise TrackError(
            f"{source}: the face is only {np.median(heights):.0f} px tall (forehead to chin; at least "
            f"{config.min_face_px:.0f} needed); film closer or at a higher resolution."
        )
    if 2 * found < num:
        raise TrackError(
            f"{source}: a face was found in only {found} of its {num} frames; keep the face in the picture, from "
            f"the front and well lit, for most of the {what}, or cut the {what} to where the face is."
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


def _crops(state: _LandmarkState, config: TrackConfig) -> tuple[np.ndarray, tuple[float, float, float, float], bool]:
    """(crops (N, 3) x0, y0, side in input pixels; the capture's intrinsics (fx, fy, cx, cy) at ``config.size``;
    whether all frames share one crop). Frames of one size share the stable crop; photos of different sizes get
    one each, and the median of their crops' intrinsics as the camera of all."""
    shapes = state.shapes
    if (shapes == shapes[0]).all():
        crop = stable_crop(state.landmarks, state.valid, config.head_fraction)
        intrinsics = crop_intrinsics(tuple(int(x) for x in shapes[0]), config.fov, crop, config.size)
        return np.tile(np.array(crop, np.float64), (len(shapes), 1)), intrinsics, True
    crops = photo_crops(state.landmarks, state.valid, shapes, config.head_fraction)
    each = np.array([crop_intrinsics(tuple(int(x) for x in hw), config.fov, tuple(c), config.size)
                     for hw, c in zip(shapes, crops)])
    intrinsics = tuple(float(x) for x in np.median(each[state.valid], axis=0))
    return crops, intrinsics, False


def _capture_fps(source: Path, times: np.ndarray, config: TrackConfig) -> float:
    """Frame rate of the capture: a video's average rate over the frames kept (``(n - 1)`` over the time from the
    first to the last, so a variable frame rate counts as it was filmed), or the nominal one (the container's, or
    the lower ``config.fps``) when within 1 % of it; 1 for image folders."""
    if source.is_dir():
        return 1.0
    from liftavatar.video import probe_video

    nominal = probe_video(source).fps
    nominal = float(min(nominal, config.fps) if config.fps else nominal)
    span = float(times[-1] - times[0]) if len(times) > 1 else 0.0
    if span <= 0:
        return nominal
    measured = (len(times) - 1) / span
    return nominal if nominal > 0 and abs(measured - nominal) <= _FPS_SNAP * nominal else measured


def track(source: str | Path, out_dir: str | Path, config: TrackConfig | None = None, *, overwrite: bool = False,
          resume: bool = False, progress: bool = True, batch_size: int = 8) -> tuple[Capture, TrackReport]:
    """Track ``source`` (video file or image folder) into a Capture at ``out_dir``."""
    started = time.perf_counter()
    config = config or TrackConfig()
    if config.size < 16 or config.size % 2:
        raise TrackError(f"--size {config.size}: use an even size of at least 16 pixels.")
    if config.min_frames < 1:
        raise ConfigError(f"--min-frames {config.min_frames}: use 1 or more.")
    if config.max_frames is not None and config.max_frames < config.min_frames:
        raise ConfigError(f"--max-frames {config.max_frames} is fewer than --min-frames {config.min_frames}; "
                          "raise --max-frames or lower --min-frames.")
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
    cache = _FrameCache()
    from liftavatar.face.fit import fit_rig, single_threaded_math

    try:
        with single_threaded_math():  # the network's small batches run beside FaceMesh: one torch thread
            state = detect_landmarks(source, config, report, state_path, progress, appearance, cache=cache)
        _check_faces(source, state, config)
    except LiftAvatarError:
        if not resume:  # nothing worth resuming: leave no staging directory behind
            writer.discard()
        raise
    num = len(state.valid)
    report.frames, report.valid = num, int(state.valid.sum())
    report.multi_face_frames = int(state.multi.sum())
    report.interpolated = _short_gaps(state.valid)

    crops, intrinsics, one_crop = _crops(state, config)
    report.crop = tuple(float(c) for c in crops[0])
    # Landmarks in crop pixels (float32 arithmetic, as the crop's offset and scale are applied to every frame).
    scales = (config.size / crops[:, 2]).astype(np.float32)[:, None, None]
    crop_landmarks = ((state.landmarks - crops[:, None, :2].astype(np.float32)) * scales).astype(np.float32)

    prior = {} if appearance is None or state.appearance is None else {"prior_mean": state.appearance,
                                                                       "prior_weight": appearance.precision}

    def fit_kinematics():
        with _Timer(report, "fitting"):  # fit_rig runs torch and BLAS single-threaded (see single_threaded_math)
            return fit_rig(crop_landmarks, state.valid, intrinsics, rig=rig, device=config.device, **prior)

    fps = _capture_fps(source, state.times, config)
    with writer:
        # Now known: the frame rate, the crop(s) (input pixels: x0, y0, side) and the intrinsics.
        rounded = [[round(float(c), 3) for c in crop] for crop in crops]
        placed = {"crop": rounded[0]} if one_crop else {"crops": rounded}
        creator = {**meta.creator, "config": {**meta.creator["config"], **placed}}
        writer.meta = CaptureMeta(**{**asdict(meta), "fps": fps, "intrinsics": tuple(float(k) for k in intrinsics),
                                     "creator": creator})
        decoding = None
        if cache.holds(num):  # one decode: each kept frame is let go as it is cropped
            kept = cache.frames
            frames = ((i, kept.pop(i)) for i in range(num))
        else:
            decoding = _prefetch(iter_frames(source, config))
            frames = ((i, frame) for i, (_, frame) in enumerate(decoding))
        cache = None
        try:
            # The fit runs on a thread while the frames are cropped and segmented, which does not need it.
            with single_threaded_math(), ThreadPoolExecutor(1, thread_name_prefix="track-fit") as fitter:
                fitted = fitter.submit(fit_kinematics)
                _write_frames(writer, frames, num, crops, state.valid, rig, fitted, intrinsics, config, report,
                              progress, batch_size)
                fit = fitted.result()
        finally:
            if decoding is not None:
                decoding.close()
        report.median_reprojection_px = float(np.nanmedian(fit.reprojection_px))
        kinematics = Kinematics(
            expression=fit.expression, rotation=fit.rotation, translation=fit.translation,
            valid=state.valid.copy(), provenance=np.full(num, PROVENANCE_OBSERVED, np.uint8),
            identity=fit.identity, landmarks2d=crop_landmarks,
        )
        with _Timer(report, "writing"):
            writer.flush()
            state_path.unlink(missing_ok=True)
            capture = writer.finalize(kinematics)
    report.wall_seconds = time.perf_counter() - started
    return capture, report


def _write_frames(writer: CaptureWriter, frames: Iterator[tuple[int, np.ndarray]], num: int, crops: np.ndarray,
                  valid: np.ndarray, rig: FaceRig, fit: Future, intrinsics, config: TrackConfig, report: TrackReport,
                  progress: bool, batch_size: int, ahead: int = 256) -> None:
    """Crop and segment the frames here, and hand them in batches to one worker thread that waits for the ``fit``
    and makes their head regions, masks and shading maps and gives them to the writer (whose threads encode the
    PNGs): all overlap. Up to ``ahead`` frames wait for the worker (the fit's time is spent segmenting). Frames
    the writer has already are skipped (resume)."""
    from collections import deque

    size = config.size
    segment_size = max(size, SEGMENT_SIZE)
    in_flight: deque[Future] = deque()
    batch: list[tuple[int, np.ndarray, np.ndarray]] = []
    with SelfieSegmenter() as segmenter, ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="track-render") as worker, \
            tqdm(total=num, desc="writing", unit="frame", disable=not progress) as bar:

        def hand_over() -> None:
            nonlocal batch
            in_flight.append(worker.submit(_write_batch, writer, batch, rig, fit, valid, intrinsics, config, report))
            batch = []
            while in_flight and (in_flight[0].done() or len(in_flight) * batch_size > max(ahead, 2 * batch_size)):
                bar.update(in_flight.popleft().result())

        try:
            for index, frame in frames:
                if index >= num:
                    break
                if writer.has_frame(index):
                    bar.update()
                    continue
                crop = tuple(float(c) for c in crops[index])
                with _Timer(report, "crop"):
                    image = crop_frame(frame, crop, size)
                    wide = image if segment_size == size else crop_frame(frame, crop, segment_size)
                with _Timer(report, "segmentation"):
                    person = segmenter(wide, size)
                    coverage = picture_coverage(frame.shape[:2], crop, size)
                    person = (person.astype(np.uint16) * coverage // 255).astype(np.uint8)
                batch.append((index, image, person))
                if len(batch) == batch_size:
                    hand_over()
            if batch:
                hand_over()
            while in_flight:
                bar.update(in_flight.popleft().result())
        except BaseException:  # interrupted or failed: batches not yet started are dropped, not rendered
            for job in in_flight:
                job.cancel()
            raise


def _fingerprint(source: Path, config: TrackConfig) -> dict:
    """What a tracked capture is made from, recorded by its CaptureWriter so that ``resume`` reuses landmarks and
    frames of the same input and settings only: the config (but the device, which changes results by float
    rounding only) and the input's identity (:func:`liftavatar.fingerprint.input_identity`: a video's path,
    size and content hash; a folder's path and its images' names and sizes)."""
    from liftavatar.fingerprint import input_identity

    settings = {k: v for k, v in asdict(config).items() if k != "device"}
    return {**settings, "input": input_identity(source, IMAGE_SUFFIXES if source.is_dir() else None)}


def _write_batch(writer: CaptureWriter, batch: list[tuple[int, np.ndarray, np.ndarray]], rig: FaceRig,
                 fit: Future, valid: np.ndarray, intrinsics, config: TrackConfig, report: TrackReport) -> int:
    """Masks and shading maps of a batch of ``(index, crop, person probability)`` and their PNGs (queued on the
    writer's threads once the previous batch's are done, so that at most two batches are held while this one's
    maps are made beside the previous one's encoding); returns the number of frames."""
    fit = fit.result()
    indices = [i for i, _, _ in batch]
    size = (config.size, config.size)
    k = (fit.expression[indices], fit.rotation[indices], fit.translation[indices])
    verts = rig.vertices(fit.identity, *k)
    with _Timer(report, "head region"):
        region = head_region(fit.identity, *k, intrinsics, size, rig, vertices=verts)
        person = np.stack([p for _, _, p in batch])
        # A frame without a face has no kinematics to place the head by: its mask is the plain person mask.
        masks = np.where(valid[indices][:, None, None], head_masks(person, region), person)
    with _Timer(report, "shading"):
        shading = render_shading(verts.to(config.device), intrinsics, size, rig)
    with _Timer(report, "writing"):
        writer.flush()
        for (index, image, _), mask, shade in zip(batch, masks, shading):
            writer.add_frame(index, image, mask, shade)
    return len(batch)
