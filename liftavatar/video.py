"""Frames in and out: video decode and encode through PyAV (FFmpeg), image files, frame sequences on disk.

Frames cross this border as (H, W, 3) uint8 RGB arrays, row 0 at the top of the picture as it is displayed: a
phone's clip stored on its side with a display rotation, or a photo with an EXIF orientation, reads upright.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from liftavatar.errors import ConfigError, VideoError
from liftavatar.io import temporary_name

__all__ = ["FRAMES_MARKER", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "VideoInfo", "check_frames_output", "probe_video",
           "read_image", "read_video", "read_video_timed", "write_frames", "write_video"]

_CORRUPT_FIX = "re-export or re-copy the video"
# Frame timestamps are floats from rational pts; this slack keeps a frame that lands exactly on
# an output slot boundary from falling into the slot before it.
_SLOT_EPSILON = 1e-6


@dataclass(frozen=True)
class VideoInfo:
    """What a video's container says about its first video stream.

    Attributes:
        num_frames: frame count from the container, or duration × fps where it has none; an
            estimate (variable frame rate, edit lists), so count decoded frames where it matters.
        fps: average frame rate, frames per second.
        size: (H, W) in pixels, as displayed (upright: the display rotation applied).
        duration: seconds.
        rotation: degrees counter-clockwise the display turns the stored frames (a multiple of 90; a phone's
            portrait clip is stored landscape with ±90).
    """

    num_frames: int
    fps: float
    size: tuple[int, int]
    duration: float
    rotation: int = 0


def _open(path: Path) -> av.container.InputContainer:  # noqa: F821  (av is imported where it is used)
    """Open ``path`` for reading; raise :class:`VideoError` unless it has a video stream."""
    import av  # PyAV loads FFmpeg: only where a video is read or written, so frames folders need none
    if not path.exists():
        raise VideoError(f"{path}: no such file; check the path.")
    if not path.is_file():
        raise VideoError(f"{path}: is not a file; pass a video file.")
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise VideoError(
            f"{path}: cannot be opened as a video ({exc.strerror}); it is not a video, or it is "
            f"truncated or corrupt: {_CORRUPT_FIX}."
        ) from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream; pass a file that contains video.")
    return container


def _stream_fps(stream: av.video.stream.VideoStream) -> float:  # noqa: F821
    rate = stream.average_rate or stream.guessed_rate
    return float(rate) if rate else 0.0


def _quarter_turns(frame: av.VideoFrame) -> int:  # noqa: F821
    """How many quarter turns counter-clockwise the display rotation of ``frame`` asks for (0..3)."""
    return round((frame.rotation or 0) / 90) % 4


def _upright(frame: av.VideoFrame) -> np.ndarray:  # noqa: F821
    """The decoded ``frame`` as (H, W, 3) uint8 RGB, turned as the display matrix says (PyAV reports the rotation
    counter-clockwise, which is ``np.rot90``'s direction for an image with row 0 at the top)."""
    image = frame.to_ndarray(format="rgb24")
    turns = _quarter_turns(frame)
    return np.ascontiguousarray(np.rot90(image, k=turns)) if turns else image


def probe_video(path: Path | str) -> VideoInfo:
    """Read the container header of the video at ``path``, and decode its first frame for the display rotation
    (FFmpeg reports it on frames only).

    Raises:
        VideoError: the file is missing, is not a video, or has no video stream.
    """
    import av

    path = Path(path)
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        if stream.duration is not None and stream.time_base is not None:
            duration = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration = container.duration / av.time_base
        else:
            duration = 0.0
        num_frames = stream.frames or round(duration * fps)
        size = (stream.codec_context.height, stream.codec_context.width)
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError:  # read_video reports a file that does not decode
            first = None
        turns = 0 if first is None else _quarter_turns(first)
    if turns % 2:
        size = size[::-1]
    return VideoInfo(num_frames=num_frames, fps=fps, size=size, duration=duration, rotation=90 * turns)


def read_video(
    path: Path | str, max_frames: int | None = None, fps: float | None = None
) -> Iterator[np.ndarray]:
    """Decode the first video stream of ``path`` into (H, W, 3) uint8 RGB frames, upright (the display rotation a
    phone records is applied).

    The file is opened before this returns, so a missing or unreadable file fails here; decoding
    happens as the iterator is consumed.

    Args:
        max_frames: stop after yielding this many frames.
        fps: yield at most this many frames per second of video, by timestamp: the first frame
            of every 1/fps-second slot is kept, the others dropped. Frames are never repeated, so
            a rate above the video's yields every frame. A variable frame rate is resampled by the
            frames' own times.

    Raises:
        VideoError: missing file, not a video, no video stream (here); a decoding failure or
            zero decodable frames (while iterating).
        ConfigError: ``max_frames`` < 0 or ``fps`` ≤ 0.
    """
    frames = read_video_timed(path, max_frames, fps)
    return (frame for _, frame in frames)


def read_video_timed(
    path: Path | str, max_frames: int | None = None, fps: float | None = None
) -> Iterator[tuple[float, np.ndarray]]:
    """As :func:`read_video`, with each frame's presentation time: ``(seconds since the first decoded frame,
    frame)``. A variable-frame-rate clip's times are irregular; the average rate of what is yielded is
    ``(n - 1) / (last time - first time)``."""
    if max_frames is not None and max_frames < 0:
        raise ConfigError(f"max_frames is {max_frames}; pass 0 or more.")
    if fps is not None and not fps > 0:
        raise ConfigError(f"fps is {fps}; pass a positive frame rate.")
    path = Path(path)
    return _read(path, _open(path), max_frames, fps)


def _read(
    path: Path, container: av.container.InputContainer, max_frames: int | None, fps: float | None  # noqa: F821
) -> Iterator[tuple[float, np.ndarray]]:
    import av

    with container:
        stream = container.streams.video[0]
        # FFmpeg's default slice threading is kept on purpose: with frame threading the decoder
        # swallows the error of a truncated last packet and a cut file reads as a short one.
        source_fps = _stream_fps(stream) or 1.0
        decoded = yielded = 0
        start = None
        last_slot = -1
        frames = container.decode(stream)
        while max_frames is None or yielded < max_frames:
            try:
                frame = next(frames, None)
            except av.FFmpegError as exc:
                raise VideoError(
                    f"{path}: decoding failed after {decoded} frames ({exc.strerror}); the file "
                    f"is truncated or corrupt: {_CORRUPT_FIX}."
                ) from None
            if frame is None:
                break
            decoded += 1
            time = frame.time if frame.time is not None else (decoded - 1) / source_fps
            start = time if start is None else start
            if fps is not None:
                slot = math.floor((time - start) * fps + _SLOT_EPSILON)
                if slot <= last_slot:
                    continue
                last_slot = slot
            yielded += 1
            yield time - start, _upright(frame)
        if decoded == 0 and max_frames != 0:
            raise VideoError(f"{path}: has no decodable frames; {_CORRUPT_FIX}.")


def write_video(
    path: Path | str, frames: Iterable[np.ndarray], fps: float, crf: int = 18
) -> None:
    """Encode (H, W, 3) uint8 RGB ``frames`` as H.264 (libx264, yuv420p) at ``fps`` frames/s.

    The container format follows the suffix of ``path`` (.mp4, .mov, .mkv). The file is written
    under a temporary name in the same folder and renamed at the end, so ``path`` never holds a
    half-written video. ``crf`` is x264's constant rate factor (0 lossless … 51 worst; 18 looks
    lossless).

    Raises:
        VideoError: no frames, a frame that is not (H, W, 3) uint8 or differs in size from the
            first, H or W odd (yuv420p halves both), or ``fps`` ≤ 0.
    """
    import av

    path = Path(path)
    if not fps > 0:
        raise VideoError(f"{path}: fps is {fps}; pass a positive frame rate.")
    if not path.parent.is_dir():
        raise VideoError(f"{path}: folder {path.parent} does not exist; create it first.")
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise VideoError(f"{path}: no frames to write; pass at least one frame.")
    _check_frame(path, 0, first, None)
    height, width = first.shape[:2]
    if height % 2 or width % 2:
        raise VideoError(
            f"{path}: frames are {height}×{width} (H×W), but H.264 in yuv420p needs even sides; "
            f"crop or pad the frames to even sizes."
        )

    # Keep the suffix on the temporary name: FFmpeg picks the container format from it.
    tmp = temporary_name(path, keep_suffix=True)
    try:
        container = av.open(str(tmp), "w")
    except (av.FFmpegError, ValueError) as exc:
        # A bad suffix surfaces as a plain ValueError ("Could not determine output format").
        reason = getattr(exc, "strerror", None) or exc
        raise VideoError(
            f"{path}: cannot be written ({reason}); use a suffix that names a video format "
            f"(.mp4, .mov, .mkv)."
        ) from None
    try:
        with container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height = width, height
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": str(crf)}
            for index, frame in enumerate(itertools.chain([first], frames)):
                _check_frame(path, index, frame, (height, width))
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_frame(
    path: Path, index: int, frame: np.ndarray, size: tuple[int, int] | None
) -> None:
    is_rgb = isinstance(frame, np.ndarray) and frame.ndim == 3 and frame.shape[2] == 3
    if not (is_rgb and frame.dtype == np.uint8):
        got = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame)
        raise VideoError(
            f"{path}: frame {index} is {got}, expected (H, W, 3) uint8 RGB; convert it first."
        )
    if size is not None and frame.shape[:2] != size:
        raise VideoError(
            f"{path}: frame {index} is {frame.shape[0]}×{frame.shape[1]}, but the first frame is "
            f"{size[0]}×{size[1]}; resize the frames to one size."
        )


# ----------------------------------------------------------------------------------------------- frame sequences


def read_image(path: Path | str) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB, upright: the EXIF orientation a phone records is applied.

    Raises:
        VideoError: the file is missing or is not a readable image.
    """
    from PIL import Image, ImageOps

    path = Path(path)
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except FileNotFoundError:
        raise VideoError(f"{path}: no such file; check the path.") from None
    except (OSError, ValueError) as exc:
        raise VideoError(f"{path}: not a readable image ({exc}); remove it from the folder or re-export it.") from None

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")
"""Suffixes of video files: read as videos, and an output with one is written as a video (anything else is a
folder of PNG frames)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
"""Suffixes of image files, as a folder of frames or photos holds them."""
FRAMES_MARKER = ".liftavatar-frames"
"""Marks a frames folder as written by :func:`write_frames`: ``force`` replaces such a folder, and never another."""


def check_frames_output(out: Path | str, force: bool = False) -> None:
    """Refuse an output :func:`write_frames` must not write: an existing one without ``force``, and with ``force``
    anything but a video file or a frames folder an earlier :func:`write_frames` wrote (a capture, a foreign
    folder, another file). Call it before the work that makes the frames, so that a refusal costs nothing.

    Raises:
        ConfigError: one sentence naming ``out`` and what to do.
    """
    out = Path(out)
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(f"-o {out}: {parent} is a file, not a folder; choose an output path in a folder.")
    video = out.suffix.lower() in VIDEO_SUFFIXES
    if not out.exists() and not out.is_symlink():
        return
    if video and out.is_file():
        if not force:
            raise ConfigError(f"-o {out}: the file exists; pass --force to replace it, or choose another -o.")
        return
    if video:
        raise ConfigError(f"-o {out}: a folder is there, not a video file; choose another -o.")
    if out.is_dir() and not out.is_symlink():
        if not any(out.iterdir()):
            return
        if (out / FRAMES_MARKER).is_file():
            if not force:
                raise ConfigError(f"-o {out}: frames written earlier are there; pass --force to replace them, or "
                                  "choose another -o.")
            return
        what = "a capture" if (out / "capture.json").is_file() else "a folder of other files"
        raise ConfigError(f"-o {out}: {what} is there, which is never replaced; choose another -o (a new folder "
                          "for PNG frames, or an .mp4 file).")
    raise ConfigError(f"-o {out}: a file that is not a video ({', '.join(VIDEO_SUFFIXES)}) is there, which is never "
                      "replaced; choose another -o (a new folder for PNG frames, or an .mp4 file).")


def write_frames(frames: Iterable[np.ndarray], out: Path | str, fps: float, force: bool = False) -> Path:
    """Write (H, W, 3) uint8 RGB frames as a video (``out`` ends in one of :data:`VIDEO_SUFFIXES`) or as a folder
    of ``000000.png`` … frames, replacing what is at ``out`` only as :func:`check_frames_output` allows.

    A folder is written under a temporary name with :data:`FRAMES_MARKER` inside and renamed into place whole;
    the folder it replaces is moved aside first and deleted last, so an interruption leaves the old frames or
    the new ones, never a mix."""
    import shutil
    import uuid

    from liftavatar.io import save_png, write_text

    out = Path(out)
    check_frames_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() in VIDEO_SUFFIXES:
        write_video(out, frames, fps)
        return out
    tmp = temporary_name(out)
    if tmp.exists():  # an interrupted earlier write: ours only when it holds the marker
        if not (tmp / FRAMES_MARKER).is_file():
            raise ConfigError(f"-o {out}: {tmp} is in the way and was not written by liftavatar; move it away.")
        shutil.rmtree(tmp)
    tmp.mkdir()
    write_text(tmp / FRAMES_MARKER, "frames written by liftavatar; --force may replace this folder\n")
    for i, frame in enumerate(frames):
        save_png(frame, tmp / f"{i:06d}.png")
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)
    return out
