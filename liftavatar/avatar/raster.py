"""Gaussian rasterization: gsplat on CUDA, a pure-PyTorch backend with the same signature on CPU.

:func:`rasterization` takes the subset of :func:`gsplat.rasterization`'s arguments the avatar
needs and returns what it returns: ``(render_colors, render_alphas, info)``. On CUDA tensors it
calls gsplat (fused CUDA kernels, JIT-compiled on first use); on CPU it runs :func:`_torch_raster`.

What is hand-written, and why: gsplat has no CPU path. Its pure-PyTorch reference functions
(``gsplat.cuda._torch_impl``) cover covariance, projection and spherical harmonics, and are used
here as they are; its reference *compositing* (``_rasterize_to_pixels``) calls a CUDA kernel and
needs nerfacc, and its tile intersection is a Python loop per Gaussian, so the depth-sorted
alpha compositing below is written by hand. It reproduces gsplat's CUDA forward semantics:

- a Gaussian is skipped when its opacity is below 1/255; its screen extent is gsplat's
  opacity-aware box ``ceil(min(3.33, sqrt(2 ln(255 o))) * sqrt(diag Σ2d))`` (arXiv 2402.00525);
- per pixel, Gaussians are composited front to back by camera-frame depth with
  ``α = min(0.999, o · exp(-½ dᵀ Σ2d⁻¹ d))``, pairs with ``α < 1/255`` are skipped, and a
  pixel stops before the Gaussian that would bring its transmittance to ≤ 1e-4;
- ``Σ2d`` includes gsplat's ``eps2d`` blur (0.3 px² by default, "classic" mode).

It is vectorised over every (Gaussian, pixel) pair inside each Gaussian's box: pairs that pass
the α test are sorted by pixel (stable, so depth order is kept within a pixel), transmittance is
an exclusive segmented cumulative sum of ``log(1 - α)`` in float64, and colours are scattered with
``index_add``. Autograd differentiates it, so gradients reach means (through ``means2d``, which
``info`` returns for densification as gsplat does), quaternions, scales, opacities and colours.

Conventions (as gsplat's): ``viewmats`` are world-to-camera 4×4 matrices to the OpenCV camera
(x right, y down, z forward); ``Ks`` are 3×3 pinhole intrinsics in pixels, with the image's
top-left *corner* at (0, 0), so pixel (row i, col j) has its centre at (j + 0.5, i + 0.5) — the
same convention as :mod:`liftavatar.face.render`. Quaternions are (w, x, y, z), need not be
normalised; scales are standard deviations in world units (metres for the avatar); opacities
are in [0, 1]. Images come out channels-last: (..., C, H, W, D).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = ["ALPHA_THRESHOLD", "rasterization", "gsplat_available"]

ALPHA_THRESHOLD = 1.0 / 255.0
"""Pairs (and Gaussians) with a smaller α are skipped, as in gsplat."""
_T_STOP = 1e-4
_MAX_EXTEND = 3.33

Backend = Literal["auto", "gsplat", "torch"]
RenderMode = Literal["RGB", "D", "ED", "RGB+D", "RGB+ED"]


def gsplat_available(device: torch.device | str) -> bool:
    """True when gsplat can rasterize on ``device`` (a CUDA device; gsplat has no CPU kernels)."""
    return torch.device(device).type == "cuda"


def rasterization(
    means: Tensor,
    quats: Tensor,
    scales: Tensor,
    opacities: Tensor,
    colors: Tensor,
    viewmats: Tensor,
    Ks: Tensor,
    width: int,
    height: int,
    *,
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,
    render_mode: RenderMode = "RGB",
    absgrad: bool = False,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Rasterize 3D Gaussians into C camera images (gsplat's ``rasterization`` signature subset).

    Args:
        means: (..., N, 3) world-space centres (the avatar's world is the OpenCV camera frame of
            the capture, metres).
        quats: (..., N, 4) rotations (w, x, y, z), normalised here.
        scales: (..., N, 3) standard deviations along the rotated axes, world units.
        opacities: (..., N) in [0, 1].
        colors: (..., N, D) features, or (..., N, K, 3) SH coefficients with ``sh_degree`` set
            (gsplat's SH convention: colour = SH(dir) + 0.5, clamped at 0; dir from the camera
            centre to the mean).
        viewmats: (..., C, 4, 4) world-to-camera transforms (OpenCV camera axes).
        Ks: (..., C, 3, 3) pinhole intrinsics, pixels, top-left corner at (0, 0).
        width, height: image size in pixels.
        near_plane, far_plane: camera-z clipping of Gaussian centres, world units.
        eps2d: blur added to every projected covariance, pixels² (gsplat's "classic" mode).
        sh_degree: SH degree to evaluate, or None when ``colors`` are plain features.
        backgrounds: (..., C, D) colour composited behind, or None (black / zero).
        render_mode: "RGB" (features), "D" (accumulated z), "ED" (expected z), or both ("RGB+D",
            "RGB+ED": depth in the last channel).
        absgrad: ask gsplat for absolute means2d gradients (CUDA only; ignored by the torch
            backend).
        backend: "auto" (gsplat on CUDA tensors, torch otherwise), "gsplat" or "torch".

    Returns:
        ``(render_colors (..., C, H, W, D'), render_alphas (..., C, H, W, 1), info)``; ``info``
        holds gsplat's unpacked keys that densification needs: ``means2d`` (..., C, N, 2) pixel
        centres (in the autograd graph), ``radii`` (..., C, N, 2) int32 (0 = culled), ``depths``,
        ``conics``, ``width``, ``height``, ``n_cameras``, ``gaussian_ids`` (None: unpacked).
    """
    if backend == "auto":
        backend = "gsplat" if gsplat_available(means.device) else "torch"
    if backend == "gsplat":
        import gsplat

        return gsplat.rasterization(
            means, quats, scales, opacities, colors, viewmats, Ks, width, height,
            near_plane=near_plane, far_plane=far_plane, eps2d=eps2d, sh_degree=sh_degree,
            packed=False, backgrounds=backgrounds, render_mode=render_mode, absgrad=absgrad,
            rasterize_mode="classic",
        )
    if backend != "torch":
        raise ValueError(f"backend must be 'auto', 'gsplat' or 'torch', got {backend!r}")
    return _torch_raster(
        means, quats, scales, opacities, colors, viewmats, Ks, width, height, near_plane,
        far_plane, eps2d, sh_degree, backgrounds, render_mode,
    )


def _torch_raster(
    means: Tensor, quats: Tensor, scales: Tensor, opacities: Tensor, colors: Tensor,
    viewmats: Tensor, Ks: Tensor, width: int, height: int, near_plane: float, far_plane: float,
    eps2d: float, sh_degree: int | None, backgrounds: Tensor | None, render_mode: str,
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    from gsplat.cuda._torch_impl import _spherical_harmonics

    batch_dims = means.shape[:-2]
    num = means.shape[-2]
    cams = viewmats.shape[-3]
    if viewmats.shape[:-3] != batch_dims or Ks.shape[:-3] != batch_dims:
        raise ValueError(
            f"means {tuple(means.shape)}, viewmats {tuple(viewmats.shape)} and Ks "
            f"{tuple(Ks.shape)} must share their batch dimensions"
        )
    opac = torch.broadcast_to(opacities[..., None, :], batch_dims + (cams, num))
    radii, means2d, depths, conics = project_gaussians(
        means, quats, scales, opac, viewmats, Ks, width, height, eps2d, near_plane, far_plane
    )

    if sh_degree is not None:
        campos = torch.inverse(viewmats)[..., :3, 3]  # (..., C, 3)
        dirs = means[..., None, :, :] - campos[..., None, :]  # (..., C, N, 3)
        shs = colors if colors.dim() == len(batch_dims) + 4 else colors[..., None, :, :, :]
        shs = torch.broadcast_to(shs, batch_dims + (cams, num) + colors.shape[-2:])
        feats = torch.clamp_min(_spherical_harmonics(sh_degree, dirs, shs) + 0.5, 0.0)
    elif colors.dim() == len(batch_dims) + 2:
        feats = torch.broadcast_to(colors[..., None, :, :], batch_dims + (cams, num, colors.shape[-1]))
    else:
        feats = colors
    if render_mode in ("D", "ED", "RGB+D", "RGB+ED"):
        z = depths[..., None].to(feats.dtype)
        feats = z if render_mode in ("D", "ED") else torch.cat((feats, z), -1)

    images = math.prod(batch_dims) * cams
    channels = feats.shape[-1]
    out, alpha = _composite(
        means2d.reshape(images, num, 2), conics.reshape(images, num, 3),
        opac.reshape(images, num), feats.reshape(images, num, channels),
        radii.reshape(images, num, 2), depths.reshape(images, num), width, height,
    )
    out = out.reshape(batch_dims + (cams, height, width, channels))
    alpha = alpha.reshape(batch_dims + (cams, height, width, 1))
    if render_mode in ("ED", "RGB+ED"):
        depth = out[..., -1:] / alpha.clamp_min(1e-10)
        out = depth if render_mode == "ED" else torch.cat((out[..., :-1], depth), -1)
    if backgrounds is not None:
        out = out + backgrounds[..., None, None, :] * (1.0 - alpha)
    info = {
        "means2d": means2d, "radii": radii, "depths": depths, "conics": conics,
        "opacities": opac, "width": width, "height": height, "n_cameras": cams,
        "gaussian_ids": None, "tile_size": 16,
    }
    return out, alpha, info


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """Batched product of small matrices (..., i, j) x (..., j, k) by broadcasting; on CPU much
    faster than ``matmul``/``einsum``, which run one tiny GEMM per matrix."""
    return (a[..., :, :, None] * b[..., None, :, :]).sum(-2)


def project_gaussians(
    means: Tensor, quats: Tensor, scales: Tensor, opac: Tensor, viewmats: Tensor, Ks: Tensor,
    width: int, height: int, eps2d: float = 0.3, near_plane: float = 0.01, far_plane: float = 1e10,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EWA projection of 3D Gaussians, as gsplat's fused CUDA projection computes it.

    Same maths as ``gsplat.cuda._torch_impl._fully_fused_projection`` (which the tests compare
    it with) but written elementwise: that reference builds 2x3 and 3x3 products with einsum,
    one tiny GEMM per Gaussian, about 10x slower on CPU. Adds gsplat's CUDA opacity-aware box.

    Args:
        means (..., N, 3), quats (..., N, 4) wxyz, scales (..., N, 3): world-space Gaussians.
        opac: (..., C, N) opacities per camera, for the box.
        viewmats: (..., C, 4, 4) world-to-camera (OpenCV axes); Ks (..., C, 3, 3) pixels.

    Returns:
        radii (..., C, N, 2) int32 box half-sizes in pixels (0 = culled), means2d (..., C, N, 2)
        pixel coordinates (top-left image corner at (0, 0)), depths (..., C, N) camera z,
        conics (..., C, N, 3) upper triangle (a, b, c) of the inverse 2D covariance (pixels⁻²).
    """
    from gsplat.cuda._torch_impl import _quat_to_rotmat

    rot = _quat_to_rotmat(quats)  # normalises
    m = rot * scales[..., None, :]  # (..., N, 3, 3) = R S
    rv = viewmats[..., :3, :3]  # (..., C, 3, 3)
    tv = viewmats[..., :3, 3]
    means_c = torch.matmul(means[..., None, :, :], rv.transpose(-1, -2)) + tv[..., None, :]  # (..., C, N, 3)
    x, y, z = means_c.unbind(-1)
    fx, fy = Ks[..., 0, 0, None], Ks[..., 1, 1, None]
    cx, cy = Ks[..., 0, 2, None], Ks[..., 1, 2, None]
    tan_x, tan_y = 0.5 * width / fx, 0.5 * height / fy
    zc = torch.where(z.abs() < 1e-12, torch.full_like(z, 1e-12), z)
    tx = zc * torch.clamp(x / zc, min=-(cx / fx + 0.3 * tan_x), max=(width - cx) / fx + 0.3 * tan_x)
    ty = zc * torch.clamp(y / zc, min=-(cy / fy + 0.3 * tan_y), max=(height - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(zc)
    jac = torch.stack((fx / zc, zero, -fx * tx / zc**2, zero, fy / zc, -fy * ty / zc**2), -1)
    jac = jac.reshape(zc.shape + (2, 3))  # (..., C, N, 2, 3)
    jw = _mm(jac, rv[..., None, :, :])  # J Rv
    a = _mm(jw, m[..., None, :, :, :])  # J Rv R S, (..., C, N, 2, 3)
    c00 = (a[..., 0, :] ** 2).sum(-1) + eps2d
    c01 = (a[..., 0, :] * a[..., 1, :]).sum(-1)
    c11 = (a[..., 1, :] ** 2).sum(-1) + eps2d
    det = c00 * c11 - c01 * c01
    det_safe = det.clamp_min(1e-10)
    conics = torch.stack((c11 / det_safe, -c01 / det_safe, c00 / det_safe), -1)
    means2d = torch.stack((fx * x / zc + cx, fy * y / zc + cy), -1)

    with torch.no_grad():
        extend = torch.sqrt(2.0 * torch.log((opac / ALPHA_THRESHOLD).clamp_min(1.0))).clamp_max(_MAX_EXTEND)
        r = torch.ceil(extend[..., None] * torch.stack((c00, c11), -1).clamp_min(0).sqrt())
        keep = (det > 0) & (z > near_plane) & (z < far_plane) & (opac >= ALPHA_THRESHOLD)
        keep &= (r > 0).any(-1)
        keep &= (means2d[..., 0] + r[..., 0] > 0) & (means2d[..., 0] - r[..., 0] < width)
        keep &= (means2d[..., 1] + r[..., 1] > 0) & (means2d[..., 1] - r[..., 1] < height)
        radii = torch.where(keep[..., None], r, torch.zeros_like(r)).int()
    return radii, means2d, z, conics


@torch.no_grad()
def _pairs(
    means2d: Tensor, conics: Tensor, opac: Tensor, radii: Tensor, depths: Tensor, width: int,
    height: int,
) -> tuple[Tensor, Tensor]:
    """The (instance, pixel) pairs that survive gsplat's α tests, sorted by pixel and, within a
    pixel, front to back. Instances index the flattened (I * N,) Gaussians of all images;
    pixels the flattened (I * H * W,) image stack.

    Candidates are each Gaussian's square box of half-size R = max(radii), evaluated densely per
    group of equal R by broadcasting (no per-candidate gathers)."""
    images, num = opac.shape
    flat_r = radii.reshape(-1, 2)
    inst = ((flat_r > 0).all(-1)).nonzero().squeeze(1)
    depth_rank = torch.empty(len(inst), dtype=torch.long)
    depth_rank[torch.argsort(depths.reshape(-1).index_select(0, inst))] = torch.arange(len(inst))
    big_r = flat_r.index_select(0, inst).amax(-1).long()
    m2 = means2d.reshape(-1, 2)
    co = conics.reshape(-1, 3)
    op = opac.reshape(-1)
    keys, alphas = [], []
    # Groups of similar box size; the box is padded up to the group's size.
    edges = [0, 1, 2, 3, 4, 6, 8, 11, 16, 23, 32, 48, 64, 96, 128, 192, 256, 1 << 30]
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = ((big_r > lo) & (big_r <= hi)).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        size = int(big_r.index_select(0, sel).max())
        ids = inst.index_select(0, sel)
        m = m2.index_select(0, ids)
        c = co.index_select(0, ids)
        k = 2 * size + 1
        span = torch.arange(k, dtype=m.dtype)
        col0 = torch.floor(m[:, 0]) - size  # first pixel column / row of the box
        row0 = torch.floor(m[:, 1]) - size
        col = col0[:, None] + span  # (n, K)
        row = row0[:, None] + span
        dx = col + 0.5 - m[:, 0:1]
        dy = row + 0.5 - m[:, 1:2]
        # sigma = ½ a dx² + ½ c dy² + b dx dy; pixels off the image get +inf.
        term_x = (0.5 * c[:, 0:1] * dx * dx).masked_fill_((col < 0) | (col >= width), math.inf)
        term_y = (0.5 * c[:, 2:3] * dy * dy).masked_fill_((row < 0) | (row >= height), math.inf)
        sigma = (c[:, 1:2] * dx)[:, None, :] * dy[:, :, None]
        sigma += term_x[:, None, :]
        sigma += term_y[:, :, None]
        # α = o exp(-sigma) >= 1/255  <=>  sigma <= ln(255 o)
        limit = torch.log(op.index_select(0, ids) / ALPHA_THRESHOLD)
        hit = ((sigma <= limit[:, None, None]) & (sigma >= 0)).view(-1).nonzero().squeeze(1)
        g = torch.div(hit, k * k, rounding_mode="floor")
        ij = hit - g * (k * k)
        i = torch.div(ij, k, rounding_mode="floor")
        j = ij - i * k
        gid = ids.index_select(0, g)
        image = torch.div(gid, num, rounding_mode="floor")
        pixel = (image * height + row0.long().index_select(0, g) + i) * width + col0.long().index_select(0, g) + j
        keys.append(pixel * len(inst) + depth_rank.index_select(0, sel).index_select(0, g))
        s_hit = sigma.view(-1).index_select(0, hit)
        alphas.append(torch.clamp_max(op.index_select(0, gid) * torch.exp(-s_hit), 0.999))
    if not keys:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty
    key, order = torch.sort(torch.cat(keys))
    alpha = torch.cat(alphas).index_select(0, order)
    rank = key % len(inst)
    pixel = torch.div(key, len(inst), rounding_mode="floor")
    by_rank = torch.empty_like(inst)
    by_rank[depth_rank] = inst
    inst = by_rank.index_select(0, rank)

    # Early termination: keep the prefix of each pixel's list whose inclusive T stays > 1e-4.
    log_t = _exclusive_log_transmittance(alpha, pixel)
    keep = ((log_t + torch.log1p(-alpha.double())) > math.log(_T_STOP)).nonzero().squeeze(1)
    return inst.index_select(0, keep), pixel.index_select(0, keep)


def _exclusive_log_transmittance(alpha: Tensor, pixel: Tensor) -> Tensor:
    """log T before each pair, T = Π (1 - α) over the earlier pairs of the same pixel, in
    float64; ``pixel`` is sorted."""
    log1m = torch.log1p(-alpha.double())
    before = torch.cumsum(log1m, 0) - log1m  # sum over all earlier pairs, every pixel
    first = torch.ones_like(pixel, dtype=torch.bool)
    first[1:] = pixel[1:] != pixel[:-1]
    segment = torch.cumsum(first, 0) - 1
    starts = before.index_select(0, first.nonzero().squeeze(1))
    return before - starts.index_select(0, segment)


def _composite(
    means2d: Tensor, conics: Tensor, opac: Tensor, feats: Tensor, radii: Tensor, depths: Tensor,
    width: int, height: int,
) -> tuple[Tensor, Tensor]:
    """Front-to-back alpha compositing: (I, H, W, D) features and (I, H, W, 1) alpha, black
    background; shapes in are (I, N, ...)."""
    images, num = opac.shape
    channels = feats.shape[-1]
    size = images * height * width
    inst, pixel = _pairs(means2d, conics, opac, radii, depths, width, height)
    # Per-Gaussian scalars as separate 1-D tensors: gathering those is cheap to differentiate
    # (the backward of a column slice of a per-pair tensor would zero-fill a per-pair buffer).
    flat2d = means2d.reshape(-1, 2)
    flat_co = conics.reshape(-1, 3)
    mx, my = (flat2d[:, k].index_select(0, inst) for k in range(2))
    ca, cb, cc = (flat_co[:, k].index_select(0, inst) for k in range(3))
    o = opac.reshape(-1).index_select(0, inst)
    within = pixel % (height * width)
    row = torch.div(within, width, rounding_mode="floor")
    dx = mx - ((within - row * width).to(mx.dtype) + 0.5)
    dy = my - (row.to(my.dtype) + 0.5)
    sigma = 0.5 * (ca * dx * dx + cc * dy * dy) + cb * dx * dy
    alpha = torch.clamp_max(o * torch.exp(-sigma), 0.999)
    log_t = _exclusive_log_transmittance(alpha, pixel)
    weight = (alpha.double() * torch.exp(log_t)).to(feats.dtype)
    values = torch.cat((weight[:, None] * feats.reshape(-1, channels).index_select(0, inst), weight[:, None]), -1)
    out = feats.new_zeros((size, channels + 1)).index_add(0, pixel, values)
    out = out.view(images, height, width, channels + 1)
    return out[..., :channels], out[..., channels:]
