"""Test clips made as phones store them (one home for the tests of video reading and of tracking)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def write_phone_clip(path: Path, frames: list[np.ndarray], rate: int = 30, times_ms: list[int] | None = None,
                     rotation: int = 0) -> None:
    """An H.264 clip of ``frames`` (stored as given) made with PyAV, with a display rotation (degrees
    counter-clockwise) and, where given, irregular presentation times in milliseconds (variable frame rate)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        if rotation:
            stream.set_display_rotation(rotation)
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = (times_ms[i] if times_ms else round(i * 1000 / rate)), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
