"""The appearance cue (liftavatar.face.appearance) and its prior in the fit."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from liftavatar.errors import LiftAvatarError
from liftavatar.face import fit as fitmod
from liftavatar.face.appearance import (APPEARANCE_FILE, CROP, AppearanceModel, AppearanceNet, alignment_frame,
                                        face_crop, similarity)
from liftavatar.face.fit import FitConfig, LandmarkModel, fit_rig
from liftavatar.face.render import project
from liftavatar.face.rig import DATA, FaceRig
from liftavatar.synth.kinematics import sample_kinematics
from liftavatar.synth.world import default_intrinsics

K = default_intrinsics(256)


@pytest.fixture(scope="module")
def rig() -> FaceRig:
    return FaceRig.load()


def test_similarity_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (30, 2))
    angle, scale, shift = np.radians(20), 1.7, np.array([12.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m = similarity(src, src @ (scale * rot).T + shift)
    np.testing.assert_allclose(m[:, :2], scale * rot, atol=1e-9)
    np.testing.assert_allclose(m[:, 2], shift, atol=1e-7)


def test_crop_puts_the_alignment_landmarks_at_their_canonical_places(rig):
    """A face turned by 30° in the image, twice the crop's scale: a dot at one alignment landmark
    lands at its canonical crop position."""
    ids, canonical = alignment_frame(rig)
    assert canonical.min() > 0 and canonical.max() < CROP
    angle, scale, shift = np.radians(30), 2.0, np.array([60.0, 40.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = np.zeros((478, 2))
    landmarks[ids] = canonical @ (scale * rot).T + shift
    image = np.zeros((320, 320, 3), np.uint8)
    u, v = landmarks[ids[0]]
    image[int(v) - 2:int(v) + 3, int(u) - 2:int(u) + 3] = 255  # 5 px square centred on pixel (int u, int v)
    crop = face_crop(image, landmarks, ids, canonical)
    assert crop.shape == (CROP, CROP, 3) and crop.dtype == np.uint8
    ys, xs = np.nonzero(crop[..., 0] > 60)
    centre = np.array([xs.mean() + 0.5, ys.mean() + 0.5])  # corner-origin pixel centres
    expected = (np.array([int(u) + 0.5, int(v) + 0.5]) - shift) @ rot / scale
    np.testing.assert_allclose(centre, expected, atol=0.5)


def test_packaged_weights_load_and_predict(rig):
    assert (DATA / APPEARANCE_FILE).is_file(), "the appearance weights ship with the package"
    model = AppearanceModel.default(rig)
    assert model is not None and model.expression_names == list(rig.expression_names)
    assert (DATA / APPEARANCE_FILE).stat().st_size < 5e6
    assert model.precision.shape == (rig.num_expressions,) and (model.precision > 0).all()
    side = model.crop_size
    crops = np.random.default_rng(0).integers(0, 256, (3, side, side, 3), dtype=np.uint8)
    out = model.predict(crops, batch_size=2)
    assert out.shape == (3, rig.num_expressions) and out.dtype == np.float32
    assert ((out >= 0) & (out <= 1)).all()
    assert model.predict(crops[:0]).shape == (0, rig.num_expressions)
    with pytest.raises(LiftAvatarError, match="must be shaped"):
        model.predict(crops[:, :50])


def test_save_and_load_round_trip(rig, tmp_path):
    torch.manual_seed(0)
    ids, canonical = alignment_frame(rig)
    net = AppearanceNet(rig.num_expressions, width=8).eval()
    model = AppearanceModel(net, list(rig.expression_names), ids, canonical, np.linspace(1, 2, rig.num_expressions))
    model.save(tmp_path / "a.safetensors")
    loaded = AppearanceModel.load(tmp_path / "a.safetensors")
    crops = np.random.default_rng(1).integers(0, 256, (2, CROP, CROP, 3), dtype=np.uint8)
    np.testing.assert_allclose(loaded.predict(crops), model.predict(crops), atol=1e-6)
    np.testing.assert_allclose(loaded.precision, model.precision, rtol=1e-6)
    assert (loaded.align_ids == ids).all() and loaded.expression_names == model.expression_names
    with pytest.raises(LiftAvatarError, match="no appearance weights"):
        AppearanceModel.load(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------------------------
# The prior term in the fit
# --------------------------------------------------------------------------------------------


def _neutral_clip(rig, frames=6):
    kin = sample_kinematics("sparse", frames, rig.expression_names, seed=7502)
    kin.expression[:] = 0.0
    verts = rig.vertices(np.zeros(rig.num_identity, np.float32), kin.expression, kin.rotation, kin.translation)
    return kin, project(verts, K)[:, : rig.num_landmarks, :2].numpy()


def test_prior_pulls_a_coefficient_toward_the_estimate(rig):
    """Landmarks of a neutral face; an appearance estimate says eyeWideLeft = 0.6. Without the prior the
    fit says 0; the pull grows with the prior's weight, and a weight of zero changes nothing."""
    kin, landmarks = _neutral_clip(rig)
    e = rig.expression_index("eyeWideLeft")
    mean = np.zeros((len(kin), rig.num_expressions), np.float32)
    mean[:, e] = 0.6
    config = FitConfig.for_projected_landmarks(1.0)
    model = LandmarkModel.from_rig(rig)
    fitted = {}
    for w in (0.0, 50.0, 1e5):
        weight = np.zeros(rig.num_expressions)
        weight[e] = w
        result = fit_rig(landmarks, np.ones(len(kin), bool), K, rig, config, landmark_model=model,
                         prior_mean=mean, prior_weight=weight)
        fitted[w] = float(result.expression[:, e].mean())
        if w == 0.0:
            assert np.abs(result.expression).max() < 0.05, "the landmarks alone say neutral"
    plain = fit_rig(landmarks, np.ones(len(kin), bool), K, rig, config, landmark_model=model)
    assert fitted[0.0] == pytest.approx(float(plain.expression[:, e].mean()), abs=1e-3) and fitted[0.0] < 0.05
    assert fitted[0.0] < fitted[50.0] < fitted[1e5]
    assert fitted[1e5] == pytest.approx(0.6, abs=0.02)
    # FitConfig.appearance_weight = 0 switches the prior off.
    off = fit_rig(landmarks, np.ones(len(kin), bool), K, rig, dataclasses.replace(config, appearance_weight=0.0),
                  landmark_model=model, prior_mean=mean, prior_weight=np.full(rig.num_expressions, 1e5))
    assert off.expression[:, e].mean() < 0.05


def test_prior_shapes_are_checked(rig):
    kin, landmarks = _neutral_clip(rig, frames=2)
    valid = np.ones(2, bool)
    with pytest.raises(LiftAvatarError, match="prior_mean"):
        fit_rig(landmarks, valid, K, rig, prior_mean=np.zeros((3, rig.num_expressions)),
                prior_weight=np.ones(rig.num_expressions))
    with pytest.raises(LiftAvatarError, match="prior_mean"):
        fit_rig(landmarks, valid, K, rig, prior_mean=np.zeros((2, rig.num_expressions)))
    with pytest.raises(LiftAvatarError, match="prior_weight"):
        fit_rig(landmarks, valid, K, rig, prior_mean=np.zeros((2, rig.num_expressions)),
                prior_weight=np.full(rig.num_expressions, -1.0))
    # Per-frame weights (N, E) and a frame without an estimate (NaN row) are accepted.
    mean = np.zeros((2, rig.num_expressions))
    mean[1] = np.nan
    result = fit_rig(landmarks, valid, K, rig, prior_mean=mean, prior_weight=np.ones((2, rig.num_expressions)))
    assert np.isfinite(result.expression).all()


def test_prior_gradient_matches_autograd(rig):
    """The prior's gradient in the normal equations equals the derivative of its energy."""
    n = rig.num_landmarks
    kin, landmarks = _neutral_clip(rig, frames=3)
    rng = np.random.default_rng(3)
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    config = FitConfig(expression_l1=0.0, expression_l2=0.0, identity_prior=0.0)
    mean = rng.uniform(0, 1, (3, rig.num_expressions))
    weight = rng.uniform(0, 100, (3, rig.num_expressions))
    kwargs = dict(observed=f32(landmarks), weight=f32(np.zeros(n)), template=f32(rig.template[:n]),
                  shape_basis=f32(np.concatenate([rig.expression_basis[:, :n], rig.identity_basis[:, :n]])),
                  normals=f32(fitmod.template_normals(rig)), k=f32(K), scale=1.0, gap=np.ones(2),
                  num_expressions=rig.num_expressions, config=config)
    problem = fitmod._Problem(**kwargs, prior_mean=mean, prior_weight=weight)
    psi = rng.uniform(0, 1, (3, rig.num_expressions))
    frame = np.concatenate([kin.rotation, kin.translation, psi], 1)
    state = fitmod._State(identity=torch.zeros(rig.num_identity), frame=f32(frame))
    vis = torch.ones(3, n)
    h_ff, _, _, g_f, _ = fitmod._normal_equations(problem, state, vis)
    psi32 = frame[:, 6:].astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(g_f[:, 6:], weight * (psi32 - mean), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.diagonal(h_ff[:, 6:, 6:], axis1=1, axis2=2), weight, rtol=1e-6)
    # The energy includes ½ w (ψ − μ)².
    plain = fitmod._Problem(**kwargs)
    diff = fitmod._energy(problem, state, vis) - fitmod._energy(plain, state, vis)
    assert diff == pytest.approx(0.5 * (weight * (psi32 - mean) ** 2).sum(), rel=1e-6)


def test_tracker_estimates_each_found_face(rig, tmp_path):
    """detect_landmarks crops and reads every frame with a face (batched); frames without one get NaN."""
    import skimage.data
    from PIL import Image

    from liftavatar.face.track import TrackConfig, TrackReport, detect_landmarks

    face = skimage.data.astronaut()
    for i, image in enumerate([face, np.zeros_like(face), face[:, ::-1]]):
        Image.fromarray(np.ascontiguousarray(image)).save(tmp_path / f"{i:03d}.png")
    model = AppearanceModel.default(rig)
    report = TrackReport()
    state = detect_landmarks(tmp_path, TrackConfig(), report, None, False, model, batch_size=2)
    assert state.valid.tolist() == [True, False, True]
    assert state.appearance.shape == (3, rig.num_expressions)
    assert np.isfinite(state.appearance[[0, 2]]).all() and np.isnan(state.appearance[1]).all()
    crop = model.crop(face, state.landmarks[0])
    np.testing.assert_allclose(state.appearance[0], model.predict(crop[None])[0], atol=1e-5)
    assert report.seconds["appearance"] > 0
    plain = detect_landmarks(tmp_path, TrackConfig(), TrackReport(), None, False, None)
    assert plain.appearance is None
