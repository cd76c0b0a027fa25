"""`liftavatar eval PRED GT --json`: captures, folders and videos; tracked and given kinematics;
LPIPS / FID reported as skipped when their weights are absent; bad input exits 2."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from liftavatar.capture import Capture
from liftavatar.cli import main
from liftavatar.metrics.weights import FID_ENV, LPIPS_ENV
from liftavatar.synth.world import SynthSpec, synthesize
from liftavatar.video import write_video

N = 4


@pytest.fixture(autouse=True)
def no_weights(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(LPIPS_ENV, raising=False)
    monkeypatch.delenv(FID_ENV, raising=False)
    monkeypatch.setattr("liftavatar.metrics.weights._lpips_package_heads", lambda: None)


@pytest.fixture(scope="module")
def gt(tmp_path_factory) -> Capture:
    return synthesize(SynthSpec(seed=3, preset="sparse", frames=N, size=128), tmp_path_factory.mktemp("gt") / "cap",
                      progress=False)


def write_folder(folder: Path, frames: np.ndarray) -> Path:
    folder.mkdir(parents=True)
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"{i:04d}.png")
    return folder


def run_eval(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(["eval", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_identical_frames_score_perfectly_with_the_tracker_on_both_sides(gt, tmp_path, capsys):
    pred = write_folder(tmp_path / "pred", gt.frames())
    code, out, err = run_eval([str(pred), str(gt.path), "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    m = report["metrics"]
    assert report["pred"]["kind"] == "folder" and report["gt"]["kind"] == "capture" and report["gt"]["frames"] == N
    assert m["psnr"]["value"] == 100.0 and m["psnr"]["unit"] == "dB" and len(m["psnr"]["per_frame"]) == N
    assert m["ssim"]["value"] == pytest.approx(1.0) and m["ssim_masked"]["value"] == pytest.approx(1.0)
    # The same frames tracked twice give the same kinematics.
    assert m["aed"]["frames"] == N and m["aed"]["value"] == pytest.approx(0.0, abs=1e-6)
    assert m["apd_rotation"]["value"] == pytest.approx(0.0, abs=1e-3)
    assert m["apd_translation"]["value"] == pytest.approx(0.0, abs=1e-3)
    assert m["csim"]["value"] == pytest.approx(1.0) and m["csim"]["frames"] == N
    # LPIPS and FID: weights absent -> said, not substituted.
    for name in ("lpips", "fid"):
        assert set(m[name]) == {"skipped"} and "not on this machine" in m[name]["skipped"]
    assert "LPIPS skipped" in out and "FID skipped" in out and f"wrote {tmp_path / 'r.json'}" in out


def test_a_known_error_gives_the_hand_computed_psnr(gt, tmp_path, capsys):
    frames = gt.frames().astype(int)
    pred = np.where(frames >= 8, frames - 8, frames + 8).astype(np.uint8)  # |error| = 8 levels everywhere
    folder = write_folder(tmp_path / "pred", pred)
    code, _, err = run_eval([str(folder), str(gt.path), "--metrics", "psnr", "ssim", "--json", str(tmp_path / "r.json")],
                            capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert set(m) == {"psnr", "psnr_masked", "ssim", "ssim_masked"}
    expected = 20 * math.log10(255 / 8)
    np.testing.assert_allclose(m["psnr"]["per_frame"], expected, rtol=1e-9)
    np.testing.assert_allclose(m["psnr_masked"]["per_frame"], expected, rtol=1e-9)
    assert 0.5 < m["ssim"]["value"] < 1.0


def test_given_kinematics_between_two_captures(gt, tmp_path, capsys):
    pred_dir = tmp_path / "pred"
    shutil.copytree(gt.path, pred_dir)
    with np.load(pred_dir / "kinematics.npz") as z:
        arrays = dict(z)
    k = gt.kinematics
    expression = k.expression.copy()
    expression[:, 0] = np.where(expression[:, 0] > 0.5, expression[:, 0] - 0.3, expression[:, 0] + 0.3)
    arrays["expression"] = expression
    turn = Rotation.from_rotvec([0, math.radians(5.0), 0])
    arrays["rotation"] = (turn * Rotation.from_rotvec(k.rotation)).as_rotvec().astype(np.float32)
    arrays["translation"] = k.translation + np.float32([0.003, 0.004, 0.0])
    np.savez(pred_dir / "kinematics.npz", **arrays)
    code, out, err = run_eval([str(pred_dir), str(gt.path), "--kinematics", "given", "--metrics", "aed", "apd",
                               "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    e = k.expression.shape[1]
    assert m["aed"]["value"] == pytest.approx(0.3 / e, rel=1e-5)  # one coefficient of E off by 0.3
    assert m["apd_rotation"]["value"] == pytest.approx(5.0, abs=1e-3)
    assert m["apd_translation"]["value"] == pytest.approx(5.0, abs=1e-3)  # a 3-4-5 mm shift
    assert m["aed"]["source"] == "given"


def test_a_video_prediction(gt, tmp_path, capsys):
    video = tmp_path / "pred.mp4"
    write_video(video, gt.frames(), gt.meta.fps)
    code, out, err = run_eval([str(video), str(gt.path), "--metrics", "psnr", "--no-masked"], capsys)
    assert code == 0, err
    assert "psnr_masked" not in out
    value = float(out.split("psnr")[1].split()[0])
    assert 28 < value < 60  # lossy H.264 of the same frames


@pytest.mark.parametrize(
    "make_pred, needle",
    [
        (lambda gt, tmp: write_folder(tmp / "short", gt.frames()[:2]), "has 2 frames but"),
        (lambda gt, tmp: write_folder(tmp / "small", gt.frames()[:, :64, :64]), "render or resize"),
        (lambda gt, tmp: tmp / "missing", "no such file or folder"),
        (lambda gt, tmp: (tmp / "empty").mkdir() or tmp / "empty", "holds no images"),
    ],
)
def test_bad_input_exits_2_with_one_line(gt, tmp_path, capsys, make_pred, needle):
    pred = make_pred(gt, tmp_path)
    code, _, err = run_eval([str(pred), str(gt.path), "--metrics", "psnr"], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("error:")


def test_given_kinematics_need_captures(gt, tmp_path, capsys):
    pred = write_folder(tmp_path / "pred", gt.frames())
    code, _, err = run_eval([str(pred), str(gt.path), "--kinematics", "given", "--metrics", "aed"], capsys)
    assert code == 2 and "--kinematics tracked" in err


@pytest.mark.parametrize("where", ["directory", "under a file"])
def test_an_unwritable_json_target_is_refused_before_anything_is_computed(gt, tmp_path, capsys, monkeypatch, where):
    def computed(*args, **kwargs):
        raise AssertionError("evaluated before the --json target was checked")

    import sys

    # The package's `evaluate` attribute is the function, so patch the module by its sys.modules entry.
    monkeypatch.setattr(sys.modules["liftavatar.metrics.evaluate"], "evaluate", computed)
    if where == "directory":
        target = tmp_path / "report"
        target.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "report.json"
    code, out, err = run_eval([str(gt.path), str(gt.path), "--metrics", "psnr", "--json", str(target)], capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "--json" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["report"] if where == "directory" else ["file"])
