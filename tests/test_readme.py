"""The README's commands run as written, top to bottom, at tiny sizes.

Every ``liftavatar`` line of the README's ``bash`` blocks runs in order in one working folder, as a user copying
them would, with options that make it tiny appended (a later option wins over an earlier one) and two inputs
the README leaves to the user (a video of your face, a folder of your photos) made here. Left out: what needs a
GPU or local Wan2.1 weights, and the benchmark and demo (their own tests run them).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from liftavatar.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"

# Appended to each verb's command: what makes it tiny (sizes, steps, frame counts), never what it does.
TINY: dict[tuple[str, ...], list[str]] = {
    ("synth",): ["--frames", "8", "--size", "64"],
    ("track",): ["--size", "64", "--max-frames", "10"],
    ("train",): ["--preset", "tiny", "--steps", "1", "--batch-size", "1", "--size", "32", "--mixed-precision", "no",
                 "--save-every", "1", "--clips-per-subject", "1"],
    ("generate",): ["--steps", "1", "--max-frames", "2"],
    ("lift",): ["--num-expressions", "1", "--steps", "1"],
    ("adapt",): ["--frames", "2", "--refs", "2", "--val-clips", "1", "--steps", "1", "--batch-size", "1"],
    ("avatar", "train"): ["--iters", "3", "--val-every", "0", "--size", "32"],
    ("eval",): ["--metrics", "psnr", "ssim"],
}
SKIP = ("--base ", "--device cuda", "liftavatar bench", "liftavatar demo")


def readme_commands() -> list[str]:
    """The ``liftavatar`` commands of the README's bash blocks, in order (continuation lines joined, comments off)."""
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("liftavatar ") and not any(s in line for s in SKIP):
                commands.append(line)
    return commands


def _tiny(argv: list[str]) -> list[str]:
    verb = tuple(argv[:2]) if argv[0] == "avatar" else (argv[0],)
    return argv + TINY.get(verb, [])


@pytest.fixture
def user_inputs(tmp_path):
    """A 12-frame video of a synthetic face and a folder of 3 photos of one (what the README calls yours)."""
    from liftavatar.synth.world import SynthSpec, synthesize
    from liftavatar.video import write_video

    take = synthesize(SynthSpec(seed=7406, preset="sparse", frames=12, size=192), tmp_path / "take", progress=False)
    write_video(tmp_path / "my_face.mp4", take.frames(), 25.0)
    photos = tmp_path / "photos_of_one_person"
    photos.mkdir()
    from PIL import Image

    for i in (0, 5, 11):
        Image.fromarray(take.frame(i)).save(photos / f"photo_{i}.jpg", quality=95)
    return tmp_path


def test_the_readme_names_the_pipeline():
    verbs = {tuple(shlex.split(c)[1:3]) if shlex.split(c)[1] == "avatar" else shlex.split(c)[1]
             for c in readme_commands()}
    for verb in ("track", "refs", "lift", "generate", "train", "eval", ("avatar", "train"), ("avatar", "render")):
        assert verb in verbs, f"the README shows no `liftavatar {verb}` command"


def test_readme_commands_run_as_written(user_inputs, monkeypatch, capsys):
    monkeypatch.chdir(user_inputs)
    for command in readme_commands():
        argv = shlex.split(command)[1:]
        code = main(_tiny(argv))
        err = capsys.readouterr().err
        assert code == 0, f"`{command}` exited {code}: {err[-2000:]}"
    assert Path("runs/me_lifted/capture.json").is_file() and Path("avatar.ply").is_file()
    assert os.path.getsize("render.mp4") > 0 and len(list(Path("runs/me_render").glob("*.png"))) == 10
    assert np.isfinite(__import__("json").loads(Path("metrics.json").read_text())["metrics"]["psnr"]["value"])
