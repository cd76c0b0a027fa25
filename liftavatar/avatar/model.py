"""Mesh-rigged 3D Gaussians: every Gaussian is bound to one rig triangle (DESIGN.md §7).

GaussianAvatars-style binding (Qian et al., CVPR 2024). Triangle t of the posed rig mesh has a
frame: origin at its centroid ``c``, rotation ``R = [e0, e1, n]`` (columns; ``e0`` along the first
edge v0→v1, ``n`` the unit normal of (v1 - v0) × (v2 - v0), ``e1 = n × e0``) and a scale ``k``,
the mean length of its three edges (metres). A Gaussian bound to t stores, in that frame and in
units of ``k``:

- ``means`` (N, 3): local position μ;           world mean  = c + k · R μ
- ``scales`` (N, 3): log of the local std s;     world scale = k · exp(s)
- ``quats`` (N, 4): local rotation q (w, x, y, z); world rotation = quat(R) ⊗ q
- ``opacities`` (N,): logit of the opacity
- ``sh0`` (N, 1, 3), ``shN`` (N, K - 1, 3): SH colour coefficients (K = (degree + 1)²), gsplat's
  convention colour = SH(dir) + 0.5, clamped at 0.

So when the expression or the pose moves the mesh, the Gaussians move, turn and stretch with
their triangles. The "world" is the OpenCV camera frame of the capture (x right, y down,
z forward, metres) because the rig's ``vertices()`` already applies the head pose; the head
frame is the world at zero rotation and translation.

Colour direction (``sh_frame``): "local" evaluates SH on the view direction expressed in the
Gaussian's triangle frame, so colour depends on how the surface faces the camera (the shading
a light fixed to the camera gives, which is what synthetic and phone captures have); "world"
is standard 3DGS (direction in the world frame). Colours are evaluated here, and the rasterizer
gets plain RGB, so both backends see the same input.

Which parts carry Gaussians: by default all of the rig's parts — face, eyeballs, mouth interior
(teeth, tongue, cavity), *and* the head shell and neck, because capture masks cover the whole
rigged head (hair on the shell, the neck), so without Gaussians there the masked photometric
loss would drag face Gaussians over the hair. ``AvatarConfig.parts`` can drop them.

Expression-dependent deformation (``AvatarConfig.deform_width`` > 0; FlashAvatar, Xiang et al. CVPR 2024, conditions
mesh-embedded Gaussians' offsets on the expression the same way): a small MLP maps each Gaussian's canonical
position (where it sits on the neutral head, Fourier-encoded) and the frame's expression coefficients and head
rotation to offsets of its local mean, log-scale, quaternion and base colour. Its last layer starts at zero, so a
new avatar is the plain binding. It lets the avatar learn what the rig's blendshapes do not move (wrinkles, the
skin around a wide-open mouth, hair that swings as the head turns); :func:`deform_gaussians`.

State is plain tensors (:class:`Avatar`); :func:`gaussians_world` is a pure function from
(parameters, posed vertices[, deformation and the frame's condition]) to world-space Gaussians.

On disk (:func:`save_avatar`): one file, ``avatar.safetensors``, is the checkpoint: the avatar's
tensors, the training state's tensors (``train.``-prefixed: Adam moments, densification statistics,
kinematics corrections) and, in the safetensors header's metadata, the avatar's metadata and the
training state's (JSON). It is written under a temporary name and renamed, so a checkpoint appears
whole or not at all: parameters are never paired with another step's optimizer state, and a kill
leaves the previous checkpoint. ``avatar.json`` and ``train_state.json`` beside it are readable
copies written after it; nothing reads them back (they may lag it by one interrupted write).
Avatars saved before this layout (four files, no metadata in the header) still load.
"""

from __future__ import annotations

import json
import logging
import math
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from liftavatar.errors import LiftAvatarError
from liftavatar.io import atomic_write, json_safe, write_json

logger = logging.getLogger(__name__)

__all__ = [
    "AVATAR_FILE",
    "AVATAR_META",
    "ALL_PARTS",
    "ActivatedGaussians",
    "Avatar",
    "AvatarConfig",
    "AvatarError",
    "AvatarMeta",
    "WorldGaussians",
    "activate_gaussians",
    "bake_deformation",
    "canonical_positions",
    "deform_condition",
    "deform_features",
    "deform_gaussians",
    "encode_positions",
    "init_deform",
    "gaussians_world",
    "init_avatar",
    "load_avatar",
    "local_covariances",
    "matrix_to_quaternion",
    "pose_gaussians",
    "quaternion_multiply",
    "render_avatar",
    "rgb_to_sh0",
    "intrinsics_matrix",
    "read_checkpoint",
    "save_avatar",
    "triangle_frames",
]

AVATAR_FILE = "avatar.safetensors"
"""The checkpoint: every tensor, and both metadata records in its header."""
AVATAR_META = "avatar.json"
"""Readable copy of the avatar's metadata (written after the checkpoint; not read back)."""
STATE_META = "train_state.json"
"""Readable copy of the training state's metadata (written after the checkpoint; not read back)."""
LEGACY_STATE_FILE = "train_state.safetensors"
"""The training state's tensors in avatars saved before the one-file checkpoint."""
AVATAR_FORMAT = 1
_HEADER_TAG = "liftavatar-avatar"  # the safetensors metadata "format" of a one-file checkpoint
TRAIN_PREFIX = "train."
DEFORM_PREFIX = "deform."
ALL_PARTS = ("face", "eyeball", "upper_teeth", "lower_teeth", "tongue", "cavity", "head", "neck")
PARAM_NAMES = ("means", "scales", "quats", "opacities", "sh0", "shN")
_MIN_TRIANGLE_SCALE = 1e-6  # metres; keeps degenerate triangles from collapsing their Gaussians


class AvatarError(LiftAvatarError):
    """An avatar directory is missing, incomplete, or does not fit the input it is used with."""


@dataclass
class AvatarConfig:
    """How an avatar is built (recorded in ``avatar.json``)."""

    parts: tuple[str, ...] = ALL_PARTS
    """Rig parts whose triangles carry Gaussians."""
    gaussians_per_triangle: int = 2
    """Gaussians placed on every triangle at initialisation (densification adds more)."""
    sh_degree: int = 1
    """Spherical-harmonics degree of the colour (0: view-independent)."""
    sh_frame: Literal["local", "world"] = "local"
    """Frame of the SH direction: the bound triangle's frame, or the world (standard 3DGS)."""
    init_opacity: float = 0.9
    init_thickness: float = 0.3
    """Initial std along the triangle normal, relative to the in-plane std."""
    deform_width: int = 32
    """Width of the MLP that offsets every Gaussian by the frame's expression and head rotation (see the module
    docstring); 0: no deformation, the plain binding (what :class:`~liftavatar.avatar.fast_render.AvatarRenderer`
    renders). 32 was chosen on ``train/`` real clips and a synthetic subject, 128², 1 CPU thread: on
    liveportrait_d19 (1500 iterations) training-frame fit 31.9 → 33.1 dB and held-out seen frames 30.9 → 31.4 dB
    for about the same time per iteration as without it (width 64 gained about as much); on the demo's synthetic
    subject (1500 iterations) the extreme test 25.16 → 25.66 dB and the seen test 32.93 → 33.49 dB (inside-mask
    28.61 → 29.73 dB). On six ``train/`` clips on a GPU (3000 iterations, width 64) it raised the fit by 1.4–3.8 dB
    and left the seen frames within ±0.6 dB (benchmarks/results/avatar_real_sweep_train.json)."""
    deform_frequencies: int = 4
    """Fourier frequencies (octaves) of the canonical position the deformation MLP reads."""


@dataclass
class AvatarMeta:
    """What an avatar was trained on; render and export check their inputs against it."""

    subject: str
    rig: dict[str, Any]
    expression_names: list[str]
    size: tuple[int, int]
    """(H, W) of the training images, pixels."""
    intrinsics: tuple[float, float, float, float]
    """(fx, fy, cx, cy) of the training camera at ``size``, pixels."""
    fps: float = 25.0
    step: int = 0
    """Training iterations done."""
    config: AvatarConfig = field(default_factory=AvatarConfig)
    iters: int | None = None
    """Training iterations the run was asked for; ``step < iters`` means unfinished (interrupted or
    time-boxed). None: an avatar saved before this was recorded, taken as finished."""

    @property
    def finished(self) -> bool:
        """Whether training reached its target (see ``iters``)."""
        return self.iters is None or self.step >= self.iters

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["finished"] = self.finished  # for readers of avatar.json; derived, not read back
        data["format"] = AVATAR_FORMAT
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "AvatarMeta":
        data = dict(data)
        data.pop("format", None)
        data.pop("finished", None)
        cfg = dict(data.pop("config"))
        cfg["parts"] = tuple(cfg["parts"])
        return cls(
            **{**data, "size": tuple(data["size"]), "intrinsics": tuple(data["intrinsics"])},
            config=AvatarConfig(**cfg),
        )


@dataclass
class Avatar:
    """An avatar's state.

    Attributes:
        params: the trainable tensors, keyed by :data:`PARAM_NAMES` (see the module docstring).
        binding: (N,) long, index into ``faces`` of each Gaussian's triangle.
        faces: (F, 3) long, the rig's triangles (all parts; ``binding`` indexes these).
        identity: (I,) float32 identity coefficients of the subject.
        meta: :class:`AvatarMeta`.
        deform: the deformation MLP's tensors (``w0_pos``, ``w0_cond``, ``b0``, ``w1``, ``b1``, ``w2``, ``b2``),
            or None when ``meta.config.deform_width`` is 0.
    """

    params: dict[str, Tensor]
    binding: Tensor
    faces: Tensor
    identity: Tensor
    meta: AvatarMeta
    deform: dict[str, Tensor] | None = None

    @property
    def num_gaussians(self) -> int:
        return int(self.binding.shape[0])

    @property
    def device(self) -> torch.device:
        return self.binding.device

    def to(self, device: torch.device | str) -> "Avatar":
        return Avatar(
            {k: v.to(device) for k, v in self.params.items()}, self.binding.to(device),
            self.faces.to(device), self.identity.to(device), self.meta,
            None if self.deform is None else {k: v.to(device) for k, v in self.deform.items()},
        )

    def vertices(self, expression: Tensor, rotation: Tensor, translation: Tensor, rig=None) -> Tensor:
        """Posed rig vertices (B, V, 3) in the camera frame (metres) for this subject."""
        from liftavatar.face.rig import FaceRig

        rig = rig or FaceRig.load()
        device = self.device
        return rig.vertices(
            self.identity.to(device), torch.as_tensor(expression, device=device),
            torch.as_tensor(rotation, device=device), torch.as_tensor(translation, device=device),
        )


@dataclass
class WorldGaussians:
    """World-space Gaussians of one or more frames: means (B, N, 3) metres, quats (B, N, 4) wxyz,
    scales (B, N, 3) metres (std), opacities (N,) in [0, 1], colors (B, N, 3) RGB (>= 0); or,
    from :func:`pose_gaussians` with ``covariances``, ``covars`` (B, N, 6) m² (upper triangle
    xx, xy, xz, yy, yz, zz, gsplat's layout) in place of quats and scales (then None)."""

    means: Tensor
    quats: Tensor | None
    scales: Tensor | None
    opacities: Tensor
    colors: Tensor
    covars: Tensor | None = None


# --------------------------------------------------------------------------------------------
# Geometry


def triangle_frames(vertices: Tensor, faces: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Frames of triangles ``faces`` (F, 3) of posed vertices (B, V, 3).

    Returns:
        centroids (B, F, 3) metres, rotations (B, F, 3, 3) with columns (e0, e1, n) (see the
        module docstring), and scales (B, F) metres (mean edge length, at least 1e-6).
    """
    v0, v1, v2 = (vertices[:, faces[:, k]] for k in range(3))
    e01, e02, e12 = v1 - v0, v2 - v0, v2 - v1
    e0 = F.normalize(e01, dim=-1, eps=1e-12)
    n = F.normalize(torch.cross(e01, e02, dim=-1), dim=-1, eps=1e-12)
    e1 = torch.cross(n, e0, dim=-1)
    rot = torch.stack((e0, e1, n), dim=-1)
    scale = (e01.norm(dim=-1) + e02.norm(dim=-1) + e12.norm(dim=-1)) / 3
    return (v0 + v1 + v2) / 3, rot, scale.clamp_min(_MIN_TRIANGLE_SCALE)


def matrix_to_quaternion(matrix: Tensor) -> Tensor:
    """(..., 3, 3) rotation matrices -> (..., 4) unit quaternions (w, x, y, z), differentiable
    (the best-conditioned of the four standard candidates, as in PyTorch3D)."""
    m = matrix.reshape(matrix.shape[:-2] + (9,))
    m00, m01, m02, m10, m11, m12, m20, m21, m22 = m.unbind(-1)
    q_sq = torch.stack(
        (1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22), -1
    )
    q_abs = torch.sqrt(q_sq.clamp_min(1e-12))
    candidates = torch.stack(
        (
            torch.stack((q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01), -1),
            torch.stack((m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20), -1),
            torch.stack((m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21), -1),
            torch.stack((m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2), -1),
        ),
        -2,
    ) / (2.0 * q_abs[..., None].clamp_min(0.1))
    # One-hot of the best candidate by comparison with arange (same values as F.one_hot, which on
    # some devices checks its input on the host); keeps this free of host syncs (CUDA graphs).
    best = (q_abs.argmax(-1)[..., None] == torch.arange(4, device=matrix.device)).to(matrix.dtype)
    quat = (candidates * best[..., None]).sum(-2)
    return F.normalize(quat, dim=-1)


def quaternion_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product a ⊗ b of (..., 4) quaternions (w, x, y, z): rotate by b, then by a."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack(
        (
            aw * bw - ax * bx - ay * by - az * bz,
            aw * bx + ax * bw + ay * bz - az * by,
            aw * by - ax * bz + ay * bw + az * bx,
            aw * bz + ax * by - ay * bx + az * bw,
        ),
        -1,
    )


@dataclass
class ActivatedGaussians:
    """The frame-independent part of an avatar's Gaussians, activated: local means (N, 3),
    local std ``exp(scales)`` (N, 3), unit local quaternions (N, 4), opacities ``sigmoid`` (N,)
    and the SH coefficients (N, K, 3) (``sh0`` and ``shN`` joined). :func:`gaussians_world`
    computes it on every call (it must stay differentiable in the parameters); a renderer of a
    fixed avatar (:mod:`liftavatar.avatar.fast_render`) computes it once."""

    means: Tensor
    scales: Tensor
    quats: Tensor
    opacities: Tensor
    coeffs: Tensor


def activate_gaussians(params: dict[str, Tensor]) -> ActivatedGaussians:
    """:class:`ActivatedGaussians` of the avatar's parameters (differentiable)."""
    return ActivatedGaussians(
        means=params["means"], scales=torch.exp(params["scales"]), quats=F.normalize(params["quats"], dim=-1),
        opacities=torch.sigmoid(params["opacities"]), coeffs=torch.cat((params["sh0"], params["shN"]), 1),
    )


def deform_condition(expression: Tensor, rotation: Tensor) -> Tensor:
    """(B, E + 3): what the deformation reads of a frame: its expression coefficients and head rotation
    (axis-angle, radians); hair and skin that move with a turn of the head read the latter."""
    return torch.cat((torch.as_tensor(expression, dtype=torch.float32),
                      torch.as_tensor(rotation, dtype=torch.float32)), -1)


_DEFORM_OUT = 13  # Δ local mean (3), Δ log-scale (3), Δ quaternion (4), Δ base colour (3)
_CANONICAL_EXTENT = 0.25  # metres: canonical positions (head frame) are divided by this before encoding


def init_deform(config: AvatarConfig, conditions: int, seed: int = 0) -> dict[str, Tensor] | None:
    """The deformation MLP's tensors for ``conditions`` inputs per frame (None when the config has none): two
    hidden SiLU layers of ``deform_width``, the output layer zero, so that the new avatar is undeformed."""
    width = config.deform_width
    if width <= 0:
        return None
    gen = torch.Generator().manual_seed(seed + 0xDEF)
    features = 3 * (1 + 2 * config.deform_frequencies)

    def linear(n_in: int, n_out: int) -> Tensor:
        return torch.randn(n_in, n_out, generator=gen) * math.sqrt(2.0 / n_in)

    first = linear(features + conditions, width)
    return {"w0_pos": first[:features].contiguous(), "w0_cond": first[features:].contiguous(),
            "b0": torch.zeros(width), "w1": linear(width, width), "b1": torch.zeros(width),
            "w2": torch.zeros(width, _DEFORM_OUT), "b2": torch.zeros(_DEFORM_OUT)}


def canonical_positions(params: dict[str, Tensor], binding: Tensor, neutral: Tensor, faces: Tensor) -> Tensor:
    """(N, 3) where every Gaussian sits on the neutral head (head frame, metres): its triangle's frame on the
    ``neutral`` vertices (1, V, 3) applied to its local mean. Detached: an input of the deformation, not a path
    for gradients into the means."""
    cen, rot, k = (t[0].index_select(0, binding) for t in triangle_frames(neutral, faces))
    return (cen + k[:, None] * (rot * params["means"].detach()[:, None, :]).sum(-1)).detach()


def encode_positions(positions: Tensor, frequencies: int) -> Tensor:
    """(N, 3 (1 + 2 F)) Fourier encoding of canonical positions (NeRF's γ) at octaves 0 … F − 1."""
    p = positions / _CANONICAL_EXTENT
    scaled = p[..., None] * (2.0 ** torch.arange(frequencies, device=p.device, dtype=p.dtype)) * math.pi
    return torch.cat((p, torch.sin(scaled).flatten(-2), torch.cos(scaled).flatten(-2)), -1)


def deform_gaussians(local: ActivatedGaussians, deform: dict[str, Tensor], features: Tensor,
                     condition: Tensor) -> ActivatedGaussians:
    """The Gaussians of every frame offset by the deformation MLP: per-frame (B, N, ...) local means, scales,
    quaternions and colour coefficients (opacities stay shared). ``features`` (N, P) encoded canonical positions,
    ``condition`` (B, C) from :func:`deform_condition`. Written out rather than as an ``nn.Module`` so that the
    avatar stays plain tensors (and densification, which reorders Gaussians, never touches the MLP): the first
    layer's position half runs once for all frames, its condition half once per frame."""
    hidden = features @ deform["w0_pos"] + (condition.to(features) @ deform["w0_cond"] + deform["b0"])[:, None]
    hidden = F.silu(hidden)  # (B, N, W)
    hidden = F.silu(hidden @ deform["w1"] + deform["b1"])
    out = hidden @ deform["w2"] + deform["b2"]  # (B, N, 13)
    d_mean, d_scale, d_quat, d_colour = out.split((3, 3, 4, 3), -1)
    dc = local.coeffs[:, :1] + d_colour[..., None, :] / 0.28209479177387814  # Δ colour as a DC offset
    coeffs = torch.cat((dc, local.coeffs[None, :, 1:].expand(out.shape[0], -1, -1, -1)), -2)
    return ActivatedGaussians(means=local.means + d_mean, scales=local.scales * torch.exp(d_scale),
                              quats=F.normalize(local.quats + d_quat, dim=-1), opacities=local.opacities,
                              coeffs=coeffs)


@torch.no_grad()
def bake_deformation(avatar: Avatar, condition: Tensor) -> Avatar:
    """The avatar with its deformation at one frame's ``condition`` (1, C) folded into its parameters, and no
    deformation left: what a viewer or exporter that knows nothing of it shows of that frame (the neutral head:
    ``deform_condition`` of the neutral expression and zero rotation)."""
    if avatar.deform is None:
        return avatar
    local = deform_gaussians(activate_gaussians(avatar.params), avatar.deform, deform_features(avatar),
                             condition.to(avatar.device))
    params = dict(avatar.params)
    params["means"] = local.means[0]
    params["scales"] = torch.log(local.scales[0])
    params["quats"] = local.quats[0]
    params["sh0"] = local.coeffs[0, :, :1]
    meta = AvatarMeta(**{**asdict(avatar.meta), "config": replace(avatar.meta.config, deform_width=0)})
    return Avatar(params, avatar.binding, avatar.faces, avatar.identity, meta, None)


def gaussians_world(
    params: dict[str, Tensor],
    binding: Tensor,
    vertices: Tensor,
    faces: Tensor,
    sh_degree: int,
    sh_frame: str = "local",
    campos: Tensor | None = None,
    deform: dict[str, Tensor] | None = None,
    features: Tensor | None = None,
    condition: Tensor | None = None,
) -> WorldGaussians:
    """World-space Gaussians of posed rig vertices; pure and differentiable in all inputs.

    Args:
        params: the avatar's parameters (local frame, see the module docstring).
        binding: (N,) long triangle index of every Gaussian.
        vertices: (B, V, 3) posed rig vertices, camera frame, metres.
        faces: (F, 3) long rig triangles.
        sh_degree: SH degree to evaluate (≤ the stored degree).
        sh_frame: "local" or "world" (direction of view in the triangle's frame or the world's).
        campos: (B, 3) or (3,) camera centre in the world frame, metres; default the origin (the
            capture camera).
        deform, features, condition: the deformation MLP, the Gaussians' encoded canonical positions (N, P) and
            the frames' conditions (B, C) (:func:`deform_condition`); with ``deform`` None, no deformation.
    """
    local = activate_gaussians(params)
    if deform is not None:
        local = deform_gaussians(local, deform, features, condition)
    return pose_gaussians(local, binding, vertices, faces, sh_degree, sh_frame, campos)


def pose_gaussians(
    local: ActivatedGaussians,
    binding: Tensor,
    vertices: Tensor,
    faces: Tensor,
    sh_degree: int,
    sh_frame: str = "local",
    campos: Tensor | None = None,
    covariances: Tensor | None = None,
) -> WorldGaussians:
    """:func:`gaussians_world` from already activated parameters (same arguments otherwise).

    Only fixed-shape tensor operations, no host synchronisation and no data-dependent control
    flow, so that :mod:`liftavatar.avatar.fast_render` can capture it in a CUDA graph.

    ``covariances``: (N, 3, 3) local covariances R_l diag(exp(s))² R_lᵀ (triangle units², see
    :func:`local_covariances`); when given, the world covariances k² R Σ_l Rᵀ are returned as
    ``covars`` instead of quats and scales: the same Gaussians for a rasterizer that takes
    covariances (gsplat), in ~7 tensor operations instead of the ~70 of the quaternion path.
    """
    from gsplat.cuda._torch_impl import _spherical_harmonics

    # Frames of all triangles, then gathered: no torch.unique, which would sync a CUDA device.
    cen, rot, k = triangle_frames(vertices, faces)
    cen, rot, k = (t.index_select(1, binding) for t in (cen, rot, k))  # (B, N, ...)
    # Local tensors are (N, ...) or, deformed per frame, (B, N, ...): both broadcast against (B, N, ...).
    means = cen + k[..., None] * (rot * local.means[..., None, :]).sum(-1)  # R μ, elementwise (fast on CPU)
    quats = scales = covars = None
    if covariances is None:
        scales = k[..., None] * local.scales
        quats = quaternion_multiply(matrix_to_quaternion(rot), local.quats)
    else:
        rs = (rot[..., :, :, None] * covariances[None, :, None, :, :]).sum(-2)  # R Σ_l
        cov = (rs[..., :, None, :] * rot[..., None, :, :]).sum(-1) * (k * k)[..., None, None]  # k² R Σ_l Rᵀ
        covars = torch.stack((cov[..., 0, 0], cov[..., 0, 1], cov[..., 0, 2], cov[..., 1, 1], cov[..., 1, 2],
                              cov[..., 2, 2]), -1)
    if campos is None:
        campos = means.new_zeros(3)
    campos = torch.as_tensor(campos, dtype=means.dtype, device=means.device).reshape(-1, 1, 3)
    dirs = means - campos  # (B, N, 3) world
    if sh_frame == "local":
        dirs = (rot * dirs[..., :, None]).sum(-2)  # Rᵀ d
    elif sh_frame != "world":
        raise ValueError(f"sh_frame must be 'local' or 'world', got {sh_frame!r}")
    coeffs = local.coeffs if local.coeffs.dim() == 4 else local.coeffs[None]  # (B or 1, N, K, 3)
    if sh_degree == 0:
        colors = coeffs[:, :, 0] * 0.28209479177387814 + 0.5
        colors = colors.expand(means.shape[0], -1, -1)
    else:
        colors = _spherical_harmonics(sh_degree, dirs, coeffs.expand(means.shape[0], -1, -1, -1)) + 0.5
    return WorldGaussians(
        means=means, quats=quats, scales=scales, opacities=local.opacities, colors=colors.clamp_min(0.0),
        covars=covars,
    )


def local_covariances(local: ActivatedGaussians) -> Tensor:
    """(N, 3, 3) covariances R_l diag(σ)² R_lᵀ of the Gaussians in their triangle frames, in
    triangle units² (σ = ``local.scales``, R_l the rotation of ``local.quats``)."""
    from gsplat.cuda._torch_impl import _quat_to_rotmat

    m = _quat_to_rotmat(local.quats) * local.scales[..., None, :]  # R_l S
    return (m[..., :, None, :] * m[..., None, :, :]).sum(-1)  # (R_l S)(R_l S)ᵀ


# --------------------------------------------------------------------------------------------
# Initialisation


def rgb_to_sh0(rgb: Tensor) -> Tensor:
    """DC SH coefficient whose colour (SH + 0.5) is ``rgb`` in [0, 1]."""
    return (rgb - 0.5) / 0.28209479177387814


def init_avatar(
    rig,
    identity: np.ndarray | Tensor,
    meta: AvatarMeta,
    colors: Tensor | None = None,
    seed: int = 0,
) -> Avatar:
    """Gaussians on the neutral rig surface of ``identity``.

    Each triangle of ``meta.config.parts`` gets ``gaussians_per_triangle`` Gaussians at
    stratified barycentric points, flat in the triangle's plane (in-plane std ≈ the spacing
    between them, ``init_thickness`` of it along the normal), local rotation identity, opacity
    ``init_opacity`` and grey colour (or ``colors``: (N, 3) RGB in [0, 1] in the order built
    here, see :func:`init_positions`), and the expression-deformation MLP of ``meta.config.deform_width``
    (zero output, so the new avatar is the plain binding).
    """
    cfg = meta.config
    bad = [p for p in cfg.parts if p not in rig.part_names]
    if bad:
        raise AvatarError(f"avatar parts {bad} are not parts of rig {rig.name} ({', '.join(rig.part_names)}); "
                          f"choose parts among those.")
    binding, bary = init_positions(rig, cfg, seed)
    faces = torch.as_tensor(rig.faces, dtype=torch.long)
    identity = torch.as_tensor(identity, dtype=torch.float32)
    verts = rig.vertices(identity, rig.neutral_expression(1), np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32))
    cen, rot, k = triangle_frames(verts, faces[binding])
    corners = verts[0][faces[binding]]  # (N, 3, 3)
    points = (bary[..., None] * corners).sum(1)
    local = (rot[0].transpose(-1, -2) @ ((points - cen[0]) / k[0, :, None])[..., None])[..., 0]
    local[:, 2] = 0.0
    # In-plane std: half the spacing of n points on a triangle of area A, relative to k.
    area = 0.5 * torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1).norm(dim=-1)
    spacing = torch.sqrt(area / cfg.gaussians_per_triangle) / k[0]
    s = (0.5 * spacing).clamp(0.05, 1.0)
    scales = torch.log(torch.stack((s, s, s * cfg.init_thickness), -1))
    n = len(binding)
    num_sh = (cfg.sh_degree + 1) ** 2
    rgb = colors if colors is not None else torch.full((n, 3), 0.5)
    params = {
        "means": local.contiguous(),
        "scales": scales,
        "quats": torch.tensor([1.0, 0, 0, 0]).repeat(n, 1),
        "opacities": torch.full((n,), math.log(cfg.init_opacity / (1 - cfg.init_opacity))),
        "sh0": rgb_to_sh0(rgb)[:, None, :],
        "shN": torch.zeros(n, num_sh - 1, 3),
    }
    avatar = Avatar(params, binding, faces, identity, meta)
    avatar.deform = init_deform(cfg, len(meta.expression_names) + 3, seed=seed)
    return avatar


def degenerate_triangles(rig) -> np.ndarray:
    """(F,) bool: triangles of zero area in the template (the eyeballs' pole triangles), whose
    frame is undefined; no Gaussian is bound to them."""
    v = rig.template[rig.faces]  # (F, 3, 3)
    e1, e2 = v[:, 1] - v[:, 0], v[:, 2] - v[:, 0]
    area2 = np.linalg.norm(np.cross(e1, e2), axis=-1)
    k = (np.linalg.norm(e1, axis=-1) + np.linalg.norm(e2, axis=-1) + np.linalg.norm(v[:, 2] - v[:, 1], axis=-1)) / 3
    return area2 <= 1e-6 * np.maximum(k, 1e-12) ** 2


def init_positions(rig, cfg: AvatarConfig, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(binding (N,), barycentric (N, 3)) of the initial Gaussians: the non-degenerate triangles
    of ``cfg.parts`` in index order, ``gaussians_per_triangle`` each, the first at the centroid and the others
    jittered inside the triangle (deterministic in ``seed``)."""
    tris = torch.as_tensor(np.flatnonzero(rig.part_mask(*cfg.parts) & ~degenerate_triangles(rig)), dtype=torch.long)
    per = cfg.gaussians_per_triangle
    if per < 1:
        raise AvatarError(f"gaussians_per_triangle is {per}; use 1 or more.")
    binding = tris.repeat_interleave(per)
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(len(binding), 2, generator=gen)
    flip = u.sum(-1) > 1
    u[flip] = 1 - u[flip]
    bary = torch.stack((1 - u.sum(-1), u[:, 0], u[:, 1]), -1)
    bary = 0.5 * bary + 0.5 / 3  # stay inside, away from the edges
    bary[::per] = 1.0 / 3
    return binding, bary


# --------------------------------------------------------------------------------------------
# Saving and loading


def save_avatar(
    avatar: Avatar,
    out_dir: str | Path,
    train_meta: dict[str, Any] | None = None,
    train_tensors: dict[str, Tensor] | None = None,
) -> Path:
    """Write the checkpoint ``out_dir/avatar.safetensors`` in one atomic rename (see the module docstring),
    then its readable copies ``avatar.json`` and, with ``train_meta``, ``train_state.json``.

    ``train_meta`` (JSON-ready) and ``train_tensors`` are the training state that ``--resume`` continues
    from; they are saved in the same file as the parameters, so the two always belong to the same step.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in avatar.params.items()}
    tensors["binding"] = avatar.binding.cpu().contiguous()
    tensors["identity"] = avatar.identity.cpu().contiguous()
    for name, value in (avatar.deform or {}).items():
        tensors[DEFORM_PREFIX + name] = value.detach().cpu().contiguous()
    for name, value in (train_tensors or {}).items():
        tensors[TRAIN_PREFIX + name] = value.detach().cpu().contiguous()
    meta = avatar.meta.to_json()
    header = {"format": _HEADER_TAG, "avatar": json.dumps(json_safe(meta))}
    if train_meta is not None:
        header["train_state"] = json.dumps(json_safe(train_meta))
    atomic_write(out / AVATAR_FILE, lambda p: save_file(tensors, str(p), metadata=header))
    # The checkpoint is complete; what follows only keeps the readable copies in step with it.
    (out / LEGACY_STATE_FILE).unlink(missing_ok=True)  # superseded by the train.* tensors
    write_json(out / AVATAR_META, meta)
    if train_meta is not None:
        write_json(out / STATE_META, train_meta)
    else:
        (out / STATE_META).unlink(missing_ok=True)
    return out


def read_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", *, train_state: bool = False
) -> tuple[Avatar, dict[str, Any] | None, dict[str, Tensor]]:
    """Read an avatar directory as it is, finished or not: (avatar, training-state metadata or None, training-state
    tensors without their prefix; read only with ``train_state``). Reads avatars saved before the one-file
    checkpoint too (``avatar.json`` and ``train_state.json`` / ``.safetensors`` then hold what the header lacks).

    Raises:
        AvatarError: the directory or checkpoint is missing, unreadable, lacks a tensor, or was trained with
            another rig version.
    """
    from safetensors import SafetensorError, safe_open

    from liftavatar.face.rig import FaceRig

    root = Path(path)
    weights, meta_path = root / AVATAR_FILE, root / AVATAR_META
    if not root.is_dir():
        raise AvatarError(f"{root}: no such avatar directory; pass the -o directory of `liftavatar avatar train`.")
    if not weights.is_file():
        raise AvatarError(f"{weights}: missing, so {root} holds no finished avatar checkpoint; "
                          f"train one with `liftavatar avatar train CAPTURE -o {root}`.")
    device = str(device)
    try:
        with safe_open(str(weights), framework="pt", device=device) as f:
            header = f.metadata() or {}
            keys = set(f.keys())
            wanted = [k for k in keys if train_state or not k.startswith(TRAIN_PREFIX)]
            tensors = {k: f.get_tensor(k) for k in wanted}
    except (SafetensorError, OSError) as exc:
        raise AvatarError(f"{weights}: cannot be read ({exc}); train the avatar again.") from None

    legacy = header.get("format") != _HEADER_TAG
    source = meta_path if legacy else weights
    try:
        if legacy:
            if not meta_path.is_file():
                raise AvatarError(f"{meta_path}: missing, so {root} holds no finished avatar checkpoint; "
                                  f"train one with `liftavatar avatar train CAPTURE -o {root}`.")
            meta = AvatarMeta.from_json(json.loads(meta_path.read_text(encoding="utf-8")))
        else:
            meta = AvatarMeta.from_json(json.loads(header["avatar"]))
        train_meta = json.loads(header["train_state"]) if "train_state" in header else None
    except (ValueError, TypeError, KeyError) as exc:
        raise AvatarError(f"{source}: cannot be read as avatar metadata ({exc!r}); train the avatar "
                          f"again.") from None
    rig = FaceRig.load()
    if meta.rig.get("name") != rig.name or meta.rig.get("version") != rig.version:
        raise AvatarError(f"{source}: the avatar is bound to rig {meta.rig}, not this package's "
                          f"{rig.name} v{rig.version}; train it again with this version.")
    missing = [k for k in (*PARAM_NAMES, "binding", "identity") if k not in keys]
    if missing:
        raise AvatarError(f"{weights}: holds no tensor {missing[0]!r}, so the file is damaged or not an avatar of "
                          f"this package; train the avatar again.")
    params = {k: tensors[k] for k in PARAM_NAMES}
    binding = tensors["binding"].long()
    n = binding.shape[0] if binding.dim() == 1 else -1
    misfit = [f"{k} {tuple(v.shape)}" for k, v in params.items() if v.dim() == 0 or v.shape[0] != n]
    if n > 0 and not 0 <= int(binding.min()) <= int(binding.max()) < len(rig.faces):
        misfit.append(f"binding indices up to {int(binding.max())} for {len(rig.faces)} rig triangles")
    if n < 0 or misfit:
        raise AvatarError(f"{weights}: its tensors do not fit together (binding {tuple(binding.shape)}, "
                          f"{misfit[0] if misfit else 'not one index per Gaussian'}); train the avatar again.")
    faces = torch.as_tensor(rig.faces, dtype=torch.long, device=device)
    deform = {k[len(DEFORM_PREFIX):]: v for k, v in tensors.items() if k.startswith(DEFORM_PREFIX)} or None
    if (deform is None) != (meta.config.deform_width <= 0):
        raise AvatarError(f"{weights}: its deformation tensors do not match its config (deform_width "
                          f"{meta.config.deform_width}); train the avatar again.")
    avatar = Avatar(params, binding, faces, tensors["identity"], meta, deform)

    state: dict[str, Tensor] = {}
    if train_state:
        state = {k[len(TRAIN_PREFIX):]: v for k, v in tensors.items() if k.startswith(TRAIN_PREFIX)}
        if legacy:
            train_meta, state = _read_legacy_state(root, device)
    return avatar, train_meta, state


def _read_legacy_state(root: Path, device: str) -> tuple[dict[str, Any] | None, dict[str, Tensor]]:
    """The training state of an avatar saved before the one-file checkpoint (two files), or (None, {})."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    meta_path, tensors_path = root / STATE_META, root / LEGACY_STATE_FILE
    if not meta_path.is_file() or not tensors_path.is_file():
        return None, {}
    try:
        return json.loads(meta_path.read_text(encoding="utf-8")), load_file(str(tensors_path), device=device)
    except (ValueError, SafetensorError, OSError) as exc:
        raise AvatarError(f"{root}: its training state cannot be read ({exc}); train the avatar again with "
                          f"--force.") from None


def load_avatar(path: str | Path, device: str | torch.device = "cpu", *, allow_unfinished: bool = False) -> Avatar:
    """Load the avatar of a directory written by :func:`save_avatar` (``liftavatar avatar train``), for use.

    An unfinished avatar (its training interrupted or time-boxed before ``meta.iters``) is refused unless
    ``allow_unfinished``; avatars saved before the target was recorded count as finished.

    Raises:
        AvatarError: see :func:`read_checkpoint`; or the avatar is unfinished.
    """
    avatar, train_meta, _ = read_checkpoint(path, device)
    meta = avatar.meta
    if not meta.finished:
        progress = f"trained {meta.step} of {meta.iters} iterations"
        if not allow_unfinished:
            recorded = (train_meta or {}).get("captures")
            captures = shlex.join(map(str, recorded)) if isinstance(recorded, list) and recorded else "CAPTURE ..."
            raise AvatarError(f"{path}: the avatar is unfinished ({progress}); continue its training with "
                              f"`liftavatar avatar train {captures} -o {path} --resume`, or pass --allow-unfinished "
                              f"to use it as it is.")
        logger.warning("note: %s is unfinished (%s); using it as it is, as asked.", path, progress)
    return avatar


# --------------------------------------------------------------------------------------------
# Rendering


def deform_features(avatar: Avatar, params: dict[str, Tensor] | None = None, binding: Tensor | None = None,
                    rig=None) -> Tensor:
    """(N, P) the deformation's per-Gaussian input: the encoded canonical positions of ``params`` (default the
    avatar's) on this subject's neutral head."""
    from liftavatar.face.rig import FaceRig

    rig = rig or FaceRig.load()
    params = avatar.params if params is None else params
    binding = avatar.binding if binding is None else binding
    device = binding.device
    neutral = rig.vertices(avatar.identity.to(device), torch.as_tensor(rig.neutral_expression(1), device=device),
                           torch.zeros(1, 3, device=device), torch.zeros(1, 3, device=device))
    positions = canonical_positions(params, binding, neutral, avatar.faces.to(device))
    return encode_positions(positions, avatar.meta.config.deform_frequencies)


def intrinsics_matrix(intrinsics: Tensor) -> Tensor:
    """(..., 4) (fx, fy, cx, cy) -> (..., 3, 3) pinhole matrices (pixels)."""
    fx, fy, cx, cy = torch.as_tensor(intrinsics, dtype=torch.float32).unbind(-1)
    zero, one = torch.zeros_like(fx), torch.ones_like(fx)
    return torch.stack((fx, zero, cx, zero, fy, cy, zero, zero, one), -1).reshape(fx.shape + (3, 3))


def render_avatar(
    avatar: Avatar,
    vertices: Tensor,
    intrinsics: Tensor,
    size: tuple[int, int],
    *,
    background: Tensor | None = None,
    backend: str = "auto",
    params: dict[str, Tensor] | None = None,
    binding: Tensor | None = None,
    condition: Tensor | None = None,
    deform: dict[str, Tensor] | None = None,
    features: Tensor | None = None,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Render posed frames of an avatar seen by the capture camera (at the world origin).

    Args:
        avatar: the avatar (its ``params``/``binding`` unless given explicitly, e.g. the live
            parameters during training).
        vertices: (B, V, 3) posed rig vertices, camera frame, metres.
        intrinsics: (4,) or (B, 4) (fx, fy, cx, cy) pixels at ``size``.
        size: (H, W) pixels.
        background: (3,) RGB in [0, 1] behind the avatar; None is black.
        backend: rasterizer backend ("auto": gsplat on CUDA, torch on CPU).
        condition: (B, C) the frames' :func:`deform_condition`; needed by an avatar that deforms.
        deform, features: the deformation MLP (default the avatar's) and the Gaussians' encoded canonical
            positions (default computed here from ``params``; training passes its live ones).

    Returns:
        rgb (B, H, W, 3), alpha (B, H, W, 1), and the rasterizer's ``info`` (unpacked;
        ``means2d`` is (1, N, 2) for B = 1, as gsplat's strategies expect, else (B, 1, N, 2)).
    """
    from liftavatar.avatar.raster import rasterization

    params = avatar.params if params is None else params
    binding = avatar.binding if binding is None else binding
    cfg = avatar.meta.config
    deform = avatar.deform if deform is None else deform
    if deform is not None:
        if condition is None:
            raise AvatarError("this avatar deforms with the expression: pass the frames' condition "
                              "(deform_condition(expression, rotation)) to render it.")
        if features is None:
            features = deform_features(avatar, params, binding)
        condition = condition.to(vertices.device)
    world = gaussians_world(params, binding, vertices, avatar.faces, cfg.sh_degree, cfg.sh_frame,
                            deform=deform, features=features, condition=condition)
    batch = vertices.shape[0]
    ks = intrinsics_matrix(torch.as_tensor(intrinsics, device=vertices.device).float().expand(batch, 4))
    ks = ks.to(vertices.device)[:, None]  # (B, 1, 3, 3)
    view = torch.eye(4, device=vertices.device).repeat(batch, 1, 1, 1)  # (B, 1, 4, 4), contiguous for gsplat
    bg = None
    if background is not None:
        bg = torch.as_tensor(background, dtype=torch.float32, device=vertices.device).expand(batch, 1, 3)
    height, width = size
    if batch == 1:
        # Unbatched call: info then has gsplat's plain (C, N, ...) layout that its densification
        # strategies index.
        rgb, alpha, info = rasterization(
            world.means[0], world.quats[0], world.scales[0], world.opacities, world.colors[0],
            view[0], ks[0], width, height, backgrounds=None if bg is None else bg[0], backend=backend,
        )
        return rgb, alpha, info
    rgb, alpha, info = rasterization(
        world.means, world.quats, world.scales, world.opacities.expand(batch, -1).contiguous(), world.colors,
        view, ks, width, height, backgrounds=bg, backend=backend,
    )
    return rgb[:, 0], alpha[:, 0], info
