"""Kinematic-space completion: target choice, coverage, and `lift` end to end on a tiny prior."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from liftavatar.capture import PROVENANCE_LIFTED, Capture, Kinematics
from liftavatar.cli import main
from liftavatar.errors import CaptureError, ConfigError
from liftavatar.lift import LiftConfig, lift
from liftavatar.targets import coverage, farthest_targets
from liftavatar.synth.world import SynthSpec, synthesize

from .conftest import tiny_prior

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
    root = tmp_path_factory.mktemp("lift")
    tiny_prior(root / "prior")
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
    assert out.size == tracked.size and report["generated_size"] == 64
    # Lifted frames of a tracked capture get the tracked frames' mask rule: the person segmented from the
    # generated picture, within the head region of the frame's kinematics (not the rig's silhouette).
    from liftavatar.face.control import render_controls
    from liftavatar.face.masks import SelfieSegmenter, head_masks, head_region
    from liftavatar.face.rig import FaceRig

    rig, k, n0 = FaceRig.load(), out.kinematics, tracked.num_frames
    lifted = list(range(n0, out.num_frames))
    region = head_region(k.identity, k.expression[lifted], k.rotation[lifted], k.translation[lifted],
                         out.meta.intrinsics, out.size, rig)
    with SelfieSegmenter() as segment:
        expected = head_masks(np.stack([segment(f) for f in out.frames(lifted)]), region)
    assert np.array_equal(out.masks(lifted), expected)
    verts = rig.vertices(k.identity, k.expression[lifted], k.rotation[lifted], k.translation[lifted])
    assert not np.array_equal(out.masks(lifted), render_controls(verts, out.meta.intrinsics, out.size, rig).mask)


def test_coverage_rises_where_targets_are_added_and_only_there(tmp_path, tiny_prior_and_capture):
    """Coverage counts held-out library entries near some frame: lifting toward an expression the capture lacks
    must raise it strictly; lifting a capture whose library is its own frames can add nothing new and must leave it
    unchanged."""
    from liftavatar.face.rig import FaceRig
    from liftavatar.synth.kinematics import expression_keyframes

    prior, capture = tiny_prior_and_capture
    config = LiftConfig(num_expressions=2, refs=2, steps=1, poses="observed")
    k = capture.kinematics
    extreme = expression_keyframes("extreme", 50, FaceRig.load().expression_names, seed=3)
    far = extreme[np.argmax(np.linalg.norm(extreme[:, None] - k.expression[None], axis=-1).min(1))]
    assert np.linalg.norm(far - k.expression, axis=1).min() > config.coverage_radius
    # A library capture of the same subject whose every frame shows that expression (held out: every 5th entry).
    library = tmp_path / "library"
    shutil.copytree(capture.path, library)
    Kinematics(np.repeat(far[None], capture.num_frames, 0).astype(np.float32), k.rotation, k.translation, k.valid,
               k.provenance, k.identity, k.landmarks2d).save_npz(library / "kinematics.npz")
    _, toward = lift(capture.path, tmp_path / "toward", prior, config, expressions_from=library, progress=False)
    assert toward["coverage"]["before"]["expression"] == 0.0 and toward["coverage"]["after"]["expression"] == 1.0
    assert toward["coverage_after"] > toward["coverage_before"]
    _, own = lift(capture.path, tmp_path / "own", prior, config, expressions_from=capture.path, progress=False)
    assert own["coverage_after"] == own["coverage_before"] == 1.0


def test_lift_targets_reach_their_library_poses(tmp_path, tiny_prior_and_capture):
    """With the default joint library, each lifted clip ends at its target's expression and its pose: the
    capture's typical pose turned by the entry's relative rotation, well beyond what the sparse capture shows."""
    from scipy.spatial.transform import Rotation

    from liftavatar.targets import relative_rotations, typical_rotation

    prior, capture = tiny_prior_and_capture
    out, report = lift(capture.path, tmp_path / "lifted", prior, LiftConfig(num_expressions=3, refs=2, steps=1),
                       progress=False)
    assert report["library"].startswith("tracked train/ clips") and report["poses"] == "library"
    k, n0 = out.kinematics, capture.num_frames
    typical = typical_rotation(capture.kinematics.rotation)
    observed = np.degrees(np.linalg.norm(relative_rotations(capture.kinematics.rotation, typical), axis=1)).max()
    ends = [n0 + 3 * c + 2 for c in range(3)]
    turned = np.degrees(np.linalg.norm(relative_rotations(k.rotation[ends], typical), axis=1))
    assert turned.max() > observed + 5  # picked jointly: the farthest targets include wider poses
    start = Rotation.from_rotvec(k.rotation[n0])
    assert Rotation.from_rotvec(k.rotation[n0 + 1]).inv() * start != start  # the clip turns on its way
    assert set(report["coverage"]["after"]) == {"expression", "pose", "joint"}


def test_lift_a_capture_larger_than_the_prior_keeps_its_size(tmp_path, tiny_prior_and_capture):
    """A 64² capture and a 32² prior: the prior generates at 32², the lifted capture is 64² throughout."""
    from liftavatar.face.control import render_controls
    from liftavatar.face.rig import FaceRig

    prior, _ = tiny_prior_and_capture
    big = synthesize(SynthSpec(seed=7403, preset="sparse", frames=6, size=2 * SIZE), tmp_path / "big", progress=False)
    out, report = lift(big.path, tmp_path / "lifted", prior, LiftConfig(num_expressions=2, refs=2, steps=1),
                       progress=False)
    n0 = big.num_frames
    assert out.size == (2 * SIZE, 2 * SIZE) and out.num_frames == n0 + 6 and report["generated_size"] == SIZE
    for read in ("frames", "masks", "shadings"):  # the observed frames are copied unchanged
        np.testing.assert_array_equal(getattr(out, read)(range(n0)), getattr(big, read)())
    assert out.frames(range(n0, n0 + 6)).shape == (6, 2 * SIZE, 2 * SIZE, 3)
    # the lifted shading maps and masks are rendered at the capture's size, not enlarged from the prior's
    rig, k = FaceRig.load(), out.kinematics
    rows = slice(n0, n0 + 6)
    maps = render_controls(rig.vertices(k.identity, k.expression[rows], k.rotation[rows], k.translation[rows]),
                           out.meta.intrinsics, out.size, rig)
    np.testing.assert_array_equal(out.shadings(range(n0, n0 + 6)), maps.shading)
    np.testing.assert_array_equal(out.masks(range(n0, n0 + 6)), maps.mask)


def test_lift_resume_continues_only_the_run_it_was_started_as(tmp_path, tiny_prior_and_capture, monkeypatch):
    import liftavatar.face.control as control

    prior, capture = tiny_prior_and_capture
    out, config, n0 = tmp_path / "lifted", LiftConfig(num_expressions=3, refs=2, steps=1), capture.num_frames
    real, calls = control.render_controls, []

    def render(*args, interrupt_at=None, **kw):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(control, "render_controls", lambda *a, **kw: render(*a, interrupt_at=2, **kw))
    with pytest.raises(KeyboardInterrupt):  # interrupted while rendering the second clip's shading maps
        lift(capture.path, out, prior, config, progress=False)
    first = out.with_name("lifted.partial") / "frames" / f"{n0:06d}.png"
    kept = first.read_bytes()
    monkeypatch.setattr(control, "render_controls", render)

    # (the seed also draws the library's widened poses, so the library differs with it)
    for kw, what in ((dict(config=replace(config, seed=1)), r"seed, library_contents differ"),
                     (dict(config=replace(config, library="rig")), r"library, library_contents differ"),
                     (dict(prior=tiny_prior(tmp_path / "other_prior", seed=1)), r"prior differs")):
        with pytest.raises(CaptureError, match=rf"other inputs \({what}\).*without --resume"):
            lift(capture.path, out, **{"prior": prior, "config": config, **kw}, resume=True, progress=False)
        assert first.read_bytes() == kept and not out.exists()

    calls.clear()
    lifted, _ = lift(capture.path, out, prior, config, resume=True, progress=False)
    assert len(calls) == 2, "only the two clips not written yet are rendered and generated"
    assert (lifted.path / "frames" / first.name).read_bytes() == kept
    assert lifted.num_frames == n0 + 9


def test_lift_loads_a_lora_prior_from_a_moved_base_with_base_and_dtype(tmp_path, tiny_prior_and_capture, capsys):
    """`lift` takes what `generate` takes to load a prior: --base (a LoRA prior's Wan weights), --vae, --dtype."""
    from diffusers import WanTransformer3DModel

    from liftavatar.generator.transformer import BASE_PRESETS, LiftAvatarTransformer

    _, capture = tiny_prior_and_capture
    WanTransformer3DModel(**{**BASE_PRESETS["tiny"], "in_channels": 12, "out_channels": 12}).save_pretrained(
        tmp_path / "base")
    model = LiftAvatarTransformer.from_base(tmp_path / "base", 43)
    model.add_lora(rank=4)
    model.save_pretrained(tmp_path / "lora", extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None},
                                                    "frames": 3, "size": SIZE})
    (tmp_path / "base").rename(tmp_path / "moved")
    argv = ["lift", str(capture.path), "-o", str(tmp_path / "out"), "--prior", str(tmp_path / "lora"),
            "--num-expressions", "1", "--refs", "2", "--steps", "1"]
    assert main(argv) == 2 and "--base PATH" in capsys.readouterr().err
    assert main([*argv, "--base", str(tmp_path / "moved"), "--dtype", "bfloat16"]) == 0
    assert Capture.load(tmp_path / "out").num_frames == capture.num_frames + 3
