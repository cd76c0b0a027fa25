"""Training a mesh-rigged Gaussian avatar on Captures (``liftavatar avatar train``).

Per iteration one frame is drawn (deterministically from ``seed`` and the step, so a resumed run
repeats the uninterrupted one) from a pool in which observed frames are repeated to make about
``observed_share`` of the draws, and from the observed frames alone in the last ``observed_finish``
share of the iterations; the rig is posed with the frame's kinematics, the Gaussians
follow their triangles (:func:`liftavatar.avatar.model.gaussians_world`), and the render over
black is compared with the frame times its mask:

    loss = w_frame · [(1 - λ) L1 + λ (1 - SSIM)] + w_mask · L1(alpha, mask)
           + w_pos · mean(relu(|μ_local| - ε_pos)) + w_scale · mean(relu(exp(s_local) - ε_scale))

``w_frame`` is ``lifted_weight`` for lifted frames (provenance 1), else 1. The regularisers are
GaussianAvatars' (local units: triangle sizes). LPIPS is not used: no LPIPS weights are available
locally (the `lpips` package downloads them), so the perceptual term is left out.

Densification and pruning: gsplat's :class:`~gsplat.DefaultStrategy` (3DGS's clone / split by
image-plane gradient, prune by opacity) works on the *local* parameters unchanged — a split
samples new positions from the parent's local Gaussian, which maps to the right world
distribution because the binding is a similarity transform — and the triangle index rides along
as a non-trainable ``binding`` tensor that gsplat's ops copy, split and remove with the rest, so
every child keeps its parent's triangle. :class:`BoundStrategy` adds two things: pruning never
empties a triangle (its most opaque Gaussian stays, as in GaussianAvatars), and growth stops at
``max_gaussians``. Scale thresholds are in triangle units (``scene_scale`` = 1). gsplat 1.5.3's
periodic opacity reset never fires (``step % reset_every == 0 & step > 0`` parses as a chained
comparison that is always false), so none is configured.

Checkpoints (every ``checkpoint_every`` steps, at the end, and on Ctrl-C): one file,
``avatar.safetensors``, written atomically, holds the model (usable by render/export) and the
training state for ``--resume`` (Adam moments, densification statistics, kinematics refinements,
step, recipe, captures), so a kill at any moment leaves one whole checkpoint; ``avatar.json`` and
``train_state.json`` are readable copies (see :mod:`liftavatar.avatar.model`). The avatar records
the iterations it was asked for: one whose training stopped early is *unfinished*, and render and
export refuse it unless allowed. Validation renders (ground truth | render of held-out frames, or of
training frames when none are held out) go to ``val/step_XXXXXX.png`` and their PSNR to
``val/log.jsonl``.

Training writes into a new or empty folder, one an earlier run left before its first checkpoint, or
one holding an avatar of ours (with ``force`` or ``resume``; other files there are left alone), never
into a capture or a folder of other files, not even with ``force``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from liftavatar.avatar.model import (
    AVATAR_FILE,
    AVATAR_META,
    LEGACY_STATE_FILE,
    PARAM_NAMES,
    STATE_META,
    Avatar,
    AvatarConfig,
    AvatarError,
    AvatarMeta,
    canonical_positions,
    deform_condition,
    encode_positions,
    init_avatar,
    read_checkpoint,
    render_avatar,
    rgb_to_sh0,
    save_avatar,
)
from liftavatar.capture import META_FILE, PROVENANCE_LIFTED, Capture
from liftavatar.errors import ConfigError
from liftavatar.io import save_png, temporary_name, to_uint8

__all__ = ["FrameSet", "TrainConfig", "TrainResult", "load_frames", "observed_repeats", "psnr", "ssim", "train_avatar"]

VAL_DIR = "val"
# What training writes into its folder; anything else there means the folder is not an avatar of ours.
_AVATAR_ENTRIES = frozenset({AVATAR_FILE, AVATAR_META, STATE_META, LEGACY_STATE_FILE, VAL_DIR})


@dataclass
class TrainConfig:
    """Options of ``liftavatar avatar train`` (recorded in ``train_state.json``)."""

    iters: int = 3000
    """Training iterations (one frame each)."""
    size: int | None = None
    """Train at this image height in pixels (width keeps the aspect); None: the captures' size."""
    lifted_weight: float = 0.5
    """Loss weight of lifted frames (provenance 1) relative to observed ones: generated frames are less exact than
    filmed ones. Measured on the demo subject (12 lifted expressions, 1200 iterations, CPU; extreme / seen-range
    PSNR against the baseline's 25.81 / 32.88 dB): weight 1 and no repeats 26.53 / 31.35; weight 0.5 with observed
    frames at ~61 % / ~76 % / ~82 % of the draws 26.85 / 32.27, 26.91 / 32.35, 27.15 / 32.89; weight 0.25 at ~76 %
    26.99 / 32.52. The benchmark (``liftavatar bench``) runs with these defaults."""
    observed_share: float = 0.75
    """Observed frames are repeated in the draw pool so that they make about this share of the draws (0: every
    frame once, the plain union): a lifted capture would otherwise hold up to 5 lifted frames to each filmed one.
    See :func:`observed_repeats`."""
    observed_finish: float = 0.25
    """The last share of the iterations draws observed (filmed) frames only: lifted frames teach the avatar
    the expressions and poses the capture lacks, then a polish on the filmed frames takes back the detail
    that generated frames blur. Measured on the demo subject as above (weight 0.5, ~76 %): 0 → 26.91 / 32.35 dB,
    0.25 → 27.23 / 32.68 dB; giving lifted frames no say in the colours instead (geometry only) 26.79 / 32.32.
    Chosen there, before the 3-subject benchmark ran with it."""
    ssim_weight: float = 0.2
    """λ of the D-SSIM term (3DGS's 0.2)."""
    mask_weight: float = 0.1
    """Weight of L1 between the rendered alpha and the capture's mask."""
    position_weight: float = 0.01
    """Weight of the penalty on local positions beyond ``position_threshold`` (GaussianAvatars' ε_position)."""
    position_threshold: float = 1.0
    """Local positions beyond this many triangle sizes from the centroid are penalised."""
    scale_weight: float = 1.0
    """Weight of the penalty on local scales above ``scale_threshold`` (GaussianAvatars' ε_scaling)."""
    scale_threshold: float = 0.6
    """Local scales above this many triangle sizes are penalised."""
    lr_means: float = 5e-3
    """Initial learning rate of the local positions (Adam; local units: triangle sizes)."""
    lr_means_final: float = 5e-5
    """Position learning rate decays exponentially from lr_means to this (local units / step)."""
    lr_scales: float = 1.7e-2
    """Learning rate of the log local scales."""
    lr_quats: float = 1e-3
    """Learning rate of the local rotations (quaternions)."""
    lr_opacities: float = 5e-2
    """Learning rate of the opacity logits."""
    lr_sh0: float = 1e-2
    """Learning rate of the base colours (SH degree 0)."""
    lr_shN: float = 5e-4
    """Learning rate of the higher SH coefficients."""
    densify: bool = True
    """Clone, split and prune Gaussians (gsplat's DefaultStrategy, keeping every triangle's binding)."""
    refine_start: int = 300
    """First iteration that densifies."""
    refine_stop: float = 0.6
    """Stop densifying after this fraction of the iterations."""
    refine_every: int = 100
    """Densify every this many iterations."""
    grow_grad2d: float = 2e-4
    """Mean image-plane gradient (gsplat's normalised units) above which a Gaussian is cloned or split."""
    grow_scale: float = 0.25
    """Local scale (triangle sizes) separating clone (below) from split (above)."""
    prune_opacity: float = 0.005
    """Gaussians below this opacity are pruned (the most opaque of each triangle stays)."""
    max_gaussians: int = 100_000
    """Densification stops growing at this many Gaussians."""
    refine_kinematics: bool = False
    """Optimise a per-frame correction of expression, rotation and translation (training frames)."""
    lr_kinematics: float = 1e-4
    """Learning rate of the per-frame kinematics corrections."""
    lr_deform: float = 5e-4
    """Learning rate of the deformation MLP (an avatar with ``--avatar.deform-width`` > 0)."""
    holdout_every: int = 0
    """Hold out every k-th valid frame for validation (0: none held out)."""
    val_every: int = 500
    """Validate (render held-out or training frames, log their PSNR) every this many iterations; 0: never."""
    val_frames: int = 4
    """Frames rendered at each validation."""
    checkpoint_every: int = 500
    """Checkpoint every this many iterations (and always at the end and on Ctrl-C); 0: only then."""
    seed: int = 0
    """Seed of the initial Gaussians and of the frame drawn at each iteration."""
    device: str = "cpu"
    """Torch device (cuda uses gsplat, cpu the PyTorch rasterizer)."""
    backend: str = "auto"
    """Rasterizer: auto (gsplat on CUDA, torch on CPU), gsplat, torch."""
    progress: bool = True
    """Show a progress bar."""
    avatar: AvatarConfig = field(default_factory=AvatarConfig)


LEGACY_DEFAULTS = {"lifted_weight": 1.0, "observed_finish": 0.0, "observed_share": 0.0}
"""What a training state written before a recipe field existed (or before the defaults became the benchmarked
ones) trained with: a resumed run keeps that recipe."""


def observed_repeats(observed: int, lifted: int, share: float) -> int:
    """How many times the draw pool holds each of ``observed`` frames so that they make about ``share`` of the
    draws next to ``lifted`` lifted frames, each held once (1: the plain union)."""
    if lifted == 0 or share <= 0 or observed == 0:
        return 1
    return max(1, round(share / (1 - share) * lifted / observed))


@dataclass
class FrameSet:
    """Frames of one subject from one or more captures, resized to one size.

    images (N, H, W, 3) uint8, masks (N, H, W) uint8, expression (N, E), rotation (N, 3)
    axis-angle radians, translation (N, 3) metres (camera frame), intrinsics (N, 4) pixels at
    (H, W), weight (N,) loss weight, names (N,) "capture:index".
    """

    images: Tensor
    masks: Tensor
    expression: Tensor
    rotation: Tensor
    translation: Tensor
    intrinsics: Tensor
    weight: Tensor
    names: list[str]
    identity: np.ndarray
    subject: str
    rig: dict[str, Any]
    expression_names: list[str]
    fps: float
    lifted: Tensor | None = None
    """(N,) bool: the frame is lifted (provenance 1); None: none is."""

    def __post_init__(self) -> None:
        if self.lifted is None:
            self.lifted = torch.zeros(len(self.names), dtype=torch.bool)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    def select(self, idx: Sequence[int]) -> "FrameSet":
        i = torch.as_tensor(list(idx), dtype=torch.long)
        pick = lambda t: t.index_select(0, i)  # noqa: E731
        return FrameSet(
            pick(self.images), pick(self.masks), pick(self.expression), pick(self.rotation),
            pick(self.translation), pick(self.intrinsics), pick(self.weight),
            [self.names[k] for k in i.tolist()], self.identity, self.subject, self.rig,
            self.expression_names, self.fps, pick(self.lifted),
        )

    def targets(self, idx: Tensor | int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Masked ground truth (B, H, W, 3) in [0, 1] (black background) and mask (B, H, W, 1)."""
        idx = torch.as_tensor(idx).reshape(-1)
        img = self.images[idx].to(device).float() / 255
        mask = self.masks[idx].to(device).float()[..., None] / 255
        return img * mask, mask


def _resize(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, h, w[, C]) uint8 -> (N, H, W[, C]) uint8, area filter down, bilinear up."""
    if images.shape[1:3] == size:
        return images
    x = torch.from_numpy(images).float()
    gray = x.dim() == 3
    x = (x[:, None] if gray else x.permute(0, 3, 1, 2))
    mode = "area" if size[0] < images.shape[1] else "bilinear"
    x = F.interpolate(x, size=size, mode=mode, **({} if mode == "area" else {"align_corners": False}))
    x = x[:, 0] if gray else x.permute(0, 2, 3, 1)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def load_frames(paths: Sequence[str | Path], size: int | None = None, lifted_weight: float = 1.0) -> FrameSet:
    """Valid frames of one subject from ``paths`` (Capture directories), resized to height
    ``size`` (None: the first capture's size), with intrinsics rescaled to match.

    Raises:
        AvatarError: no captures, a capture with no valid frames, or captures of different
            subjects, rigs or expression sets.
        CaptureError: a capture that does not load.
    """
    from liftavatar.face.rig import FaceRig

    if not paths:
        raise AvatarError("no capture given; pass one or more capture directories to train on.")
    rig = FaceRig.load()
    captures = [Capture.load(p) for p in paths]
    first = captures[0]
    for cap in captures:
        meta = cap.meta
        if meta.rig.get("name") != rig.name or meta.rig.get("version") != rig.version:
            raise AvatarError(f"{cap.path}: its kinematics refer to rig {meta.rig}, not {rig.name} v{rig.version}; "
                              f"track or synthesise the capture with this rig.")
        if list(meta.expression_names) != list(rig.expression_names):
            raise AvatarError(f"{cap.path}: its {len(meta.expression_names)} expression coefficients are not the "
                              f"rig's {rig.num_expressions}; track or synthesise it with this rig.")
        if meta.subject != first.meta.subject or not np.array_equal(cap.kinematics.identity, first.kinematics.identity):
            raise AvatarError(f"{cap.path} is of subject {meta.subject!r} but {first.path} is of "
                              f"{first.meta.subject!r} (or their identity vectors differ); train one avatar per "
                              f"subject, with that subject's captures only.")
        if not cap.kinematics.valid.any():
            raise AvatarError(f"{cap.path}: has no valid frames (kinematics.npz marks all {cap.num_frames} invalid); "
                              f"re-track it or leave it out of the training.")
    h0, w0 = first.size
    target = (h0, w0) if size is None else (int(size), max(1, round(size * w0 / h0)))
    if target[0] < 8:
        raise ConfigError(f"--size {size}: use at least 8 pixels.")
    images, masks, kin, intr, weight, names, lifted = [], [], [], [], [], [], []
    for cap in captures:
        valid = np.flatnonzero(cap.kinematics.valid)
        k = cap.kinematics.select(valid)
        images.append(_resize(cap.frames(valid), target))
        masks.append(_resize(cap.masks(valid), target))
        kin.append(k)
        h, w = cap.size
        fx, fy, cx, cy = cap.meta.intrinsics
        sx, sy = target[1] / w, target[0] / h
        intr.append(np.tile([fx * sx, fy * sy, cx * sx, cy * sy], (len(valid), 1)))
        weight.append(np.where(k.provenance == PROVENANCE_LIFTED, lifted_weight, 1.0))
        lifted.append(k.provenance == PROVENANCE_LIFTED)
        names += [f"{cap.path.name}:{i}" for i in valid]
    cat = lambda key: torch.from_numpy(np.concatenate([getattr(k, key) for k in kin])).float()  # noqa: E731
    return FrameSet(
        images=torch.from_numpy(np.concatenate(images)),
        masks=torch.from_numpy(np.concatenate(masks)),
        expression=cat("expression"), rotation=cat("rotation"), translation=cat("translation"),
        intrinsics=torch.from_numpy(np.concatenate(intr)).float(),
        weight=torch.from_numpy(np.concatenate(weight)).float(),
        names=names, identity=first.kinematics.identity.copy(), subject=first.meta.subject,
        rig=dict(first.meta.rig), expression_names=list(first.meta.expression_names), fps=first.meta.fps,
        lifted=torch.from_numpy(np.concatenate(lifted)),
    )


# --------------------------------------------------------------------------------------------
# Losses and metrics


def _gauss_window(sigma: float = 1.5, radius: int = 5, device=None) -> Tensor:
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim(a: Tensor, b: Tensor) -> Tensor:
    """Mean SSIM of (B, H, W, C) images in [0, 1], per image (B,): 11-tap Gaussian window (σ 1.5),
    valid region only, C1 = 0.01², C2 = 0.03² — the same numbers as scikit-image's
    ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1)``. Differentiable."""
    x = a.permute(0, 3, 1, 2).float()
    y = b.permute(0, 3, 1, 2).float()
    ch = x.shape[1]
    w = _gauss_window(device=x.device)
    wx = w.view(1, 1, 1, -1).expand(ch, 1, 1, -1)
    wy = w.view(1, 1, -1, 1).expand(ch, 1, -1, 1)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(F.conv2d(t, wx, groups=ch), wy, groups=ch)

    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cxy = blur(x * y) - mx * my
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


def psnr(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """PSNR in dB of (B, H, W, C) images in [0, 1], per image; over ``mask`` (B, H, W, 1) pixels
    when given."""
    err = (a.float() - b.float()) ** 2
    if mask is None:
        mse = err.mean(dim=(1, 2, 3))
    else:
        m = (mask > 0.5).float()
        mse = (err * m).sum(dim=(1, 2, 3)) / (m.sum(dim=(1, 2, 3)) * err.shape[-1]).clamp_min(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


# --------------------------------------------------------------------------------------------
# Densification that keeps the binding


def _bound_strategy(cfg: TrainConfig):
    from gsplat.strategy import DefaultStrategy
    from gsplat.strategy.ops import remove

    @dataclass
    class BoundStrategy(DefaultStrategy):
        """gsplat's DefaultStrategy on bound Gaussians: never empties a triangle, caps growth."""

        max_gaussians: int = 100_000

        def _grow_gs(self, params, optimizers, state, step):
            if len(params["means"]) >= self.max_gaussians:
                return 0, 0
            return super()._grow_gs(params, optimizers, state, step)

        @torch.no_grad()
        def _prune_gs(self, params, optimizers, state, step):
            opacity = params["opacities"].detach()
            is_prune = torch.sigmoid(opacity) < self.prune_opa
            binding = params["binding"]
            # The most opaque Gaussian of each triangle stays (the first of equals).
            size = int(binding.max()) + 1
            best = torch.full((size,), -math.inf, device=opacity.device)
            best = best.scatter_reduce(0, binding, opacity, reduce="amax")
            top = (opacity >= best[binding]).nonzero().squeeze(1)
            n_all = len(opacity)
            keeper = torch.full((size,), n_all, device=opacity.device)
            keeper = keeper.scatter_reduce(0, binding[top], top, reduce="amin")
            is_prune[keeper[keeper < n_all]] = False
            n = int(is_prune.sum())
            if n:
                remove(params=params, optimizers=optimizers, state=state, mask=is_prune)
            return n

    refine_stop = int(cfg.refine_stop * cfg.iters) if cfg.densify else 0
    return BoundStrategy(
        prune_opa=cfg.prune_opacity, grow_grad2d=cfg.grow_grad2d, grow_scale3d=cfg.grow_scale,
        prune_scale3d=1e9, refine_start_iter=cfg.refine_start, refine_stop_iter=refine_stop,
        refine_every=cfg.refine_every, reset_every=10**9, absgrad=False, verbose=False,
        max_gaussians=cfg.max_gaussians,
    )


# --------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    """What a training run produced."""

    out_dir: Path
    step: int
    num_gaussians: int
    seconds: float
    iters_per_second: float
    val_psnr: float | None
    history: list[dict[str, float]]


@torch.no_grad()
def initial_colors(avatar: Avatar, frames: FrameSet, count: int = 8) -> Tensor:
    """(N, 3) RGB per Gaussian: the mean colour at its projection over up to ``count`` evenly
    spaced frames where its triangle is the visible surface there (mesh z-buffer); the mean
    foreground colour where it is never visible."""
    from liftavatar.face.render import rasterize
    from liftavatar.avatar.model import gaussians_world

    n = avatar.num_gaussians
    total = torch.zeros(n, 3)
    hits = torch.zeros(n)
    pick = np.unique(np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int))
    h, w = frames.size
    for i in pick:
        verts = avatar.vertices(frames.expression[i:i + 1], frames.rotation[i:i + 1], frames.translation[i:i + 1])
        frag = rasterize(verts, avatar.faces, frames.intrinsics[i], (h, w))
        world = gaussians_world(avatar.params, avatar.binding, verts, avatar.faces, 0)
        fx, fy, cx, cy = frames.intrinsics[i].tolist()
        x, y, z = world.means[0].unbind(-1)
        u = (fx * x / z + cx).floor().long()
        v = (fy * y / z + cy).floor().long()
        inside = (u >= 0) & (u < w) & (v >= 0) & (v < h) & (z > 0)
        u, v = u.clamp(0, w - 1), v.clamp(0, h - 1)
        seen = inside & (frag.face_index[0, v, u] == avatar.binding)
        seen &= frames.masks[i, v, u] > 127
        rgb = frames.images[i, v, u].float() / 255
        total += rgb * seen[:, None]
        hits += seen.float()
    fg = frames.masks[pick] > 127
    mean = (frames.images[pick][fg].float() / 255).mean(0) if fg.any() else torch.full((3,), 0.5)
    return torch.where(hits[:, None] > 0, total / hits.clamp_min(1)[:, None], mean)


def _lr_means(cfg: TrainConfig, step: int) -> float:
    t = min(step / max(cfg.iters, 1), 1.0)
    return cfg.lr_means * (cfg.lr_means_final / cfg.lr_means) ** t


def _make_optimizers(params: dict[str, torch.nn.Parameter], cfg: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    lrs = {"means": cfg.lr_means, "scales": cfg.lr_scales, "quats": cfg.lr_quats,
           "opacities": cfg.lr_opacities, "sh0": cfg.lr_sh0, "shN": cfg.lr_shN}
    return {k: torch.optim.Adam([params[k]], lr=lr, eps=1e-15) for k, lr in lrs.items()}


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919 + 12345) % (2**63)


def _train_state(step: int, params, optimizers, strategy_state, kin_delta, cfg: TrainConfig,
                 captures: Sequence[str], deform: dict[str, Tensor] | None = None,
                 deform_opt: torch.optim.Optimizer | None = None) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """(metadata, tensors) of the training state at ``step``, for :func:`save_avatar`."""
    tensors: dict[str, Tensor] = {}
    steps: dict[str, float] = {}
    moments = [(name, opt, params[name]) for name, opt in optimizers.items()]
    moments += [(f"deform.{name}", deform_opt, value) for name, value in (deform or {}).items()]
    for name, opt, param in moments:
        st = opt.state.get(param, {})
        if "exp_avg" in st:
            tensors[f"opt.{name}.exp_avg"] = st["exp_avg"]
            tensors[f"opt.{name}.exp_avg_sq"] = st["exp_avg_sq"]
            steps[name] = float(st["step"])
    for key in ("grad2d", "count"):
        if strategy_state.get(key) is not None:
            tensors[f"strategy.{key}"] = strategy_state[key]
    if kin_delta is not None:
        tensors["kinematics_delta"] = kin_delta
    return {"step": step, "adam_steps": steps, "config": asdict(cfg), "captures": list(captures)}, tensors


def _check_out_dir(out: Path, resume: bool, force: bool) -> None:
    """Refuse an output folder training must not write into, before anything is computed or written.

    Ours: a folder with an avatar checkpoint (files beside it are the user's and left alone), or one that holds
    nothing but what training writes (a run stopped before its first checkpoint). Never: a capture, or a folder
    of other files, whatever ``force`` says.
    """
    if out.is_symlink() and not out.exists() or out.exists() and not out.is_dir():
        raise AvatarError(f"{out}: is a file (or a broken link), not a folder; choose a new or empty folder for the "
                          f"avatar (-o).")
    if not out.exists():
        if resume:
            raise AvatarError(f"{out}: no such folder, so it holds no training state to resume; drop --resume "
                              f"to start a new training there.")
        return
    if (out / META_FILE).exists():
        raise AvatarError(f"{out}: holds a capture ({META_FILE}), and an avatar is never written into a capture, "
                          f"not even with --force; choose a new or empty folder for the avatar (-o).")
    if (out / AVATAR_FILE).exists():
        if not resume and not force:
            raise AvatarError(f"{out}: already holds an avatar; pass --force to replace it or --resume to continue "
                              f"its training.")
        return
    ours = _AVATAR_ENTRIES | {temporary_name(out / name).name for name in _AVATAR_ENTRIES}
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in ours)
    if foreign:
        raise AvatarError(f"{out}: holds {foreign[0]!r} and no avatar, so training does not write there, not even "
                          f"with --force; choose a new or empty folder for the avatar (-o).")


def _config_from_json(data: dict[str, Any]) -> TrainConfig:
    data = {**LEGACY_DEFAULTS, **data}
    avatar = dict(data.pop("avatar"))
    avatar["parts"] = tuple(avatar["parts"])
    return TrainConfig(**data, avatar=AvatarConfig(**avatar))


@torch.no_grad()
def _validate(avatar: Avatar, params, binding, frames: FrameSet, idx: list[int], device, backend: str
              ) -> tuple[float, np.ndarray]:
    """Mean PSNR (dB, whole image, black background) of frames ``idx`` and a GT | render grid."""
    from liftavatar.report import grid

    rows, scores = [], []
    for i in idx:
        verts = avatar.vertices(frames.expression[i:i + 1], frames.rotation[i:i + 1], frames.translation[i:i + 1])
        rgb, _, _ = render_avatar(avatar, verts, frames.intrinsics[i].to(device), frames.size,
                                  backend=backend, params=params, binding=binding,
                                  condition=deform_condition(frames.expression[i:i + 1], frames.rotation[i:i + 1]))
        gt, _ = frames.targets(i, device)
        scores.append(float(psnr(rgb.clamp(0, 1), gt)[0]))
        rows.append([to_uint8(gt[0]), to_uint8(rgb[0])])
    labels = [[f"{frames.names[i]} ground truth", f"render {s:.1f} dB"] for i, s in zip(idx, scores)]
    return float(np.mean(scores)), grid(rows, labels)


def train_avatar(
    captures: Sequence[str | Path],
    out_dir: str | Path,
    cfg: TrainConfig | None = None,
    *,
    resume: bool = False,
    force: bool = False,
    max_steps: int | None = None,
) -> TrainResult:
    """Train (or resume training) an avatar on ``captures`` of one subject into ``out_dir``.

    ``max_steps`` stops this call after that many iterations (checkpointed; continue with
    ``resume``), e.g. to time-box a run; the schedule still spans ``cfg.iters``. An interrupt
    (Ctrl-C) also checkpoints the last finished iteration before it propagates.

    Raises:
        AvatarError: bad captures (see :func:`load_frames`), an existing avatar at ``out_dir``
            without ``force``/``resume``, ``resume`` with no training state there, or an ``out_dir`` that
            is a file, a capture or a folder of other files (see :func:`_check_out_dir`).
    """
    from liftavatar.face.rig import FaceRig

    cfg = cfg or TrainConfig()
    out = Path(out_dir)
    _check_out_dir(out, resume, force)
    start_step = 0
    if resume:
        if not (out / AVATAR_FILE).is_file():
            raise AvatarError(f"{out}: holds no training state ({AVATAR_FILE}) to resume; drop --resume to start "
                              f"a new training there.")
        resumed, saved, saved_tensors = read_checkpoint(out, device="cpu", train_state=True)
        if saved is None:
            raise AvatarError(f"{out}: its avatar holds no training state to resume (saved without it); drop "
                              f"--resume and pass --force to train it again.")
        try:
            stored = _config_from_json(saved["config"])
            start_step = int(saved["step"])
        except (KeyError, TypeError, ValueError) as exc:
            raise AvatarError(f"{out}: its training state cannot be read ({exc!r}); train it again with --force, "
                              f"without --resume.") from None
        # The stored recipe wins; only the length and where it runs may change on resume.
        cfg = TrainConfig(**{**asdict(stored), "avatar": stored.avatar, "iters": cfg.iters,
                             "device": cfg.device, "backend": cfg.backend, "progress": cfg.progress})
    if cfg.iters < 1:
        raise ConfigError(f"--iters {cfg.iters}: use 1 or more.")
    if not 0 <= cfg.observed_finish < 1:
        raise ConfigError(f"--observed-finish {cfg.observed_finish}: use a share of the iterations in [0, 1).")
    if not 0 <= cfg.observed_share < 1:
        raise ConfigError(f"--observed-share {cfg.observed_share}: use a share of the draws in [0, 1).")
    device = torch.device(cfg.device)
    rig = FaceRig.load()
    frames = load_frames(captures, cfg.size, cfg.lifted_weight)
    n_frames = len(frames)
    if cfg.holdout_every > 1 and n_frames >= 2:
        held = [i for i in range(n_frames) if i % cfg.holdout_every == cfg.holdout_every - 1]
    else:
        held = []
    train_idx = [i for i in range(n_frames) if i not in set(held)]
    train_tensor = torch.as_tensor(train_idx)
    observed_tensor = train_tensor[~frames.lifted[train_tensor]]
    # The draw pool: every training frame, then the observed ones again (repeats - 1 times), in the order the
    # lifted capture followed by copies of its observed capture gave before observed_share lived here, so that
    # runs draw the same frames as then. The observed-only pool holds each observed frame `repeats` times too.
    repeats = observed_repeats(len(observed_tensor), len(train_tensor) - len(observed_tensor), cfg.observed_share)
    train_tensor = torch.cat([train_tensor, observed_tensor.repeat(repeats - 1)])
    observed_tensor = observed_tensor.repeat(repeats)
    val_pool = held or train_idx
    val_idx = [val_pool[int(j)] for j in np.unique(np.linspace(0, len(val_pool) - 1, min(cfg.val_frames, len(val_pool))).round())]

    if resume:
        avatar = resumed
        if avatar.meta.subject != frames.subject:
            raise AvatarError(f"{out}: the avatar is of {avatar.meta.subject!r}, the captures of {frames.subject!r}; "
                              f"resume with the captures it was trained on.")
    else:
        meta = AvatarMeta(subject=frames.subject, rig=frames.rig, expression_names=frames.expression_names,
                          size=frames.size, intrinsics=tuple(float(x) for x in frames.intrinsics[0]),
                          fps=frames.fps, config=cfg.avatar, iters=cfg.iters)
        avatar = init_avatar(rig, frames.identity, meta, seed=cfg.seed)
        avatar.params["sh0"] = rgb_to_sh0(initial_colors(avatar, frames.select(train_tensor.tolist())))[:, None, :]
    avatar = avatar.to(device)
    frames.images, frames.masks = frames.images.to(device), frames.masks.to(device)  # uint8, small

    params: dict[str, torch.nn.Parameter] = {k: torch.nn.Parameter(avatar.params[k].clone()) for k in PARAM_NAMES}
    params["binding"] = torch.nn.Parameter(avatar.binding.clone(), requires_grad=False)
    optimizers = _make_optimizers(params, cfg)
    strategy = _bound_strategy(cfg)
    strategy_state = strategy.initialize_state(scene_scale=1.0)
    kin_delta = None
    kin_opt = None
    if cfg.refine_kinematics:
        kin_delta = torch.nn.Parameter(torch.zeros(n_frames, frames.expression.shape[1] + 6, device=device))
        kin_opt = torch.optim.Adam([kin_delta], lr=cfg.lr_kinematics)
    if avatar.deform is not None:
        avatar.deform = {k: v.to(device) for k, v in avatar.deform.items()}
    deform = None if avatar.deform is None else {k: torch.nn.Parameter(v.clone()) for k, v in avatar.deform.items()}
    deform_opt = None if deform is None else torch.optim.Adam(list(deform.values()), lr=cfg.lr_deform)
    # The subject's neutral head, where the deformation reads every Gaussian's canonical position.
    neutral = None if deform is None else rig.vertices(
        avatar.identity, torch.as_tensor(rig.neutral_expression(1), device=device), torch.zeros(1, 3, device=device),
        torch.zeros(1, 3, device=device))

    if resume:
        st = {k: v.to(device) for k, v in saved_tensors.items()}
        for name, opt in optimizers.items():
            if f"opt.{name}.exp_avg" in st:
                opt.state[params[name]] = {
                    "step": torch.tensor(saved["adam_steps"][name]),
                    "exp_avg": st[f"opt.{name}.exp_avg"], "exp_avg_sq": st[f"opt.{name}.exp_avg_sq"],
                }
        for key in ("grad2d", "count"):
            if f"strategy.{key}" in st:
                strategy_state[key] = st[f"strategy.{key}"]
        if kin_delta is not None and "kinematics_delta" in st:
            kin_delta.data.copy_(st["kinematics_delta"])
        for name, value in (deform or {}).items():
            if f"opt.deform.{name}.exp_avg" in st:
                deform_opt.state[value] = {
                    "step": torch.tensor(saved["adam_steps"][f"deform.{name}"]),
                    "exp_avg": st[f"opt.deform.{name}.exp_avg"], "exp_avg_sq": st[f"opt.deform.{name}.exp_avg_sq"],
                }

    out.mkdir(parents=True, exist_ok=True)
    (out / VAL_DIR).mkdir(exist_ok=True)
    capture_paths = [str(p) for p in captures]
    faces = avatar.faces
    expr_all, rot_all, trans_all = (t.to(device) for t in (frames.expression, frames.rotation, frames.translation))
    intr_all = frames.intrinsics.to(device)
    identity = avatar.identity
    h, w = frames.size
    history: list[dict[str, float]] = []
    val_psnr = None

    def snapshot(step: int) -> Avatar:
        return Avatar({k: params[k].detach() for k in PARAM_NAMES}, params["binding"].detach(), faces, identity,
                      AvatarMeta(**{**asdict(avatar.meta), "config": avatar.meta.config, "step": step,
                                    "iters": cfg.iters}),
                      None if deform is None else {k: v.detach() for k, v in deform.items()})

    def checkpoint(step: int) -> None:
        state, tensors = _train_state(step, params, optimizers, strategy_state, kin_delta, cfg, capture_paths,
                                      deform, deform_opt)
        save_avatar(snapshot(step).to("cpu"), out, state, tensors)

    def validate(step: int) -> float:
        score, sheet = _validate(snapshot(step), {k: params[k].detach() for k in PARAM_NAMES}, params["binding"],
                                 frames, val_idx, device, cfg.backend)
        save_png(sheet, out / VAL_DIR / f"step_{step:06d}.png")
        with open(out / VAL_DIR / "log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "psnr": score, "frames": [frames.names[i] for i in val_idx],
                                "held_out": bool(held), "gaussians": int(params["means"].shape[0])}) + "\n")
        return score

    from tqdm import tqdm

    if start_step == 0 and cfg.val_every:
        validate(0)  # the initial avatar, for comparison
    finish_from = cfg.iters - round(cfg.observed_finish * cfg.iters)

    def train_step(step: int) -> dict[str, float]:
        torch.manual_seed(_step_seed(cfg.seed, step))
        pool = observed_tensor if step >= finish_from and len(observed_tensor) else train_tensor
        i = int(pool[torch.randint(len(pool), ())])
        expr, rot, trans = expr_all[i:i + 1], rot_all[i:i + 1], trans_all[i:i + 1]
        if kin_delta is not None:
            d = kin_delta[i:i + 1]
            e = expr.shape[1]
            expr, rot, trans = expr + d[:, :e], rot + d[:, e:e + 3], trans + d[:, e + 3:]
        verts = rig.vertices(identity, expr, rot, trans)
        for g in optimizers["means"].param_groups:
            g["lr"] = _lr_means(cfg, step)
        condition = features = None
        if deform is not None:
            condition = deform_condition(expr, rot)
            positions = canonical_positions(params, params["binding"], neutral, faces)
            features = encode_positions(positions, avatar.meta.config.deform_frequencies)
        rgb, alpha, info = render_avatar(avatar, verts, intr_all[i], (h, w), backend=cfg.backend,
                                         params=params, binding=params["binding"], condition=condition,
                                         deform=deform, features=features)
        gt, mask = frames.targets(i, device)
        strategy.step_pre_backward(params, optimizers, strategy_state, step, info)
        l1 = (rgb - gt).abs().mean()
        loss = frames.weight[i].item() * ((1 - cfg.ssim_weight) * l1 + cfg.ssim_weight * (1 - ssim(rgb, gt).mean()))
        if cfg.mask_weight:
            loss = loss + cfg.mask_weight * (alpha - mask).abs().mean()
        if cfg.position_weight:
            loss = loss + cfg.position_weight * F.relu(params["means"].norm(dim=-1) - cfg.position_threshold).mean()
        if cfg.scale_weight:
            loss = loss + cfg.scale_weight * F.relu(torch.exp(params["scales"]) - cfg.scale_threshold).mean()
        loss.backward()
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        for opt in (kin_opt, deform_opt):
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
        strategy.step_post_backward(params, optimizers, strategy_state, step, info, packed=False)
        with torch.no_grad():
            p = float(psnr(rgb.detach().clamp(0, 1), gt)[0])
        return {"step": step + 1, "loss": float(loss.detach()), "psnr": p, "gaussians": int(params["means"].shape[0]),
                "frame": i}

    end = cfg.iters if max_steps is None else min(cfg.iters, start_step + max(max_steps, 0))
    bar = tqdm(total=cfg.iters, initial=start_step, desc="avatar", disable=not cfg.progress, unit="it")
    started = time.perf_counter()
    done = start_step
    try:
        for step in range(start_step, end):
            record = train_step(step)
            done = step + 1
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['psnr']:.2f}", n=record["gaussians"])
            if cfg.val_every and done % cfg.val_every == 0 and done < end:
                val_psnr = validate(done)
            if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done < end:
                checkpoint(done)
    except KeyboardInterrupt:
        bar.close()
        checkpoint(done)
        raise
    bar.close()
    seconds = time.perf_counter() - started
    final = done
    checkpoint(final)
    val_psnr = validate(final) if cfg.val_every else None
    ran = final - start_step
    return TrainResult(out, final, int(params["means"].shape[0]), seconds, ran / seconds if seconds > 0 else 0.0,
                       val_psnr, history)
