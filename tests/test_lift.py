"""Kinematic-space completion: target choice, coverage, and `lift` end to end on a tiny prior."""

import json

import numpy as np
import pytest

from liftavatar.capture import PROVENANCE_LIFTED, Capture
from liftavatar.cli import main
from liftavatar.errors import ConfigError
from liftavatar.lift import LiftConfig, coverage, farthest_targets, lift
from liftavatar.synth.world import SynthSpec, synthesize

SIZE = 32


def test_farthest_targets_fill_the_empty_regions_first():
    observed = np.zeros((3, 2))
    library = np.array([[0.1, 0.0], [1.0, 1.0], [0.9, 1.0], [-1.0, 0.0], [0.0, 0.2]])
    picks = farthest_targets(library, observed, 2)
    assert picks.tolist() == [1, 3]  # the farthest entry, then the one farthest from it and the observed set
    with pytest.raises(ConfigError, match="only 5 entries"):
        farthest_targets(library, observed, 6)


def test_coverage_counts_queries_within_the_radius():
    frames = np.array([[0.0, 0.0], [1.0, 0.0]])
    query = np.array([[0.1, 0.0], [0.9, 0.0], [0.0, 0.9], [5.0, 5.0]])
    assert coverage(query, frames, 0.5) == 0.5
    assert coverage(query, np.zeros((0, 2)), 0.5) == 0.0


@pytest.fixture(scope="module")
def tiny_prior_and_capture(tmp_path_factory):
    from liftavatar.generator.transformer import LiftAvatarTransformer

    root = tmp_path_factory.mktemp("lift")
    LiftAvatarTransformer.from_preset("tiny", 43, in_channels=12, out_channels=12).save_pretrained(
        root / "prior", extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None}, "frames": 3, "size": SIZE})
    capture = synthesize(SynthSpec(seed=7403, preset="sparse", frames=8, size=SIZE), root / "capture", progress=False)
    return root / "prior", capture


def test_lift_appends_lifted_frames_and_raises_coverage(tmp_path, tiny_prior_and_capture):
    prior, capture = tiny_prior_and_capture
    out, report = lift(capture.path, tmp_path / "lifted", prior,
                       LiftConfig(num_expressions=2, refs=2, steps=1, poses="wide"), progress=False)
    assert out.num_frames == capture.num_frames + 2 * 3
    k = out.kinematics
    assert (k.provenance[:8] == capture.kinematics.provenance).all()
    assert (k.provenance[8:] == PROVENANCE_LIFTED).all() and k.valid.all()
    assert np.allclose(k.expression[:8], capture.kinematics.expression)
    assert report["coverage_after"] >= report["coverage_before"]
    assert np.array_equal(out.frame(3), capture.frame(3))
    assert out.mask(9).max() > 0  # masks of the rendered rig
    assert len(out.meta.reference_indices) == 2
    assert json.loads((out.path / "lift_report.json").read_text())["lifted_frames"] == 6
    # each lifted clip ends at its target: an extreme expression far from the sparse capture
    far = np.linalg.norm(k.expression[10] - capture.kinematics.expression, axis=1).min()
    assert far > 0.5
    # resuming a finished lift (the output exists) needs --force or --resume
    assert main(["lift", str(capture.path), "-o", str(tmp_path / "lifted"), "--prior", str(prior),
                 "--num-expressions", "2", "--refs", "2", "--steps", "1"]) == 2


def test_lift_cli_and_bad_inputs(tmp_path, tiny_prior_and_capture, capsys):
    prior, capture = tiny_prior_and_capture
    assert main(["lift", str(capture.path), "-o", str(tmp_path / "out"), "--prior", str(prior),
                 "--num-expressions", "1", "--refs", "2", "--steps", "1"]) == 0
    assert "coverage" in capsys.readouterr().out
    assert Capture.load(tmp_path / "out").num_frames == 11
    assert main(["lift", str(capture.path), "-o", str(tmp_path / "x"), "--prior", str(prior),
                 "--num-expressions", "1", "--refs", "20"]) == 2
    assert "more than the 8 valid" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_lift_a_capture_tracked_from_an_mp4(tmp_path):
    """The user's path: phone-style .mp4 → `track` → `lift` (a tiny random prior, one solver step)."""
    from liftavatar.face.track import TrackConfig, track
    from liftavatar.generator.transformer import LiftAvatarTransformer
    from liftavatar.synth.world import DEFAULT_FOV_DEG
    from liftavatar.video import write_video

    truth = synthesize(SynthSpec(seed=7404, preset="sparse", frames=6, size=192), tmp_path / "truth", progress=False)
    write_video(tmp_path / "clip.mp4", truth.frames(), truth.meta.fps)
    tracked, _ = track(tmp_path / "clip.mp4", tmp_path / "tracked", TrackConfig(size=64, fov=DEFAULT_FOV_DEG),
                       progress=False)
    LiftAvatarTransformer.from_preset("tiny", 43, in_channels=12, out_channels=12).save_pretrained(
        tmp_path / "prior", extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None}, "frames": 2, "size": 64})
    out, report = lift(tracked.path, tmp_path / "lifted", tmp_path / "prior",
                       LiftConfig(num_expressions=2, refs=2, steps=1), progress=False)
    assert out.num_frames == tracked.num_frames + 4
    assert (out.kinematics.provenance[-4:] == PROVENANCE_LIFTED).all()
    assert report["coverage_after"] >= report["coverage_before"]
