"""liftavatar.io: atomic writes leave the old file or the new one, never a part; the 8-bit conversion."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from liftavatar.io import atomic_write, json_safe, save_npz, save_png, to_uint8, write_json


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "report.json"
    write_json(path, {"a": 1})

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"], "no temporary file left behind"


def test_temporary_names_never_look_like_the_output(tmp_path):
    seen = []
    atomic_write(tmp_path / "000001.png", lambda tmp: seen.append(tmp.name) or tmp.write_bytes(b"x"))
    assert seen[0].startswith(".") and not seen[0].endswith(".png")
    save_npz(tmp_path / "a.npz", x=np.arange(3))  # np.savez needs the .npz suffix kept on the temporary name
    with np.load(tmp_path / "a.npz") as data:
        assert data["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000001.png", "a.npz"]


def test_to_uint8_rounds_half_up_and_clamps_for_arrays_and_tensors():
    values = np.array([-0.5, 0.0, 0.5 / 255, 0.499 / 255, 0.5, 1.0, 2.0], np.float32)
    expected = np.array([0, 0, 1, 0, 128, 255, 255], np.uint8)
    assert to_uint8(values).tolist() == expected.tolist()
    assert to_uint8(torch.from_numpy(values)).tolist() == expected.tolist()
    # The same bytes as the formula the renderers used before this module existed.
    x = torch.rand(4, 9, 9, 3)
    before = x.clone()
    assert np.array_equal(to_uint8(x), (x.clamp(0, 1) * 255 + 0.5).to(torch.uint8).numpy())
    assert torch.equal(x, before), "the input is left as it was"
    assert to_uint8(torch.tensor([0, 1, 3])).tolist() == [0, 255, 255]  # integer tensors too


def test_json_safe_makes_json_of_numpy_paths_and_non_finite_floats(tmp_path):
    data = {"t": (1, 2), "p": tmp_path, "f": np.float32(0.5), "i": np.int64(3), "b": np.bool_(True),
            "a": np.arange(2), "nan": math.nan, "_private": 1}
    assert json_safe(data) == {"t": [1, 2], "p": str(tmp_path), "f": 0.5, "i": 3, "b": True, "a": [0, 1],
                               "nan": None}
    write_json(tmp_path / "x.json", data)  # allow_nan=False would raise on a NaN that slipped through
    assert json.loads((tmp_path / "x.json").read_text())["nan"] is None


def test_save_png_round_trips(tmp_path):
    from PIL import Image

    image = (np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5)
    save_png(image, tmp_path / "x.png")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png")), image)
