"""Batched triangle-mesh rasterizer and shader in pure PyTorch (CPU and CUDA, same code).

Written by hand because no installable library rasterizes batched meshes on both CPU and CUDA
here: nvdiffrast and PyTorch3D need compiled extensions that cannot be built offline.

Conventions (every function below uses them):

- Vertices are in the camera frame, in metres. OpenCV camera: x right, y down, z forward; the
  camera sits at the origin and a point is visible only if its z is greater than ``near``.
- Intrinsics are ``(fx, fy, cx, cy)`` in pixels, shaped (4,) or (B, 4).
- Pixel coordinates are continuous with the image's top-left *corner* at (0, 0): pixel (row i,
  col j) covers [j, j+1) x [i, i+1) and has its centre at (u, v) = (j + 0.5, i + 0.5). Projection
  is u = fx * x / z + cx, v = fy * y / z + cy. Scaling the intrinsics by s therefore renders the
  same view at s times the resolution exactly (used by ``supersample``).
- Images are float in [0, 1], channels-last (B, H, W, C) at this module's border.
- Winding: a face's right-hand normal is (v1 - v0) x (v2 - v0). A face is *front-facing* when that
  normal points toward the camera (n . v0 < 0), which is the same as its corners appearing
  counter-clockwise in the image as displayed (v pointing down). Both windings are drawn unless
  ``cull_backfaces`` is set.

Rasterization (:func:`rasterize`): triangles with any vertex at z <= near are skipped whole (no
clipping); others are tested against every pixel centre of their screen bounding box, clipped to
the image, in chunks of candidates to bound memory. A pixel centre is covered when it is inside
all three edges. A centre exactly on an edge is decided as if it were nudged an infinitesimal step
right (+u), then down (+v); each edge function is computed from its endpoints in a canonical
order, so two triangles sharing an edge get bit-for-bit opposite values and a pixel centre on a
shared edge (or a shared vertex) is covered by exactly one of them: no holes, no double cover.
The z-buffer keeps the nearest camera z; equal depths go to the smaller face index.

Gradients: rasterization is not differentiable (it runs under ``torch.no_grad``); gradients do
flow from rendered images to attributes, vertex colours and textures through
:func:`interpolate`, :func:`interpolate_face_corners`, :func:`sample_texture` and
:func:`render_mesh`, and to vertices through the normals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CANONICAL_LIGHTING",
    "DEFAULT_ALBEDO",
    "Fragments",
    "Lighting",
    "RenderOutput",
    "interpolate",
    "interpolate_face_corners",
    "project",
    "rasterize",
    "render_mesh",
    "sample_texture",
    "vertex_normals",
]

DEFAULT_ALBEDO = 0.8
"""Grey albedo used when a render has neither a texture nor vertex colours, and the default
per-face albedo of the shading map."""

# Candidates per chunk, measured: on CPU larger chunks are slower (cache, fresh pages each op);
# on CUDA smaller chunks are slower (launch and sync overhead).
_CHUNK_CPU = 1 << 18
_CHUNK_CUDA = 1 << 22
_FACE_BITS = 32  # low bits of a z-buffer key hold the face index, high bits the depth
_NO_KEY = torch.iinfo(torch.int64).max  # z-buffer key of an uncovered pixel
_BOX_MARGIN = 1 / 256  # pixels; several float32 ulps of coordinates up to ~4096


# --------------------------------------------------------------------------------------------
# Data classes
# --------------------------------------------------------------------------------------------


@dataclass
class Fragments:
    """Per-pixel result of :func:`rasterize`; shapes are (B, H, W[, 3]).

    Attributes:
        face_index: long, index into ``faces`` of the visible face, -1 for background.
        barycentric: float32, perspective-correct barycentric coordinates of the pixel centre's
            point on the 3D triangle, weights of the face's corners 0, 1, 2 (0 for background).
        depth: float32, camera-frame z in metres of that point, +inf for background.
    """

    face_index: Tensor
    barycentric: Tensor
    depth: Tensor

    @property
    def mask(self) -> Tensor:
        """(B, H, W) bool, True where a face is visible."""
        return self.face_index >= 0


def _default_direction() -> Tensor:
    return F.normalize(torch.tensor([-0.3, -0.5, -1.0]), dim=0)


@dataclass
class Lighting:
    """Lambertian light plus ambient, in the camera frame.

    Each field is a tensor shaped (3,) or (B, 3).

    Attributes:
        direction: unit vector pointing FROM the surface TOWARD the light (it is normalised again
            when used). The default, normalised (-0.3, -0.5, -1.0), comes from slightly above and
            left of the camera, as seen in the image.
        color: RGB intensity of the directional light.
        ambient: RGB intensity of the ambient light.

    A surface with albedo a and unit normal n receives a * (ambient + color * max(0, n . direction)).
    """

    direction: Tensor = field(default_factory=_default_direction)
    color: Tensor = field(default_factory=lambda: torch.full((3,), 0.85))
    ambient: Tensor = field(default_factory=lambda: torch.full((3,), 0.25))


CANONICAL_LIGHTING = Lighting()
"""The fixed light of every shading map, whatever the subject's lighting: key light from
normalised (-0.3, -0.5, -1.0) (the camera's upper left) with intensity 0.85, plus ambient 0.25.
A face turned to the camera with the default albedo 0.8 gets a shading of about 0.79."""


@dataclass
class RenderOutput:
    """Images from :func:`render_mesh`, all at the requested (H, W).

    Attributes:
        rgb: (B, H, W, 3) in [0, 1], albedo x lighting composited over the background by ``mask``.
        mask: (B, H, W) coverage in [0, 1] (fractional at edges when supersampled).
        shading: (B, H, W, 3) untextured geometry under :data:`CANONICAL_LIGHTING`, black background.
        normals: (B, H, W, 3) camera-frame unit normals turned toward the camera, 0 for background.
        depth: (B, H, W) camera z in metres, +inf for background; when supersampled, the minimum
            over each pixel's samples.
    """

    rgb: Tensor
    mask: Tensor
    shading: Tensor
    normals: Tensor
    depth: Tensor


# --------------------------------------------------------------------------------------------
# Projection
# --------------------------------------------------------------------------------------------


def _intrinsics(intrinsics: Tensor | Sequence[float], batch: int, device: torch.device) -> Tensor:
    """(B, 4) float32 (fx, fy, cx, cy) from (4,) or (B, 4)."""
    k = torch.as_tensor(intrinsics, dtype=torch.float32, device=device)
    if k.shape not in ((4,), (batch, 4)):
        raise ValueError(f"intrinsics must be shaped (4,) or ({batch}, 4), got {tuple(k.shape)}")
    return k.expand(batch, 4)


def project(vertices: Tensor, intrinsics: Tensor | Sequence[float]) -> Tensor:
    """Project camera-frame points to pixels.

    Args:
        vertices: (B, V, 3) camera-frame points in metres (OpenCV axes).
        intrinsics: (4,) or (B, 4) ``(fx, fy, cx, cy)`` in pixels.

    Returns:
        (B, V, 3) float32 ``(u, v, z)``: continuous pixel coordinates (top-left image corner at
        (0, 0)) and the camera z in metres. Points with z <= 0 get meaningless (u, v).
    """
    _check_vertices(vertices)
    k = _intrinsics(intrinsics, vertices.shape[0], vertices.device)[:, None, :]
    x, y, z = vertices.float().unbind(-1)
    u = k[..., 0] * x / z + k[..., 2]
    v = k[..., 1] * y / z + k[..., 3]
    return torch.stack((u, v, z), dim=-1)


# --------------------------------------------------------------------------------------------
# Rasterization
# --------------------------------------------------------------------------------------------


@dataclass
class _Triangles:
    """Screen-space set-up of the triangles that can cover a pixel: one column per (batch, face),
    stored column-wise so that gathering candidates gives contiguous rows.

    Edge k (opposite corner k) has value E_k = a_k * u + b_k * v + c_k at pixel (u, v), positive
    inside; E_k is the unnormalised screen-space barycentric weight of corner k.
    """

    batch: Tensor  # (T,) long
    face: Tensor  # (T,) long
    box: Tensor  # (4, T) long: first column, first row, width, height (>= 1) of the pixel box
    edges: Tensor  # (9, T) float32: a0 a1 a2 b0 b1 b2 c0 c1 c2
    tie: Tensor  # (3, T) bool: whether a pixel centre exactly on edge k is inside
    inv_z: Tensor  # (3, T) float32: 1 / camera z of each corner


def _setup_triangles(
    screen: Tensor, faces: Tensor, size: tuple[int, int], near: float, cull_backfaces: bool
) -> _Triangles:
    height, width = size
    batch, num_faces = screen.shape[0], faces.shape[0]
    corners = screen[:, faces].reshape(batch * num_faces, 3, 3)  # (B*F, corner, u v z)
    u, v, z = corners.unbind(-1)
    area2 = (u[:, 1] - u[:, 0]) * (v[:, 2] - v[:, 0]) - (v[:, 1] - v[:, 0]) * (u[:, 2] - u[:, 0])
    keep = torch.isfinite(corners).all(-1).all(-1) & (z > near).all(-1) & (area2 != 0)
    if cull_backfaces:
        keep &= area2 < 0  # counter-clockwise on screen (v down) is front

    # Clamp before rounding so that far-off-screen corners cannot overflow the integer cast.
    u_lo, u_hi = (x.clamp(-1.0, width + 1.0) for x in u.aminmax(dim=-1))
    v_lo, v_hi = (x.clamp(-1.0, height + 1.0) for x in v.aminmax(dim=-1))
    # The box is widened by a hair: a centre just outside it can still sit on an edge after
    # rounding of the edge values, and the tie rule, not the box, must decide it.
    col0 = torch.ceil(u_lo - (0.5 + _BOX_MARGIN)).long().clamp_(min=0)
    col1 = torch.floor(u_hi - (0.5 - _BOX_MARGIN)).long().clamp_(max=width - 1)
    row0 = torch.ceil(v_lo - (0.5 + _BOX_MARGIN)).long().clamp_(min=0)
    row1 = torch.floor(v_hi - (0.5 - _BOX_MARGIN)).long().clamp_(max=height - 1)
    keep &= (col1 >= col0) & (row1 >= row0)

    index = keep.nonzero().squeeze(1)
    box = torch.stack((col0, row0, col1 - col0 + 1, row1 - row0 + 1)).index_select(1, index)
    u, v, z = (x.index_select(0, index) for x in (u, v, z))
    edges, tie = _edge_functions(u, v, torch.sign(area2.index_select(0, index)))
    return _Triangles(
        batch=torch.div(index, num_faces, rounding_mode="floor"),
        face=index % num_faces,
        box=box,
        edges=edges,
        tie=tie,
        inv_z=(1.0 / z).T.contiguous(),
    )


def _edge_functions(u: Tensor, v: Tensor, orientation: Tensor) -> tuple[Tensor, Tensor]:
    """Inside-positive edge coefficients (9, T) and on-edge tie flags (3, T) from corners (T, 3).

    Edge k joins corners k+1 and k+2. Its coefficients are computed from the endpoints sorted
    lexicographically by (u, v), then negated where needed; negation is exact, so triangles that
    share an edge (even through duplicated vertices) get exactly opposite edge values.
    """
    ua, va = u.roll(-1, dims=1), v.roll(-1, dims=1)
    ub, vb = u.roll(-2, dims=1), v.roll(-2, dims=1)
    a_first = (ua < ub) | ((ua == ub) & (va < vb))
    ou, ov = torch.where(a_first, ua, ub), torch.where(a_first, va, vb)
    qu, qv = torch.where(a_first, ub, ua), torch.where(a_first, vb, va)
    a = ov - qv
    b = qu - ou
    c = -((a * ou) + (b * ov))
    # The canonical edge function has the sign of the signed area at the opposite corner when
    # corner k+1 comes first.
    sign = torch.where(a_first, 1.0, -1.0) * orientation[:, None]
    a, b, c = a * sign, b * sign, c * sign
    # A centre on the edge, nudged by (+eps, +eps * delta), enters the triangle iff the inward
    # normal (a, b) points that way.
    tie = (a > 0) | ((a == 0) & (b > 0))
    return torch.cat((a, b, c), dim=1).T.contiguous(), tie.T.contiguous()


def _gather(table: Tensor, index: Tensor) -> list[Tensor]:
    """Rows of a (R, T) table at columns ``index`` (N,), as R tensors (N,); gathering 1-D rows
    is several times faster on CPU than ``index_select`` along dim 1."""
    return [row.index_select(0, index) for row in table]


def _edge_values(tris: _Triangles, tri: Tensor, pu: Tensor, pv: Tensor) -> list[Tensor]:
    """The three edge values (N,) of triangle columns ``tri`` (N,) at pixel centres (N,).
    Separate ops (no fused multiply-add), so the same inputs give the same bits on every path."""
    a0, a1, a2, b0, b1, b2, c0, c1, c2 = _gather(tris.edges, tri)
    return [(a * pu + b * pv) + c for a, b, c in ((a0, b0, c0), (a1, b1, c1), (a2, b2, c2))]


def _candidates(tris: _Triangles, lo: int, hi: int) -> tuple[Tensor, Tensor, Tensor]:
    """Every (triangle, pixel) pair of the bounding boxes of triangles lo..hi-1: triangle column,
    pixel column and pixel row, each (N,) long."""
    device = tris.box.device
    count = tris.box[2, lo:hi] * tris.box[3, lo:hi]
    total = int(count.sum())
    local = torch.repeat_interleave(torch.arange(hi - lo, device=device), count, output_size=total)
    first = torch.cumsum(count, 0) - count
    col0, row0, width, first = _gather(torch.cat((tris.box[:3, lo:hi], first[None])), local)
    offset = torch.arange(total, device=device) - first
    row = torch.div(offset, width, rounding_mode="floor")
    col = offset - row * width + col0
    return local + lo, col, row + row0


def _chunks(tris: _Triangles, chunk: int) -> list[tuple[int, int]]:
    """Consecutive runs of triangles with about ``chunk`` candidate pixels each (a triangle with
    more than ``chunk`` gets a run of its own)."""
    count = tris.box[2] * tris.box[3]
    start = torch.cumsum(count, 0) - count
    group = torch.div(start, chunk, rounding_mode="floor")
    sizes = torch.unique_consecutive(group, return_counts=True)[1].tolist()
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return list(zip([0, *ends[:-1]], ends))


def _zbuffer(tris: _Triangles, batch: int, size: tuple[int, int], chunk: int) -> Tensor:
    """(B * H * W,) int64 z-buffer keys: float32 depth bits (monotonic for positive floats)
    above the face index, so one ``amin`` keeps the nearest fragment and, among equal depths,
    the smallest face index. int64 max where no face covers the pixel."""
    height, width = size
    keys = torch.full((batch * height * width,), _NO_KEY, device=tris.edges.device)
    for lo, hi in _chunks(tris, chunk) if tris.face.numel() else []:
        tri, col, row = _candidates(tris, lo, hi)
        values = _edge_values(tris, tri, col + 0.5, row + 0.5)
        inside = None
        for value, tie in zip(values, _gather(tris.tie, tri)):
            ok = torch.where(tie, value >= 0, value > 0)
            inside = ok if inside is None else inside & ok
        hit = inside.nonzero().squeeze(1)
        tri = tri.index_select(0, hit)
        e0, e1, e2 = (value.index_select(0, hit) for value in values)
        iz0, iz1, iz2 = _gather(tris.inv_z, tri)
        depth = ((e0 + e1) + e2) / ((e0 * iz0 + e1 * iz1) + e2 * iz2)
        key = (depth.view(torch.int32).long() << _FACE_BITS) | tris.face.index_select(0, tri)
        pixel = (tris.batch.index_select(0, tri) * height + row.index_select(0, hit)) * width
        pixel += col.index_select(0, hit)
        keys.scatter_reduce_(0, pixel, key, reduce="amin")
    return keys


def rasterize(
    vertices: Tensor,
    faces: Tensor,
    intrinsics: Tensor | Sequence[float],
    size: tuple[int, int],
    near: float = 1e-3,
    *,
    cull_backfaces: bool = False,
    chunk_size: int | None = None,
) -> Fragments:
    """Rasterize a batch of meshes sharing one topology, with a z-buffer.

    Args:
        vertices: (B, V, 3) camera-frame vertices in metres (OpenCV axes).
        faces: (F, 3) long vertex indices.
        intrinsics: (4,) or (B, 4) ``(fx, fy, cx, cy)`` in pixels.
        size: output ``(H, W)`` in pixels.
        near: faces with any vertex at camera z <= near (metres) are skipped whole.
        cull_backfaces: skip faces whose corners appear clockwise in the image (their normal
            (v1 - v0) x (v2 - v0) points away from the camera); by default both sides are drawn.
        chunk_size: how many (triangle, pixel) candidates are tested at once (about 150 bytes
            each); None picks 2^18 on CPU and 2^22 on other devices, the fastest measured.

    Returns:
        :class:`Fragments` shaped (B, H, W): visible face, perspective-correct barycentrics and
        camera z of each pixel centre.
    """
    _check_vertices(vertices)
    faces = _check_faces(faces, vertices.shape[1], vertices.device)
    if not near > 0:
        raise ValueError(f"near must be a positive distance in metres, got {near}")
    size = (int(size[0]), int(size[1]))
    batch = vertices.shape[0]
    with torch.no_grad():
        screen = project(vertices.detach(), intrinsics)
        tris = _setup_triangles(screen, faces, size, near, cull_backfaces)
        if chunk_size is None:
            chunk_size = _CHUNK_CPU if vertices.device.type == "cpu" else _CHUNK_CUDA
        keys = _zbuffer(tris, batch, size, chunk_size)
        return _resolve(keys, tris, batch, faces.shape[0], size)


def _resolve(
    keys: Tensor, tris: _Triangles, batch: int, num_faces: int, size: tuple[int, int]
) -> Fragments:
    """Fragments from z-buffer keys: perspective-correct barycentrics of each winning face."""
    height, width = size
    device = keys.device
    pixel = (keys != _NO_KEY).nonzero().squeeze(1)
    key = keys.index_select(0, pixel)
    face = key & ((1 << _FACE_BITS) - 1)
    b = torch.div(pixel, height * width, rounding_mode="floor")
    row = torch.div(pixel, width, rounding_mode="floor")
    col = pixel - row * width
    row -= b * height

    column = torch.full((batch * num_faces,), -1, dtype=torch.long, device=device)
    column[tris.batch * num_faces + tris.face] = torch.arange(tris.face.numel(), device=device)
    tri = column.index_select(0, b * num_faces + face)
    values = torch.stack(_edge_values(tris, tri, col + 0.5, row + 0.5), 1).clamp_(min=0)
    weights = values * torch.stack(_gather(tris.inv_z, tri), 1)
    bary = weights / weights.sum(1, keepdim=True)

    count = batch * height * width
    face_index = torch.full((count,), -1, dtype=torch.long, device=device)
    barycentric = torch.zeros((count, 3), device=device)
    depth = torch.full((count,), math.inf, device=device)
    face_index[pixel] = face
    barycentric[pixel] = bary
    depth[pixel] = (key >> _FACE_BITS).int().view(torch.float32)
    return Fragments(
        face_index=face_index.view(batch, height, width),
        barycentric=barycentric.view(batch, height, width, 3),
        depth=depth.view(batch, height, width),
    )


# --------------------------------------------------------------------------------------------
# Attribute interpolation and texturing
# --------------------------------------------------------------------------------------------


@dataclass
class _Visible:
    """Covered pixels as flat lists, in increasing flat index (so grouped by batch item)."""

    pixel: Tensor  # (N,) long, index into B * H * W
    batch: Tensor  # (N,) long
    face: Tensor  # (N,) long
    bary: Tensor  # (N, 3) float32
    shape: tuple[int, int, int]  # (B, H, W)


def _visible(fragments: Fragments) -> _Visible:
    batch, height, width = fragments.face_index.shape
    flat = fragments.face_index.reshape(-1)
    pixel = (flat >= 0).nonzero().squeeze(1)
    return _Visible(
        pixel=pixel,
        batch=torch.div(pixel, height * width, rounding_mode="floor"),
        face=flat.index_select(0, pixel),
        bary=fragments.barycentric.reshape(-1, 3).index_select(0, pixel),
        shape=(batch, height, width),
    )


def _to_image(values: Tensor, vis: _Visible, factor: int = 1) -> Tensor:
    """(B, H / s, W / s, C) image of ``values`` (N, C) at the visible pixels, zero elsewhere,
    averaged over s x s blocks for ``factor`` s > 1 (straight from the pixel list, so the large
    supersampled image is never built)."""
    batch, height, width = vis.shape
    if factor == 1:
        out = values.new_zeros((batch * height * width, values.shape[-1]))
        return out.index_copy_(0, vis.pixel, values).view(batch, height, width, -1)
    rows, cols = height // factor, width // factor
    row = torch.div(vis.pixel, width, rounding_mode="floor")  # b * height + row
    col = vis.pixel - row * width
    target = torch.div(row, factor, rounding_mode="floor") * cols
    target += torch.div(col, factor, rounding_mode="floor")
    out = values.new_zeros((batch * rows * cols, values.shape[-1]))
    return (out.index_add_(0, target, values) / factor**2).view(batch, rows, cols, -1)


def _blend(flat: Tensor, rows: list[Tensor], bary: Tensor) -> Tensor:
    """Sum over the 3 corners of ``flat`` (M, C) rows weighted by ``bary`` (N, 3) -> (N, C)."""
    weights = bary.to(flat.dtype)
    out = flat.index_select(0, rows[0]) * weights[:, 0:1]
    for k in (1, 2):
        out = out + flat.index_select(0, rows[k]) * weights[:, k : k + 1]
    return out


def _interpolate_vertices(attributes: Tensor, faces: Tensor, vis: _Visible) -> Tensor:
    corners = faces.long().index_select(0, vis.face)  # (N, 3)
    if attributes.dim() == 2:
        rows = [corners[:, k] for k in range(3)]
    elif attributes.dim() == 3 and attributes.shape[0] == vis.shape[0]:
        base = vis.batch * attributes.shape[1]
        rows = [base + corners[:, k] for k in range(3)]
    else:
        raise ValueError(
            f"attributes must be (V, C) or ({vis.shape[0]}, V, C), got {tuple(attributes.shape)}"
        )
    return _blend(attributes.reshape(-1, attributes.shape[-1]), rows, vis.bary)


def _interpolate_corners(attributes: Tensor, vis: _Visible) -> Tensor:
    if attributes.dim() == 3:
        base = vis.face * 3
    elif attributes.dim() == 4 and attributes.shape[0] == vis.shape[0]:
        base = (vis.batch * attributes.shape[1] + vis.face) * 3
    else:
        raise ValueError(
            f"attributes must be (F, 3, C) or ({vis.shape[0]}, F, 3, C), "
            f"got {tuple(attributes.shape)}"
        )
    rows = [base + k for k in range(3)]
    return _blend(attributes.reshape(-1, attributes.shape[-1]), rows, vis.bary)


def interpolate(attributes: Tensor, faces: Tensor, fragments: Fragments) -> Tensor:
    """Interpolate per-vertex attributes at every pixel, perspective-correctly.

    Args:
        attributes: (V, C) or (B, V, C) per-vertex values (any units).
        faces: (F, 3) long, the faces that were rasterized.
        fragments: from :func:`rasterize`.

    Returns:
        (B, H, W, C) in the attributes' dtype, 0 for background.
    """
    vis = _visible(fragments)
    return _to_image(_interpolate_vertices(attributes, faces.to(attributes.device), vis), vis)


def interpolate_face_corners(attributes: Tensor, fragments: Fragments) -> Tensor:
    """Interpolate per-face-corner attributes (e.g. UVs with seams) at every pixel.

    Args:
        attributes: (F, 3, C) or (B, F, 3, C), one value per corner of every face.
        fragments: from :func:`rasterize`.

    Returns:
        (B, H, W, C) in the attributes' dtype, 0 for background.
    """
    vis = _visible(fragments)
    return _to_image(_interpolate_corners(attributes, vis), vis)


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals.

    Args:
        vertices: (B, V, 3) in any frame (the normals come out in the same frame).
        faces: (F, 3) long.

    Returns:
        (B, V, 3) unit normals, oriented like (v1 - v0) x (v2 - v0) of the surrounding faces;
        0 for vertices no face uses.
    """
    _check_vertices(vertices)
    faces = faces.long().to(vertices.device)
    v0, v1, v2 = (vertices[:, faces[:, k]] for k in range(3))
    face_normals = torch.cross(v1 - v0, v2 - v0, dim=-1)  # length = twice the area
    normals = torch.zeros_like(vertices)
    for k in range(3):
        normals = normals.index_add(1, faces[:, k], face_normals)
    return F.normalize(normals, dim=-1, eps=1e-12)


def _grid_sample(image: Tensor, uv: Tensor) -> Tensor:
    """(B, C, Ht, Wt) sampled at uv (B, H, W, 2) -> (B, H, W, C)."""
    grid = uv.to(image.dtype) * 2 - 1
    out = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)


def sample_texture(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinearly sample a texture image at UV coordinates.

    Args:
        texture: (Ht, Wt, C) or (B, Ht, Wt, C) float image.
        uv: (B, H, W, 2) texture coordinates in [0, 1]: u = 0 is the left edge of the texture
            image, v = 0 its TOP edge (image-row order, as it is stored); texel (i, j) has its
            centre at ((j + 0.5) / Wt, (i + 0.5) / Ht) (align_corners=False). Outside [0, 1] the
            border texel is repeated.

    Returns:
        (B, H, W, C) sampled values.
    """
    batch, height, width, _ = uv.shape
    if texture.dim() == 3:
        # One texture for the whole batch: fold the batch into the grid instead of copying it.
        out = _grid_sample(texture.permute(2, 0, 1)[None], uv.reshape(1, -1, width, 2))
        return out.reshape(batch, height, width, -1)
    if texture.dim() != 4 or texture.shape[0] != batch:
        raise ValueError(
            f"texture must be (Ht, Wt, C) or ({batch}, Ht, Wt, C), got {tuple(texture.shape)}"
        )
    return _grid_sample(texture.permute(0, 3, 1, 2), uv)


def _sample_visible(texture: Tensor, uv: Tensor, vis: _Visible) -> Tensor:
    """Texture (Ht, Wt, C) or (B, Ht, Wt, C) sampled at the visible pixels' uv (N, 2)."""
    if texture.dim() == 3:
        return _grid_sample(texture.permute(2, 0, 1)[None], uv[None, :, None])[0, :, 0]
    if texture.dim() != 4 or texture.shape[0] != vis.shape[0]:
        raise ValueError(
            f"texture must be (Ht, Wt, C) or ({vis.shape[0]}, Ht, Wt, C), "
            f"got {tuple(texture.shape)}"
        )
    counts = torch.bincount(vis.batch, minlength=vis.shape[0]).tolist()
    parts = [
        _grid_sample(texture[i].permute(2, 0, 1)[None], part[None, :, None])[0, :, 0]
        for i, part in enumerate(uv.split(counts))
    ]
    return torch.cat(parts)


# --------------------------------------------------------------------------------------------
# Shading and the full render
# --------------------------------------------------------------------------------------------


def _per_pixel(value: Tensor | Sequence[float], vis: _Visible, like: Tensor) -> Tensor:
    """A (3,) or (B, 3) value as (1, 3) or (N, 3) for the visible pixels."""
    value = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    return value.index_select(0, vis.batch) if value.dim() == 2 else value.reshape(1, -1)


def _lambert(normals: Tensor, lighting: Lighting, vis: _Visible) -> Tensor:
    """(N, 3) ambient + color * max(0, n . l) for camera-frame unit normals (N, 3)."""
    direction = F.normalize(_per_pixel(lighting.direction, vis, normals), dim=-1)
    cosine = (normals * direction).sum(-1, keepdim=True).clamp(min=0)
    ambient = _per_pixel(lighting.ambient, vis, normals)
    return ambient + _per_pixel(lighting.color, vis, normals) * cosine


def _visible_normals(vertices: Tensor, faces: Tensor, vis: _Visible) -> Tensor:
    """(N, 3) smooth camera-frame unit normals at the visible pixels, turned toward the camera."""
    normals = _interpolate_vertices(vertex_normals(vertices, faces), faces, vis)
    normals = F.normalize(normals, dim=-1, eps=1e-12)
    points = _interpolate_vertices(vertices, faces, vis)  # along the view ray, camera at origin
    facing_away = (normals * points).sum(-1, keepdim=True) > 0
    return torch.where(facing_away, -normals, normals)


def _visible_albedo(
    vis: _Visible,
    faces: Tensor,
    face_uvs: Tensor | None,
    texture: Tensor | None,
    vertex_colors: Tensor | None,
    like: Tensor,
) -> Tensor:
    """(N, 3) albedo: texture via UVs, else vertex colours, else :data:`DEFAULT_ALBEDO`."""
    if texture is not None:
        if face_uvs is None:
            raise ValueError("render_mesh needs face_uvs (F, 3, 2) to apply a texture")
        uv = _interpolate_corners(face_uvs.to(like.device, like.dtype), vis)
        return _sample_visible(texture.to(like.dtype), uv, vis)
    if vertex_colors is not None:
        return _interpolate_vertices(vertex_colors.to(like.dtype), faces, vis)
    return like.new_full((vis.pixel.numel(), 3), DEFAULT_ALBEDO)


def _visible_shading_albedo(values: Tensor | None, vis: _Visible, like: Tensor) -> Tensor:
    """(N, 1) per-face grey albedo ((F,) or (B, F)) at the visible pixels."""
    if values is None:
        return like.new_full((vis.pixel.numel(), 1), DEFAULT_ALBEDO)
    values = values.to(like.device, like.dtype)
    if values.dim() == 1:
        return values.index_select(0, vis.face)[:, None]
    return values.reshape(-1).index_select(0, vis.batch * values.shape[1] + vis.face)[:, None]


def _min_down(depth: Tensor, factor: int) -> Tensor:
    """(B, H*s, W*s) -> (B, H, W) minimum over s x s blocks."""
    if factor == 1:
        return depth
    return -F.max_pool2d(-depth[:, None], factor)[:, 0]


def _background(background: Tensor | None, like: Tensor) -> Tensor:
    """Background (3,), (B, 3) or (B, H, W, 3) broadcast to ``like`` (B, H, W, 3)."""
    if background is None:
        return torch.zeros_like(like)
    bg = torch.as_tensor(background, dtype=like.dtype, device=like.device)
    if bg.dim() <= 2:
        bg = bg.reshape(-1, 1, 1, 3)
    return bg.expand_as(like)


def render_mesh(
    vertices: Tensor,
    faces: Tensor,
    intrinsics: Tensor | Sequence[float],
    size: tuple[int, int],
    *,
    face_uvs: Tensor | None = None,
    texture: Tensor | None = None,
    vertex_colors: Tensor | None = None,
    lighting: Lighting | None = None,
    shading_albedo: Tensor | None = None,
    background: Tensor | None = None,
    supersample: int = 1,
) -> RenderOutput:
    """Render a batch of meshes: colour, coverage, canonical shading, normals and depth.

    Args:
        vertices: (B, V, 3) camera-frame vertices in metres (OpenCV axes).
        faces: (F, 3) long vertex indices; both windings are drawn.
        intrinsics: (4,) or (B, 4) ``(fx, fy, cx, cy)`` in pixels at the output size.
        size: output ``(H, W)``.
        face_uvs: (F, 3, 2) or (B, F, 3, 2) UV of every face corner (see :func:`sample_texture`);
            needed with ``texture``.
        texture: (Ht, Wt, 3) or (B, Ht, Wt, 3) albedo image in [0, 1]. Takes precedence over
            ``vertex_colors``; with neither, the albedo is :data:`DEFAULT_ALBEDO` grey.
        vertex_colors: (V, 3) or (B, V, 3) albedo in [0, 1].
        lighting: light for ``rgb``; None renders the albedo unlit.
        shading_albedo: (F,) or (B, F) grey albedo of each face in the shading map
            (default :data:`DEFAULT_ALBEDO`).
        background: (3,), (B, 3) or (B, H, W, 3) colour behind the mesh; None is black.
        supersample: render at this many times the resolution per axis (intrinsics scaled, exact
            under the corner-origin convention) and average each s x s block.

    Returns:
        :class:`RenderOutput`, float32. rgb = albedo x (ambient + color x max(0, n . l)), clamped
        to [0, 1]; shading uses :data:`CANONICAL_LIGHTING` whatever ``lighting`` is. Normals are
        the interpolated smooth vertex normals, renormalised and flipped where they face away from
        the camera (n . p > 0 for the surface point p), so both sides of thin parts are lit.
    """
    _check_vertices(vertices)
    if int(supersample) != supersample or supersample < 1:
        raise ValueError(f"supersample must be a positive integer, got {supersample}")
    s = int(supersample)
    vertices = vertices.float()
    faces = faces.long().to(vertices.device)
    k = _intrinsics(intrinsics, vertices.shape[0], vertices.device) * s
    fragments = rasterize(vertices, faces, k, (size[0] * s, size[1] * s))
    vis = _visible(fragments)

    normals = _visible_normals(vertices, faces, vis)
    color = _visible_albedo(vis, faces, face_uvs, texture, vertex_colors, normals)
    if lighting is not None:
        color = (color * _lambert(normals, lighting, vis)).clamp(0, 1)
    grey = _visible_shading_albedo(shading_albedo, vis, normals)
    shading = (grey * _lambert(normals, CANONICAL_LIGHTING, vis)).clamp(0, 1)

    coverage = torch.ones_like(grey)
    layers = _to_image(torch.cat((color, shading, normals, coverage), -1), vis, factor=s)
    color, shading, normals, mask = layers.split((3, 3, 3, 1), dim=-1)
    rgb = color + (1 - mask) * _background(background, color)
    return RenderOutput(
        rgb=rgb,
        mask=mask[..., 0],
        shading=shading,
        normals=F.normalize(normals, dim=-1, eps=1e-12),
        depth=_min_down(fragments.depth, s),
    )


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _check_vertices(vertices: Tensor) -> None:
    if vertices.dim() != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be shaped (B, V, 3), got {tuple(vertices.shape)}")


def _check_faces(faces: Tensor, num_vertices: int, device: torch.device) -> Tensor:
    faces = torch.as_tensor(faces, device=device).long()
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be shaped (F, 3), got {tuple(faces.shape)}")
    if faces.numel() and (faces.min() < 0 or faces.max() >= num_vertices):
        raise ValueError(f"faces index vertices outside [0, {num_vertices})")
    return faces
