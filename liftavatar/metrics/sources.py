"""What ``liftavatar eval`` compares: frames from a Capture, a folder of images, or a video.

Every source becomes a :class:`FrameSet`: (N, H, W, 3) uint8 RGB frames (row 0 at the top), plus
what a Capture adds: foreground masks, per-frame kinematics and the camera intrinsics.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from liftavatar.capture import META_FILE, Capture, Kinematics
from liftavatar.metrics.errors import MetricsError
from liftavatar.video import IMAGE_SUFFIXES, VIDEO_SUFFIXES, read_image

__all__ = ["FrameSet", "load_frames", "check_pair"]



@dataclass(eq=False)
class FrameSet:
    """Frames to evaluate and what is known about them.

    Attributes:
        path: where they came from.
        kind: ``capture``, ``folder``, ``video`` or ``array``.
        frames: (N, H, W, 3) uint8 RGB.
        masks: (N, H, W) uint8 foreground alpha (255 = foreground), from a Capture; else None.
        kinematics: the Capture's per-frame kinematics; else None.
        intrinsics: (fx, fy, cx, cy) in pixels of ``frames`` (OpenCV camera, top-left corner at
            (0, 0)), from a Capture; else None.
    """

    path: Path | None
    kind: str
    frames: np.ndarray
    masks: np.ndarray | None = None
    kinematics: Kinematics | None = None
    intrinsics: tuple[float, float, float, float] | None = None

    def __len__(self) -> int:
        return int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) in pixels."""
        return int(self.frames.shape[1]), int(self.frames.shape[2])

    def describe(self) -> dict:
        """A JSON-ready summary (path, kind, frames, size)."""
        return {"path": None if self.path is None else str(self.path), "kind": self.kind, "frames": len(self),
                "size": list(self.size), "masks": self.masks is not None, "kinematics": self.kinematics is not None}


def _stack(frames: list[np.ndarray], source: Path, names: list[str]) -> np.ndarray:
    first = frames[0].shape
    for frame, name in zip(frames, names):
        if frame.shape != first:
            raise MetricsError(
                f"{source}: frame {name} is {frame.shape[1]}x{frame.shape[0]} but the first is {first[1]}x{first[0]}; "
                f"all frames of one source must share a size."
            )
    return np.stack(frames)


def load_frames(path: str | Path, max_frames: int | None = None) -> FrameSet:
    """Read a Capture directory (has ``capture.json``), a folder of images (sorted by name) or a
    video file into a :class:`FrameSet`.

    Raises:
        MetricsError: the path is missing, empty, or holds frames of different sizes;
        CaptureError / VideoError: a broken capture or video.
    """
    path = Path(path)
    if not path.exists():
        raise MetricsError(f"{path}: no such file or folder; pass a capture directory, a folder of frames or a video.")
    if path.is_dir() and (path / META_FILE).is_file():
        capture = Capture.load(path)
        n = capture.num_frames if max_frames is None else min(max_frames, capture.num_frames)
        kin = capture.kinematics if n == capture.num_frames else capture.kinematics.select(np.arange(n))
        return FrameSet(path, "capture", capture.frames(range(n)), capture.masks(range(n)), kin,
                        tuple(float(v) for v in capture.meta.intrinsics))
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:max_frames]
        if not files:
            raise MetricsError(f"{path}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}) and no capture.json; "
                               f"pass a capture, a folder of frames or a video.")
        return FrameSet(path, "folder", _stack([read_image(p) for p in files], path, [p.name for p in files]))
    if path.suffix.lower() in VIDEO_SUFFIXES:
        from liftavatar.video import read_video

        frames = list(read_video(path, max_frames=max_frames))
        if not frames:
            raise MetricsError(f"{path}: the video holds no frames; pass a video with at least one frame.")
        return FrameSet(path, "video", np.stack(frames))
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return FrameSet(path, "image", read_image(path)[None])
    raise MetricsError(f"{path}: not a capture, a folder of frames, an image or a video ({', '.join(VIDEO_SUFFIXES)}); "
                       f"pass one of those.")


def check_pair(pred: FrameSet, gt: FrameSet) -> None:
    """Raise :class:`MetricsError` unless ``pred`` and ``gt`` hold as many frames of one size."""
    if len(pred) != len(gt):
        raise MetricsError(
            f"{pred.path} has {len(pred)} frames but {gt.path} has {len(gt)}; compare sequences of the same length "
            f"(--max-frames {min(len(pred), len(gt))} compares the first frames of both)."
        )
    if pred.size != gt.size:
        raise MetricsError(
            f"{pred.path} frames are {pred.size[0]}x{pred.size[1]} (HxW) but {gt.path} frames are "
            f"{gt.size[0]}x{gt.size[1]}; render or resize the prediction to the ground truth's size."
        )
