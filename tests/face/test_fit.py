"""Rig fitting (liftavatar.face.fit): exact and noisy projected landmarks, real MediaPipe detections
on rendered clips, bounds, invalid frames, temporal smoothing, the hand-written derivatives and
the landmark-model calibration."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from liftavatar.errors import LiftAvatarError
from liftavatar.face import fit as fitmod
from liftavatar.face.fit import (FitConfig, LandmarkModel, calibrate_landmark_model, fit_rig, mirrored_expressions,
                                 symmetrise_landmark_model)
from liftavatar.face.render import project
from liftavatar.face.rig import FaceRig
from liftavatar.synth.kinematics import KinematicsSequence, sample_kinematics
from liftavatar.synth.world import default_intrinsics

SIZE = 256
K = default_intrinsics(SIZE)


@pytest.fixture(scope="module")
def rig() -> FaceRig:
    return FaceRig.load()


@pytest.fixture(scope="module")
def exact_model(rig) -> LandmarkModel:
    return LandmarkModel.from_rig(rig)


def rotation_error_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Geodesic angle (degrees) between axis-angle rotations a and b, per row."""
    return np.degrees((Rotation.from_rotvec(a).inv() * Rotation.from_rotvec(b)).magnitude())


def synthetic_identity(seed: int, rig: FaceRig) -> np.ndarray:
    """An identity drawn like the synthetic world's subjects (normal, σ = 0.45, clipped)."""
    return np.clip(np.random.default_rng(seed).normal(0.0, 0.45, rig.num_identity), -1, 1).astype(np.float32)


def projected_landmarks(rig: FaceRig, identity, kin: KinematicsSequence) -> np.ndarray:
    """(N, 478, 2) pixels: the rig's landmark vertices projected with the default 256² camera."""
    verts = rig.vertices(identity, kin.expression, kin.rotation, kin.translation)
    return project(verts, K)[:, : rig.num_landmarks, :2].numpy()


def clip(rig: FaceRig, preset: str, seed: int, frames: int = 30):
    identity = synthetic_identity(seed, rig)
    kin = sample_kinematics(preset, frames, rig.expression_names, seed=seed)
    return identity, kin, projected_landmarks(rig, identity, kin)


# --------------------------------------------------------------------------------------------
# Projected landmarks: exact and with Gaussian noise
# --------------------------------------------------------------------------------------------


def test_surface_reprojection_of_known_kinematics(rig, exact_model):
    """The residual a capture's kinematics and detections give: zero for the rig's own projected landmarks, the
    shift for landmarks moved by a known offset (3, 4) px, and the fit's own residual for the fit's kinematics."""
    identity, kin, landmarks = clip(rig, "sparse", 7502, frames=6)
    args = (kin.expression, identity, kin.rotation, kin.translation)
    exact = fitmod.surface_reprojection_px(exact_model, *args, landmarks, K)
    assert exact.shape == (6,) and exact.max() < 1e-3
    shifted = fitmod.surface_reprojection_px(exact_model, *args, landmarks + np.array([3.0, 4.0]), K)
    np.testing.assert_allclose(shifted, 5.0, atol=1e-3)
    noisy = landmarks + np.random.default_rng(0).normal(0, 1.0, landmarks.shape)
    result = fit_rig(noisy, np.ones(len(kin), bool), K, rig, FitConfig.for_projected_landmarks(1.0),
                     landmark_model=exact_model)
    again = fitmod.surface_reprojection_px(exact_model, result.expression, result.identity, result.rotation,
                                           result.translation, noisy, K)
    np.testing.assert_allclose(again, result.reprojection_px, atol=0.05)


@pytest.mark.parametrize("preset,seed", [("sparse", 7500), ("extreme", 7501)])
def test_exact_landmarks_recover_the_truth(rig, exact_model, preset, seed):
    identity, kin, landmarks = clip(rig, preset, seed)
    result = fit_rig(landmarks, np.ones(len(kin), bool), K, rig, FitConfig.for_projected_landmarks(0.0),
                     landmark_model=exact_model)
    mae = np.abs(result.expression - kin.expression).mean()
    rot = np.median(rotation_error_deg(result.rotation, kin.rotation))
    assert mae < 0.03, f"expression MAE {mae:.4f}"
    assert rot < 0.5, f"rotation median error {rot:.3f}°"
    assert np.abs(result.identity - identity).mean() < 0.06
    assert np.abs(result.translation - kin.translation).max() < 0.01  # metres
    assert np.nanmedian(result.reprojection_px) < 0.3


def test_gaussian_noise(rig, exact_model):
    """σ = 1.5 px on every landmark, 3 clips per preset, pooled: measured MAE ≈ 0.038, rotation ≈ 0.3°."""
    errors, rotations = [], []
    rng = np.random.default_rng(7)
    for preset in ("sparse", "extreme"):
        for seed in (7500, 7501, 7502):
            identity, kin, landmarks = clip(rig, preset, seed)
            noisy = landmarks + rng.normal(0.0, 1.5, landmarks.shape).astype(np.float32)
            result = fit_rig(noisy, np.ones(len(kin), bool), K, rig, FitConfig.for_projected_landmarks(1.5),
                             landmark_model=exact_model)
            errors.append(np.abs(result.expression - kin.expression))
            rotations.append(rotation_error_deg(result.rotation, kin.rotation))
    mae = np.concatenate(errors).mean()
    rot = np.median(np.concatenate(rotations))
    assert mae < 0.06, f"expression MAE {mae:.4f}"
    assert rot < 1.5, f"rotation median error {rot:.3f}°"


# --------------------------------------------------------------------------------------------
# Real MediaPipe detections on rendered clips
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mediapipe_clips(rig):
    """2 subjects × 12 frames per preset, rendered at 256² and run through FaceMesh."""
    from liftavatar.face.landmarks import FaceMeshDetector
    from liftavatar.synth.subject import make_subject
    from liftavatar.synth.world import render_sequence

    clips = {}
    with FaceMeshDetector(static_images=True) as detector:
        for preset in ("sparse", "extreme"):
            for seed in (7400, 7401):
                subject = make_subject(seed, rig)
                kin = sample_kinematics(preset, 12, rig.expression_names, seed=seed)
                found = np.full((len(kin), rig.num_landmarks, 2), np.nan, np.float32)
                for start, batch in render_sequence(subject, kin, SIZE, rig=rig, batch_size=12):
                    for i, rgb in enumerate(batch.rgb):
                        points = detector.detect(rgb)
                        if points is not None:
                            found[start + i] = points
                clips[preset, seed] = (kin, found)
    return clips


def mediapipe_scores(rig, clips, preset, model):
    errors, rotations = [], []
    for (p, _), (kin, found) in clips.items():
        if p != preset:
            continue
        valid = np.isfinite(found).all(axis=(1, 2))
        assert valid.mean() > 0.9
        result = fit_rig(found, valid, K, rig, landmark_model=model)
        assert np.isfinite(result.expression).all() and np.isfinite(result.rotation).all()
        errors.append(np.abs(result.expression - kin.expression)[valid])
        rotations.append(rotation_error_deg(result.rotation, kin.rotation)[valid])
    return np.concatenate(errors).mean(), float(np.median(np.concatenate(rotations)))


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["sparse", "extreme"])
def test_mediapipe_detections_with_the_rig_landmarks(rig, exact_model, mediapipe_clips, preset):
    """The rig's own landmark vertices (no calibration). Measured on these clips: sparse MAE 0.020,
    rotation 3.8°; extreme MAE 0.050, rotation 3.5°: MediaPipe's nose bridge, chin and forehead
    sit off the rig's vertices, which tilts the fitted pitch. The issue's bounds (≤ 0.10, ≤ 3°)
    need the calibrated landmark model (next test; with it: sparse 0.022 / 1.7°, extreme
    0.059 / 2.7°)."""
    mae, rot = mediapipe_scores(rig, mediapipe_clips, preset, exact_model)
    assert mae <= 0.12, f"expression MAE {mae:.4f}"
    assert rot <= 7.0, f"rotation median error {rot:.2f}°"


@pytest.mark.slow
@pytest.mark.skipif(not (fitmod.DATA / fitmod.LANDMARK_MODEL_FILE).is_file(),
                    reason="no MediaPipe landmark calibration is packaged (face/data/landmark_model.npz)")
@pytest.mark.parametrize("preset", ["sparse", "extreme"])
def test_mediapipe_detections_meet_the_tracker_bounds(rig, mediapipe_clips, preset):
    mae, rot = mediapipe_scores(rig, mediapipe_clips, preset, LandmarkModel.default(rig))
    assert mae <= 0.10, f"expression MAE {mae:.4f}"
    assert rot <= 3.0, f"rotation median error {rot:.2f}°"


# --------------------------------------------------------------------------------------------
# Bounds, invalid frames, errors, smoothing
# --------------------------------------------------------------------------------------------


def test_coefficients_stay_within_bounds(rig, exact_model):
    """Landmarks of a face beyond the rig's ranges (jaw open 1.5, identity ±1.8) fit within them."""
    rng = np.random.default_rng(3)
    n = 8
    identity = np.clip(rng.normal(0, 1.2, rig.num_identity), -1.8, 1.8).astype(np.float32)
    expression = np.zeros((n, rig.num_expressions), np.float32)
    expression[:, rig.expression_index("jawOpen")] = 1.5
    expression[:, rig.expression_index("eyeBlinkLeft")] = np.linspace(0, 1.3, n)
    kin = KinematicsSequence(expression, rng.normal(0, 0.1, (n, 3)).astype(np.float32),
                             np.tile(np.array([0, 0, 0.62], np.float32), (n, 1)))
    landmarks = projected_landmarks(rig, identity, kin) + rng.normal(0, 1.0, (n, 478, 2)).astype(np.float32)
    for config in (FitConfig(), FitConfig.for_projected_landmarks(0.0)):
        result = fit_rig(landmarks, np.ones(n, bool), K, rig, config, landmark_model=exact_model)
        assert result.expression.min() >= 0.0 and result.expression.max() <= 1.0
        assert result.identity.min() >= -1.0 and result.identity.max() <= 1.0
        assert result.expression[:, rig.expression_index("jawOpen")].min() > 0.7  # at or near the top, not lost


def test_invalid_frames_get_interpolated_kinematics(rig, exact_model):
    identity, kin, landmarks = clip(rig, "sparse", 7503, frames=20)
    valid = np.ones(20, bool)
    invalid = [0, 1, 7, 8, 9, 19]
    valid[invalid] = False
    landmarks[invalid] = np.nan  # what the tracker stores for frames without a face
    landmarks[8] = 0.0  # and garbage must be ignored too
    result = fit_rig(landmarks, valid, K, rig, FitConfig.for_projected_landmarks(0.0), landmark_model=exact_model)
    for array in (result.expression, result.rotation, result.translation):
        assert array.shape[0] == 20 and np.isfinite(array).all()
    assert np.isnan(result.reprojection_px[invalid]).all() and np.isfinite(result.reprojection_px[valid]).all()
    # Ends copy the nearest valid frame; a gap interpolates its valid neighbours (6 and 10).
    np.testing.assert_allclose(result.expression[0], result.expression[2], atol=1e-6)
    np.testing.assert_allclose(result.rotation[19], result.rotation[18], atol=1e-6)
    np.testing.assert_allclose(result.expression[8], 0.5 * (result.expression[6] + result.expression[10]), atol=1e-5)
    np.testing.assert_allclose(result.translation[7], 0.75 * result.translation[6] + 0.25 * result.translation[10],
                               atol=1e-6)
    half = rotation_error_deg(result.rotation[6:7], result.rotation[10:11])[0] / 2
    assert abs(rotation_error_deg(result.rotation[6:7], result.rotation[8:9])[0] - half) < 1e-3
    # The interpolated frames stay close to the truth of this smooth trajectory.
    assert np.median(rotation_error_deg(result.rotation, kin.rotation)) < 1.0


def test_no_valid_frame_raises(rig):
    with pytest.raises(LiftAvatarError, match="no face was found"):
        fit_rig(np.zeros((5, 478, 2), np.float32), np.zeros(5, bool), K, rig)
    with pytest.raises(LiftAvatarError, match="must be shaped"):
        fit_rig(np.zeros((5, 468, 2), np.float32), np.ones(5, bool), K, rig)


def test_temporal_smoothing_reduces_jitter(rig, exact_model):
    """A still head (40 frames, mild smile and pose) with σ = 1.5 px noise. Measured jitter (mean
    frame-to-frame change): rotation 0.60° -> 0.29°, expression 0.072 -> 0.013 per coefficient."""
    n = 40
    expression = np.zeros((n, rig.num_expressions), np.float32)
    expression[:, rig.expression_index("mouthSmileLeft")] = 0.3
    expression[:, rig.expression_index("mouthSmileRight")] = 0.3
    expression[:, rig.expression_index("jawOpen")] = 0.15
    kin = KinematicsSequence(expression, np.tile(np.array([0.1, 0.2, 0.0], np.float32), (n, 1)),
                             np.tile(np.array([0.01, 0.0, 0.62], np.float32), (n, 1)))
    identity = synthetic_identity(7504, rig)
    landmarks = projected_landmarks(rig, identity, kin)
    landmarks = landmarks + np.random.default_rng(11).normal(0, 1.5, landmarks.shape).astype(np.float32)
    smooth = FitConfig.for_projected_landmarks(1.5)
    still = dataclasses.replace(smooth, smooth_expression=0.0, smooth_rotation=0.0, smooth_translation=0.0)

    def jitter(config):
        result = fit_rig(landmarks, np.ones(n, bool), K, rig, config, landmark_model=exact_model)
        rot = rotation_error_deg(result.rotation[1:], result.rotation[:-1]).mean()
        return rot, np.abs(np.diff(result.expression, axis=0)).mean()

    rot_raw, exp_raw = jitter(still)
    rot_smooth, exp_smooth = jitter(smooth)
    assert rot_smooth < 0.6 * rot_raw, (rot_raw, rot_smooth)
    assert exp_smooth < 0.3 * exp_raw, (exp_raw, exp_smooth)


# --------------------------------------------------------------------------------------------
# The hand-written parts: derivatives and the banded solve
# --------------------------------------------------------------------------------------------


def test_gradient_matches_autograd(rig):
    """The analytic Jacobians (projection, SO(3) left Jacobian, bases) give autograd's gradient."""
    identity, kin, landmarks = clip(rig, "extreme", 7505, frames=4)
    rng = np.random.default_rng(0)
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32)  # noqa: E731
    n = rig.num_landmarks
    config = FitConfig(expression_l1=0.0, expression_l2=0.0, identity_prior=0.0, huber_px=2.0)
    problem = fitmod._Problem(
        observed=f32(landmarks + rng.normal(0, 3, landmarks.shape)), weight=f32(rng.uniform(0.2, 2, n)),
        template=f32(rig.template[:n]),
        shape_basis=f32(np.concatenate([rig.expression_basis[:, :n], rig.identity_basis[:, :n]])),
        normals=f32(fitmod.template_normals(rig)), k=f32(K), scale=1.3, gap=np.ones(3),
        num_expressions=rig.num_expressions, config=config,
    )
    frame = np.concatenate([kin.rotation + 0.05, kin.translation, np.clip(kin.expression + 0.05, 0, 1)], 1)
    state = fitmod._State(identity=f32(identity * 0.8), frame=f32(frame))
    vis = torch.rand(4, n)
    _, _, _, g_f, g_b = fitmod._normal_equations(problem, state, vis)

    frame_t = state.frame.clone().requires_grad_(True)
    identity_t = state.identity.clone().requires_grad_(True)
    _, _, uv, _ = fitmod._forward(problem, fitmod._State(identity_t, frame_t))
    r = (uv - problem.observed).norm(dim=-1) / problem.scale
    (problem.weight * vis * fitmod._huber(r, config.huber_px)).sum().backward()
    np.testing.assert_allclose(g_f, frame_t.grad.numpy(), rtol=0, atol=1e-5 * np.abs(g_f).max())
    np.testing.assert_allclose(g_b, identity_t.grad.numpy(), rtol=0, atol=1e-5 * np.abs(g_b).max())


def test_banded_solve_matches_a_dense_solve():
    rng = np.random.default_rng(1)
    m, p, i = 5, 7, 3
    a = rng.normal(size=(m, p + i, 30))
    h = a @ a.transpose(0, 2, 1)
    h_ff, h_fb, h_bb = h[:, :p, :p], h[:, :p, p:], h[:, p:, p:].sum(0)
    g_f, g_b = rng.normal(size=(m, p)), rng.normal(size=i)
    lam, gap = rng.uniform(0.5, 2, p), np.array([1.0, 2.0, 1.0, 3.0])
    free = rng.random((m, p)) > 0.2
    fixed = np.where(free, 0.0, rng.normal(size=(m, p)))
    d_f, d_b = fitmod._solve(fitmod._system(h_ff, h_fb, h_bb, g_f, g_b, lam, gap, 0.0), free, fixed)

    size = m * p + i
    dense, grad = np.zeros((size, size)), np.concatenate([g_f.reshape(-1), g_b])
    for n in range(m):
        block = slice(n * p, (n + 1) * p)
        dense[block, block] = h_ff[n]
        dense[block, m * p:] = h_fb[n]
        dense[m * p:, block] = h_fb[n].T
    dense[m * p:, m * p:] = h_bb
    for n in range(m - 1):
        for k in range(p):
            u, v, c = n * p + k, (n + 1) * p + k, lam[k] / gap[n]
            dense[u, u] += c
            dense[v, v] += c
            dense[u, v] -= c
            dense[v, u] -= c
    step = np.concatenate([fixed.reshape(-1), np.zeros(i)])
    keep = np.concatenate([free.reshape(-1), np.ones(i, bool)])
    step[keep] = np.linalg.solve(dense[np.ix_(keep, keep)], -grad[keep] - dense[np.ix_(keep, ~keep)] @ step[~keep])
    np.testing.assert_allclose(d_f.reshape(-1), step[: m * p], atol=1e-10)
    np.testing.assert_allclose(d_b, step[m * p:], atol=1e-10)


# --------------------------------------------------------------------------------------------
# Landmark-model calibration
# --------------------------------------------------------------------------------------------


def test_calibration_learns_a_detector_bias(rig, exact_model, tmp_path):
    """A fake detector that reports the chin 6 mm high and jawOpen at 60 % of its size: the
    calibrated model learns both, and fitting with it recovers jawOpen and the pose."""
    jaw = rig.expression_index("jawOpen")
    offset = np.zeros((rig.num_landmarks, 3), np.float32)
    offset[[152, 148, 377, 176, 400]] = [0.0, -0.006, 0.0]
    detector = LandmarkModel(exact_model.template + offset, exact_model.identity_basis,
                             exact_model.expression_basis.copy())
    detector.expression_basis[jaw] *= 0.6

    def detect(identity, kin):
        shape = (detector.template + np.einsum("i,ilc->lc", identity, detector.identity_basis)
                 + np.einsum("ne,elc->nlc", kin.expression, detector.expression_basis))
        rmat = Rotation.from_rotvec(kin.rotation).as_matrix()
        cam = np.einsum("nab,nlb->nla", rmat, shape) + kin.translation[:, None]
        return np.stack([K[0] * cam[..., 0] / cam[..., 2] + K[2], K[1] * cam[..., 1] / cam[..., 2] + K[3]], -1)

    # Training frames: independent random expressions (a few blendshapes each), poses and identities.
    rng = np.random.default_rng(5)
    n = 300
    expression = np.where(rng.random((n, rig.num_expressions)) < 0.12, rng.random((n, rig.num_expressions)), 0.0)
    train = KinematicsSequence(expression.astype(np.float32), rng.normal(0, 0.2, (n, 3)).astype(np.float32),
                               (np.array([0, 0, 0.62]) + rng.normal(0, 0.01, (n, 3))).astype(np.float32))
    identities = np.clip(rng.normal(0, 0.45, (n, rig.num_identity)), -1, 1).astype(np.float32)
    found = np.stack([detect(identities[k], KinematicsSequence(*(a[k:k + 1] for a in (
        train.expression, train.rotation, train.translation))))[0] for k in range(n)])
    model = calibrate_landmark_model(rig, found, identities, train.expression, train.rotation, train.translation, K,
                                     ridge=0.1)
    np.testing.assert_allclose(model.template[152], detector.template[152], atol=1e-3)  # 6 mm offset, ±1 mm
    model.save(tmp_path / "model.npz")
    np.testing.assert_array_equal(LandmarkModel.load(tmp_path / "model.npz").template, model.template)

    # A clip that opens the jaw from 0 to 1 while the head turns a little.
    n = 20
    expression = np.zeros((n, rig.num_expressions), np.float32)
    expression[:, jaw] = np.linspace(0.0, 1.0, n)
    angles = np.stack([np.linspace(-0.1, 0.1, n), np.linspace(0.2, -0.2, n), np.zeros(n)], 1).astype(np.float32)
    kin = KinematicsSequence(expression, angles, np.tile(np.array([0.0, 0.0, 0.62], np.float32), (n, 1)))
    found = detect(synthetic_identity(7603, rig), kin).astype(np.float32)
    config = FitConfig.for_projected_landmarks(0.0)
    naive = fit_rig(found, np.ones(n, bool), K, rig, config, landmark_model=exact_model)
    calibrated = fit_rig(found, np.ones(n, bool), K, rig, config, landmark_model=model)
    jaw_error = lambda r: np.abs(r.expression[:, jaw] - kin.expression[:, jaw]).mean()  # noqa: E731
    assert jaw_error(calibrated) < 0.05 and jaw_error(naive) > 0.1, (jaw_error(naive), jaw_error(calibrated))
    assert np.median(rotation_error_deg(calibrated.rotation, kin.rotation)) < 0.5


def test_mirrored_expressions_swap_sides(rig):
    mirror = mirrored_expressions(rig.expression_names)
    names = rig.expression_names
    assert names[mirror[names.index("eyeWideLeft")]] == "eyeWideRight"
    assert names[mirror[names.index("jawRight")]] == "jawLeft"
    assert names[mirror[names.index("jawOpen")]] == "jawOpen"
    np.testing.assert_array_equal(mirror[mirror], np.arange(len(names)))


def test_symmetrising_averages_a_one_sided_correction(rig, exact_model):
    """A correction on one eye only (a lid landmark 2 mm lower, eyeWideLeft moving it 1 mm more)
    becomes half of it on both eyes, mirrored; the rig itself is left as it is."""
    np.testing.assert_allclose(symmetrise_landmark_model(exact_model, rig).expression_basis,
                               exact_model.expression_basis, atol=1e-6)
    lid = int(rig.eye_loops[0, 4])
    mirror_lid = int(rig.mirror_pairs[lid])
    assert mirror_lid != lid
    wide_l, wide_r = rig.expression_index("eyeWideLeft"), rig.expression_index("eyeWideRight")
    template = exact_model.template.copy()
    basis = exact_model.expression_basis.copy()
    template[lid] += [0.001, 0.002, 0.0]
    basis[wide_l, lid] += [0.0, -0.001, 0.0]
    model = symmetrise_landmark_model(LandmarkModel(template, exact_model.identity_basis, basis, "test"), rig)
    np.testing.assert_allclose(model.template[lid] - exact_model.template[lid], [0.0005, 0.001, 0.0], atol=1e-7)
    np.testing.assert_allclose(model.template[mirror_lid] - exact_model.template[mirror_lid], [-0.0005, 0.001, 0.0],
                               atol=1e-7)
    np.testing.assert_allclose(model.expression_basis[wide_l, lid] - exact_model.expression_basis[wide_l, lid],
                               [0.0, -0.0005, 0.0], atol=1e-7)
    np.testing.assert_allclose(model.expression_basis[wide_r, mirror_lid]
                               - exact_model.expression_basis[wide_r, mirror_lid], [0.0, -0.0005, 0.0], atol=1e-7)
    assert model.source == "test, mirror-symmetrised"
    assert symmetrise_landmark_model(model, rig).source == model.source  # idempotent, named once


@pytest.mark.skipif(not (fitmod.DATA / fitmod.LANDMARK_MODEL_FILE).is_file(),
                    reason="no MediaPipe landmark calibration is packaged (face/data/landmark_model.npz)")
def test_packaged_calibration_is_mirror_symmetric(rig):
    model = LandmarkModel.default(rig)
    assert "mirror-symmetrised" in model.source
    np.testing.assert_allclose(symmetrise_landmark_model(model, rig).expression_basis, model.expression_basis,
                               atol=1e-6)


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------


def test_solver_runs_single_threaded_and_restores_the_pools(rig, exact_model, monkeypatch):
    """fit_rig solves with torch and BLAS on one thread each (oversubscribed pools made it several
    times slower on a shared 2-core machine) and restores both pools afterwards, errors included."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    before_torch, before_blas = torch.get_num_threads(), blas_threads()
    seen = []
    optimise = fitmod._optimise

    def spy(*args):
        seen.append((torch.get_num_threads(), blas_threads()))
        return optimise(*args)

    monkeypatch.setattr(fitmod, "_optimise", spy)
    _, kin, landmarks = clip(rig, "sparse", 7506, frames=5)
    fit_rig(landmarks, np.ones(len(kin), bool), K, rig, FitConfig.for_projected_landmarks(0.0), landmark_model=exact_model)
    assert seen and seen[0][0] == 1 and seen[0][1] <= {1}
    assert torch.get_num_threads() == before_torch and blas_threads() == before_blas
    with pytest.raises(RuntimeError), fitmod.single_threaded_math():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before_torch and blas_threads() == before_blas
