"""Synthetic subjects and `synth` captures: deterministic, valid, with ground truth that lines up."""

from __future__ import annotations

import numpy as np
import pytest

from liftavatar.capture import PROVENANCE_SYNTHETIC, Capture, validate_capture
from liftavatar.errors import CaptureError, ConfigError
from liftavatar.face.rig import FaceRig
from liftavatar.synth.subject import make_subject
from liftavatar.synth.world import SynthSpec, synthesize


@pytest.fixture(scope="module")
def sparse_capture(tmp_path_factory) -> Capture:
    out = tmp_path_factory.mktemp("synth") / "sparse"
    return synthesize(SynthSpec(seed=7, preset="sparse", frames=10, size=64), out, progress=False)


def test_subjects_are_deterministic_and_varied():
    a, again, b = make_subject(1), make_subject(1), make_subject(2)
    np.testing.assert_array_equal(a.texture, again.texture)
    np.testing.assert_array_equal(a.identity, again.identity)
    assert not np.allclose(a.identity, b.identity)
    assert np.abs(a.texture - b.texture).mean() > 0.02
    assert a.texture.dtype == np.float32 and 0 <= a.texture.min() and a.texture.max() <= 1
    rig = FaceRig.load()
    assert a.identity.shape == (rig.num_identity,) and np.abs(a.identity).max() <= 1


def test_synth_writes_a_valid_capture_with_ground_truth(sparse_capture):
    cap = sparse_capture
    rig = FaceRig.load()
    validate_capture(cap.path, expression_bounds=rig.expression_bounds)
    assert cap.num_frames == 10 and cap.size == (64, 64)
    k = cap.kinematics
    assert (k.provenance == PROVENANCE_SYNTHETIC).all() and k.valid.all()
    assert k.expression.shape == (10, rig.num_expressions)
    assert k.landmarks2d.shape == (10, 478, 2)
    assert cap.meta.rig == {"name": rig.name, "version": rig.version}
    assert cap.meta.creator["verb"] == "synth" and cap.meta.creator["config"]["preset"] == "sparse"
    # Ground-truth landmarks lie on the foreground mask, and the face is in the middle of the frame.
    masks = cap.masks()
    for i in range(cap.num_frames):
        x, y = np.floor(k.landmarks2d[i, :468].T).astype(int)  # pixel j covers [j, j + 1)
        assert (masks[i][y.clip(0, 63), x.clip(0, 63)] > 0).mean() > 0.98
    assert 0.15 < (masks > 128).mean() < 0.7
    shading = cap.shadings()
    assert shading[masks == 0].max() == 0, "shading maps have a black background"


def test_synth_is_reproducible(sparse_capture, tmp_path):
    again = synthesize(SynthSpec(seed=7, preset="sparse", frames=10, size=64), tmp_path / "again", progress=False)
    np.testing.assert_array_equal(again.frames(), sparse_capture.frames())
    np.testing.assert_array_equal(again.kinematics.expression, sparse_capture.kinematics.expression)


def test_kinematics_from_renders_another_subject_with_the_same_motion(sparse_capture, tmp_path):
    oracle = synthesize(SynthSpec(seed=8, size=64, kinematics_from=str(sparse_capture.path)), tmp_path / "oracle",
                        progress=False)
    src = sparse_capture.kinematics
    np.testing.assert_array_equal(oracle.kinematics.expression, src.expression)
    np.testing.assert_array_equal(oracle.kinematics.rotation, src.rotation)
    assert oracle.meta.intrinsics == sparse_capture.meta.intrinsics
    assert oracle.meta.subject != sparse_capture.meta.subject
    assert not np.array_equal(oracle.frames(), sparse_capture.frames())
    # Same kinematics, same camera: the silhouettes of the faces nearly agree (identity differs a bit).
    a, b = oracle.masks() > 128, sparse_capture.masks() > 128
    assert (a & b).sum() / (a | b).sum() > 0.8


def test_resume_keeps_written_frames(sparse_capture, tmp_path):
    from liftavatar.capture import CaptureWriter
    from liftavatar.synth.world import spec_fingerprint

    out = tmp_path / "resumed"
    spec = SynthSpec(seed=7, preset="sparse", frames=10, size=64)
    # what an interrupted run of this spec leaves
    staging = CaptureWriter(out, sparse_capture.meta, fingerprint=spec_fingerprint(spec)).staging
    for i in range(4):
        for folder, image in (("frames", sparse_capture.frame(i)), ("masks", sparse_capture.mask(i)),
                              ("shading", sparse_capture.shading(i))):
            from PIL import Image

            Image.fromarray(np.zeros_like(image)).save(staging / folder / f"{i:06d}.png")
    resumed = synthesize(spec, out, resume=True, progress=False)
    assert resumed.frame(0).max() == 0, "finished frames are not rendered again"
    np.testing.assert_array_equal(resumed.frames(range(8, 10)), sparse_capture.frames(range(8, 10)))
    np.testing.assert_allclose(resumed.kinematics.landmarks2d, sparse_capture.kinematics.landmarks2d, atol=1e-4)


def test_bad_inputs(sparse_capture, tmp_path):
    with pytest.raises(ConfigError, match="size"):
        synthesize(SynthSpec(size=63), tmp_path / "odd", progress=False)
    with pytest.raises(CaptureError):
        synthesize(SynthSpec(kinematics_from=str(tmp_path / "missing")), tmp_path / "x", progress=False)
    with pytest.raises(CaptureError, match="overwrite|force|-o"):
        synthesize(SynthSpec(seed=7, frames=2, size=64), sparse_capture.path, progress=False)


@pytest.mark.gpu
def test_cuda_renders_the_same_frames_as_cpu():
    from liftavatar.synth.kinematics import sample_kinematics
    from liftavatar.synth.world import render_subject

    rig = FaceRig.load()
    subject = make_subject(21, rig)
    k = sample_kinematics("extreme", 8, rig.expression_names, seed=21)
    args = (subject, k.expression, k.rotation, k.translation, 128)
    cpu = render_subject(*args, rig=rig, device="cpu")
    gpu = render_subject(*args, rig=rig, device="cuda")
    for a, b in ((cpu.rgb, gpu.rgb), (cpu.mask, gpu.mask), (cpu.shading, gpu.shading)):
        mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
        assert 10 * np.log10(255**2 / max(mse, 1e-12)) > 40
