"""`liftavatar train` and `liftavatar generate` from the command line."""

import json

from liftavatar.cli import main
from liftavatar.video import probe_video

from .conftest import SIZE


def test_train_then_generate_an_mp4(tmp_path, tiny_capture, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--preset", "tiny", "--captures", str(tiny_capture.path),
                 "--frames", "4", "--refs", "2", "--size", str(SIZE), "--pixel-factor", "2", "--steps", "3",
                 "--batch-size", "1", "--device", "cpu"]) == 0
    assert (run / "prior" / "config.json").is_file()
    config = json.loads((run / "prior" / "config.json").read_text())
    assert config["extra"]["codec"] == {"kind": "pixel", "factor": 2, "vae_path": None}
    out = tmp_path / "gen.mp4"
    assert main(["generate", "-o", str(out), "--prior", str(run / "prior"), "--refs", str(tiny_capture.path),
                 "--kinematics", str(tiny_capture.path), "--num-refs", "2", "--steps", "2"]) == 0
    assert probe_video(out).num_frames == tiny_capture.num_frames
    folder = tmp_path / "frames"
    assert main(["generate", "-o", str(folder), "--prior", str(run / "prior"), "--refs", str(tiny_capture.path),
                 "--kinematics", str(tiny_capture.path), "--num-refs", "2", "--steps", "1", "--max-frames", "3",
                 "--guidance", "2.0"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == [".liftavatar-frames", "000000.png", "000001.png",
                                                       "000002.png"]  # the marker that lets --force replace it


def test_generate_bad_inputs_exit_2(tmp_path, tiny_capture, capsys):
    common = ["--refs", str(tiny_capture.path), "--kinematics", str(tiny_capture.path)]
    assert main(["generate", "-o", str(tmp_path / "x.mp4"), "--prior", str(tmp_path / "none"), *common]) == 2
    assert "no such directory" in capsys.readouterr().err
    from liftavatar.generator.transformer import LiftAvatarTransformer

    LiftAvatarTransformer.from_preset("tiny", 43, in_channels=12, out_channels=12).save_pretrained(
        tmp_path / "prior", extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None}, "frames": 4})
    assert main(["generate", "-o", str(tmp_path / "x.mp4"), "--prior", str(tmp_path / "prior"), *common,
                 "--num-refs", "9"]) == 2
    assert "more than the 6 valid" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_generate_from_captures_of_other_sizes_writes_the_targets_size(tmp_path, tiny_capture):
    """A 32² prior, references from a 32² capture, targets from a 64² one: frames come out at 64²."""
    from PIL import Image

    from liftavatar.generator.transformer import LiftAvatarTransformer
    from liftavatar.synth.world import SynthSpec, synthesize

    LiftAvatarTransformer.from_preset("tiny", 43, in_channels=12, out_channels=12).save_pretrained(
        tmp_path / "prior", extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None}, "frames": 4, "size": SIZE})
    big = synthesize(SynthSpec(seed=7401, preset="full", frames=3, size=2 * SIZE), tmp_path / "big", progress=False)
    out = tmp_path / "frames"
    assert main(["generate", "-o", str(out), "--prior", str(tmp_path / "prior"), "--refs", str(tiny_capture.path),
                 "--kinematics", str(big.path), "--num-refs", "2", "--steps", "1"]) == 0
    frames = sorted(out.glob("*.png"))
    assert len(frames) == 3 and all(Image.open(p).size == (2 * SIZE, 2 * SIZE) for p in frames)
    # --force replaces frames an earlier `generate` wrote
    assert main(["generate", "-o", str(out), "--prior", str(tmp_path / "prior"), "--refs", str(tiny_capture.path),
                 "--kinematics", str(tiny_capture.path), "--num-refs", "2", "--steps", "1", "--max-frames", "2",
                 "--force"]) == 0
    assert [Image.open(p).size for p in sorted(out.glob("*.png"))] == [(SIZE, SIZE)] * 2
