"""The rasterizer: the PyTorch backend against closed forms, a brute-force reference and gsplat."""

from __future__ import annotations

import math

import pytest
import torch

from liftavatar.avatar.raster import ALPHA_THRESHOLD, project_gaussians, rasterization


def _camera(f: float = 100.0, cx: float = 16.3, cy: float = 15.6):
    k = torch.tensor([[f, 0, cx], [0, f, cy], [0, 0, 1.0]])[None]
    return torch.eye(4)[None], k


def _identity_quats(n: int) -> torch.Tensor:
    return torch.tensor([[1.0, 0, 0, 0]]).repeat(n, 1)


def test_one_gaussian_matches_the_closed_form():
    # An isotropic Gaussian (std s metres) on the optical axis at depth z projects to a 2D
    # Gaussian of variance (f s / z)² + eps2d around the principal point.
    view, k = _camera()
    s, z, o = 0.01, 1.0, 0.8
    img, alpha, info = rasterization(
        torch.tensor([[0.0, 0.0, z]]), _identity_quats(1), torch.full((1, 3), s), torch.tensor([o]),
        torch.tensor([[0.2, 0.5, 1.0]]), view, k, 32, 30, backend="torch",
    )
    var = (100.0 * s / z) ** 2 + 0.3
    jj, ii = torch.meshgrid(torch.arange(32) + 0.5, torch.arange(30) + 0.5, indexing="xy")
    expected = o * torch.exp(-((jj - 16.3) ** 2 + (ii - 15.6) ** 2) / (2 * var))
    expected = torch.where(expected >= ALPHA_THRESHOLD, expected, torch.zeros_like(expected))
    assert img.shape == (1, 30, 32, 3) and alpha.shape == (1, 30, 32, 1)
    torch.testing.assert_close(alpha[0, ..., 0], expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(img[0], expected[..., None] * torch.tensor([0.2, 0.5, 1.0]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(info["means2d"][0, 0], torch.tensor([16.3, 15.6]))


def test_front_gaussian_occludes_the_back_one_and_background_fills_the_rest():
    view, k = _camera()
    means = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 1.0]])  # blue behind, red in front
    colors = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    op = torch.tensor([0.9, 0.6])
    bg = torch.tensor([[0.0, 1.0, 0.0]])
    img, alpha, _ = rasterization(means, _identity_quats(2), torch.full((2, 3), 0.02), op, colors, view, k,
                                  32, 32, backgrounds=bg, backend="torch")
    # The pixel nearest the centre: both Gaussians nearly at their peak.
    i, j = 15, 15
    a_red = 0.6 * math.exp(-0.5 * ((15.5 - 16.3) ** 2 + (15.5 - 15.6) ** 2) / ((100 * 0.02 / 1) ** 2 + 0.3))
    a_blue = 0.9 * math.exp(-0.5 * ((15.5 - 16.3) ** 2 + (15.5 - 15.6) ** 2) / ((100 * 0.02 / 2) ** 2 + 0.3))
    expect = torch.tensor([a_red, (1 - a_red) * (1 - a_blue), (1 - a_red) * a_blue])
    torch.testing.assert_close(img[0, i, j], expect, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(img[0, 0, 0], bg[0])  # far corner: background only


def _reference(means, quats, scales, opac, colors, view, k, width, height):
    """Per-pixel loop over depth-sorted Gaussians with gsplat's rules (slow, obviously right)."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    radii, means2d, depths, conics, _ = _fully_fused_projection(means, covars, view, k, width, height)
    order = torch.argsort(depths[0])
    out = torch.zeros(height, width, colors.shape[-1], dtype=torch.float64)
    acc = torch.zeros(height, width, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            t = 1.0
            for g in order.tolist():
                if depths[0, g] <= 0.01:
                    continue
                dx, dy = means2d[0, g, 0] - (j + 0.5), means2d[0, g, 1] - (i + 0.5)
                a, b, c = conics[0, g]
                sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                alpha = min(0.999, float(opac[g] * torch.exp(-sigma)))
                if sigma < 0 or alpha < ALPHA_THRESHOLD:
                    continue
                if t * (1 - alpha) <= 1e-4:
                    break
                out[i, j] += alpha * t * colors[g].double()
                acc[i, j] += alpha * t
                t *= 1 - alpha
    return out.float(), acc.float()


def _random_scene(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(n, 3, generator=gen) * torch.tensor([0.08, 0.08, 0.05]) + torch.tensor([0, 0, 0.6])
    quats = torch.randn(n, 4, generator=gen)
    scales = torch.rand(n, 3, generator=gen) * 0.02 + 0.002
    opac = torch.rand(n, generator=gen) * 0.98 + 0.01
    colors = torch.rand(n, 3, generator=gen)
    return means, quats, scales, opac, colors


def test_matches_a_brute_force_reference_including_early_termination():
    means, quats, scales, opac, colors = _random_scene(60)
    opac[:20] = 0.999  # opaque ones make pixels terminate early
    view, k = _camera(f=60.0, cx=12.0, cy=10.0)
    img, alpha, _ = rasterization(means, quats, scales, opac, colors, view, k, 24, 20, backend="torch")
    ref_img, ref_acc = _reference(means, quats, scales, opac, colors, view, k, 24, 20)
    assert ref_acc.max() > 0.99  # the scene does saturate pixels
    torch.testing.assert_close(img[0], ref_img, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(alpha[0, ..., 0], ref_acc, atol=2e-5, rtol=1e-4)


def test_projection_agrees_with_gsplats_pytorch_reference():
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci

    means, quats, scales, opac, _ = _random_scene(500, seed=1)
    view = torch.eye(4)[None].clone()
    view[0, :3, :3] = torch.tensor([[0.96, -0.28, 0.0], [0.28, 0.96, 0.0], [0.0, 0.0, 1.0]])
    view[0, :3, 3] = torch.tensor([0.01, -0.02, 0.05])
    _, k = _camera(f=80.0, cx=40.0, cy=30.0)
    radii, means2d, depths, conics = project_gaussians(means, quats, scales, opac[None], view, k, 80, 60)
    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
    ref_radii, ref_means2d, ref_depths, ref_conics, _ = _fully_fused_projection(means, covars, view, k, 80, 60)
    torch.testing.assert_close(means2d, ref_means2d)
    torch.testing.assert_close(depths, ref_depths)
    torch.testing.assert_close(conics, ref_conics, rtol=1e-4, atol=1e-6)
    # The opacity-aware box is never larger than the reference's 3.33-sigma box.
    assert (radii <= ref_radii).all() and (radii > 0).sum() > 400


def test_gradients_match_finite_differences():
    means, quats, scales, opac, colors = (t.double() for t in _random_scene(6, seed=2))
    view, k = _camera(f=60.0, cx=8.0, cy=8.0)
    view, k = view.double(), k.double()

    def render(m, s, o, c):
        img, alpha, _ = rasterization(m, quats, s, o, c, view, k, 16, 16, backend="torch")
        return img.sum() * 0.3 + (img * torch.linspace(0, 1, 16, dtype=torch.float64)[:, None, None]).sum()

    inputs = tuple(t.clone().requires_grad_(True) for t in (means, scales, opac, colors))
    assert torch.autograd.gradcheck(render, inputs, eps=1e-7, atol=1e-4, rtol=1e-3)


def test_batched_frames_equal_single_renders_and_means2d_gets_gradients():
    means, quats, scales, opac, colors = _random_scene(80, seed=3)
    view, k = _camera(f=60.0, cx=12.0, cy=12.0)
    shift = torch.tensor([0.02, -0.01, 0.03])
    batch_means = torch.stack((means, means + shift))
    img, alpha, info = rasterization(batch_means, quats.expand(2, -1, -1), scales.expand(2, -1, -1),
                                     opac.expand(2, -1), colors.expand(2, -1, -1), view.expand(2, 1, 4, 4),
                                     k.expand(2, 1, 3, 3), 24, 24, backend="torch")
    assert img.shape == (2, 1, 24, 24, 3)
    for b in range(2):
        single, _, _ = rasterization(batch_means[b], quats, scales, opac, colors, view, k, 24, 24, backend="torch")
        torch.testing.assert_close(img[b], single)
    means_leaf = means.clone().requires_grad_(True)
    out, _, info = rasterization(means_leaf, quats, scales, opac, colors, view, k, 24, 24, backend="torch")
    info["means2d"].retain_grad()
    out.sum().backward()
    assert info["means2d"].grad.abs().sum() > 0 and means_leaf.grad.abs().sum() > 0
    assert info["radii"].shape == (1, 80, 2)


@pytest.mark.gpu
def test_torch_backend_agrees_with_gsplat_on_cuda():
    """On a GPU: gsplat's CUDA kernels and the PyTorch backend render the same avatar-like scene
    (≥ 40 dB PSNR between them)."""
    from liftavatar.avatar.model import AvatarMeta, gaussians_world, init_avatar
    from liftavatar.face.rig import FaceRig

    rig = FaceRig.load()
    meta = AvatarMeta("s", {"name": rig.name, "version": rig.version}, list(rig.expression_names), (128, 128),
                      (239.0, 239.0, 64.0, 64.0))
    avatar = init_avatar(rig, torch.zeros(rig.num_identity), meta)
    gen = torch.Generator().manual_seed(0)
    avatar.params["sh0"] = torch.randn(avatar.num_gaussians, 1, 3, generator=gen) * 0.5
    avatar.params["opacities"] = torch.randn(avatar.num_gaussians, generator=gen) * 2
    verts = avatar.vertices(torch.zeros(1, rig.num_expressions), torch.tensor([[0.1, 0.3, 0.0]]),
                            torch.tensor([[0.0, 0.0, 0.62]]))
    for size in (128, 512):
        f = 239.0 * size / 128
        k = torch.tensor([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]])[None]
        w = gaussians_world(avatar.params, avatar.binding, verts, avatar.faces, 0)
        args = (w.means[0], w.quats[0], w.scales[0], w.opacities, w.colors[0], torch.eye(4)[None], k, size, size)
        cpu, _, _ = rasterization(*args, backend="torch")
        gpu, _, _ = rasterization(*(a.cuda() if torch.is_tensor(a) else a for a in args), backend="gsplat")
        mse = ((cpu - gpu.cpu()) ** 2).mean()
        assert -10 * torch.log10(mse) >= 40, float(-10 * torch.log10(mse))
