"""Capture read / write / validate: round trips, every broken-capture case, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from liftavatar.capture import (
    PROVENANCE_LIFTED,
    PROVENANCE_OBSERVED,
    SCHEMA_VERSION,
    Capture,
    CaptureMeta,
    CaptureWriter,
    Kinematics,
    validate_capture,
    write_capture,
)
from liftavatar.errors import CaptureError

H, W, N = 16, 16, 4
NAMES = ["jaw_open", "smile", "blink"]


def make_meta(**changes) -> CaptureMeta:
    meta = CaptureMeta(
        subject="test-subject",
        fps=25.0,
        size=(H, W),
        intrinsics=(20.0, 20.0, W / 2, H / 2),
        rig={"name": "facemesh-rig", "version": "1"},
        expression_names=list(NAMES),
        creator={"verb": "test", "version": "0.1.0", "config": {"seed": 0}},
    )
    for key, value in changes.items():
        setattr(meta, key, value)
    return meta


def make_kinematics(n: int = N, seed: int = 0, landmarks: bool = False) -> Kinematics:
    rng = np.random.default_rng(seed)
    return Kinematics(
        expression=rng.uniform(0, 1, (n, len(NAMES))).astype(np.float32),
        rotation=rng.uniform(-0.3, 0.3, (n, 3)).astype(np.float32),
        translation=np.tile(np.float32([0.0, 0.0, 0.5]), (n, 1)),
        valid=np.ones(n, dtype=bool),
        provenance=np.full(n, PROVENANCE_OBSERVED, dtype=np.uint8),
        identity=np.linspace(-1, 1, 5, dtype=np.float32),
        landmarks2d=rng.uniform(0, W, (n, 7, 2)).astype(np.float32) if landmarks else None,
    )


def make_images(n: int = N, offset: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:H, 0:W]
    frames = np.stack(
        [np.stack([x * 8 + 10 * (i + offset), y * 8, (x + y) * 4], axis=-1) for i in range(n)]
    ).astype(np.uint8)
    masks = np.stack([((x + i) % 3 == 0) * 255 for i in range(n)]).astype(np.uint8)
    shadings = (255 - frames).astype(np.uint8)
    return frames, masks, shadings


@pytest.fixture
def capture_dir(tmp_path: Path) -> Path:
    out = tmp_path / "capture"
    write_capture(out, make_meta(), make_kinematics(), *make_images())
    return out


def rewrite_npz(path: Path, **changes: np.ndarray | None) -> None:
    with np.load(path) as npz:
        arrays = dict(npz)
    arrays.update(changes)
    arrays = {name: array for name, array in arrays.items() if array is not None}
    with path.open("wb") as f:
        np.savez(f, **arrays)


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def assert_capture_error(path: Path, expected_file: Path, *words: str, **kwargs) -> str:
    with pytest.raises(CaptureError) as info:
        validate_capture(path, **kwargs)
    message = str(info.value)
    assert str(expected_file) in message
    for word in words:
        assert word in message
    # One sentence: what is wrong; what to do.
    assert message.endswith(".") and "; " in message
    return message


# --------------------------------------------------------------------------------------------
# Good captures


def test_round_trip(tmp_path: Path) -> None:
    kinematics = make_kinematics(landmarks=True)
    frames, masks, shadings = make_images()
    written = write_capture(
        tmp_path / "capture", make_meta(), kinematics, frames, masks, shadings, progress=True
    )
    capture = Capture.load(tmp_path / "capture", expression_bounds=(0.0, 1.0))

    assert capture.num_frames == N and capture.size == (H, W)
    assert capture.meta == written.meta
    assert capture.meta.to_json()["num_frames"] == N
    for name, array in kinematics.arrays().items():
        loaded = getattr(capture.kinematics, name)
        assert loaded.dtype == array.dtype
        np.testing.assert_array_equal(loaded, array)
    np.testing.assert_array_equal(capture.frames(), frames)
    np.testing.assert_array_equal(capture.masks(), masks)
    np.testing.assert_array_equal(capture.shadings(), shadings)
    np.testing.assert_array_equal(capture.frame(2), frames[2])
    np.testing.assert_array_equal(capture.mask(1), masks[1])
    np.testing.assert_array_equal(capture.shading(3), shadings[3])
    np.testing.assert_array_equal(capture.frames([3, 0]), frames[[3, 0]])
    assert capture.frames([]).shape == (0, H, W, 3)
    # Nothing but the capture is left behind, and nothing of the writer's inside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["capture"]
    assert sorted(p.name for p in capture.path.iterdir()) == [
        "capture.json",
        "frames",
        "kinematics.npz",
        "masks",
        "shading",
    ]


def test_empty_capture_round_trips(tmp_path: Path) -> None:
    capture = write_capture(tmp_path / "c", make_meta(), make_kinematics(0), [], [], [])
    assert Capture.load(capture.path).num_frames == 0
    assert capture.frames().shape == (0, H, W, 3)
    assert capture.masks().shape == (0, H, W)


def test_meta_json_round_trip() -> None:
    meta = make_meta(num_frames=3, reference_indices=[0, 2])
    data = json.loads(json.dumps(meta.to_json()))
    assert list(data)[0] == "schema_version" and data["schema_version"] == SCHEMA_VERSION
    assert CaptureMeta.from_json(data, "capture.json") == meta


def test_set_reference_indices(capture_dir: Path) -> None:
    capture = Capture.load(capture_dir)
    capture.set_reference_indices(np.array([3, 1]))
    assert Capture.load(capture_dir).meta.reference_indices == [3, 1]
    with pytest.raises(CaptureError, match="out of range"):
        capture.set_reference_indices([4])
    assert Capture.load(capture_dir).meta.reference_indices == [3, 1]
    assert not list(capture_dir.glob(".*"))  # no temporary file left beside capture.json


def test_check_images_off_reads_no_headers(capture_dir: Path) -> None:
    Image.new("RGB", (W, H // 2)).save(capture_dir / "frames" / "000001.png")
    validate_capture(capture_dir, check_images=False)
    assert_capture_error(capture_dir, capture_dir / "frames" / "000001.png", "8×16")


# --------------------------------------------------------------------------------------------
# Broken captures: each names its file


def _symlink_frame_outside(root: Path) -> Path:
    outside = root.parent / "outside.png"
    shutil.copy(root / "frames" / "000001.png", outside)
    (root / "frames" / "000001.png").unlink()
    (root / "frames" / "000001.png").symlink_to(outside)
    return root / "frames" / "000001.png"


def _symlink_folder_outside(root: Path) -> Path:
    shutil.move(root / "masks", root.parent / "masks-elsewhere")
    (root / "masks").symlink_to(root.parent / "masks-elsewhere")
    return root / "masks"


def _truncate_npz(root: Path) -> Path:
    path = root / "kinematics.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _set_kin(**changes) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        rewrite_npz(root / "kinematics.npz", **changes)
        return root / "kinematics.npz"

    return mutate


def _set_json(**changes) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        edit_json(root / "capture.json", **changes)
        return root / "capture.json"

    return mutate


def _remove(rel: str) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        (root / rel).unlink()
        return root / rel

    return mutate


def _extra_frame(root: Path) -> Path:
    shutil.copy(root / "frames" / "000000.png", root / "frames" / "000004.png")
    return root / "frames" / "000004.png"


def _image(rel: str, mode: str, size: tuple[int, int]) -> Callable[[Path], Path]:
    def mutate(root: Path) -> Path:
        Image.new(mode, (size[1], size[0])).save(root / rel)
        return root / rel

    return mutate


def _nan_expression(root: Path) -> Path:
    expression = make_kinematics().expression
    expression[1, 2] = np.nan
    return _set_kin(expression=expression)(root)


def _num_frames_below_arrays(root: Path) -> Path:
    # The message blames the array file and quotes capture.json's count.
    _set_json(num_frames=3)(root)
    return root / "kinematics.npz"


def _invalid_json(root: Path) -> Path:
    (root / "capture.json").write_text("{not json")
    return root / "capture.json"


def _truncate_png(rel: str) -> Callable[[Path], Path]:
    """Cut a PNG in half: its header (size, mode) still reads, its pixels do not."""

    def mutate(root: Path) -> Path:
        path = root / rel
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path

    return mutate


def _utf16_json(root: Path) -> Path:
    path = root / "capture.json"
    path.write_text(path.read_text(encoding="utf-8"), encoding="utf-16")
    return path


def _json_is_a_directory(root: Path) -> Path:
    path = root / "capture.json"
    path.unlink()
    path.mkdir()
    return path


def _invalid_reference(root: Path) -> Path:
    valid = np.ones(N, dtype=bool)
    valid[2] = False
    rewrite_npz(root / "kinematics.npz", valid=valid)
    return _set_json(reference_indices=[0, 2])(root)


BROKEN: dict[str, tuple[Callable[[Path], Path], tuple[str, ...]]] = {
    "missing frame file": (_remove("frames/000002.png"), ("missing", "num_frames=4")),
    "missing mask file": (_remove("masks/000003.png"), ("missing",)),
    "missing capture.json": (_remove("capture.json"), ("missing",)),
    "missing kinematics.npz": (_remove("kinematics.npz"), ("missing",)),
    "wrong array shape": (
        _set_kin(rotation=np.zeros((N, 4), np.float32)), ("'rotation'", "(4, 3)")
    ),
    "wrong expression count": (
        _set_kin(expression=np.zeros((N, 2), np.float32)), ("'expression'", "(4, 3)")
    ),
    "wrong dtype": (_set_kin(expression=np.zeros((N, 3), np.float64)), ("float64", "float32")),
    "missing array": (_set_kin(valid=None), ("'valid'", "missing")),
    "unknown array": (_set_kin(extra=np.zeros(3)), ("'extra'",)),
    "NaN kinematics": (_nan_expression, ("NaN", "(1, 2)")),
    "bad provenance": (_set_kin(provenance=np.uint8([0, 1, 7, 2])), ("provenance[2]", "7")),
    "rotation beyond pi": (
        _set_kin(rotation=np.tile(np.float32([4.0, 0, 0]), (N, 1))), ("rotation[0]",)
    ),
    "symlinked frame outside": (_symlink_frame_outside, ("escapes the capture directory",)),
    "symlinked folder outside": (_symlink_folder_outside, ("escapes the capture directory",)),
    "truncated kinematics.npz": (_truncate_npz, ("cannot be read",)),
    "unknown schema_version": (_set_json(schema_version=2), ("schema_version 2",)),
    "invalid JSON": (_invalid_json, ("not valid JSON",)),
    "capture.json in UTF-16": (_utf16_json, ("UTF-8",)),
    "capture.json is a directory": (_json_is_a_directory, ("directory",)),
    "wrong key type": (_set_json(fps="25"), ("'fps'",)),
    "negative fps": (_set_json(fps=-1), ("'fps'",)),
    "unknown key": (_set_json(color="red"), ("'color'",)),
    "num_frames below arrays": (_num_frames_below_arrays, ("4 frames", "num_frames=3")),
    "more frame files than num_frames": (_extra_frame, ("num_frames=4",)),
    "reference out of range": (_set_json(reference_indices=[0, 4]), ("out of range",)),
    "duplicate reference": (_set_json(reference_indices=[1, 1]), ("repeat",)),
    "reference at invalid frame": (_invalid_reference, ("invalid",)),
    "image of wrong size": (_image("shading/000001.png", "RGB", (8, 16)), ("8×16", "[16, 16]")),
    "mask in wrong mode": (_image("masks/000000.png", "RGB", (H, W)), ("mode RGB", "L")),
    "truncated frame PNG": (_truncate_png("frames/000002.png"), ("damaged",)),
    "truncated mask PNG": (_truncate_png("masks/000001.png"), ("damaged",)),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_capture_names_its_file(capture_dir: Path, case: str) -> None:
    mutate, words = BROKEN[case]
    bad_file = mutate(capture_dir)
    assert_capture_error(capture_dir, bad_file, *words)
    with pytest.raises(CaptureError):
        Capture.load(capture_dir)


def corrupt_pixels(path: Path) -> None:
    """Replace a PNG's compressed pixels with bytes that do not inflate, with valid chunk checksums: the
    damage only a full decode finds (a buggy writer, not a truncated copy)."""
    import struct
    import zlib

    data = path.read_bytes()
    out, pos = bytearray(data[:8]), 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind = data[pos + 4:pos + 8]
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IDAT":
            body = b"\x78\x01" + bytes(len(body) - 2)  # a zlib header, then stored-block garbage
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        pos += 12 + length
    path.write_bytes(bytes(out))


def test_pixels_that_do_not_decode_are_caught_by_a_full_check_and_by_every_reader(capture_dir: Path) -> None:
    bad = capture_dir / "frames" / "000002.png"
    corrupt_pixels(bad)
    # Loading checks every chunk's checksum, not the pixels: this capture loads...
    capture = Capture.load(capture_dir)
    # ...the full check (liftavatar validate) decodes and names the file...
    message = assert_capture_error(capture_dir, bad, "damaged", decode=True)
    assert "000002.png" in message
    # ...and a reader turns the decode error into the same kind of sentence, not an OSError.
    capture.frame(1)
    with pytest.raises(CaptureError, match="000002.png"):
        capture.frame(2)
    with pytest.raises(CaptureError, match="000002.png"):
        capture.frames()


def test_a_png_damaged_after_loading_is_named_by_the_reader(capture_dir: Path) -> None:
    capture = Capture.load(capture_dir)
    _truncate_png("shading/000003.png")(capture_dir)
    with pytest.raises(CaptureError, match="000003.png"):
        capture.shading(3)


def test_missing_capture_directory(tmp_path: Path) -> None:
    assert_capture_error(tmp_path / "nope", tmp_path / "nope", "no such directory")


def test_missing_capture_json_key(capture_dir: Path) -> None:
    data = json.loads((capture_dir / "capture.json").read_text())
    del data["intrinsics"]
    (capture_dir / "capture.json").write_text(json.dumps(data))
    assert_capture_error(capture_dir, capture_dir / "capture.json", "'intrinsics'", "missing")


def test_expression_bounds(capture_dir: Path) -> None:
    expression = make_kinematics().expression
    expression[2, 1] = 1.5
    rewrite_npz(capture_dir / "kinematics.npz", expression=expression)
    validate_capture(capture_dir)
    assert_capture_error(
        capture_dir, capture_dir / "kinematics.npz", "expression[2, 1]", expression_bounds=(0, 1)
    )
    expression[2, 1] = 1.0 + 5e-5  # within the rounding tolerance
    rewrite_npz(capture_dir / "kinematics.npz", expression=expression)
    validate_capture(capture_dir, expression_bounds=(0, 1))


# --------------------------------------------------------------------------------------------
# Kinematics


def test_kinematics_select_and_concatenate() -> None:
    kin = make_kinematics(landmarks=True)
    part = kin.select([3, 1])
    assert len(part) == 2
    np.testing.assert_array_equal(part.expression, kin.expression[[3, 1]])
    np.testing.assert_array_equal(part.landmarks2d, kin.landmarks2d[[3, 1]])
    np.testing.assert_array_equal(part.identity, kin.identity)

    lifted = make_kinematics(2, seed=1, landmarks=True)
    lifted.provenance[:] = PROVENANCE_LIFTED
    both = kin.concatenate(lifted)
    assert len(both) == N + 2
    np.testing.assert_array_equal(both.provenance[N:], PROVENANCE_LIFTED)
    both.validate(len(NAMES))

    other_subject = make_kinematics(2, landmarks=True)
    other_subject.identity = other_subject.identity + 1
    with pytest.raises(CaptureError, match="identity"):
        kin.concatenate(other_subject)
    with pytest.raises(CaptureError, match="landmarks2d"):
        kin.concatenate(make_kinematics(2))


def test_kinematics_npz_round_trip_and_errors(tmp_path: Path) -> None:
    kin = make_kinematics(landmarks=True)
    path = tmp_path / "kin.npz"
    kin.save_npz(path)
    loaded = Kinematics.load_npz(path)
    for name, array in kin.arrays().items():
        np.testing.assert_array_equal(getattr(loaded, name), array)

    path.write_bytes(b"not an npz at all")
    with pytest.raises(CaptureError, match=str(path)):
        Kinematics.load_npz(path)

    bad = make_kinematics()
    bad.valid = bad.valid.astype(np.uint8)
    with pytest.raises(CaptureError, match="'valid' has dtype uint8"):
        bad.save_npz(tmp_path / "bad.npz")
    assert not (tmp_path / "bad.npz").exists()


# --------------------------------------------------------------------------------------------
# Writing: atomicity, overwrite, resume


def test_interrupted_writer_leaves_no_capture(tmp_path: Path) -> None:
    out = tmp_path / "capture"
    frames, masks, shadings = make_images()
    with pytest.raises(RuntimeError), CaptureWriter(out, make_meta()) as writer:
        writer.add_frame(0, frames[0], masks[0], shadings[0])
        raise RuntimeError("render crashed")
    assert not out.exists()
    staging = tmp_path / "capture.partial"
    assert (staging / "frames" / "000000.png").is_file()
    assert_capture_error(staging, staging / "capture.json", "missing")


def test_interrupted_png_write_leaves_no_truncated_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = CaptureWriter(tmp_path / "capture", make_meta())

    def crash(image: Image.Image, fp: Path, *args, **kwargs) -> None:
        Path(fp).write_bytes(b"\x89PNG\r\n")  # half a file, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", crash)
    frames, masks, shadings = make_images(1)
    with pytest.raises(KeyboardInterrupt):
        writer.add_frame(0, frames[0], masks[0], shadings[0])
    assert list((writer.staging / "frames").iterdir()) == []
    assert not writer.has_frame(0)


def test_finalize_with_missing_frames_fails_and_installs_nothing(tmp_path: Path) -> None:
    frames, masks, shadings = make_images()
    writer = CaptureWriter(tmp_path / "capture", make_meta())
    for i in range(N - 1):
        writer.add_frame(i, frames[i], masks[i], shadings[i])
    with pytest.raises(CaptureError, match="000003.png: missing"):
        writer.finalize(make_kinematics())
    assert not (tmp_path / "capture").exists()


def test_add_frame_rejects_wrong_arrays(tmp_path: Path) -> None:
    writer = CaptureWriter(tmp_path / "capture", make_meta())
    frames, masks, shadings = make_images(1)
    with pytest.raises(CaptureError, match="masks image is float32"):
        writer.add_frame(0, frames[0], masks[0].astype(np.float32), shadings[0])
    with pytest.raises(CaptureError, match="frames image is uint8 \\(8, 16, 3\\)"):
        writer.add_frame(0, frames[0][:8], masks[0], shadings[0])


def test_writer_rejects_bad_meta_before_writing(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="'fps'"):
        CaptureWriter(tmp_path / "capture", make_meta(fps=0.0))
    assert list(tmp_path.iterdir()) == []


def test_overwrite(capture_dir: Path) -> None:
    frames, masks, shadings = make_images(offset=5)
    meta = make_meta(subject="second")
    with pytest.raises(CaptureError, match="overwrite=True \\(--force\\)"):
        write_capture(capture_dir, meta, make_kinematics(), frames, masks, shadings)
    assert Capture.load(capture_dir).meta.subject == "test-subject"

    capture = write_capture(
        capture_dir, meta, make_kinematics(), frames, masks, shadings, overwrite=True
    )
    assert Capture.load(capture_dir).meta.subject == "second"
    np.testing.assert_array_equal(capture.frames(), frames)
    assert sorted(p.name for p in capture_dir.parent.iterdir()) == ["capture"]


def test_never_replaces_a_directory_that_is_not_a_capture(tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CaptureError, match="not a capture"):
        write_capture(out, make_meta(), make_kinematics(), *make_images(), overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"

    empty = tmp_path / "empty"
    empty.mkdir()
    write_capture(empty, make_meta(), make_kinematics(), *make_images())
    validate_capture(empty)


def test_never_clears_a_foreign_partial_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "capture.partial"
    foreign.mkdir()
    (foreign / "data.bin").write_bytes(b"x")
    with pytest.raises(CaptureError, match="not made by a CaptureWriter"):
        CaptureWriter(tmp_path / "capture", make_meta())
    assert (foreign / "data.bin").exists()


def test_resume_keeps_written_frames(tmp_path: Path) -> None:
    out = tmp_path / "capture"
    frames, masks, shadings = make_images()
    with pytest.raises(RuntimeError), CaptureWriter(out, make_meta()) as writer:
        for i in range(2):
            writer.add_frame(i, frames[i], masks[i], shadings[i])
        raise RuntimeError("interrupted")

    writer = CaptureWriter(out, make_meta(), resume=True)
    assert [writer.has_frame(i) for i in range(N)] == [True, True, False, False]
    for i in range(N):
        if not writer.has_frame(i):
            writer.add_frame(i, frames[i], masks[i], shadings[i])
    capture = writer.finalize(make_kinematics(), reference_indices=[0, 3])
    assert capture.meta.reference_indices == [0, 3]
    np.testing.assert_array_equal(Capture.load(out).frames(), frames)

    # Without resume a leftover staging directory starts over.
    (out.parent / "capture.partial" / "frames").mkdir(parents=True)
    (out.parent / "capture.partial" / ".liftavatar-partial").touch()
    (out.parent / "capture.partial" / "frames" / "000000.png").write_bytes(b"old")
    fresh = CaptureWriter(out.parent / "capture", make_meta(), overwrite=True)
    assert not fresh.has_frame(0)
    assert not os.listdir(fresh.staging / "frames")


def test_resume_refuses_a_staging_directory_of_other_inputs(tmp_path: Path) -> None:
    out = tmp_path / "capture"
    frames, masks, shadings = make_images()
    made_from = {"seed": 1, "steps": 10, "prior": {"weights": "abc", "dtype": "float32"}, "poses": ("a", "b")}
    with pytest.raises(RuntimeError), CaptureWriter(out, make_meta(), fingerprint=made_from) as writer:
        writer.add_frame(0, frames[0], masks[0], shadings[0])
        raise RuntimeError("interrupted")
    staged = tmp_path / "capture.partial" / "frames" / "000000.png"
    kept = staged.read_bytes()

    other = {**made_from, "seed": 2, "prior": {"weights": "def", "dtype": "float32"}}
    with pytest.raises(CaptureError, match=r"staged from other inputs \(seed, prior\.weights differ\); "
                                           r"run without --resume to start over"):
        CaptureWriter(out, make_meta(), resume=True, fingerprint=other)
    assert staged.read_bytes() == kept, "never mixed, never cleared"
    writer = CaptureWriter(out, make_meta(), resume=True, fingerprint=dict(made_from))
    assert writer.resumed and writer.has_frame(0) and not writer.has_frame(1)

    # a staging directory that recorded nothing (an older writer's empty marker) is not resumed blindly
    (writer.staging / ".liftavatar-partial").write_text("")
    with pytest.raises(CaptureError, match="without a record of its inputs"):
        CaptureWriter(out, make_meta(), resume=True, fingerprint=made_from)
    # without --resume it starts over, and records what it is made from
    fresh = CaptureWriter(out, make_meta(), fingerprint=other)
    assert not fresh.resumed and not fresh.has_frame(0)
    assert CaptureWriter(out, make_meta(), resume=True, fingerprint=other).resumed


def test_background_writers_give_the_same_capture(tmp_path: Path, capture_dir: Path) -> None:
    frames, masks, shadings = make_images()
    with CaptureWriter(tmp_path / "threaded", make_meta(), workers=2) as writer:
        for i in range(N):
            writer.add_frame(i, frames[i], masks[i], shadings[i])
        threaded = writer.finalize(make_kinematics())
    serial = Capture.load(capture_dir)
    np.testing.assert_array_equal(threaded.frames(), serial.frames())
    np.testing.assert_array_equal(threaded.masks(), serial.masks())
    np.testing.assert_array_equal(threaded.shadings(), serial.shadings())


def test_discard_removes_the_staging_directory(tmp_path: Path) -> None:
    frames, masks, shadings = make_images()
    writer = CaptureWriter(tmp_path / "gone", make_meta(), workers=1)
    writer.add_frame(0, frames[0], masks[0], shadings[0])
    writer.discard()
    assert not (tmp_path / "gone.partial").exists() and not (tmp_path / "gone").exists()
