"""The tracker: video or image folder -> Capture; every bad input exits 2 and leaves nothing behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import skimage.data
from PIL import Image

from liftavatar.capture import Capture, validate_capture
from liftavatar.face import track as track_module
from liftavatar.face.rig import FaceRig
from liftavatar.face.track import TrackConfig, crop_frame, crop_intrinsics, track
from liftavatar.synth.world import SynthSpec, synthesize
from liftavatar.video import write_video
from tests.clips import write_phone_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> tuple[Path, Capture]:
    """A short synthetic sparse clip as an .mp4, with its ground-truth capture."""
    root = tmp_path_factory.mktemp("clip")
    truth = synthesize(SynthSpec(seed=7401, preset="sparse", frames=12, size=256), root / "truth", progress=False)
    video = root / "clip.mp4"
    write_video(video, truth.frames(), truth.meta.fps)
    return video, truth


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liftavatar.cli", *args], capture_output=True, text=True)


def assert_refused(result: subprocess.CompletedProcess, out: Path, needle: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists() and not out.with_name(out.name + ".partial").exists(), "no half-written capture"


def test_track_a_synthetic_video(clip, tmp_path):
    video, truth = clip
    capture, report = track(video, tmp_path / "cap", TrackConfig(size=256, fov=30.0), progress=False)
    validate_capture(capture.path, expression_bounds=FaceRig.load().expression_bounds)
    assert capture.num_frames == 12 and report.valid == 12
    assert capture.meta.creator["verb"] == "track" and capture.meta.fps == pytest.approx(truth.meta.fps)
    k = capture.kinematics
    assert (k.provenance == 0).all() and k.valid.all()
    # The pose is recovered (the synthetic camera is a 30° field of view, as passed).
    from scipy.spatial.transform import Rotation

    err = (Rotation.from_rotvec(k.rotation) * Rotation.from_rotvec(truth.kinematics.rotation).inv()).magnitude()
    assert np.degrees(np.median(err)) < 6.0  # a sanity bound; accuracy is measured by benchmarks/tracking.py
    assert report.median_reprojection_px < 3.0
    # The head fills about half of the stable crop, and the masks cover it.
    assert 0.15 < (capture.masks() > 128).mean() < 0.7
    assert not (capture.path / track_module.STATE_FILE).exists()


def test_crop_geometry_is_consistent():
    """Cropping then projecting with the crop intrinsics equals projecting then cropping."""
    frame = np.zeros((300, 400, 3), np.uint8)
    frame[100:110, 200:210] = 255  # a square at u, v in [200, 210) x [100, 110)
    crop = (150.0, 50.0, 200.0)
    image = crop_frame(frame, crop, 100)  # scale 0.5: the square lands on [25, 30) x [25, 30)
    ys, xs = np.nonzero(image[..., 0] > 127)
    assert xs.min() == 25 and xs.max() == 29 and ys.min() == 25 and ys.max() == 29
    fx, fy, cx, cy = crop_intrinsics((300, 400), 60.0, crop, 100)
    assert cx == pytest.approx((200 - 150) * 0.5) and cy == pytest.approx((150 - 50) * 0.5)
    assert fx == pytest.approx(400 / (2 * np.tan(np.radians(30))) * 0.5)
    # What the picture covers of a crop: all of one inside it; of one reaching 100 px past its left edge (at scale
    # 0.5, 50 columns), nothing there, everything right of it.
    assert (track_module.picture_coverage((300, 400), crop, 100) == 255).all()
    coverage = track_module.picture_coverage((300, 400), (-100.0, 0.0, 200.0), 100)
    assert coverage[:, :50].max() == 0 and (coverage[:, 50:] == 255).all()


def test_interrupted_run_resumes_without_redoing_frames(clip, tmp_path, monkeypatch):
    video, _ = clip
    out = tmp_path / "resumed"
    config = TrackConfig(size=128, fov=30.0)
    original = track_module._write_batch
    calls = {"n": 0}

    def interrupt_after_one_batch(writer, batch, *args):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        original(writer, batch, *args)

    monkeypatch.setattr(track_module, "_write_batch", interrupt_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        track(video, out, config, progress=False, batch_size=4)
    staging = out.with_name(out.name + ".partial")
    assert not out.exists() and (staging / track_module.STATE_FILE).exists()
    first = staging / "frames" / "000000.png"
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(track_module, "_write_batch", original)

    detected = {"n": 0}
    real_detect_all = track_module.FaceMeshDetector.detect_all

    def counting(self, image):
        detected["n"] += 1
        return real_detect_all(self, image)

    monkeypatch.setattr(track_module.FaceMeshDetector, "detect_all", counting)
    capture, _ = track(video, out, config, progress=False, resume=True, batch_size=4)
    assert detected["n"] == 0, "landmarks of finished frames are not detected again"
    assert (out / "frames" / "000000.png").stat().st_mtime_ns == stamp, "finished frames are not rewritten"
    assert capture.num_frames == 12


def test_resume_on_another_input_is_refused(clip, tmp_path, monkeypatch):
    """--resume reuses landmarks and frames of the same video only: another one is refused, the staging kept."""
    from liftavatar.errors import CaptureError

    video, truth = clip
    other = tmp_path / "other.mp4"
    write_video(other, truth.frames()[::-1], truth.meta.fps)
    out, config = tmp_path / "cap", TrackConfig(size=64, fov=30.0)

    def interrupt(*args):
        raise KeyboardInterrupt

    original = track_module._write_batch
    monkeypatch.setattr(track_module, "_write_batch", interrupt)
    with pytest.raises(KeyboardInterrupt):  # after the landmarks, before any frame
        track(video, out, config, progress=False, batch_size=4)
    monkeypatch.setattr(track_module, "_write_batch", original)
    state = out.with_name(out.name + ".partial") / track_module.STATE_FILE
    kept = state.read_bytes()
    with pytest.raises(CaptureError, match=r"other inputs \(input\.path, input\..* differ\).*without --resume"):
        track(other, out, config, progress=False, resume=True)
    with pytest.raises(CaptureError, match=r"\(size differs\)"):
        track(video, out, TrackConfig(size=128, fov=30.0), progress=False, resume=True)
    assert state.read_bytes() == kept and not out.exists()


def test_several_faces_follow_the_most_prominent(tmp_path):
    head = skimage.data.astronaut()[0:300, 110:350]
    smaller = np.asarray(Image.fromarray(head).resize((180, 225)))
    folder = tmp_path / "two"
    folder.mkdir()
    for i, shift in enumerate((0, 4, 8)):
        canvas = np.zeros((400, 600, 3), np.uint8)
        canvas[50:350, 20 + shift:260 + shift] = head  # the prominent face, on the left
        canvas[60:285, 320:500] = smaller
        Image.fromarray(canvas).save(folder / f"{i:03d}.png")
    result = run(["track", str(folder), "-o", str(tmp_path / "cap"), "--size", "128"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "several faces in 3 frames" in result.stdout
    capture = Capture.load(tmp_path / "cap")
    assert capture.kinematics.valid.all()
    # The crop follows the left face: its centre lies in the left part of the input.
    x0, y0, side = capture.meta.creator["config"]["crop"]
    assert x0 + side / 2 < 300


def _rotation_error_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return np.degrees((Rotation.from_rotvec(a) * Rotation.from_rotvec(b).inv()).magnitude())


def _phone_clip(path: Path, frames: list[np.ndarray], rotation: int = 0, times_ms: list[int] | None = None) -> None:
    """An H.264 clip as a phone stores it: the upright ``frames`` stored turned clockwise by ``rotation`` degrees
    with a display rotation that turns them back, and (``times_ms``) irregular frame times."""
    stored = [np.ascontiguousarray(np.rot90(f, k=-rotation // 90)) for f in frames]
    write_phone_clip(path, stored, rate=25, times_ms=times_ms, rotation=rotation)


def _fov_for(width: float, focal_px: float) -> float:
    """Horizontal field of view (degrees) of an image ``width`` pixels wide with focal length ``focal_px``."""
    return float(np.degrees(2 * np.arctan(width / 2 / focal_px)))


def _place(image: np.ndarray, canvas_hw: tuple[int, int], scale: float, at: tuple[int, int], fill: int = 90):
    """``image`` resized by ``scale`` and pasted with its top-left corner at ``at`` (row, col) on a grey canvas."""
    side = round(image.shape[0] * scale)
    small = np.asarray(Image.fromarray(image).resize((side, side), Image.LANCZOS))
    canvas = np.full((*canvas_hw, 3), fill, np.uint8)
    r, c = at
    canvas[r:r + side, c:c + side] = small
    return canvas


@pytest.mark.parametrize("layout", ["portrait phone clip (stored landscape, display rotation)",
                                    "landscape clip, small face off-centre"])
def test_non_square_and_rotated_clips_track_upright(layout, clip, tmp_path):
    """Whatever the clip's aspect and stored orientation, the face is found upright in every frame where it is in
    the picture, and the square crop around it is black where it leaves the picture."""
    _, truth = clip
    focal = truth.meta.intrinsics[0]  # px at 256²
    frames = truth.frames()
    if layout.startswith("portrait"):
        scale, at = 1.0, (72, 8)  # 272 wide, 400 tall; the synthetic camera's axis at the picture's centre
        upright = [_place(f, (400, 272), scale, at) for f in frames]
        _phone_clip(tmp_path / "clip.mp4", upright, rotation=-90)  # stored 400 wide, 272 tall
        fov = _fov_for(272, focal)
    else:
        scale, at = 0.625, (4, 30)  # the face is 160 px of a 480x272 picture, near its top-left corner
        upright = [_place(f, (272, 480), scale, at) for f in frames]
        _phone_clip(tmp_path / "clip.mp4", upright)
        fov = _fov_for(480, focal * scale)
    capture, report = track(tmp_path / "clip.mp4", tmp_path / "cap", TrackConfig(size=128, fov=fov), progress=False)
    assert report.valid == capture.num_frames == 12
    # The landmarks land where the true ones are, carried through the placement and the crop.
    x0, y0, side = report.crop
    expected = (truth.kinematics.landmarks2d * scale + np.array(at[::-1]) - np.array([x0, y0])) * 128 / side
    error = np.linalg.norm(capture.kinematics.landmarks2d[:, :468] - expected[:, :468], axis=-1)
    assert np.median(error) < 1.5
    if layout.startswith("portrait"):  # the camera's axis is where the tracker assumes it: the pose is the truth's
        assert np.median(_rotation_error_deg(capture.kinematics.rotation, truth.kinematics.rotation)) < 6.0
    else:  # the crop reaches past the picture's top: black there
        assert y0 < 0
        top = int(-y0 * 128 / side)
        assert top >= 2 and capture.frames()[:, : top - 1].max() == 0
        assert capture.masks()[:, :top].max() == 0, "the border is not filmed: no mask there"


def test_a_folder_of_photos_of_different_sizes(clip, tmp_path):
    """Photos of one person of different sizes (and one without a face): each is cropped around its own face at
    the standard framing, all share the median camera, and the photo without a face is kept, marked invalid."""
    _, truth = clip
    frames = truth.frames()
    photos = {
        "0_as_is.png": frames[0],
        "1_landscape.png": _place(frames[3], (300, 420), 1.0, (20, 120)),
        "2_small_portrait.png": _place(frames[6], (320, 200), 0.7, (100, 10)),
        "3_large.png": _place(frames[9], (420, 420), 1.5, (20, 20)),
        "4_no_face.png": np.full((150, 100, 3), 128, np.uint8),
        "5_square.png": _place(frames[11], (300, 300), 1.1, (10, 5)),
    }
    folder = tmp_path / "photos"
    folder.mkdir()
    for name, image in photos.items():
        Image.fromarray(image).save(folder / name)
    config = TrackConfig(size=128, fov=30.0)
    capture, report = track(folder, tmp_path / "cap", config, progress=False)
    validate_capture(capture.path)
    k = capture.kinematics
    assert capture.num_frames == 6 and k.valid.tolist() == [True, True, True, True, False, True]
    crops = capture.meta.creator["config"]["crops"]
    assert len(crops) == 6 and "crop" not in capture.meta.creator["config"]
    # The standard framing in every photo: forehead to chin about head_fraction of the side, face centred.
    face = k.landmarks2d[k.valid]
    heights = np.linalg.norm(face[:, 152] - face[:, 10], axis=-1) / 128
    np.testing.assert_allclose(heights, config.head_fraction, atol=0.06)
    centres = 0.5 * (face[:, :468].min(1) + face[:, :468].max(1)) / 128
    assert np.abs(centres - 0.5).max() < 0.12
    # The photos' sizes and framings differ, yet one camera fits the heads' poses.
    truth_rot = truth.kinematics.rotation[[0, 3, 6, 9, 11]]
    assert np.median(_rotation_error_deg(k.rotation[k.valid], truth_rot)) < 6.0
    assert report.median_reprojection_px < 3.0


def test_a_variable_frame_rate_clip_keeps_every_frame_at_its_average_rate(clip, tmp_path):
    _, truth = clip
    times_ms = [0, 30, 70, 90, 160, 200, 240, 330, 360, 400, 520, 560]
    _phone_clip(tmp_path / "vfr.mp4", list(truth.frames()), times_ms=times_ms)
    capture, _ = track(tmp_path / "vfr.mp4", tmp_path / "cap", TrackConfig(size=64, fov=30.0), progress=False)
    assert capture.num_frames == 12
    assert capture.meta.fps == pytest.approx(11 / 0.56, rel=1e-3)
    resampled, _ = track(tmp_path / "vfr.mp4", tmp_path / "half", TrackConfig(size=64, fov=30.0, fps=10),
                         progress=False)
    # --fps 10 keeps the first frame of each 0.1 s slot, by time: 0, 160, 200, 330, 400 and 520 ms.
    assert resampled.num_frames == 6 and resampled.meta.fps == pytest.approx(5 / 0.52, rel=1e-3)
    kept = [0, 4, 5, 7, 9, 10]
    np.testing.assert_allclose(resampled.kinematics.rotation, capture.kinematics.rotation[kept], atol=0.02)


def _zero_frame_video(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"


@pytest.mark.parametrize(
    "case, needle",
    [
        ("missing", "no such file"),
        ("not_a_video", "notes.mp4"),
        ("corrupt", "noise.mp4"),
        ("truncated", "cut.mp4"),
        ("zero_frames", "empty.mp4"),
        ("no_face", "no face"),
        ("tiny_face", "px tall"),
        ("empty_folder", "no images"),
        ("face_in_few_frames", "found in only 2 of its 6 frames"),
        ("too_short_after_fps", "gives 1 frame with --fps 2, fewer than the 5 needed"),
        ("max_frames_below_min_frames", "--max-frames 3 is fewer than --min-frames 5"),
    ],
)
def test_bad_input_exits_2_and_leaves_nothing(case, needle, clip, tmp_path):
    video, truth = clip
    source = tmp_path / "input"
    if case == "missing":
        source = tmp_path / "nowhere.mp4"
    elif case == "not_a_video":
        source = tmp_path / "notes.mp4"
        source.write_text("these are my notes, not a video\n")
    elif case == "corrupt":
        source = tmp_path / "noise.mp4"
        source.write_bytes(np.random.default_rng(0).bytes(50_000))
    elif case == "truncated":
        source = tmp_path / "cut.mp4"
        data = video.read_bytes()
        source.write_bytes(data[: len(data) // 2])
    elif case == "zero_frames":
        source = tmp_path / "empty.mp4"
        _zero_frame_video(source)
    elif case == "no_face":
        source = tmp_path / "cat.mp4"
        cat = skimage.data.chelsea()[:300, :450]
        write_video(source, [cat] * 5, 25)
    elif case == "tiny_face":
        source.mkdir()
        # Found by MediaPipe, but only ~35 px from forehead to chin: too little to fit a rig to.
        canvas = np.zeros((256, 256, 3), np.uint8)
        canvas[:153, :153] = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((153, 153)))
        Image.fromarray(canvas).save(source / "000.png")
    elif case == "empty_folder":
        source.mkdir()
        (source / "readme.txt").write_text("no frames here")
    elif case == "face_in_few_frames":
        source = tmp_path / "away.mp4"
        frames = list(truth.frames()[:2]) + [np.zeros_like(truth.frames()[0])] * 4
        write_video(source, frames, 25)
    extra = []
    if case.startswith("too_short") or case.startswith("max_frames"):
        source = video
        extra = ["--min-frames", "5", *(["--fps", "2"] if case.startswith("too_short") else ["--max-frames", "3"])]
    out = tmp_path / "cap"
    assert_refused(run(["track", str(source), "-o", str(out), "--size", "128", *extra]), out, needle)
