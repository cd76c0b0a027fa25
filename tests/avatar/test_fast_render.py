"""The single-frame renderer (liftavatar.avatar.fast_render) renders what render_avatar renders."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from liftavatar.avatar.fast_render import (
    EPS2D,
    FAR_PLANE,
    NEAR_PLANE,
    TILE_SIZE,
    AvatarRenderer,
)
from liftavatar.avatar.model import (
    AvatarConfig,
    AvatarMeta,
    activate_gaussians,
    init_avatar,
    local_covariances,
    pose_gaussians,
    render_avatar,
)



def _avatar(rig, size: int = 64, seed: int = 6004):
    """An untrained avatar with arbitrary colours, view-dependent SH, opacities, local offsets,
    rotations and anisotropic scales (so every part of the pose → Gaussians path matters)."""
    f = 119.4 * size / 64
    meta = AvatarMeta("synth-006004", {"name": rig.name, "version": rig.version}, list(rig.expression_names),
                      (size, size), (f, f, size / 2, size / 2), config=AvatarConfig(deform_width=0))
    av = init_avatar(rig, np.full(rig.num_identity, 0.2, np.float32), meta)
    gen = torch.Generator().manual_seed(seed)
    n = av.num_gaussians
    av.params["means"] = av.params["means"] + torch.randn(n, 3, generator=gen) * 0.1
    av.params["quats"] = torch.randn(n, 4, generator=gen)
    av.params["scales"] = av.params["scales"] + torch.randn(n, 3, generator=gen) * 0.2
    av.params["sh0"] = torch.randn(n, 1, 3, generator=gen) * 0.5
    av.params["shN"] = torch.randn(n, av.params["shN"].shape[1], 3, generator=gen) * 0.3
    av.params["opacities"] = torch.randn(n, generator=gen) + 1.5
    return av


def _frames(rig, count: int, seed: int = 0):
    """``count`` different (expression (1, E), rotation (1, 3), translation (1, 3)) frames."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        expr = torch.rand(1, rig.num_expressions, generator=gen) * 0.6
        rot = torch.randn(1, 3, generator=gen) * 0.25
        trans = torch.tensor([[0.0, 0.0, 0.6]]) + torch.randn(1, 3, generator=gen) * torch.tensor([0.02, 0.02, 0.05])
        out.append((expr, rot, trans))
    return out


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return float("inf") if mse == 0 else -10 * np.log10(mse)


def test_settings_are_those_of_render_avatar():
    """The renderer's projection and tile settings are raster.rasterization's defaults (what
    render_avatar uses) and gsplat's."""
    from liftavatar.avatar.raster import rasterization

    params = inspect.signature(rasterization).parameters
    assert (params["near_plane"].default, params["far_plane"].default, params["eps2d"].default) == (
        NEAR_PLANE, FAR_PLANE, EPS2D)
    gs = pytest.importorskip("gsplat")
    gs_params = inspect.signature(gs.rasterization).parameters
    assert gs_params["tile_size"].default == TILE_SIZE
    assert gs_params["radius_clip"].default == 0.0


def test_cpu_renderer_matches_render_avatar(rig):
    """On CPU (PyTorch rasterizer, no graph) the renderer gives render_avatar's images, frame
    after frame, and accepts (E,) / (1, E) tensors or numpy arrays."""
    av = _avatar(rig)
    k = torch.tensor(av.meta.intrinsics)
    bg = torch.tensor([0.2, 0.3, 0.4])
    renderer = AvatarRenderer(av, k, (64, 64), "cpu", background=bg, graph=True)
    assert renderer.mode == "eager-torch" and renderer.graph_error is None
    for i, (expr, rot, trans) in enumerate(_frames(rig, 3)):
        ref_rgb, ref_alpha, _ = render_avatar(av, av.vertices(expr, rot, trans), k, (64, 64), background=bg)
        args = (expr, rot, trans) if i % 2 else (expr[0].numpy(), rot[0], trans[0].numpy())
        rgb, alpha = renderer(*args)
        assert rgb.shape == ref_rgb.shape == (1, 64, 64, 3) and alpha.shape == ref_alpha.shape == (1, 64, 64, 1)
        assert ref_alpha.mean() > 0.05  # the head is in view
        torch.testing.assert_close(rgb, ref_rgb, atol=1e-6, rtol=0)
        torch.testing.assert_close(alpha, ref_alpha, atol=1e-6, rtol=0)
        assert _psnr(rgb, ref_rgb) >= 50


def test_renderer_default_intrinsics_are_the_training_camera(rig):
    """intrinsics=None: the avatar's training camera rescaled to the output size."""
    av = _avatar(rig)
    renderer = AvatarRenderer(av, None, (32, 32), "cpu")
    f = av.meta.intrinsics[0] / 2
    torch.testing.assert_close(renderer._K[0], torch.tensor([[f, 0, 16.0], [0, f, 16.0], [0, 0, 1]]))


def test_world_covariances_match_quaternions_and_scales(rig):
    """pose_gaussians with precomputed local covariances gives the covariances of the world
    quaternions and scales it gives otherwise (what gsplat would build from them), and the same
    means and colours."""
    from gsplat.cuda._torch_impl import _quat_scale_to_covar_preci

    av = _avatar(rig)
    local = activate_gaussians(av.params)
    expr, rot, trans = _frames(rig, 1, seed=3)[0]
    verts = av.vertices(expr, rot, trans)
    quat = pose_gaussians(local, av.binding, verts, av.faces, 1, "local")
    cov = pose_gaussians(local, av.binding, verts, av.faces, 1, "local", covariances=local_covariances(local))
    assert cov.quats is None and cov.scales is None and cov.covars.shape == (1, av.num_gaussians, 6)
    ref, _ = _quat_scale_to_covar_preci(quat.quats, quat.scales, compute_preci=False, triu=True)
    scale = ref.abs().amax(-1, keepdim=True)
    assert float(((cov.covars - ref).abs() / scale).max()) < 1e-5
    torch.testing.assert_close(cov.means, quat.means, atol=0, rtol=0)
    torch.testing.assert_close(cov.colors, quat.colors, atol=0, rtol=0)


@pytest.mark.gpu
def test_graph_renderer_matches_render_avatar_on_cuda(rig):
    """On a GPU: the CUDA-graph renderer (and its eager and quaternion variants) renders what
    render_avatar renders (≥ 50 dB), over several different frames rendered out of order, with
    earlier results kept (stale static buffers or overwritten outputs would show)."""
    size = 512
    av = _avatar(rig, size=size).to("cuda")
    k = torch.tensor(av.meta.intrinsics, device="cuda")
    bg = torch.tensor([0.1, 0.2, 0.3], device="cuda")
    frames = [tuple(t.cuda() for t in f) for f in _frames(rig, 6, seed=1)]
    refs = []
    for expr, rot, trans in frames:
        rgb, alpha, _ = render_avatar(av, av.vertices(expr, rot, trans), k, (size, size), background=bg)
        refs.append((rgb, alpha))
    graph = AvatarRenderer(av, k, (size, size), "cuda", background=bg, graph=True)
    assert graph.mode.startswith("graph"), f"graph capture failed: {graph.graph_error}"
    variants = {
        "graph": graph,
        "eager": AvatarRenderer(av, k, (size, size), "cuda", background=bg, graph=False),
        "graph-quats": AvatarRenderer(av, k, (size, size), "cuda", background=bg, covariances=False),
    }
    order = [0, 3, 1, 5, 2, 4, 0]
    for name, renderer in variants.items():
        kept = {}
        for i in order:
            kept[i] = renderer(*frames[i])
        for i, (rgb, alpha) in kept.items():
            ref_rgb, ref_alpha = refs[i]
            assert refs[i][1].mean() > 0.05
            assert rgb.shape == ref_rgb.shape and alpha.shape == ref_alpha.shape
            assert _psnr(rgb, ref_rgb) >= 50, (name, i, _psnr(rgb, ref_rgb))
            assert _psnr(alpha, ref_alpha) >= 50, (name, i, _psnr(alpha, ref_alpha))
        # Different frames give different images (the graph reads its inputs).
        assert _psnr(kept[0][0], kept[3][0]) < 40


# --------------------------------------------------------------------------------------------
# The gsplat path without a GPU: gsplat's own Python wrappers (their shape checks included) run
# on CPU with their CUDA kernels replaced by PyTorch stand-ins, so that the calls the renderer
# makes (arguments, shapes, layouts) are exercised here; the GPU test checks the real kernels.


def _fake_kernels(state: dict):
    """Stand-ins of gsplat's CUDA entry points used by the renderer (CPU, PyTorch)."""
    from gsplat.cuda._torch_impl import (
        _fully_fused_projection,
        _quat_scale_to_covar_preci,
    )

    def project(means, covars, quats, scales, opacities, viewmats, Ks, width, height, eps2d, near, far, radius_clip,
                calc_compensations, camera_model):
        assert opacities is not None and radius_clip == 0.0 and not calc_compensations
        if covars is not None:  # gsplat's layout: xx, xy, xz, yy, yz, zz
            c = covars
            cov = torch.stack((c[..., 0], c[..., 1], c[..., 2], c[..., 1], c[..., 3], c[..., 4], c[..., 2], c[..., 4],
                               c[..., 5]), -1).reshape(c.shape[:-1] + (3, 3))
        else:
            cov, _ = _quat_scale_to_covar_preci(quats, scales, compute_preci=False)
        radii, means2d, depths, conics, _ = _fully_fused_projection(means, cov, viewmats, Ks, width, height, eps2d,
                                                                   near, far)
        state["radii"] = radii
        return radii, means2d, depths, conics, None

    def intersect(means2d, radii, depths, image_ids, gaussian_ids, n_images, tile_size, tile_w, tile_h, sort, seg):
        assert image_ids is None and gaussian_ids is None and n_images == 1 and sort and not seg
        assert radii.dtype == torch.int32 and means2d.shape[:-1] == depths.shape
        n = int(((radii > 0).all(-1)).sum())
        return (torch.zeros(depths.shape, dtype=torch.int32), torch.zeros(n, dtype=torch.int64),
                torch.zeros(n, dtype=torch.int32))

    def offsets(isect_ids, n_images, tile_w, tile_h):
        return torch.zeros(n_images, tile_h, tile_w, dtype=torch.int32)

    def rasterize(means2d, conics, colors, opacities, backgrounds, masks, width, height, tile_size, isect_offsets,
                  flatten_ids):
        from liftavatar.avatar.raster import _composite

        out, alpha = _composite(means2d, conics, opacities, colors, state["radii"], state["depths"], width, height)
        if backgrounds is not None:
            out = out + backgrounds[:, None, None, :] * (1 - alpha)
        return out, alpha.double(), torch.zeros(alpha.shape[:-1], dtype=torch.int32)

    def camera(name):
        assert name == "CameraModelType.PINHOLE", name
        return name

    kernels = {"projection_ewa_3dgs_fused_fwd": project, "intersect_tile": intersect, "intersect_offset": offsets,
               "rasterize_to_pixels_3dgs_fwd": rasterize}
    return (lambda name: kernels[name]), camera


class _FakeGraph:
    """Stands in for a captured CUDA graph: a replay recomputes the renderer's forward pass from
    its static input buffers into the static output tensors (what a real replay does)."""

    def __init__(self, renderer, project: bool):
        self.renderer, self.project = renderer, project
        self.out = renderer._forward(*renderer._inputs, project=project)

    def replay(self):
        fresh = self.renderer._forward(*self.renderer._inputs, project=self.project)
        for name, tensor in self.out.items():
            tensor.copy_(fresh[name])


@pytest.mark.parametrize("covariances", [True, False])
@pytest.mark.parametrize("graph", [False, True])
def test_gsplat_path_calls_gsplat_consistently(rig, monkeypatch, covariances, graph):
    """The gsplat path (projection, tile intersection, offsets, compositing through gsplat's
    wrappers, with stand-in kernels), eager and through a (stand-in) graph, renders what
    render_avatar renders with the PyTorch rasterizer, frame after frame."""
    import gsplat.cuda._wrapper as wrapper

    state: dict = {}
    func, obj = _fake_kernels(state)
    monkeypatch.setattr(wrapper, "_make_lazy_cuda_func", func)
    monkeypatch.setattr(wrapper, "_make_lazy_cuda_obj", obj)

    # The stand-in compositor needs depths in render order; take them from the projection.
    real_project = AvatarRenderer._project

    def project(self, world):
        out = real_project(self, world)
        state["depths"] = out["depths"]
        return out

    monkeypatch.setattr(AvatarRenderer, "_project", project)

    size = 48
    av = _avatar(rig, size=size)
    k = torch.tensor(av.meta.intrinsics)
    bg = torch.tensor([0.3, 0.2, 0.1])
    renderer = AvatarRenderer(av, k, (size, size), "cpu", background=bg, backend="torch")
    renderer._setup_gsplat(covariances)
    if graph:
        fake = _FakeGraph(renderer, project=True)
        renderer._graph, renderer._graph_out, renderer._graph_projects = fake, fake.out, True
        renderer._check_graph()
    for expr, rot, trans in _frames(rig, 3, seed=5):
        ref_rgb, ref_alpha, _ = render_avatar(av, av.vertices(expr, rot, trans), k, (size, size), background=bg,
                                              backend="torch")
        rgb, alpha = renderer(expr[0], rot, trans[0])
        assert rgb.shape == ref_rgb.shape and alpha.shape == ref_alpha.shape and alpha.dtype == torch.float32
        assert ref_alpha.mean() > 0.05
        assert _psnr(rgb, ref_rgb) >= 50, _psnr(rgb, ref_rgb)
        assert _psnr(alpha, ref_alpha) >= 50, _psnr(alpha, ref_alpha)


def test_graph_check_catches_stale_inputs(rig):
    """_check_graph rejects a 'graph' that does not read its input buffers."""

    class Stale(_FakeGraph):
        def replay(self):  # ignores the inputs: keeps the capture-time outputs
            pass

    av = _avatar(rig, size=32)
    renderer = AvatarRenderer(av, None, (32, 32), "cpu")
    stale = Stale(renderer, project=False)
    renderer._graph, renderer._graph_out, renderer._graph_projects = stale, stale.out, False
    renderer._project = lambda world: {  # stand-in, no gsplat on CPU
        "means2d": world["means"][None, :, :2], "conics": world["means"][None],
        "radii": torch.ones(1, world["means"].shape[0], 2, dtype=torch.int32)}
    with pytest.raises(RuntimeError, match="differs from eager"):
        renderer._check_graph()
