"""`liftavatar avatar train | render | export` end to end, and bad input: exit 2, one sentence."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np

from liftavatar.cli import main
from tests.avatar.conftest import with_one_expression_fewer


def test_train_render_export(capture, tmp_path, capsys):
    out = tmp_path / "avatar"
    assert main(["avatar", "train", str(capture), "-o", str(out), "--iters", "4", "--size", "32",
                 "--val-every", "2"]) == 0
    assert "trained 4 iterations" in capsys.readouterr().out
    assert (out / "avatar.safetensors").is_file() and (out / "val" / "step_000004.png").is_file()
    assert json.loads((out / "avatar.json").read_text())["size"] == [32, 32]
    # Training again into the same folder needs --force or --resume.
    assert main(["avatar", "train", str(capture), "-o", str(out), "--iters", "4"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["avatar", "train", str(capture), "-o", str(out), "--iters", "6", "--size", "32", "--resume"]) == 0
    assert json.loads((out / "avatar.json").read_text())["step"] == 6

    assert main(["avatar", "render", str(out), "--kinematics", str(capture), "-o", str(tmp_path / "frames"),
                 "--size", "48"]) == 0
    from PIL import Image

    pngs = sorted((tmp_path / "frames").glob("*.png"))
    assert len(pngs) == 12 and Image.open(pngs[0]).size == (48, 48)
    assert np.asarray(Image.open(pngs[0])).max() > 50  # something was drawn
    assert main(["avatar", "render", str(out), "--kinematics", str(capture), "-o", str(tmp_path / "v.mp4")]) == 0
    from liftavatar.video import probe_video

    assert probe_video(tmp_path / "v.mp4").size == (64, 64)
    assert main(["avatar", "export", str(out), "-o", str(tmp_path / "a.ply")]) == 0
    assert (tmp_path / "a.ply").stat().st_size > 1000


def test_avatar_train_uses_the_library_defaults(capture, tmp_path):
    """`avatar train` trains with the benchmarked recipe unless told otherwise (--lifted-weight, --observed-finish,
    --observed-share), the same numbers TrainConfig holds."""
    from dataclasses import asdict

    from liftavatar.avatar.train import TrainConfig

    keys = ("lifted_weight", "observed_finish", "observed_share")
    assert main(["avatar", "train", str(capture), "-o", str(tmp_path / "a"), "--iters", "1", "--size", "32",
                 "--val-every", "1"]) == 0
    stored = json.loads((tmp_path / "a" / "train_state.json").read_text())["config"]
    assert {k: stored[k] for k in keys} == {k: v for k, v in asdict(TrainConfig()).items() if k in keys}
    assert main(["avatar", "train", str(capture), "-o", str(tmp_path / "b"), "--iters", "1", "--size", "32",
                 "--val-every", "1", "--lifted-weight", "1", "--observed-finish", "0", "--observed-share", "0"]) == 0
    stored = json.loads((tmp_path / "b" / "train_state.json").read_text())["config"]
    assert [stored[k] for k in keys] == [1.0, 0.0, 0.0]


def _one_line_exit_2(args: list[str], needle: str, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("error: "), err


def test_missing_checkpoint(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _one_line_exit_2(["avatar", "export", str(tmp_path / "empty"), "-o", str(tmp_path / "a.ply")],
                     "avatar.safetensors: missing", capsys)
    _one_line_exit_2(["avatar", "render", str(tmp_path / "nope"), "--kinematics", str(tmp_path), "-o",
                      str(tmp_path / "f")], "no such avatar directory", capsys)
    assert not (tmp_path / "a.ply").exists()


def test_mixed_subjects_and_no_valid_frames(capture, other_subject, tmp_path, capsys):
    _one_line_exit_2(["avatar", "train", str(capture), str(other_subject), "-o", str(tmp_path / "x")],
                     "train one avatar per subject", capsys)
    invalid = tmp_path / "invalid"
    shutil.copytree(other_subject, invalid)
    with np.load(invalid / "kinematics.npz") as z:
        arrays = dict(z)
    arrays["valid"][:] = False
    np.savez(invalid / "kinematics.npz", **arrays)
    _one_line_exit_2(["avatar", "train", str(invalid), "-o", str(tmp_path / "x")], "has no valid frames", capsys)
    assert not (tmp_path / "x").exists()


def test_kinematics_with_another_expression_count(trained, other_subject, tmp_path, capsys):
    fewer = with_one_expression_fewer(other_subject, tmp_path / "fewer")
    _one_line_exit_2(["avatar", "render", str(trained), "--kinematics", str(fewer), "-o", str(tmp_path / "f")],
                     "expression coefficients", capsys)
    assert not (tmp_path / "f").exists()


def test_the_console_script_reports_bad_input_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "liftavatar.cli", "avatar", "export", str(tmp_path), "-o",
                             str(tmp_path / "a.ply")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr and str(tmp_path) in result.stderr


def test_an_interrupted_training_is_not_taken_for_a_finished_avatar(capture, tmp_path, capsys, monkeypatch):
    import liftavatar.avatar.train as train_module

    out = tmp_path / "avatar"
    calls = []
    real_ssim = train_module.ssim

    def ctrl_c_in_the_third_iteration(a, b):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_ssim(a, b)

    with monkeypatch.context() as m:
        m.setattr(train_module, "ssim", ctrl_c_in_the_third_iteration)
        assert main(["avatar", "train", str(capture), "-o", str(out), "--iters", "6", "--size", "32",
                     "--val-every", "0"]) == 130
    summary = json.loads((out / "avatar.json").read_text())
    assert (summary["step"], summary["iters"], summary["finished"]) == (2, 6, False)
    capsys.readouterr()
    _one_line_exit_2(["avatar", "export", str(out), "-o", str(tmp_path / "a.ply")], "trained 2 of 6 iterations",
                     capsys)
    _one_line_exit_2(["avatar", "render", str(out), "--kinematics", str(capture), "-o", str(tmp_path / "f")],
                     f"liftavatar avatar train {capture} -o {out} --resume", capsys)
    assert not (tmp_path / "a.ply").exists() and not (tmp_path / "f").exists()
    # Asked for explicitly, the unfinished avatar is used, with a note.
    assert main(["avatar", "export", str(out), "-o", str(tmp_path / "a.ply"), "--allow-unfinished"]) == 0
    assert "unfinished" in capsys.readouterr().err and (tmp_path / "a.ply").is_file()
    # Resumed to the end, it is finished.
    assert main(["avatar", "train", str(capture), "-o", str(out), "--iters", "6", "--resume"]) == 0
    assert json.loads((out / "avatar.json").read_text())["finished"] is True
    assert main(["avatar", "export", str(out), "-o", str(tmp_path / "b.ply")]) == 0
