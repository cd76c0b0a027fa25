"""Video IO through PyAV: round trip, resampling, and every unreadable-input case."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pytest

from liftavatar.errors import ConfigError, VideoError
from liftavatar.video import probe_video, read_video, write_video
from tests.clips import write_phone_clip

H, W = 32, 48


def smooth_frames(n: int) -> list[np.ndarray]:
    """Gradients whose brightness steps by 20 per frame, so frames are told apart by their mean."""
    y, x = np.mgrid[0:H, 0:W]
    return [
        np.stack([x * 2 + 20 * i, y * 3 + 20 * i, np.full_like(x, 60 + 20 * i)], -1).astype(
            np.uint8
        )
        for i in range(n)
    ]


def noise_video(path: Path, n: int, faststart: bool = False) -> None:
    """Incompressible frames, so that cutting the file loses whole frames of data."""
    rng = np.random.default_rng(0)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for _ in range(n):
            image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    frames = smooth_frames(5)
    write_video(path, frames, fps=25)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4"]

    info = probe_video(path)
    assert (info.num_frames, info.fps, info.size) == (5, 25.0, (H, W))
    assert info.duration == pytest.approx(0.2)

    decoded = list(read_video(path))
    assert len(decoded) == 5
    for original, frame in zip(frames, decoded, strict=True):
        assert frame.shape == (H, W, 3) and frame.dtype == np.uint8
        assert np.abs(frame.astype(np.int16) - original).mean() < 8


def test_read_resamples_by_timestamp_and_stops_at_max_frames(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    frames = smooth_frames(10)
    write_video(path, frames, fps=30)
    means = [f.mean() for f in frames]

    def source_indices(decoded: list[np.ndarray]) -> list[int]:
        return [int(np.argmin([abs(f.mean() - m) for m in means])) for f in decoded]

    assert source_indices(list(read_video(path, fps=10))) == [0, 3, 6, 9]
    assert source_indices(list(read_video(path, fps=15))) == [0, 2, 4, 6, 8]
    assert len(list(read_video(path, fps=60))) == 10  # never duplicates frames
    assert source_indices(list(read_video(path, max_frames=2))) == [0, 1]
    assert source_indices(list(read_video(path, fps=10, max_frames=2))) == [0, 3]
    with pytest.raises(ConfigError):
        read_video(path, fps=0)


def test_write_rejects_odd_size_and_bad_frames(tmp_path: Path) -> None:
    path = tmp_path / "clip.mp4"
    with pytest.raises(VideoError, match="even"):
        write_video(path, [np.zeros((31, 48, 3), np.uint8)], fps=25)
    with pytest.raises(VideoError, match="frame 1 is 16×16"):
        write_video(path, [np.zeros((H, W, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)], 25)
    with pytest.raises(VideoError, match="float32"):
        write_video(path, [np.zeros((H, W, 3), np.float32)], fps=25)
    with pytest.raises(VideoError, match="no frames"):
        write_video(path, [], fps=25)
    with pytest.raises(VideoError, match="suffix"):
        write_video(tmp_path / "clip.unknownformat", smooth_frames(1), fps=25)
    # A failed write leaves neither the video nor its temporary file.
    assert list(tmp_path.iterdir()) == []


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.mp4"
    with pytest.raises(VideoError, match=f"{path}: no such file"):
        read_video(path)  # fails on the call, not on first iteration
    with pytest.raises(VideoError, match="no such file"):
        probe_video(path)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.mp4"
    path.write_bytes(b"this is not a video " * 100)
    with pytest.raises(VideoError, match=f"{path}: cannot be opened as a video"):
        read_video(path)
    with pytest.raises(VideoError, match=str(path)):
        probe_video(path)


def test_no_video_stream(tmp_path: Path) -> None:
    path = tmp_path / "sound.wav"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), "s16", "mono")
        samples.sample_rate = 8000
        container.mux(stream.encode(samples))
        container.mux(stream.encode())
    with pytest.raises(VideoError, match="no video stream"):
        read_video(path)


def test_truncated_mp4_index_at_end(tmp_path: Path) -> None:
    # write_video puts the mp4 index (moov) at the end, so a cut file cannot even be opened.
    path = tmp_path / "cut.mp4"
    write_video(path, smooth_frames(10), fps=25)
    truncate(path)
    with pytest.raises(VideoError, match=f"{path}: cannot be opened.*truncated"):
        read_video(path)


def test_truncated_mp4_index_at_start(tmp_path: Path) -> None:
    # Phones and web exports put the index first; a cut file then opens and fails mid-decode.
    path = tmp_path / "cut.mp4"
    noise_video(path, 20, faststart=True)
    truncate(path)
    assert probe_video(path).num_frames == 20  # the header still promises every frame
    frames = read_video(path)
    with pytest.raises(VideoError, match=f"{path}: decoding failed after \\d+ frames"):
        list(frames)


def test_read_image_applies_the_exif_orientation_a_phone_records(tmp_path):
    from PIL import Image

    from liftavatar.video import read_image

    upright = np.zeros((40, 20, 3), np.uint8)  # portrait: 40 rows, 20 columns, white at the top
    upright[:10] = 255
    stored = Image.fromarray(np.rot90(upright, k=1))  # stored on its side, as a phone's sensor gives it
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90° clockwise to display
    stored.save(tmp_path / "photo.jpg", exif=exif, quality=100)
    image = read_image(tmp_path / "photo.jpg")
    assert image.shape == (40, 20, 3)
    assert image[:10].mean() > 200 and image[20:].mean() < 50


def _portrait() -> np.ndarray:
    """An upright portrait picture (48 rows, 32 columns): white at the top, red down the left side."""
    image = np.full((48, 32, 3), 40, np.uint8)
    image[:12] = 255
    image[:, :6] = (255, 0, 0)
    return image


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_a_rotated_phone_clip_decodes_upright(tmp_path: Path, rotation: int) -> None:
    """A phone stores a portrait clip on its side with a display matrix: the display turns the stored frame
    ``rotation`` degrees counter-clockwise. Stored here is the upright picture turned the other way (clockwise),
    so only a reader that applies the matrix, in the right direction, gets the upright picture back."""
    upright = _portrait()
    stored = np.ascontiguousarray(np.rot90(upright, k=-rotation // 90))  # k < 0: clockwise
    path = tmp_path / "phone.mp4"
    write_phone_clip(path, [stored] * 3, rotation=rotation)
    frames = list(read_video(path))
    assert len(frames) == 3
    for frame in frames:
        assert frame.shape == upright.shape and frame.flags["C_CONTIGUOUS"]
        assert np.abs(frame.astype(int) - upright).mean() < 12
    assert probe_video(path).size == (48, 32)  # the size as displayed: (H, W) upright


def test_a_variable_frame_rate_clip_decodes_every_frame_and_resamples_by_time(tmp_path: Path) -> None:
    """Phones record at a variable frame rate: irregular frame times. Every frame is decoded with its own time,
    the average rate is frames over time, and --fps keeps the first frame of each 1/fps-second slot."""
    from liftavatar.video import read_video_timed

    times_ms = [0, 30, 50, 200, 230, 500, 520, 540, 900, 1000]
    frames = [np.full((32, 32, 3), 20 * i, np.uint8) for i in range(len(times_ms))]
    path = tmp_path / "vfr.mp4"
    write_phone_clip(path, frames, times_ms=times_ms)
    timed = list(read_video_timed(path))
    assert [round(t, 3) for t, _ in timed] == [t / 1000 for t in times_ms]
    assert [round(f.mean() / 20) for _, f in timed] == list(range(10))
    # 5 frames/s: slots [0, 0.2), [0.2, 0.4), [0.4, 0.6), [0.6, 0.8) (empty), [0.8, 1.0), [1.0, 1.2).
    assert [round(f.mean() / 20) for f in read_video(path, fps=5)] == [0, 3, 5, 8, 9]
    assert probe_video(path).num_frames == 10
