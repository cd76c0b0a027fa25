"""Tests for the batched mesh rasterizer (liftavatar.face.render)."""

from __future__ import annotations

import math

import pytest
import torch

from liftavatar.face.render import (
    CANONICAL_LIGHTING,
    Lighting,
    interpolate,
    interpolate_face_corners,
    project,
    rasterize,
    render_mesh,
    sample_texture,
    vertex_normals,
)

# fx = fy = 64 and z = 2 make unprojection exact in binary: pixel (u, v) <-> (u / 32, v / 32, 2).
EXACT_K = torch.tensor([64.0, 64.0, 0.0, 0.0])
EXACT_Z = 2.0


def unproject(uv: list[tuple[float, float]], z: float = EXACT_Z, k: torch.Tensor = EXACT_K):
    """(1, N, 3) camera-frame points at depth z that project to the given pixel coordinates."""
    fx, fy, cx, cy = k.tolist()
    return torch.tensor([[((u - cx) * z / fx, (v - cy) * z / fy, z) for u, v in uv]])


def shoelace(points: list[tuple[float, float]]) -> float:
    n = len(points)
    return abs(
        sum(points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1] for i in range(n))
    ) / 2


def uv_sphere(n_lat: int = 24, n_lon: int = 32, radius: float = 1.0, center=(0.0, 0.0, 3.0)):
    theta = torch.linspace(0, math.pi, n_lat + 1)
    phi = torch.linspace(0, 2 * math.pi, n_lon + 1)[:-1]
    t, p = torch.meshgrid(theta, phi, indexing="ij")
    unit = torch.stack((t.sin() * p.cos(), -t.cos(), t.sin() * p.sin()), -1).reshape(-1, 3)
    faces = []
    for i in range(n_lat):
        for j in range(n_lon):
            a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
            c, d = a + n_lon, b + n_lon
            faces += [[a, c, b], [b, c, d]]
    return unit * radius + torch.tensor(center), torch.tensor(faces)


def grid_mesh(n: int, step: float, origin: float, jitter: int, seed: int = 0):
    """Planar (n+1)^2-vertex grid at EXACT_Z with pixel coordinates on half-integers (so many
    pixel centres fall exactly on edges and vertices); interior vertices jittered by whole pixels.
    Returns vertices (1, V, 3), faces, and the grid's outer square in pixels."""
    gen = torch.Generator().manual_seed(seed)
    uv = []
    for i in range(n + 1):
        for j in range(n + 1):
            u, v = origin + j * step, origin + i * step
            if 0 < i < n and 0 < j < n:
                du, dv = torch.randint(-jitter, jitter + 1, (2,), generator=gen).tolist()
                u, v = u + du, v + dv
            uv.append((u, v))
    faces = []
    for i in range(n):
        for j in range(n):
            a, b = i * (n + 1) + j, i * (n + 1) + j + 1
            c, d = a + n + 1, b + n + 1
            faces += [[a, b, d], [a, d, c]] if (i + j) % 2 else [[a, b, c], [b, d, c]]
    return unproject(uv), torch.tensor(faces), (origin, origin + n * step)


# ----------------------------------------------------------------------------------------------
# Projection and coverage
# ----------------------------------------------------------------------------------------------


def test_project_principal_point_and_formula():
    k = torch.tensor([100.0, 120.0, 64.0, 48.0])
    uvz = project(torch.tensor([[[0.0, 0.0, 2.0], [0.5, -0.25, 2.0]]]), k)
    assert torch.allclose(uvz[0, 0], torch.tensor([64.0, 48.0, 2.0]))
    assert torch.allclose(uvz[0, 1], torch.tensor([100 * 0.25 + 64, 120 * -0.125 + 48, 2.0]))


def test_pixel_centre_convention():
    # A tiny triangle around u, v = (10.5, 20.5) covers exactly pixel (row 20, col 10).
    verts = unproject([(10.4, 20.4), (10.7, 20.45), (10.5, 20.7)])
    frags = rasterize(verts, torch.tensor([[0, 1, 2]]), EXACT_K, (32, 32))
    assert frags.mask.sum() == 1 and bool(frags.mask[0, 20, 10])


def test_large_triangle_covers_its_area():
    corners = [(10.3, 12.7), (200.1, 30.4), (60.5, 220.9)]
    k = torch.tensor([180.0, 180.0, 128.0, 128.0])
    frags = rasterize(unproject(corners, 2.0, k), torch.tensor([[0, 1, 2]]), k, (256, 256))
    assert abs(frags.mask.sum().item() / shoelace(corners) - 1) < 0.01
    assert torch.all(frags.depth[frags.mask] == 2.0) and torch.all(frags.depth[~frags.mask] == math.inf)
    assert torch.all(frags.face_index[~frags.mask] == -1)


def test_square_of_two_triangles_is_watertight():
    # Corners and the diagonal pass exactly through pixel centres.
    verts = unproject([(20.5, 20.5), (100.5, 20.5), (100.5, 100.5), (20.5, 100.5)])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    size = (128, 128)
    both = rasterize(verts, faces, EXACT_K, size).mask.sum().item()
    alone = [rasterize(verts, faces[i : i + 1], EXACT_K, size).mask.sum().item() for i in range(2)]
    # Centres on the left/top edges are in, right/bottom out; the diagonal goes to exactly one.
    assert both == 80 * 80
    assert sum(alone) == both


@pytest.mark.parametrize("seed", [0, 1])
def test_jittered_grid_has_no_holes_or_double_cover(seed):
    verts, faces, (lo, hi) = grid_mesh(n=6, step=8.0, origin=4.5, jitter=2, seed=seed)
    size = (64, 64)
    union = rasterize(verts, faces, EXACT_K, size)
    per_face = sum(
        rasterize(verts, faces[i : i + 1], EXACT_K, size).mask.sum().item() for i in range(len(faces))
    )
    square = int(hi - lo) ** 2  # left/top boundary centres in, right/bottom out
    assert union.mask.sum().item() == square
    assert per_face == square
    # Reversing every face's winding must not change coverage.
    assert torch.equal(rasterize(verts, faces.flip(1), EXACT_K, size).mask, union.mask)


def test_shared_edges_watertight_under_perspective():
    # A tilted, jittered sphere: the silhouette-free front part must have no holes.
    verts, faces = uv_sphere(16, 20)
    k = torch.tensor([90.0, 90.0, 32.0, 32.0])
    size = (64, 64)
    frags = rasterize(verts[None], faces, k, size)
    per_face = torch.zeros(faces.shape[0])
    for i in range(faces.shape[0]):
        per_face[i] = rasterize(verts[None], faces[i : i + 1], k, size, cull_backfaces=True).mask.sum()
    front = rasterize(verts[None], faces, k, size, cull_backfaces=True).mask
    assert per_face.sum().item() == front.sum().item()  # no pixel drawn by two front faces
    assert torch.equal(front, frags.mask)  # back faces add nothing outside the front silhouette


def test_faces_behind_near_plane_are_skipped():
    verts = torch.tensor([[[-1.0, -1.0, 2.0], [1.0, -1.0, 2.0], [0.0, 1.0, -0.5]]])
    frags = rasterize(verts, torch.tensor([[0, 1, 2]]), [50.0, 50.0, 32.0, 32.0], (64, 64))
    assert not frags.mask.any()


def test_backface_culling_keeps_counter_clockwise_on_screen():
    # On screen (v down) (10,10) -> (10,50) -> (50,10) runs counter-clockwise.
    verts = unproject([(10.0, 10.0), (10.0, 50.0), (50.0, 10.0)])
    front, back = torch.tensor([[0, 1, 2]]), torch.tensor([[0, 2, 1]])
    size = (64, 64)
    assert rasterize(verts, front, EXACT_K, size, cull_backfaces=True).mask.any()
    assert not rasterize(verts, back, EXACT_K, size, cull_backfaces=True).mask.any()
    both_sides = [rasterize(verts, f, EXACT_K, size).mask.sum() for f in (front, back)]
    assert both_sides[0] == both_sides[1]
    # Front-facing means the right-hand normal points toward the camera.
    normal = torch.cross(verts[0, 1] - verts[0, 0], verts[0, 2] - verts[0, 0], dim=0)
    assert torch.dot(normal, verts[0, 0]) < 0


def test_small_chunks_give_identical_result():
    verts, faces = uv_sphere()
    k = [70.0, 70.0, 32.0, 32.0]
    a = rasterize(verts[None], faces, k, (64, 64))
    b = rasterize(verts[None], faces, k, (64, 64), chunk_size=100)
    assert torch.equal(a.face_index, b.face_index) and torch.equal(a.barycentric, b.barycentric)


# ----------------------------------------------------------------------------------------------
# Depth order
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_nearer_triangle_wins(order):
    near_tri = unproject([(5.0, 5.0), (60.0, 5.0), (5.0, 60.0)], z=2.0)
    far_tri = unproject([(10.0, 10.0), (62.0, 10.0), (10.0, 62.0)], z=2.0) * 1.5  # same pixels, z=3
    verts = torch.cat((near_tri, far_tri), 1)
    tris = torch.tensor([[0, 1, 2], [3, 4, 5]])[order]
    frags = rasterize(verts, tris, EXACT_K, (64, 64))
    near_index = order.index(0)
    both = rasterize(verts, tris[near_index : near_index + 1], EXACT_K, (64, 64)).mask & rasterize(
        verts, tris[1 - near_index : 2 - near_index], EXACT_K, (64, 64)
    ).mask
    assert both.sum() > 500
    assert torch.all(frags.face_index[both] == near_index)
    assert torch.allclose(frags.depth[both], torch.tensor(2.0))
    only_far = frags.mask & (frags.face_index == 1 - near_index)
    assert only_far.any() and torch.allclose(frags.depth[only_far], torch.tensor(3.0))


def test_equal_depth_goes_to_smaller_face_index():
    verts = unproject([(5.0, 5.0), (60.0, 5.0), (5.0, 60.0)])
    frags = rasterize(verts, torch.tensor([[0, 1, 2], [0, 2, 1], [1, 0, 2]]), EXACT_K, (64, 64))
    assert torch.all(frags.face_index[frags.mask] == 0)


# ----------------------------------------------------------------------------------------------
# Interpolation
# ----------------------------------------------------------------------------------------------


def test_perspective_correct_interpolation_on_tilted_plane():
    # Plane z = 2 + 0.8 x, strongly tilted in depth.
    xy = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    verts = torch.cat((xy, (2 + 0.8 * xy[:, :1])), 1)[None]
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    k = torch.tensor([60.0, 60.0, 64.0, 64.0])
    frags = rasterize(verts, faces, k, (128, 128))
    attr = interpolate(verts[0], faces, frags)  # camera-frame position per pixel
    mask = frags.mask[0]
    rows, cols = torch.nonzero(mask, as_tuple=True)
    dx = (cols + 0.5 - 64.0) / 60.0
    dy = (rows + 0.5 - 64.0) / 60.0
    t = 2.0 / (1 - 0.8 * dx)  # ray (dx, dy, 1) * t meets the plane
    expected = torch.stack((t * dx, t * dy, t), -1)
    assert (attr[0][mask] - expected).abs().max() < 1e-4
    assert (frags.depth[0][mask] - t).abs().max() < 1e-4

    # Screen-space-linear barycentrics would be visibly wrong.
    screen = project(verts, k)[0, :, :2]
    face = frags.face_index[0][mask]
    corners = screen[faces[face]]  # (N, 3, 2)
    p = torch.stack((cols + 0.5, rows + 0.5), -1)[:, None]
    rolled1, rolled2 = corners.roll(-1, 1), corners.roll(-2, 1)
    w = (rolled1 - p)[..., 0] * (rolled2 - p)[..., 1] - (rolled1 - p)[..., 1] * (rolled2 - p)[..., 0]
    w = w / w.sum(-1, keepdim=True)
    linear = (w[..., None] * verts[0][faces[face]]).sum(1)
    assert (linear - expected).abs().max() > 0.02


def test_barycentrics_are_valid():
    verts, faces = uv_sphere()
    frags = rasterize(verts[None], faces, [70.0, 70.0, 32.0, 32.0], (64, 64))
    bary = frags.barycentric[frags.mask]
    assert torch.all(bary >= 0) and torch.allclose(bary.sum(-1), torch.ones(1))
    assert torch.all(frags.barycentric[~frags.mask] == 0)


def test_interpolate_face_corners_and_batched_attributes():
    verts = unproject([(5.0, 5.0), (60.0, 5.0), (5.0, 60.0)]).repeat(2, 1, 1)
    faces = torch.tensor([[0, 1, 2]])
    frags = rasterize(verts, faces, EXACT_K, (64, 64))
    corner_values = torch.tensor([[[1.0], [2.0], [3.0]]])
    per_corner = interpolate_face_corners(corner_values, frags)
    per_vertex = interpolate(torch.tensor([[1.0], [2.0], [3.0]]), faces, frags)
    batched = interpolate(torch.tensor([[[1.0], [2.0], [3.0]], [[2.0], [4.0], [6.0]]]), faces, frags)
    assert torch.allclose(per_corner, per_vertex)
    assert torch.allclose(batched[1], 2 * per_vertex[1])
    assert torch.all(per_vertex[~frags.mask] == 0)


def test_vertex_normals_of_a_plane():
    verts = unproject([(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0)])
    normals = vertex_normals(verts, torch.tensor([[0, 1, 2], [0, 2, 3]]))
    assert torch.allclose(normals, torch.tensor([0.0, 0.0, 1.0]).expand(1, 4, 3))


# ----------------------------------------------------------------------------------------------
# Texturing, shading, compositing
# ----------------------------------------------------------------------------------------------


def test_texture_uv_origin_is_top_left_texel():
    texture = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0], [1.0, 1.0, 1.0]]])
    uv = torch.tensor([[[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]]])
    out = sample_texture(texture, uv)
    assert torch.allclose(out[0, 0], texture.reshape(4, 3))
    assert torch.allclose(sample_texture(texture[None], uv), out)


def test_textured_quad_shows_texture_upright():
    # A screen-aligned quad whose top-left corner has uv (0, 0).
    verts = unproject([(0.0, 0.0), (64.0, 0.0), (64.0, 64.0), (0.0, 64.0)])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    texture = torch.zeros(8, 8, 3)
    texture[:4, :4, 0] = 1.0  # top-left quarter red
    out = render_mesh(verts, faces, EXACT_K, (64, 64), face_uvs=uv[faces], texture=texture)
    assert torch.allclose(out.rgb[0, 5, 5], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(out.rgb[0, 58, 58], torch.zeros(3))
    assert out.mask.min() == 1


def test_sphere_lit_from_camera_is_brightest_at_centre_and_shading_ignores_lighting():
    verts, faces = uv_sphere(32, 48)
    k = [60.0, 60.0, 32.0, 32.0]
    head_on = Lighting(direction=torch.tensor([0.0, 0.0, -1.0]), color=torch.ones(3), ambient=torch.zeros(3))
    out = render_mesh(verts[None], faces, k, (64, 64), lighting=head_on)
    grey = out.rgb[0, ..., 0]
    row, col = divmod(int(grey.argmax()), 64)
    assert abs(row + 0.5 - 32) <= 1.5 and abs(col + 0.5 - 32) <= 1.5
    assert grey.max() == pytest.approx(0.8, abs=0.01)
    assert out.normals[0, 32, 32, 2] < -0.99  # facing the camera

    other = Lighting(direction=torch.tensor([1.0, 0.0, 0.0]), color=torch.tensor([1.0, 0.2, 0.2]))
    relit = render_mesh(verts[None], faces, k, (64, 64), lighting=other)
    assert torch.equal(out.shading, relit.shading)
    assert not torch.allclose(out.rgb, relit.rgb)
    assert torch.all(out.shading[~out.mask.bool()] == 0)


def test_shading_uses_canonical_light_and_per_face_albedo():
    verts = unproject([(0.0, 0.0), (64.0, 0.0), (64.0, 64.0), (0.0, 64.0)])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])  # plane facing the camera
    out = render_mesh(verts, faces, EXACT_K, (64, 64), shading_albedo=torch.tensor([0.5, 1.0]))
    l_z = -CANONICAL_LIGHTING.direction[2] / CANONICAL_LIGHTING.direction.norm()
    lit = (CANONICAL_LIGHTING.ambient[0] + CANONICAL_LIGHTING.color[0] * l_z).item()
    assert out.shading[0, 5, 60, 0] == pytest.approx(0.5 * lit, abs=1e-5)  # face 0, upper right
    assert out.shading[0, 60, 5, 0] == pytest.approx(1.0 * lit, abs=1e-5)  # face 1, lower left


def test_back_side_normals_are_turned_toward_camera():
    verts = unproject([(10.0, 10.0), (50.0, 10.0), (10.0, 50.0)])  # clockwise: back side
    out = render_mesh(verts, torch.tensor([[0, 1, 2]]), EXACT_K, (64, 64), lighting=Lighting())
    n = out.normals[out.mask.bool()]
    assert torch.all(n[:, 2] < -0.99)


def test_vertex_colours_background_and_gradients():
    verts = unproject([(10.0, 10.0), (10.0, 50.0), (50.0, 10.0)])
    colors = torch.tensor([[1.0, 0.0, 0.0]] * 3, requires_grad=True)
    bg = torch.tensor([[0.0, 0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2]])
    out = render_mesh(verts, faces, EXACT_K, (64, 64), vertex_colors=colors, background=bg)
    assert torch.allclose(out.rgb[0, 20, 20], torch.tensor([1.0, 0.0, 0.0]))
    assert torch.allclose(out.rgb[0, 60, 60], torch.tensor([0.0, 0.0, 1.0]))
    assert out.depth[0, 60, 60] == math.inf
    out.rgb.sum().backward()
    assert colors.grad is not None and colors.grad.abs().sum() > 0


def test_nothing_visible_renders_background():
    verts = torch.tensor([[[0.0, 0.0, -1.0], [1.0, 0.0, -1.0], [0.0, 1.0, -1.0]]]).repeat(2, 1, 1)
    uv = torch.rand(1, 3, 2)
    out = render_mesh(
        verts, torch.tensor([[0, 1, 2]]), [10.0, 10.0, 4.0, 4.0], (8, 8), face_uvs=uv,
        texture=torch.rand(2, 8, 8, 3), lighting=Lighting(), background=torch.tensor([0.1, 0.2, 0.3]),
        supersample=2,
    )
    assert out.mask.sum() == 0 and torch.isinf(out.depth).all() and out.normals.abs().sum() == 0
    assert torch.allclose(out.rgb, torch.tensor([0.1, 0.2, 0.3]).expand(2, 8, 8, 3))


# ----------------------------------------------------------------------------------------------
# Batching and supersampling
# ----------------------------------------------------------------------------------------------


def test_batch_equals_one_by_one():
    verts, faces = uv_sphere()
    gen = torch.Generator().manual_seed(0)
    batch = verts[None] + 0.3 * torch.randn(3, 1, 3, generator=gen) * torch.tensor([1.0, 1.0, 0.3])
    k = torch.tensor([[60.0, 60.0, 32.0, 32.0], [70.0, 65.0, 30.0, 34.0], [50.0, 50.0, 32.0, 32.0]])
    colors = torch.rand(3, verts.shape[0], 3, generator=gen)
    uvs = torch.rand(faces.shape[0], 3, 2, generator=gen)
    textures = torch.rand(3, 16, 16, 3, generator=gen)
    light = Lighting(direction=torch.randn(3, 3, generator=gen), color=torch.rand(3, 3, generator=gen))
    together = render_mesh(batch, faces, k, (64, 64), vertex_colors=colors, lighting=light, supersample=2)
    textured = render_mesh(batch, faces, k, (64, 64), face_uvs=uvs, texture=textures)
    frags = rasterize(batch, faces, k, (64, 64))
    for i in range(3):
        one_light = Lighting(light.direction[i], light.color[i], light.ambient)
        item = batch[i : i + 1]
        alone = render_mesh(
            item, faces, k[i], (64, 64), vertex_colors=colors[i], lighting=one_light, supersample=2
        )
        textured_alone = render_mesh(item, faces, k[i], (64, 64), face_uvs=uvs, texture=textures[i])
        assert torch.allclose(textured.rgb[i], textured_alone.rgb[0], atol=1e-6)
        one = rasterize(batch[i : i + 1], faces, k[i], (64, 64))
        assert torch.equal(frags.face_index[i], one.face_index[0])
        for name in ("rgb", "mask", "shading", "normals", "depth"):
            assert torch.allclose(getattr(together, name)[i], getattr(alone, name)[0], atol=1e-6), name


def test_supersampled_edges_are_fractional_and_area_is_right():
    corners = [(3.3, 4.1), (60.2, 12.7), (17.9, 58.6)]
    verts = unproject(corners)
    out = render_mesh(verts, torch.tensor([[0, 1, 2]]), EXACT_K, (64, 64), supersample=4)
    mask = out.mask[0]
    assert ((mask > 0) & (mask < 1)).sum() > 50
    assert mask.sum().item() == pytest.approx(shoelace(corners), rel=0.005)
    assert torch.isfinite(out.depth[0][mask > 0]).all() and torch.isinf(out.depth[0][mask == 0]).all()
    n = out.normals[0][mask > 0]
    assert torch.allclose(n.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_supersample_equals_box_filtered_high_resolution_render():
    verts, faces = uv_sphere()
    colors = torch.rand(verts.shape[0], 3, generator=torch.Generator().manual_seed(0))
    k = torch.tensor([50.0, 50.0, 16.0, 16.0])
    kwargs = dict(vertex_colors=colors, lighting=Lighting())
    low = render_mesh(verts[None], faces, k, (32, 32), supersample=3, **kwargs)
    high = render_mesh(verts[None], faces, k * 3, (96, 96), **kwargs)

    def box(x):
        return torch.nn.functional.avg_pool2d(x.permute(0, 3, 1, 2), 3).permute(0, 2, 3, 1)

    assert torch.allclose(low.rgb, box(high.rgb), atol=1e-5)
    assert torch.allclose(low.shading, box(high.shading), atol=1e-5)
    assert torch.allclose(low.mask, box(high.mask[..., None])[..., 0], atol=1e-6)
    depth = -torch.nn.functional.max_pool2d(-high.depth[:, None], 3)[:, 0]
    assert torch.equal(low.depth, depth)


# ----------------------------------------------------------------------------------------------
# CPU vs CUDA
# ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_cuda_agree():
    verts, faces = uv_sphere(40, 50)
    gen = torch.Generator().manual_seed(0)
    batch = verts[None] + 0.02 * torch.randn(4, *verts.shape, generator=gen)
    colors = torch.rand(verts.shape[0], 3, generator=gen)
    k = torch.tensor([200.0, 200.0, 64.0, 64.0])
    kwargs = dict(vertex_colors=colors, lighting=Lighting(), supersample=2)
    cpu = render_mesh(batch, faces, k, (128, 128), **kwargs)
    gpu = render_mesh(batch.cuda(), faces.cuda(), k.cuda(), (128, 128), vertex_colors=colors.cuda(),
                      lighting=Lighting(), supersample=2)
    frags_cpu = rasterize(batch, faces, k, (128, 128))
    frags_gpu = rasterize(batch.cuda(), faces.cuda(), k.cuda(), (128, 128))
    agree = (frags_cpu.face_index == frags_gpu.face_index.cpu()).float().mean()
    assert agree >= 0.999
    assert (cpu.rgb - gpu.rgb.cpu()).abs().max() < 1e-3
    assert (cpu.mask - gpu.mask.cpu()).abs().max() < 1e-3


def test_shared_edges_through_pixel_centres_with_inexact_coordinates():
    # Each batch item: two triangles sharing an edge whose line runs (up to float rounding of its
    # endpoints) through two pixel centres. Edge values near zero then depend on rounding; they
    # must still give every centre to exactly one of the two triangles.
    gen = torch.Generator().manual_seed(0)
    n = 400
    p = torch.randint(4, 28, (n, 2), generator=gen).double() + 0.5
    q = p + torch.randint(-3, 4, (n, 2), generator=gen).double()
    q[(q == p).all(-1), 0] += 1
    t = torch.rand(n, 2, generator=gen).double()
    a, b = p + (q - p) * (-1 - t[:, :1]), p + (q - p) * (2 + t[:, 1:])
    side = torch.stack((-(q - p)[:, 1], (q - p)[:, 0]), -1) * (1.5 + t[:, :1])
    c1, c2 = (a + b) / 2 + side, (a + b) / 2 - side
    k = torch.tensor([37.0, 41.0, 0.3, -0.7])
    z = 1.7 + t[:, :1]
    uv = torch.stack((a, b, c1, c2), 1)
    xyz = torch.cat(((uv[..., :1] - k[2]) * z[:, None] / k[0], (uv[..., 1:] - k[3]) * z[:, None] / k[1]), -1)
    verts = torch.cat((xyz, z[:, None].expand(n, 4, 1)), -1).float()
    faces = torch.tensor([[0, 1, 2], [1, 0, 3]])
    size = (32, 32)
    union = rasterize(verts, faces, k, size).mask
    first = rasterize(verts, faces[:1], k, size).mask.sum((1, 2))
    second = rasterize(verts, faces[1:], k, size).mask.sum((1, 2))
    assert torch.equal(first + second, union.sum((1, 2)))  # no double cover
    items = torch.arange(n)
    for centre in (p, q):  # no holes on the shared edge
        assert union[items, centre[:, 1].long(), centre[:, 0].long()].all()
