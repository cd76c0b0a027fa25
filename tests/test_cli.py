"""The `liftavatar` command: verbs work end to end; bad input exits 2 with one clear sentence."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from liftavatar.cli import main


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "liftavatar.cli", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "cap"
    assert main(["synth", "-o", str(out), "--seed", "5", "--frames", "6", "--size", "64", "--video", "--preview"]) == 0
    return out


def test_help_lists_the_verbs():
    result = run(["--help"])
    assert result.returncode == 0
    for verb in ("synth", "validate", "demo"):
        assert verb in result.stdout


def test_synth_then_validate(synth_dir, capsys):
    assert (synth_dir / "video.mp4").stat().st_size > 0
    assert (synth_dir / "preview.png").stat().st_size > 0
    assert main(["validate", str(synth_dir)]) == 0
    assert "valid capture" in capsys.readouterr().out
    from liftavatar.video import probe_video

    assert probe_video(synth_dir / "video.mp4").size == (64, 64)


def test_validate_names_the_broken_file(synth_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(synth_dir, broken)
    (broken / "shading" / "000003.png").unlink()
    result = run(["validate", str(broken)])
    assert result.returncode == 2
    assert "shading/000003.png" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_validate_checks_the_rig_bounds(synth_dir, tmp_path):
    import shutil

    out = tmp_path / "bounds"
    shutil.copytree(synth_dir, out)
    with np.load(out / "kinematics.npz") as z:
        arrays = dict(z)
    arrays["expression"][2, 0] = 1.7  # coefficients are bounded to [0, 1]
    np.savez(out / "kinematics.npz", **arrays)
    result = run(["validate", str(out)])
    assert result.returncode == 2 and "kinematics.npz" in result.stderr


@pytest.mark.parametrize(
    "args, needle",
    [
        (["synth", "-o", "{tmp}/x", "--size", "63"], "--size"),
        (["synth", "-o", "{tmp}/x", "--frames", "0"], "--frames"),
        (["synth", "-o", "{tmp}/x", "--kinematics-from", "{tmp}/nope"], "nope"),
        (["validate", "{tmp}/nope"], "nope"),
    ],
)
def test_bad_input_exits_2(tmp_path, args, needle):
    result = run([a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_synth_refuses_to_overwrite_without_force(synth_dir):
    before = json.loads((synth_dir / "capture.json").read_text())
    result = run(["synth", "-o", str(synth_dir), "--frames", "2", "--size", "64"])
    assert result.returncode == 2 and "--force" in result.stderr
    assert json.loads((synth_dir / "capture.json").read_text()) == before


def test_demo_help_names_the_pipeline_and_the_report(capsys):
    """The demo itself is the bench protocol at demo size (tests/bench runs it end to end, --quick)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "lift" in text and "report" in text and "900001" in text
