"""Fit the FaceRig to per-frame 2D landmarks: one identity, per-frame head pose and expression.

Input: MediaPipe FaceMesh landmarks (N, 478, 2) in pixels (x right, y down, the image's top-left
corner at (0, 0)) of N frames, a per-frame validity flag, and the pinhole intrinsics
(fx, fy, cx, cy) in pixels. Output (:class:`FitResult`): identity β (I,) in [-1, 1], and per frame
expression ψ_n (E,) in [0, 1], rotation ω_n (3,) axis-angle in radians (head frame -> OpenCV
camera: x right, y down, z forward) and translation t_n (3,) in metres, so that
``rig.vertices(β, ψ_n, ω_n, t_n)`` projects onto the landmarks.

Energy, summed over valid frames n and landmarks l (all terms are ½·squares unless said)::

    E = Σ_n Σ_l w_l c_nl ρ_δ(|π(x_nl) − u_nl| / s)                                data
      + ½ λ_id |β|²                                                               identity prior
      + Σ_n (λ_1 Σ_e ψ_ne + ½ λ_2 |ψ_n|²)                                         expression prior
      + Σ_n Σ_e ½ a w_ne (ψ_ne − μ_ne)²                                           appearance prior (optional)
      + Σ_(m,n) ½ / gap_mn (λ_ψ |ψ_n − ψ_m|² + λ_ω |ω_n − ω_m|² + λ_t |t_n − t_m|²) smoothness

- ``x_nl = R(ω_n) (T_l + B_id,l β + B_exp,l ψ_n) + t_n``: landmark l in the camera frame (metres);
  T, B_id, B_exp are the rig's landmark vertices and bases, or a :class:`LandmarkModel`
  calibrated to where the detector reports them (see below). ``π`` projects to pixels.
- ``u_nl``: the detection (pixels); ``ρ_δ``: the Huber function (quadratic up to δ, then linear),
  so a few misplaced landmarks cannot drag the fit.
- ``w_l``: per-landmark-group weights (:class:`FitConfig`); ``c_nl`` in [0, 1]: visibility from
  the landmark's surface normal (where the face turns away MediaPipe guesses).
- ``s = (fx / median t_z) / REFERENCE_PX_PER_M``: the face's scale relative to the synthetic
  world's 256² framing (head 0.62 m from a 30° camera). Residuals are divided by it, so every
  pixel-valued setting means the same on a 256² crop and a 1024² one (MediaPipe's landmark noise
  scales with the face, not with the image). Energies are in these "reference pixels" squared.
- ``μ_ne``, ``w_ne``: an independent estimate of each coefficient and its weight (reference px²
  per unit²), from :mod:`liftavatar.face.appearance` (a CNN on the face's pixels), scaled by
  ``a`` = ``FitConfig.appearance_weight``; absent unless ``prior_mean`` is passed (then λ_1 is
  scaled by ``FitConfig.appearance_l1_scale``). It carries blendshapes the landmarks barely see
  (wide eyes, brow raise, upper-lip raise, jaw and mouth shapes; see the limits below).
- ``λ_1 Σψ`` is an L1 sparsity prior that is linear because ψ ≥ 0: it keeps coefficients the
  data do not call for at exactly 0. ``gap_mn``: frames between consecutive valid frames (1 for
  neighbours), so smoothing across missed detections is proportionally weaker.

Method (hand-written: no library fits this custom linear rig, and generic optimisers would not
use its structure):

1. **Initial pose** per frame: ``cv2.solvePnP`` (SQPnP) of the neutral template on the landmarks
   expressions move least; expression 0, identity 0.
2. **Levenberg–Marquardt (Gauss–Newton)** on all frames at once. Analytic Jacobians, batched in
   torch: the model is linear in β and ψ, so only the projection and the rotation (through the
   SO(3) left Jacobian) need derivatives. Huber enters by iteratively reweighted least squares;
   visibility weights come from the initial pose and are refreshed once, after the first step.
   The normal equations are block-tridiagonal over frames (the smoothness terms couple the same
   parameter of consecutive frames) with a dense border for the shared identity; they are solved
   exactly by a banded Cholesky (``scipy.linalg.solveh_banded``, bandwidth = parameters per
   frame = 6 + E) and the identity's Schur complement. Cost per iteration is linear in N.
3. **Bounds** by projected Newton: coefficients at a bound whose gradient points outward are held
   (Bertsekas), coefficients the step would carry across a bound are pinned to it and the rest
   re-solved (a few active-set passes), then everything is clipped (ψ to [0, 1], β to [-1, 1]).
   Unlike a sigmoid parametrisation, this lets the many coefficients that are truly 0 sit exactly
   on the bound, with no vanishing gradient there.
4. A step is kept only if it lowers E (otherwise the damping grows).

Why Gauss–Newton rather than Adam / L-BFGS: this is a small nonlinear least-squares problem with
a good start and an exploitable structure. Measured on a 100-frame MediaPipe clip (same energy,
2 CPU cores): LM reaches E = 47 380 in 6 iterations (0.6 s); projected Adam, with step sizes tuned
per parameter group, reaches 47 426 after 400 steps (1.5 s) and then oscillates; projected
L-BFGS (strong Wolfe) is at 55 064 after 20 steps (1.7 s). torch's L-BFGS has no bounds either.

Invalid frames take no part; afterwards they get kinematics interpolated from the nearest valid
neighbours (expression and translation linearly, rotation by slerp; before the first / after the
last valid frame, that frame's values). The caller keeps them flagged invalid.

Landmark weights (measured: MediaPipe on renders of the synthetic world against the projected
rig, 256²): eyelids are the most precise landmarks (median 0.8 px sparse / 1.3 px extreme) and
carry blinks and squints; lips (1.2 / 2.5 px) carry jaw and mouth; brows 1.6 / 2.0 px; the ~340
untextured points (cheeks, forehead, nose) 1.7 / 2.5 px and biased; the face oval 4.2 / 6.1 px,
worse with yaw. Irises carry gaze, which the rig does not model. Hence the default group
weights of :class:`FitConfig` (eyelids 4, lips 2, brows 2, nose and the rest 0.1, oval 0.3,
irises 0), on top of the visibility weight c. Against the calibrated landmark model the residuals
(per axis, robust σ) are eyelids 0.5 px, brows 0.7, lips 0.8, the rest 0.8, the oval 1.9: inverse
variances near 4 : 2 : 1.5 for eyelids, brows and lips. The many untextured points stay at 0.1
although their σ is small: their errors are strongly correlated (MediaPipe fills them in from its
own face model), and weighting them as independent made the extreme-expression error worse.

Landmark models: MediaPipe does not report exactly the rig's landmark vertices. On the synthetic
world it reports blendshapes at 0.3–0.9 of their size (brows, nose sneer, eye-wide least) and
places the chin, forehead and nose bridge a few pixels off the rig's vertices, which biases the
fitted pitch. :func:`calibrate_landmark_model` learns, from renders with known kinematics, a
:class:`LandmarkModel` that says where MediaPipe puts each landmark as a function of the same
coefficients (a per-landmark response to each blendshape, so it carries the detector's gain);
:meth:`LandmarkModel.default` uses a packaged calibration file when one exists. The packaged one
(``scripts/calibrate_landmarks.py``) includes clips whose blendshapes vary independently: with only
the presets' fixed combinations, each blendshape's response was smeared over its companions. It is
then averaged with its mirror image (:func:`symmetrise_landmark_model`): the face, the detector and
the data are left-right symmetric, so the calibration's asymmetries are noise.

Limits, measured on development clips (MediaPipe in video mode on 256² renders): several
blendshapes barely move MediaPipe's landmarks at all: at 0.9, eyeWide moves the detected landmarks
by ~1 px in total and noseSneer by ~1.5 px, and in combinations (squeezed eyes, anger, surprise) the
detector reports about half the summed isolated displacement. Their coefficients stay near 0 under
any prior, and no landmark fit recovers them (even with the true pose and identity, an unregularised
fit is uncorrelated with the truth). The ``extreme`` preset's error is dominated by them.

The appearance prior (:mod:`liftavatar.face.appearance`, used by ``liftavatar track``) recovers
part of them from the pixels. On the development clips (seeds 7300–7303, the whole ``track``
path) it lowered the extreme MAE from 0.116 to 0.110 (eyeWide 0.14 → 0.09, browInnerUp 0.13 →
0.06, mouthUpperUp 0.19 → 0.16, jawOpen 0.08 → 0.06, mouthPucker 0.05 → 0.02) with sparse
unchanged (0.0205); the network itself does no better than the landmarks on noseSneer, browDown,
eyeSquint and mouthPress, which stay the largest errors.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from scipy.linalg import solveh_banded
from scipy.spatial.transform import Rotation, Slerp
from tqdm import tqdm

from liftavatar.errors import LiftAvatarError
from liftavatar.face.rig import DATA, FaceRig, axis_angle_to_matrix

NUM_SURFACE = 468  # FaceMesh surface landmarks; 468–477 are the irises
# MediaPipe's FACEMESH_NOSE landmark ids.
NOSE = np.array([1, 2, 4, 5, 6, 19, 45, 48, 64, 94, 97, 98, 115, 168, 195, 197, 220, 275, 278, 294, 326, 327, 344, 440])
# Pixels per metre at the head in the synthetic world's 256² framing: f = 128 / tan(15°) px, head
# 0.62 m away. Pixel-valued settings are given at this scale.
REFERENCE_PX_PER_M = 128.0 / math.tan(math.radians(15.0)) / 0.62
# A MediaPipe calibration of the rig's landmarks, if one is packaged (see LandmarkModel.default).
LANDMARK_MODEL_FILE = "landmark_model.npz"


@dataclass
class FitConfig:
    """Weights and solver settings of :func:`fit_rig`. Pixel values are at the 256² reference scale."""

    huber_px: float = 3.0
    """Huber threshold δ, reference pixels: residuals beyond it count linearly (outlier landmarks)."""
    weight_oval: float = 0.3
    """Face-oval contour (36 points): MediaPipe guesses it where the cheek turns away, and puts the
    chin and forehead several pixels off the rig's vertices even frontally (median error ~4 px
    against the rig, 1.9 px per axis against the calibrated model, which absorbs the offsets)."""
    weight_eyelid: float = 4.0
    """Eyelid contours (2 × 16 points): the most precise landmarks (~0.8 px median; 0.5 px per axis
    against the calibrated model) and the only evidence of blinks, squints and wide eyes."""
    weight_lips: float = 2.0
    """Inner and outer lip contours (40 points): jaw, mouth opening, smile, pucker."""
    weight_brow: float = 2.0
    """Eyebrow outlines (20 points; 0.7 px per axis against the calibrated model): brow raise and frown."""
    weight_nose: float = 0.1
    """Nose (MediaPipe's FACEMESH_NOSE, 24 points): MediaPipe puts the bridge 2–4 px below the rig's
    vertices, which tilts the fitted pitch by several degrees if weighted fully."""
    weight_iris: float = 0.0
    """Iris landmarks (10): they carry gaze, which the rig does not model; excluded by default."""
    weight_other: float = 0.1
    """All other surface landmarks (~340 on cheeks, forehead, chin): untextured, so MediaPipe fills
    them in from its own face model (~1.7 px median error, biased)."""
    facing_lo: float = 0.0
    """Visibility weight c: 0 where the surface normal's cosine to the viewing ray is below this ..."""
    facing_hi: float = 0.35
    """... rising linearly to 1 at this cosine (points facing the camera)."""
    identity_prior: float = 1000.0
    """λ_id, reference px² per unit² of identity: pulls the shared identity toward the mean face."""
    expression_l1: float = 80.0
    """λ_1, reference px² per unit of coefficient per frame: sparsity (coefficients are ≥ 0)."""
    expression_l2: float = 5.0
    """λ_2, reference px² per unit² per frame: small magnitude; conditions near-degenerate pairs."""
    smooth_expression: float = 50.0
    """λ_ψ, reference px² per unit² of frame-to-frame expression change."""
    smooth_rotation: float = 2.0e4
    """λ_ω, reference px² per rad² of frame-to-frame rotation change (0.01 rad ≈ 0.6° costs 1 px²)."""
    smooth_translation: float = 1.0e6
    """λ_t, reference px² per m² of frame-to-frame translation change (1 mm costs 0.5 px²)."""
    pnp_landmarks: int = 100
    """The initial pose (PnP) uses this many landmarks: those that expressions move least."""
    iterations: int = 6
    """Most Levenberg–Marquardt iterations (on MediaPipe landmarks the accuracy settles after ~4)."""
    tolerance: float = 1e-3
    """Stop when an accepted step lowers the energy by less than this fraction."""
    damping: float = 1e-3
    """Initial Levenberg–Marquardt damping (fraction of the Hessian's diagonal)."""
    appearance_weight: float = 8.0
    """a: scales the appearance prior's per-blendshape weights (``prior_weight`` of :func:`fit_rig`,
    the packaged network's 2 / (validation MSE + 0.002)); 0 ignores the prior. Tuned on the
    development clips (seeds 7300–7303; 2 → 16 moved their extreme MAE 0.115 → 0.112)."""
    appearance_l1_scale: float = 0.5
    """λ_1 is multiplied by this when an appearance prior is given: the prior now says which
    coefficients are 0, and halving the sparsity lowered the development extreme MAE by ~0.001."""

    @classmethod
    def for_projected_landmarks(cls, noise_px: float = 0.0) -> "FitConfig":
        """Settings for landmarks that are the rig's own projected vertices plus independent
        Gaussian noise of ``noise_px`` (reference pixels): synthetic tests, or any source whose
        errors are unbiased and independent. Every group weighs the same (no landmark is less
        trustworthy than another), and the priors scale with the noise variance, as in a MAP
        estimate, down to small floors that keep the problem well posed for exact landmarks.
        The defaults of :class:`FitConfig` are instead tuned to MediaPipe's biased errors."""
        v = (noise_px / 1.5) ** 2
        return cls(weight_oval=1.0, weight_eyelid=1.0, weight_lips=1.0, weight_brow=1.0, weight_nose=1.0,
                   weight_other=1.0, identity_prior=max(100.0 * v, 20.0), expression_l1=max(2.0 * v, 0.5),
                   expression_l2=max(2.0 * v, 0.5), smooth_expression=max(300.0 * v, 5.0),
                   smooth_rotation=max(2.0e4 * v, 1.0e3), smooth_translation=max(1.0e6 * v, 5.0e4),
                   iterations=20, tolerance=1e-6)


@dataclass
class FitResult:
    """Fitted kinematics (the Capture's layout, DESIGN.md §3)."""

    identity: np.ndarray  # (I,) float32 in [-1, 1], one per subject
    expression: np.ndarray  # (N, E) float32 in [0, 1]
    rotation: np.ndarray  # (N, 3) float32 axis-angle radians (head frame -> OpenCV camera)
    translation: np.ndarray  # (N, 3) float32 metres
    reprojection_px: np.ndarray  # (N,) float32 median surface-landmark error, pixels (NaN if invalid)
    iterations: int = 0  # Levenberg–Marquardt iterations run
    energy: float = float("nan")  # final energy E, reference px²


# --------------------------------------------------------------------------------------------
# What the detector reports: the landmark model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LandmarkModel:
    """Where the detector puts the 478 landmarks, linear in the rig's coefficients (head frame, metres).

    ``from_rig`` is the rig's own landmark vertices (exact for landmarks projected from the rig);
    a calibrated model (:func:`calibrate_landmark_model`) moves them to where MediaPipe reports
    them. The fitted coefficients keep the rig's meaning either way.
    """

    template: np.ndarray  # (478, 3)
    identity_basis: np.ndarray  # (I, 478, 3) per unit coefficient
    expression_basis: np.ndarray  # (E, 478, 3) at coefficient 1
    source: str = "rig"

    @classmethod
    def from_rig(cls, rig: FaceRig) -> "LandmarkModel":
        n = rig.num_landmarks
        return cls(rig.template[:n], rig.identity_basis[:, :n], rig.expression_basis[:, :n], "rig")

    @classmethod
    def load(cls, path: str | Path) -> "LandmarkModel":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["template"], z["identity_basis"], z["expression_basis"], str(z["source"]))

    @classmethod
    def default(cls, rig: FaceRig) -> "LandmarkModel":
        """The packaged MediaPipe calibration (``face/data/landmark_model.npz``) if there is one, else the rig's."""
        path = DATA / LANDMARK_MODEL_FILE
        if path.is_file():
            model = cls.load(path)
            shapes = (model.expression_basis.shape[0], model.identity_basis.shape[0])
            if shapes == (rig.num_expressions, rig.num_identity):
                return model
        return cls.from_rig(rig)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, template=self.template.astype(np.float32),
                            identity_basis=self.identity_basis.astype(np.float32),
                            expression_basis=self.expression_basis.astype(np.float32), source=np.array(self.source))


def calibrate_landmark_model(
    rig: FaceRig,
    landmarks: np.ndarray,
    identity: np.ndarray,
    expression: np.ndarray,
    rotation: np.ndarray,
    translation: np.ndarray,
    intrinsics: tuple[float, float, float, float],
    ridge: float = 1.0,
    source: str = "calibrated",
) -> LandmarkModel:
    """Learn where a detector puts the rig's landmarks, from frames with known kinematics.

    Args:
        landmarks: (N, 478, 2) detections in pixels of N rendered frames (rows with NaN are skipped).
        identity: (N, I) ground-truth identity of each frame's subject.
        expression, rotation, translation: (N, E), (N, 3), (N, 3) ground-truth kinematics.
        intrinsics: (fx, fy, cx, cy) pixels of the renders.
        ridge: shrinkage toward the rig, px² per mm² of head-frame correction (per landmark).

    Returns:
        The rig's landmark model plus, per landmark l, a head-frame correction linear in the
        expression, ``D_l [ψ; 1]`` (a (3, E + 1) matrix: a response to each blendshape and a
        constant offset), fitted by ridge least squares of the detections' pixel residuals
        linearised at the true pose. The identity basis is the rig's.
    """
    model = LandmarkModel.from_rig(rig)
    ok = np.isfinite(landmarks).all(axis=(1, 2))
    idn, exp, rot, trans, obs = (np.asarray(a, np.float64)[ok]
                                 for a in (identity, expression, rotation, translation, landmarks))
    shape = (model.template[None] + np.einsum("ni,ilc->nlc", idn, model.identity_basis)
             + np.einsum("ne,elc->nlc", exp, model.expression_basis))
    rmat = Rotation.from_rotvec(rot).as_matrix()
    cam = np.einsum("nab,nlb->nla", rmat, shape) + trans[:, None]
    fx, fy, cx, cy = intrinsics
    x, y, z = cam[..., 0], cam[..., 1], cam[..., 2]
    uv = np.stack([fx * x / z + cx, fy * y / z + cy], -1)
    jac = np.zeros(cam.shape[:2] + (2, 3))
    jac[..., 0, 0], jac[..., 0, 2] = fx / z, -fx * x / z**2
    jac[..., 1, 1], jac[..., 1, 2] = fy / z, -fy * y / z**2
    jr = np.einsum("nlab,nbc->nlac", jac, rmat) * 1e-3  # pixels per mm of head-frame displacement
    design = np.concatenate([exp, np.ones((len(exp), 1))], 1)  # (N, E + 1)
    residual = obs - uv  # (N, L, 2) px
    k = design.shape[1]
    corr = np.zeros((model.template.shape[0], 3, k))
    for l in range(model.template.shape[0]):
        # Unknown vec(D_l) (3k); row (n, a): Σ_c jr[n, l, a, c] D_l[c, :] · design[n].
        rows = (jr[:, l, :, :, None] * design[:, None, None, :]).reshape(-1, 3 * k)
        normal = rows.T @ rows + ridge * np.eye(3 * k)
        corr[l] = np.linalg.solve(normal, rows.T @ residual[:, l].reshape(-1)).reshape(3, k)
    corr *= 1e-3  # mm -> m
    return LandmarkModel(
        template=(model.template + corr[..., -1]).astype(np.float32),
        identity_basis=model.identity_basis.astype(np.float32),
        expression_basis=(model.expression_basis + corr[..., :-1].transpose(2, 0, 1)).astype(np.float32),
        source=source,
    )


def mirrored_expressions(names: list[str] | tuple[str, ...]) -> np.ndarray:
    """(E,) index of each blendshape's mirror image: Left and Right swap (jawLeft <-> jawRight too)."""
    names = list(names)
    return np.array([names.index(n.replace("Left", "#").replace("Right", "Left").replace("#", "Right")) for n in names])


def symmetrise_landmark_model(model: LandmarkModel, rig: FaceRig) -> LandmarkModel:
    """The landmark model averaged with its own mirror image (the head frame's x = 0 plane).

    The rig is mirror-symmetric, and so are the detector's behaviour and the synthetic world's
    distribution of poses and expressions; a calibration's left-right differences are therefore
    estimation noise, and the correction's share of it is halved by averaging the correction of
    each landmark and blendshape with that of its mirror (the mirrored landmark's response to the
    mirrored blendshape, x negated). Measured on development clips (seeds 7300–7323, the full
    ``track`` path): in the unsymmetrised calibration, eyeWide's response had 0.46 of the rig's
    size on the left eye and 0.05 on the right (least-squares gain), and symmetrising lowered the
    extreme expression MAE from 0.1049 to 0.1035 (seeds 7300–7311) and
    from 0.0934 to 0.0905 (7312–7323); sparse moved by under 0.0003. The irises (which the fit does
    not use) keep their correction.
    """
    rig_model = LandmarkModel.from_rig(rig)
    surface = rig.mirror_pairs  # (468,)
    flip = np.array([-1.0, 1.0, 1.0])
    d_template = (model.template - rig_model.template).astype(np.float64)
    d_basis = (model.expression_basis - rig_model.expression_basis).astype(np.float64)
    d_template[:NUM_SURFACE] = 0.5 * (d_template[:NUM_SURFACE] + flip * d_template[surface])
    mirrored = d_basis[mirrored_expressions(rig.expression_names)][:, surface] * flip
    d_basis[:, :NUM_SURFACE] = 0.5 * (d_basis[:, :NUM_SURFACE] + mirrored)
    return LandmarkModel(
        template=(rig_model.template + d_template).astype(np.float32),
        identity_basis=model.identity_basis,
        expression_basis=(rig_model.expression_basis + d_basis).astype(np.float32),
        source=model.source if model.source.endswith("mirror-symmetrised") else f"{model.source}, mirror-symmetrised",
    )


def landmark_weights(rig: FaceRig, config: FitConfig) -> np.ndarray:
    """(478,) float32 group weight w_l of each FaceMesh landmark (later groups override earlier)."""
    w = np.full(rig.num_landmarks, config.weight_other, np.float32)
    w[NOSE] = config.weight_nose
    w[rig.face_oval] = config.weight_oval
    w[rig.brow_outlines.ravel()] = config.weight_brow
    w[rig.lips_outline] = config.weight_lips
    w[rig.mouth_loop] = config.weight_lips
    w[rig.eye_loops.ravel()] = config.weight_eyelid
    w[NUM_SURFACE:] = config.weight_iris
    return w


def stable_landmarks(model: LandmarkModel, face_oval: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` surface landmark ids (face oval excluded) that expressions move least."""
    reach = np.abs(model.expression_basis[:, :NUM_SURFACE]).max(axis=(0, 2))
    reach[face_oval] = np.inf
    return np.sort(np.argsort(reach, kind="stable")[: max(count, 6)])


def template_normals(rig: FaceRig) -> np.ndarray:
    """(478, 3) outward unit normals of the landmark vertices on the neutral template (head frame)."""
    faces = rig.faces[rig.part_mask("face")]
    v = rig.template.astype(np.float64)
    fn = np.cross(v[faces[:, 1]] - v[faces[:, 0]], v[faces[:, 2]] - v[faces[:, 0]])
    n = np.zeros_like(v)
    for k in range(3):
        np.add.at(n, faces[:, k], fn)
    n = n[: rig.num_landmarks]
    n /= np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    if n[:NUM_SURFACE, 2].mean() > 0:  # outward: the face looks toward -z in the head frame
        n = -n
    return n.astype(np.float32)


def initial_pose(
    landmarks: np.ndarray, template: np.ndarray, ids: np.ndarray, intrinsics: tuple[float, float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame PnP of template points ``ids`` on ``landmarks`` (M, 478, 2) px -> rotation, translation (M, 3)."""
    import cv2

    fx, fy, cx, cy = intrinsics
    camera = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], np.float64)
    obj = template[ids].astype(np.float64)
    head_height = float(np.ptp(template[:NUM_SURFACE, 1]))
    rot = np.zeros((len(landmarks), 3))
    trans = np.zeros((len(landmarks), 3))
    for n, pts in enumerate(landmarks):
        ok, rvec, tvec = cv2.solvePnP(obj, pts[ids].astype(np.float64), camera, None, flags=cv2.SOLVEPNP_SQPNP)
        if not ok or tvec[2, 0] <= 0:  # degenerate: frontal, at the depth the face's height implies
            depth = fy * head_height / max(float(np.ptp(pts[:NUM_SURFACE, 1])), 1.0)
            rvec, tvec = np.zeros((3, 1)), np.array([[0.0], [0.0], [depth]])
        rot[n], trans[n] = rvec[:, 0], tvec[:, 0]
    return rot, trans


# --------------------------------------------------------------------------------------------
# The least-squares problem
# --------------------------------------------------------------------------------------------


def _skew(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrices [v]x."""
    x, y, z = v.unbind(-1)
    o = torch.zeros_like(x)
    return torch.stack([o, -z, y, z, o, -x, -y, x, o], -1).reshape(*v.shape, 3)


def _left_jacobian(omega: torch.Tensor) -> torch.Tensor:
    """SO(3) left Jacobian (..., 3, 3): R(ω + dω) ≈ exp([J_l(ω) dω]x) R(ω)."""
    theta = omega.norm(dim=-1, keepdim=True)[..., None].clamp_min(1e-8)
    k = _skew(omega)
    eye = torch.eye(3, dtype=omega.dtype, device=omega.device).expand_as(k)
    small = theta < 1e-4  # series limits: a -> 1/2, b -> 1/6
    a = torch.where(small, torch.full_like(theta, 0.5), (1 - torch.cos(theta)) / theta**2)
    b = torch.where(small, torch.full_like(theta, 1 / 6), (theta - torch.sin(theta)) / theta**3)
    return eye + a * k + b * (k @ k)


@dataclass
class _Problem:
    """Fixed data of one fit on the fitting device (M valid frames, L used landmarks, K = E + I)."""

    observed: torch.Tensor  # (M, L, 2) px
    weight: torch.Tensor  # (L,) group weights w_l
    template: torch.Tensor  # (L, 3) m
    shape_basis: torch.Tensor  # (K, L, 3) m: expression basis, then identity basis
    normals: torch.Tensor  # (L, 3) head frame
    k: torch.Tensor  # (4,) fx fy cx cy
    scale: float  # s: pixels -> reference pixels
    gap: np.ndarray  # (M-1,) frames between consecutive valid frames
    num_expressions: int
    config: FitConfig
    prior_mean: np.ndarray | None = None  # (M, E) appearance estimate μ of ψ
    prior_weight: np.ndarray | None = None  # (M, E) its weight a·w, reference px² per unit²

    @property
    def num_params(self) -> int:  # per frame: ω (3), t (3), ψ (E)
        return 6 + self.num_expressions


@dataclass
class _State:
    identity: torch.Tensor  # (I,)
    frame: torch.Tensor  # (M, P): ω, t, ψ per frame

    @property
    def coefficients(self) -> torch.Tensor:
        """(M, K) the shape coefficients of each frame: ψ_n, then β."""
        return torch.cat([self.frame[:, 6:], self.identity.expand(len(self.frame), -1)], 1)


def _forward(p: _Problem, s: _State):
    """Rotated shape (M, L, 3), camera points (M, L, 3), pixels (M, L, 2), rotations (M, 3, 3)."""
    shape = p.template + torch.einsum("mk,klc->mlc", s.coefficients, p.shape_basis)
    rot = axis_angle_to_matrix(s.frame[:, :3])
    rotated = shape @ rot.transpose(1, 2)
    cam = rotated + s.frame[:, None, 3:6]
    z = cam[..., 2].clamp_min(1e-4)
    uv = torch.stack((p.k[0] * cam[..., 0] / z + p.k[2], p.k[1] * cam[..., 1] / z + p.k[3]), -1)
    return rotated, cam, uv, rot


def _visibility(p: _Problem, cam: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """(M, L) c_nl in [0, 1] from the cosine between the rotated template normal and the ray to the camera."""
    normals = p.normals @ rot.transpose(1, 2)
    cosine = -(normals * cam).sum(-1) / cam.norm(dim=-1).clamp_min(1e-9)
    lo, hi = p.config.facing_lo, p.config.facing_hi
    return ((cosine - lo) / (hi - lo)).clamp(0, 1)


def _huber(r: torch.Tensor, delta: float) -> torch.Tensor:
    return torch.where(r <= delta, 0.5 * r * r, delta * (r - 0.5 * delta))


def _smooth_weights(p: _Problem) -> np.ndarray:
    """(P,) temporal weights λ of the per-frame parameters ω, t, ψ."""
    cfg = p.config
    return np.array([cfg.smooth_rotation] * 3 + [cfg.smooth_translation] * 3
                    + [cfg.smooth_expression] * p.num_expressions)


def _energy(p: _Problem, s: _State, vis: torch.Tensor) -> float:
    """E of the module docstring (float64), with the visibility weights ``vis`` (M, L) held fixed."""
    cfg = p.config
    _, _, uv, _ = _forward(p, s)
    r = (uv - p.observed).norm(dim=-1) / p.scale
    data = (p.weight * vis * _huber(r, cfg.huber_px)).sum(dtype=torch.float64).item()
    frame = s.frame.double().cpu().numpy()
    psi = frame[:, 6:]
    prior = (0.5 * cfg.identity_prior * float((s.identity.double() ** 2).sum())
             + cfg.expression_l1 * psi.sum() + 0.5 * cfg.expression_l2 * (psi**2).sum())
    if p.prior_mean is not None:
        prior += 0.5 * float((p.prior_weight * (psi - p.prior_mean) ** 2).sum())
    d = frame[1:] - frame[:-1]
    smooth = 0.5 * float((_smooth_weights(p)[None] / p.gap[:, None] * d * d).sum())
    return data + prior + smooth


def _normal_equations(p: _Problem, s: _State, vis: torch.Tensor):
    """Gauss–Newton system of the data and prior terms (the smoothness terms are added by :func:`_system`).

    Returns numpy H_ff (M, P, P), H_fb (M, P, I), H_bb (I, I), g_f (M, P), g_b (I,): the IRLS
    Hessian blocks and the gradient of E w.r.t. the per-frame parameters f = (ω, t, ψ) and the
    identity b.
    """
    cfg = p.config
    e = p.num_expressions
    rotated, cam, uv, rot = _forward(p, s)
    res = (uv - p.observed) / p.scale  # (M, L, 2) reference px
    norm = res.norm(dim=-1)
    irls = torch.where(norm <= cfg.huber_px, torch.ones_like(norm), cfg.huber_px / norm.clamp_min(1e-12))
    sw = (p.weight * vis * irls).sqrt()  # (M, L): the square root of each residual's weight

    # d(uv)/d(cam) (M, L, 2, 3) in reference px per metre, with the weights folded in.
    x, y, z = cam.unbind(-1)
    iz = sw / z.clamp_min(1e-4)
    zero = torch.zeros_like(x)
    fx, fy = p.k[0] / p.scale, p.k[1] / p.scale
    d_proj = torch.stack([fx * iz, zero, -fx * x * iz / z, zero, fy * iz, -fy * y * iz / z], -1).reshape(*x.shape, 2, 3)
    # d(cam)/dω = -[R s]x J_l(ω), so a row r of d_proj maps to (R s) x r; d(cam)/dt = I.
    j_rot = torch.einsum("mlab,mbc->mlac", torch.cross(rotated[:, :, None].expand_as(d_proj), d_proj, dim=-1),
                         _left_jacobian(s.frame[:, :3]))
    # The model is linear in ψ and β: d(cam)/d(coefficient k) = R B_k.
    d_shape = torch.einsum("mlab,mbc->mlac", d_proj, rot)
    m, num_l = norm.shape
    j_pose = torch.cat([j_rot, d_proj], -1).reshape(m, 2 * num_l, 6)
    j_shape = torch.einsum("mlab,klb->mlak", d_shape, p.shape_basis).reshape(m, 2 * num_l, -1)
    r_w = (res * sw[..., None]).reshape(m, -1, 1)
    # Hessian blocks (pose, shape) without concatenating the large shape Jacobian.
    h_pp, h_ps = j_pose.transpose(1, 2) @ j_pose, j_pose.transpose(1, 2) @ j_shape
    h_ss = j_shape.transpose(1, 2) @ j_shape
    hess = torch.cat([torch.cat([h_pp, h_ps], 2), torch.cat([h_ps.transpose(1, 2), h_ss], 2)], 1).double().cpu().numpy()
    grad = torch.cat([j_pose.transpose(1, 2) @ r_w, j_shape.transpose(1, 2) @ r_w], 1)[..., 0].double().cpu().numpy()

    n_f = p.num_params
    h_ff, h_fb, h_bb = hess[:, :n_f, :n_f], hess[:, :n_f, n_f:], hess[:, n_f:, n_f:].sum(0)
    g_f, g_b = grad[:, :n_f], grad[:, n_f:].sum(0)
    # Priors: identity toward 0; expression L1 (linear, as ψ ≥ 0) and L2.
    identity = s.identity.double().cpu().numpy()
    g_b = g_b + cfg.identity_prior * identity
    h_bb = h_bb + cfg.identity_prior * np.eye(len(identity))
    psi = s.frame[:, 6:].double().cpu().numpy()
    g_f[:, 6:] += cfg.expression_l1 + cfg.expression_l2 * psi
    h_ff[:, 6:, 6:] += cfg.expression_l2 * np.eye(e)
    if p.prior_mean is not None:  # appearance prior: ½ w (ψ − μ)²
        g_f[:, 6:] += p.prior_weight * (psi - p.prior_mean)
        h_ff[:, 6 + np.arange(e), 6 + np.arange(e)] += p.prior_weight
    return h_ff, h_fb, h_bb, g_f, g_b


# --------------------------------------------------------------------------------------------
# The solver
# --------------------------------------------------------------------------------------------


@dataclass
class _System:
    """Damped normal equations of one LM step (float64). With f the per-frame and b the identity
    variables, the Hessian is ``[[blockdiag(h_ff) − offdiag(coupling), h_fb], [h_fb^T, h_bb]]``;
    ``coupling`` (M−1, P) = λ / gap joins the same parameter of frames n and n+1, and ``banded``
    holds the frame part in LAPACK's upper banded storage."""

    h_ff: np.ndarray  # (M, P, P), smoothness degree and damping on the diagonal
    h_fb: np.ndarray  # (M, P, I)
    h_bb: np.ndarray  # (I, I)
    g_f: np.ndarray  # (M, P)
    g_b: np.ndarray  # (I,)
    coupling: np.ndarray  # (M - 1, P)
    banded: np.ndarray  # (P + 1, M·P)

    def frame_product(self, v: np.ndarray) -> np.ndarray:
        """(M, P) frame rows of H·[v; 0]."""
        y = np.einsum("npq,nq->np", self.h_ff, v)
        y[:-1] -= self.coupling * v[1:]
        y[1:] -= self.coupling * v[:-1]
        return y


def _system(h_ff, h_fb, h_bb, g_f, g_b, lam: np.ndarray, gap: np.ndarray, damping: float) -> _System:
    """Add the smoothness Laplacian and Levenberg–Marquardt damping (Marquardt's diagonal scaling)."""
    m, p = g_f.shape
    h_ff = h_ff.copy()
    h_bb = h_bb.copy()
    coupling = lam[None, :] / gap[:, None]
    diag = np.arange(p)
    h_ff[:, diag, diag] += np.pad(coupling, ((0, 1), (0, 0))) + np.pad(coupling, ((1, 0), (0, 0)))
    d = h_ff[:, diag, diag]
    h_ff[:, diag, diag] += damping * (d + 1e-6 * d.mean() + 1e-12)  # the floor covers unused directions
    h_bb[np.diag_indices_from(h_bb)] += damping * (np.diag(h_bb) + 1e-12)
    # Upper banded storage: banded[p + i − j, j] = H[i, j]. Frame blocks sit at offsets 0..p−1 and
    # the temporal coupling (parameter k of frame n and n+1) at offset exactly p, row 0.
    banded = np.zeros((p + 1, m * p))
    a, b = np.triu_indices(p)
    banded[p + a - b, (np.arange(m)[:, None] * p + b).reshape(m, -1)] = h_ff[:, a, b]
    banded[0, p:] = -coupling.reshape(-1)
    return _System(h_ff, h_fb, h_bb, g_f, g_b, coupling, banded)


def _solve(sys: _System, free: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Newton step (δf (M, P), δb (I,)) with the variables not ``free`` held at step ``fixed``.

    Held variables drop out (zero row and column, unit diagonal); their step moves to the
    right-hand side. The frame part is solved by banded Cholesky, the identity by its Schur complement.
    """
    m, p = free.shape
    f = free.reshape(-1).astype(np.float64)
    banded = sys.banded.copy()
    for k in range(1, p + 1):  # entry (j − k, j) survives only if both variables are free
        banded[p - k, k:] *= f[k:] * f[:-k]
    banded[p] = banded[p] * f + (1.0 - f)
    rhs_f = (-sys.g_f - sys.frame_product(fixed)).reshape(-1) * f
    rhs_b = -sys.g_b - np.einsum("npi,np->i", sys.h_fb, fixed)
    h_fb = sys.h_fb.reshape(m * p, -1) * f[:, None]
    sol = solveh_banded(banded, np.concatenate([rhs_f[:, None], h_fb], 1), lower=False, check_finite=False)
    # The small dense algebra runs in torch: numpy's multithreaded BLAS takes milliseconds to wake
    # for a 15 × 15 solve while torch's threads are busy.
    sol_t, h_fb_t = torch.from_numpy(sol), torch.from_numpy(h_fb)
    x_g, x_b = sol_t[:, :1], sol_t[:, 1:]
    schur = torch.from_numpy(sys.h_bb) - h_fb_t.T @ x_b
    d_b = torch.linalg.solve(schur, torch.from_numpy(rhs_b)[:, None] - h_fb_t.T @ x_g)
    d_f = ((x_g - x_b @ d_b)[:, 0].numpy() * f).reshape(m, p) + fixed
    return d_f, d_b[:, 0].numpy()


def _bounded_step(sys: _System, frame: np.ndarray, passes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Projected-Newton step keeping the expression (columns 6:) in [0, 1], by a few active-set passes."""
    psi, g = frame[:, 6:], sys.g_f[:, 6:]
    free = np.ones_like(frame, dtype=bool)
    free[:, 6:] = ~(((psi <= 0.0) & (g > 0)) | ((psi >= 1.0) & (g < 0)))  # at a bound, pushed outward
    fixed = np.zeros_like(frame)
    for _ in range(passes):
        d_f, d_b = _solve(sys, free, fixed)
        new = psi + d_f[:, 6:]
        out = free[:, 6:] & ((new < 0.0) | (new > 1.0))
        if not out.any():
            break
        fixed[:, 6:] = np.where(out, np.clip(new, 0.0, 1.0) - psi, fixed[:, 6:])  # pin to the bound
        free[:, 6:] &= ~out
    return d_f, d_b


def _clipped(s: _State, d_f: np.ndarray, d_b: np.ndarray) -> _State:
    """The state after a step, clipped to the bounds: expression [0, 1], identity [-1, 1]."""
    frame = s.frame + torch.as_tensor(d_f, dtype=s.frame.dtype, device=s.frame.device)
    frame[:, 6:] = frame[:, 6:].clamp(0.0, 1.0)
    identity = s.identity + torch.as_tensor(d_b, dtype=s.identity.dtype, device=s.identity.device)
    return _State(identity.clamp(-1.0, 1.0), frame)


def _temporal_gradient(frame: np.ndarray, lam: np.ndarray, gap: np.ndarray) -> np.ndarray:
    """(M, P) gradient of the smoothness term ½ Σ λ / gap |f_n − f_m|²."""
    g = np.zeros_like(frame)
    d = (frame[1:] - frame[:-1]) * lam[None] / gap[:, None]
    g[1:] += d
    g[:-1] -= d
    return g


def _optimise(p: _Problem, s: _State, progress: bool) -> tuple[_State, int, float]:
    """Levenberg–Marquardt with IRLS (Huber), visibility reweighting and projected-Newton bounds."""
    cfg = p.config
    lam = _smooth_weights(p)
    damping = cfg.damping
    energy = float("nan")
    it = 0
    for it in tqdm(range(1, cfg.iterations + 1), desc="fitting rig", unit="it", disable=not progress):
        if it <= 2:  # visibility from the initial pose, then once more after the first (large) step;
            _, cam, _, rot = _forward(p, s)  # held after that, so the energy being minimised is fixed
            vis = _visibility(p, cam, rot)
        energy = _energy(p, s, vis)
        h_ff, h_fb, h_bb, g_f, g_b = _normal_equations(p, s, vis)
        frame = s.frame.double().cpu().numpy()
        g_f = g_f + _temporal_gradient(frame, lam, p.gap)
        for _ in range(8):  # raise the damping until the step lowers the energy
            trial = _clipped(s, *_bounded_step(_system(h_ff, h_fb, h_bb, g_f, g_b, lam, p.gap, damping), frame))
            new_energy = _energy(p, trial, vis)
            if new_energy < energy:
                damping = max(damping / 3.0, 1e-7)
                break
            damping *= 5.0
        else:
            break  # no step lowers the energy: converged as far as the damping allows
        s, decrease, energy = trial, (energy - new_energy) / max(energy, 1e-12), new_energy
        if decrease < cfg.tolerance:
            break
    return s, it, energy


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def fit_rig(
    landmarks: np.ndarray,
    valid: np.ndarray,
    intrinsics: tuple[float, float, float, float],
    rig: FaceRig | None = None,
    config: FitConfig | None = None,
    device: str = "cpu",
    progress: bool = False,
    landmark_model: LandmarkModel | None = None,
    prior_mean: np.ndarray | None = None,
    prior_weight: np.ndarray | None = None,
) -> FitResult:
    """Fit one identity and per-frame pose and expression to 2D landmarks (see the module docstring).

    Args:
        landmarks: (N, 478, 2) float pixels in MediaPipe order, x right, y down, the image's
            top-left corner at (0, 0). Rows of invalid frames are ignored.
        valid: (N,) bool, frames where a face was detected.
        intrinsics: (fx, fy, cx, cy) in pixels of the image the landmarks are in.
        rig: the FaceRig (default: the packaged one).
        config: weights and solver settings (default: :class:`FitConfig`).
        device: torch device for the Jacobians ("cpu" or "cuda").
        progress: show a progress bar over the solver's iterations.
        landmark_model: where the detector puts the landmarks (default:
            :meth:`LandmarkModel.default`); use ``LandmarkModel.from_rig(rig)`` for landmarks
            projected from the rig itself.
        prior_mean: optional (N, E) independent estimate μ of the expression (e.g.
            :meth:`liftavatar.face.appearance.AppearanceModel.predict`); rows of invalid frames are
            ignored. The fit starts from it and is pulled toward it by the appearance prior.
        prior_weight: (E,) or (N, E) weights w of that prior, reference px² per unit² of
            coefficient (scaled by ``config.appearance_weight``); required with ``prior_mean``.

    Returns:
        :class:`FitResult`; invalid frames carry kinematics interpolated from valid neighbours
        and a NaN reprojection error.

    Raises:
        LiftAvatarError: no valid frame, or inputs of the wrong shape.
    """
    rig = rig or FaceRig.load()
    config = config or FitConfig()
    model = landmark_model or LandmarkModel.default(rig)
    landmarks = np.asarray(landmarks, np.float32)
    valid = np.asarray(valid, bool)
    num = len(landmarks)
    if landmarks.ndim != 3 or landmarks.shape[1:] != (rig.num_landmarks, 2) or valid.shape != (num,):
        raise LiftAvatarError(
            f"landmarks {landmarks.shape} and valid {valid.shape} must be shaped (N, {rig.num_landmarks}, 2) and (N,); "
            "pass MediaPipe FaceMesh landmarks with iris refinement, one row per frame."
        )
    valid = valid & np.isfinite(landmarks).all(axis=(1, 2))
    if not valid.any():
        raise LiftAvatarError(f"no face was found in any of the {num} frames, so the rig cannot be fitted; "
                              "check that the video shows a face and that it is not too small or dark.")
    index = np.flatnonzero(valid)
    obs = landmarks[index]
    rot0, trans0 = initial_pose(obs, model.template, stable_landmarks(model, rig.face_oval, config.pnp_landmarks),
                                intrinsics)

    dev = torch.device(device)
    f32 = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float32, device=dev)  # noqa: E731
    weight = landmark_weights(rig, config)
    used = np.flatnonzero(weight > 0)  # zero-weight landmarks (the irises) cost nothing
    mean = weight_psi = None
    if prior_mean is not None:
        e = rig.num_expressions
        prior_mean = np.asarray(prior_mean, np.float64)
        if prior_weight is None or prior_mean.shape != (num, e):
            raise LiftAvatarError(f"prior_mean {prior_mean.shape} must be shaped ({num}, {e}) and come with "
                                  "prior_weight; "
                                  "pass one expression estimate per frame and the prior's weights.")
        weight_psi = np.broadcast_to(np.asarray(prior_weight, np.float64), (num, e))[index] * config.appearance_weight
        if not (np.isfinite(weight_psi).all() and (weight_psi >= 0).all()):
            raise LiftAvatarError("prior_weight must be finite and non-negative; "
                                  "pass the appearance model's precision.")
        known = np.isfinite(prior_mean[index])  # frames without an estimate get no pull
        weight_psi = np.where(known, weight_psi, 0.0)
        mean = np.where(known, np.clip(np.nan_to_num(prior_mean[index]), 0.0, 1.0), 0.0)
        config = replace(config, expression_l1=config.expression_l1 * config.appearance_l1_scale)
    problem = _Problem(
        observed=f32(obs[:, used]), weight=f32(weight[used]), template=f32(model.template[used]),
        shape_basis=f32(np.concatenate([model.expression_basis[:, used], model.identity_basis[:, used]])),
        normals=f32(template_normals(rig)[used]), k=f32(intrinsics),
        scale=float(intrinsics[0] / np.median(trans0[:, 2])) / REFERENCE_PX_PER_M,
        gap=np.diff(index).astype(np.float64), num_expressions=rig.num_expressions, config=config,
        prior_mean=mean, prior_weight=weight_psi,
    )
    psi0 = np.zeros((len(index), rig.num_expressions)) if mean is None else np.where(weight_psi > 0, mean, 0.0)
    frame = np.concatenate([rot0, trans0, psi0], axis=1)
    state = _State(identity=torch.zeros(rig.num_identity, device=dev), frame=f32(frame))
    with single_threaded_math():
        state, iterations, energy = _optimise(problem, state, progress)

    frame = state.frame.double().cpu().numpy()
    rotation, translation, expression = _fill_invalid(index, num, frame[:, :3], frame[:, 3:6], frame[:, 6:])
    reproj = np.full(num, np.nan, np.float32)
    reproj[index] = _reprojection(model, state, obs, intrinsics)
    return FitResult(
        identity=state.identity.cpu().numpy().astype(np.float32),
        expression=np.clip(expression, 0, 1).astype(np.float32),
        rotation=rotation.astype(np.float32),
        translation=translation.astype(np.float32),
        reprojection_px=reproj,
        iterations=iterations,
        energy=energy,
    )


@contextmanager
def single_threaded_math() -> Iterator[None]:
    """Run torch and the BLAS libraries (OpenBLAS / MKL, through threadpoolctl) on one thread each.

    The solver is many small batched products and solves (M frames × 43 parameters). With the
    default pools (torch's and OpenBLAS's 2 threads each on a 2-core machine) the threads spin
    against each other and against other processes. Measured on a 100-frame extreme clip on 2
    shared cores: 0.67–1.0 s with the default pools, 0.41 s with BLAS on one thread, 0.24 s with
    both on one; ``pytest tests/face`` on a loaded machine went from 13 minutes to under 1.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # threadpoolctl comes with scikit-learn; without it only torch is limited
            yield
        else:
            with threadpool_limits(limits=1, user_api="blas"):
                yield
    finally:
        torch.set_num_threads(previous)


def _reprojection(model: LandmarkModel, s: _State, obs: np.ndarray, intrinsics) -> np.ndarray:
    """(M,) median pixel distance of the fitted surface landmarks (0–467) to the detections."""
    frame = s.frame.double().cpu().numpy()
    return surface_reprojection_px(model, frame[:, 6:], s.identity.double().cpu().numpy(), frame[:, :3],
                                   frame[:, 3:6], obs, intrinsics)


def surface_reprojection_px(model: LandmarkModel, expression: np.ndarray, identity: np.ndarray,
                            rotation: np.ndarray, translation: np.ndarray, landmarks: np.ndarray,
                            intrinsics) -> np.ndarray:
    """(M,) per frame, the median pixel distance of the surface landmarks (0–467) of the rig posed by (M, E)
    ``expression``, (I,) ``identity``, (M, 3) ``rotation`` (axis-angle) and ``translation`` to (M, ≥468, 2)
    detected ``landmarks``, through ``intrinsics`` (fx, fy, cx, cy): how well a fit explains its detections
    (a capture's kinematics and ``landmarks2d`` give it per frame after tracking)."""
    n = NUM_SURFACE
    coeff = np.concatenate([np.asarray(expression, np.float64),
                            np.broadcast_to(np.asarray(identity, np.float64), (len(expression), len(identity)))], 1)
    basis = np.concatenate([model.expression_basis[:, :n], model.identity_basis[:, :n]])
    shape = model.template[None, :n] + np.einsum("mk,klc->mlc", coeff, basis)
    rmat = Rotation.from_rotvec(np.asarray(rotation, np.float64)).as_matrix()
    cam = np.einsum("mab,mlb->mla", rmat, shape) + np.asarray(translation, np.float64)[:, None]
    fx, fy, cx, cy = intrinsics
    uv = np.stack((fx * cam[..., 0] / cam[..., 2] + cx, fy * cam[..., 1] / cam[..., 2] + cy), -1)
    return np.median(np.linalg.norm(uv - landmarks[:, :n], axis=-1), axis=1).astype(np.float32)


def _fill_invalid(index: np.ndarray, num: int, rotation: np.ndarray, translation: np.ndarray,
                  expression: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Kinematics for all N frames from those of the valid frames ``index`` (sorted).

    Between two valid frames: linear interpolation (expression, translation) and slerp (rotation);
    before the first / after the last valid frame: the nearest valid frame's values.
    """
    if len(index) == num:
        return rotation, translation, expression
    t = np.clip(np.arange(num), index[0], index[-1]).astype(np.float64)
    interp = lambda a: np.stack([np.interp(t, index, a[:, k]) for k in range(a.shape[1])], 1)  # noqa: E731
    if len(index) == 1:
        rot = np.repeat(rotation, num, axis=0)
    else:
        rot = Slerp(index.astype(np.float64), Rotation.from_rotvec(rotation))(t).as_rotvec()
    return rot, interp(translation), interp(expression)
