#!/usr/bin/env python
"""Build the LiftAvatar face rig from data that ships with registry packages.

    python scripts/build_rig.py            # writes liftavatar/face/data/{rig.npz, face_texture.png}

Recipe (DESIGN.md §5):

1. Run MediaPipe FaceMesh (``mediapipe==0.10.21``, bundled models, iris refinement) on
   scikit-image's ``astronaut.png``: 478 landmarks with relative depth.
2. Derive triangles from ``FACEMESH_TESSELATION`` (its 3-cycles, minus the two that span no face),
   orient them consistently, facing the camera.
3. Put the landmarks in a canonical head frame (OpenCV axes: x right, y down, z into the head;
   metres, scaled so the pupils are 63 mm apart), find the left/right vertex pairing and make the
   template exactly symmetric.
4. Neutralise: the photo smiles with parted lips, so the lips are closed and the corners relaxed by
   a smooth (bi-Laplacian) deformation.
5. Add what the bare surface lacks for rendering: eyeballs carrying the iris landmarks, a mouth
   interior (upper teeth fixed to the skull; lower teeth, tongue and the floor of the cavity on the
   jaw), a head shell lofted from the face oval, and a neck.
6. Identity bases: named, smooth, region-weighted affine fields. Expression bases: named ARKit-like
   blendshapes made as bi-Laplacian deformations of handle displacements on the surface, with the
   interior following the jaw rigidly.
7. UVs into one texture atlas; the face's UVs are the landmarks' positions in the photo, so the
   face texture is a crop of the photo itself (``face_texture.png``).

Hand-written: no installable library builds a semantic blendshape rig from FaceMesh landmarks.
"""

from __future__ import annotations

import argparse
import collections
import itertools
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from PIL import Image
from scipy.optimize import linear_sum_assignment
from scipy.spatial.transform import Rotation

RIG_NAME = "liftavatar-facemesh"
RIG_VERSION = 1
NUM_SURFACE = 468
NUM_LANDMARKS = 478
PUPIL_DISTANCE_M = 0.063

PARTS = ("face", "eyeball", "upper_teeth", "lower_teeth", "tongue", "cavity", "head", "neck")
# Texture atlas layout: part -> (u0, v0, u1, v1), v = 0 at the top row.
ATLAS = {
    "face": (0.0, 0.0, 0.5, 0.5),
    "head": (0.5, 0.0, 1.0, 0.5),
    "neck": (0.0, 0.5, 0.25, 0.75),
    "eyeball": (0.25, 0.5, 0.5, 0.75),
    "upper_teeth": (0.5, 0.5, 0.75, 0.625),
    "lower_teeth": (0.5, 0.625, 0.75, 0.75),
    "tongue": (0.75, 0.5, 1.0, 0.75),
    "cavity": (0.0, 0.75, 0.25, 1.0),
}
FACE_CROP_PX = 144  # square crop of the 512² photo around the face, stored at 512²
FACE_TEXTURE_SIZE = 512


# ----------------------------------------------------------------------------- landmarks, topology


def detect_astronaut() -> tuple[np.ndarray, np.ndarray]:
    """478 FaceMesh landmarks of the astronaut photo in pixels (x, y, z-like-x) and the photo."""
    import mediapipe as mp
    import skimage.data

    image = skimage.data.astronaut()
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, refine_landmarks=True, max_num_faces=1) as mesh:
        result = mesh.process(image)
    if not result.multi_face_landmarks:
        raise RuntimeError("MediaPipe found no face in astronaut.png")
    h, w = image.shape[:2]
    lm = result.multi_face_landmarks[0].landmark
    return np.array([[p.x * w, p.y * h, p.z * w] for p in lm], dtype=np.float64), image


def tessellation_edges() -> set[tuple[int, int]]:
    import mediapipe as mp

    return {tuple(sorted(e)) for e in mp.solutions.face_mesh.FACEMESH_TESSELATION}


def triangles_from_edges(edges: set[tuple[int, int]]) -> np.ndarray:
    """Faces of the tessellation: its 3-cycles, minus cycles whose every edge is shared by 3 cycles.

    In a manifold surface an edge bounds at most two faces; the tessellation has a few 3-cycles
    that run around no face (each of their edges then lies on three cycles), and those are dropped.
    """
    adjacency = collections.defaultdict(set)
    for a, b in edges:
        adjacency[a].add(b)
        adjacency[b].add(a)
    cycles = {tuple(sorted((a, b, c))) for a, b in edges for c in adjacency[a] & adjacency[b]}
    edge_count = collections.Counter(e for t in cycles for e in itertools.combinations(t, 2))
    faces = [t for t in sorted(cycles) if not all(edge_count[e] > 2 for e in itertools.combinations(t, 2))]
    return np.array(faces, dtype=np.int64)


def orient_consistently(faces: np.ndarray, vertices: np.ndarray, toward: np.ndarray) -> np.ndarray:
    """Flip faces so neighbours traverse shared edges in opposite directions; normals toward `toward`."""
    faces = faces.copy()
    edge_faces = collections.defaultdict(list)
    for f, tri in enumerate(faces):
        for a, b in ((0, 1), (1, 2), (2, 0)):
            edge_faces[tuple(sorted((tri[a], tri[b])))].append(f)
    done = np.zeros(len(faces), bool)
    for seed in range(len(faces)):
        if done[seed]:
            continue
        done[seed] = True
        queue = [seed]
        while queue:
            f = queue.pop()
            tri = faces[f]
            for a, b in ((0, 1), (1, 2), (2, 0)):
                u, v = tri[a], tri[b]
                for g in edge_faces[tuple(sorted((u, v)))]:
                    if g == f or done[g]:
                        continue
                    directed = {(faces[g][i], faces[g][(i + 1) % 3]) for i in range(3)}
                    if (u, v) in directed:  # same direction: g is flipped relative to f
                        faces[g] = faces[g][::-1]
                    done[g] = True
                    queue.append(g)
    normals = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]], vertices[faces[:, 2]] - vertices[faces[:, 0]])
    if (normals @ toward).sum() < 0:
        faces = faces[:, ::-1].copy()
    return faces


def boundary_loops(faces: np.ndarray) -> list[list[int]]:
    """Closed loops of edges that belong to a single face, as ordered vertex lists."""
    count = collections.Counter(tuple(sorted((t[a], t[b]))) for t in faces for a, b in ((0, 1), (1, 2), (2, 0)))
    nxt = collections.defaultdict(list)
    for (a, b), c in count.items():
        if c == 1:
            nxt[a].append(b)
            nxt[b].append(a)
    loops, seen = [], set()
    for start in sorted(nxt):
        if start in seen:
            continue
        loop, prev, cur = [start], None, start
        seen.add(start)
        while True:
            options = [n for n in nxt[cur] if n != prev]
            step = options[0]
            if step == start:
                break
            loop.append(step)
            seen.add(step)
            prev, cur = cur, step
        loops.append(loop)
    return loops


def chains_of(edges: list[tuple[int, int]]) -> list[list[int]]:
    """Split edges into their connected vertex chains, each ordered from one end to the other."""
    adjacency = collections.defaultdict(list)
    for a, b in edges:
        adjacency[a].append(b)
        adjacency[b].append(a)
    seen, chains = set(), []
    for start in sorted(adjacency, key=lambda n: (len(adjacency[n]), n)):
        if start in seen:
            continue
        chain, prev, cur = [start], None, start
        seen.add(start)
        while True:
            nxt = [n for n in adjacency[cur] if n != prev and n not in seen]
            if not nxt:
                break
            prev, cur = cur, nxt[0]
            chain.append(cur)
            seen.add(cur)
        chains.append(chain)
    return chains


def chain_order(edges: list[tuple[int, int]]) -> list[int]:
    """The vertices of a single closed loop of edges, in order."""
    (loop,) = chains_of(edges)
    return loop


# ----------------------------------------------------------------------------- canonical frame, symmetry


def canonical_frame(points: np.ndarray) -> np.ndarray:
    """Rotate pixel-space landmarks into the head frame: x toward the subject's left, y down, z in."""
    pts = points - points[:NUM_SURFACE].mean(0)
    x_axis = pts[263] - pts[33]  # outer eye corners: subject's right -> left
    for _ in range(3):
        x_axis /= np.linalg.norm(x_axis)
        y_axis = pts[152] - pts[10]  # forehead -> chin
        y_axis -= x_axis * (y_axis @ x_axis)
        y_axis /= np.linalg.norm(y_axis)
        frame = np.stack([x_axis, y_axis, np.cross(x_axis, y_axis)])
        local = pts @ frame.T
        pairs = mirror_pairs(local)
        left = [i for i, j in enumerate(pairs) if local[i, 0] > local[j, 0] + 1e-6]
        x_axis = (pts[left] - pts[pairs[left]]).sum(0)  # mirror pairs differ along the x axis
    return pts @ frame.T


def mirror_pairs(local: np.ndarray) -> np.ndarray:
    """pairs[i] = the surface vertex that mirrors vertex i across the x = 0 plane (itself on the midline)."""
    surf = local[:NUM_SURFACE]
    mirrored = surf * np.array([-1.0, 1.0, 1.0])
    cost = np.linalg.norm(surf[:, None, :] - mirrored[None, :, :], axis=-1)
    _, pairs = linear_sum_assignment(cost)
    return pairs.astype(np.int64)


def symmetrise(local: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    surf = local[:NUM_SURFACE]
    out = local.copy()
    out[:NUM_SURFACE] = 0.5 * (surf + surf[pairs] * np.array([-1.0, 1.0, 1.0]))
    return out


# ----------------------------------------------------------------------------- smooth deformation


def graph_laplacian(num_vertices: int, faces: np.ndarray) -> sp.csr_matrix:
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    edges = np.unique(np.sort(edges, axis=1), axis=0)
    n = num_vertices
    adj = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    adj = ((adj + adj.T) > 0).astype(np.float64)
    deg = np.asarray(adj.sum(1)).ravel()
    deg[deg == 0] = 1
    return (sp.eye(n) - sp.diags(1.0 / deg) @ adj).tocsr()


class SurfaceDeformer:
    """Bi-Laplacian interpolation of handle displacements over the face surface.

    ``deform(handles, fixed_radius)`` pins the handle vertices to their displacements, pins every
    vertex farther than ``fixed_radius`` from all handles (and any ``fixed`` vertex) at zero, and
    fills the rest by minimising ||L d||², which gives smooth, localised falloff.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        self.vertices = vertices
        lap = graph_laplacian(len(vertices), faces)
        self.bilaplacian = (lap.T @ lap).tocsr()

    def deform(
        self, handles: dict[int, np.ndarray], fixed_radius: float, fixed: set[int] | frozenset[int] = frozenset()
    ) -> np.ndarray:
        n = len(self.vertices)
        idx = np.array(sorted(handles), dtype=np.int64)
        disp = np.zeros((n, 3))
        disp[idx] = np.array([handles[i] for i in idx])
        dist = np.linalg.norm(self.vertices[:, None] - self.vertices[idx][None], axis=-1).min(1)
        pinned = np.zeros(n, bool)
        pinned[idx] = True
        zero = (dist > fixed_radius) | np.isin(np.arange(n), list(fixed))
        zero[idx] = False
        pinned |= zero
        free = ~pinned
        if free.any():
            a = self.bilaplacian[free][:, free].tocsc()
            b = -self.bilaplacian[free][:, pinned] @ disp[pinned]
            disp[free] = spla.splu(a).solve(b)
        return disp


# ----------------------------------------------------------------------------- primitive meshes


def grid_mesh(rows: int, cols: int, wrap_cols: bool = False) -> np.ndarray:
    """Triangles of a rows x cols vertex grid (row-major), optionally wrapped around in columns."""
    faces = []
    ncol = cols if wrap_cols else cols - 1
    for r in range(rows - 1):
        for c in range(ncol):
            a, b = r * cols + c, r * cols + (c + 1) % cols
            d, e = a + cols, b + cols
            faces += [(a, d, b), (b, d, e)]
    return np.array(faces, dtype=np.int64)


def ellipsoid(center, radii, rows: int = 14, cols: int = 24, theta_max: float = np.pi):
    """Vertices and faces of an ellipsoid patch; theta is the angle from the -z (front) pole."""
    theta = np.linspace(0.0, theta_max, rows)
    phi = np.linspace(0.0, 2 * np.pi, cols, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    unit = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), -np.cos(t)], -1).reshape(-1, 3)
    return np.asarray(center) + unit * np.asarray(radii), grid_mesh(rows, cols, wrap_cols=True), unit


# ----------------------------------------------------------------------------- the rig


class RigBuilder:
    def __init__(self, landmarks_px: np.ndarray):
        self.photo_landmarks = landmarks_px
        faces = triangles_from_edges(tessellation_edges())
        local = canonical_frame(landmarks_px)
        local *= PUPIL_DISTANCE_M / np.linalg.norm(local[473] - local[468])
        self.pairs = mirror_pairs(local)
        local = symmetrise(local, self.pairs)
        # Origin near the head's centre of rotation: behind the nose, a little below the eyes.
        eyes_y = local[[33, 133, 263, 362], 1].mean()
        local -= np.array([0.0, eyes_y + 0.025, local[1, 2] + 0.095])
        self.faces = orient_consistently(faces, local[:NUM_SURFACE], np.array([0.0, 0.0, -1.0]))
        loops = boundary_loops(self.faces)
        loops.sort(key=len)
        self.oval = loops[-1]
        self.mouth_loop = loops[-2]
        eye_loops = sorted(loops[:2], key=lambda lp: local[lp, 0].mean())
        self.eye_loop = {"right": eye_loops[0], "left": eye_loops[1]}  # subject's right is -x
        self.v = local
        self.deformer = SurfaceDeformer(local[:NUM_SURFACE], self.faces)
        self._split_contours()
        self.neutralise()

    # -- semantic landmark groups --------------------------------------------------------------

    def _split_loop(self, loop: list[int]) -> tuple[list[int], list[int], int, int]:
        """Split a closed loop at its leftmost/rightmost vertices into upper and lower chains."""
        x = self.v[loop, 0]
        i0, i1 = int(np.argmin(x)), int(np.argmax(x))
        n = len(loop)
        a = [loop[(i0 + k) % n] for k in range((i1 - i0) % n + 1)]
        b = [loop[(i1 + k) % n] for k in range((i0 - i1) % n + 1)]
        upper, lower = (a, b) if self.v[a, 1].mean() < self.v[b, 1].mean() else (b, a)
        return upper[1:-1], lower[1:-1], loop[i0], loop[i1]

    def _split_contours(self) -> None:
        v = self.v
        up, lo, c_r, c_l = self._split_loop(self.mouth_loop)
        self.inner_upper, self.inner_lower, self.inner_corners = up, lo, (c_r, c_l)
        self.eye = {}
        for side, loop in self.eye_loop.items():
            up_e, lo_e, a, b = self._split_loop(loop)
            self.eye[side] = {"upper": up_e, "lower": lo_e, "corners": (a, b)}
        import mediapipe as mp

        fm = mp.solutions.face_mesh
        lips = {i for e in fm.FACEMESH_LIPS for i in e}
        outer = sorted(lips - set(self.mouth_loop))
        mouth_y = v[self.mouth_loop, 1].mean()
        self.outer_upper = [i for i in outer if v[i, 1] < mouth_y - 1e-4]
        self.outer_lower = [i for i in outer if v[i, 1] > mouth_y + 1e-4]
        self.outer_corners = (min(outer, key=lambda i: v[i, 0]), max(outer, key=lambda i: v[i, 0]))
        self.brow = {
            "right": sorted({i for e in fm.FACEMESH_RIGHT_EYEBROW for i in e}),
            "left": sorted({i for e in fm.FACEMESH_LEFT_EYEBROW for i in e}),
        }
        # Outlines for texture regions: the outer lip contour as a loop, and each brow as its
        # upper chain followed by its lower chain reversed (FaceMesh gives two open chains).
        outer_edges = [e for e in fm.FACEMESH_LIPS if e[0] in outer and e[1] in outer]
        self.lips_outline = chain_order(outer_edges)
        self.brow_outline = {}
        for side, conn in (("left", fm.FACEMESH_LEFT_EYEBROW), ("right", fm.FACEMESH_RIGHT_EYEBROW)):
            chains = chains_of(list(conn))
            chains.sort(key=lambda ch: v[ch, 1].mean())  # upper first
            a, b = (sorted(ch, key=lambda i: v[i, 0]) for ch in chains)
            self.brow_outline[side] = a + b[::-1]
        self.nose = sorted({i for e in fm.FACEMESH_NOSE for i in e}) if hasattr(fm, "FACEMESH_NOSE") else [1, 2, 4]
        iris_r = list(range(468, 473))
        iris_l = list(range(473, 478))
        if v[468, 0] > v[473, 0]:
            iris_r, iris_l = iris_l, iris_r
        self.iris = {"right": iris_r, "left": iris_l}

    def side_sign(self, side: str) -> float:
        return 1.0 if side == "left" else -1.0

    # -- neutralisation ------------------------------------------------------------------------

    def _chain_at(self, x: float, chain: list[int], y_or_z: int = 1) -> float:
        """A chain's y (or z) at x, linearly interpolated along the chain sorted by x."""
        pts = self.v[chain]
        order = np.argsort(pts[:, 0])
        return float(np.interp(x, pts[order, 0], pts[order, y_or_z]))

    def neutralise(self) -> None:
        """Close the lips and relax the smile of the photo (a smooth deformation of the surface)."""
        v = self.v
        handles = {}
        corners = list(self.inner_corners) + list(self.outer_corners)
        mouth_center = v[self.mouth_loop].mean(0)
        for c in corners:
            d = np.zeros(3)
            d[0] = -0.14 * (v[c, 0] - mouth_center[0])  # corners in: the smile widened the mouth
            d[1] = 0.005  # and down
            handles[c] = d
        chain = [self.inner_corners[0]] + self.inner_lower + [self.inner_corners[1]]
        for i in self.inner_upper:
            lower_y = self._chain_at(v[i, 0], chain)
            handles[i] = np.array([-0.14 * (v[i, 0] - mouth_center[0]), 0.5 * (lower_y - v[i, 1]) + 0.002, 0.0])
        chain = [self.inner_corners[0]] + self.inner_upper + [self.inner_corners[1]]
        for i in self.inner_lower:
            upper_y = self._chain_at(v[i, 0], chain)
            handles[i] = np.array([-0.14 * (v[i, 0] - mouth_center[0]), 0.5 * (upper_y - v[i, 1]) + 0.002, 0.0])
        fixed = set(self.eye_loop["left"]) | set(self.eye_loop["right"]) | set(self.oval[:])
        disp = self.deformer.deform(handles, fixed_radius=0.045, fixed=fixed)
        v[:NUM_SURFACE] += disp
        # Closed lips: each upper inner vertex and its lower partner (same rank in x) become one
        # point, so the two contours coincide and the closed mouth leaves no sliver.
        up = sorted(self.inner_upper, key=lambda i: v[i, 0])
        lo = sorted(self.inner_lower, key=lambda i: v[i, 0])
        for a, b in zip(up, lo, strict=True):
            v[a] = v[b] = 0.5 * (v[a] + v[b])
        self.v = symmetrise(v, self.pairs)
        self.deformer = SurfaceDeformer(self.v[:NUM_SURFACE], self.faces)

    # -- parts added to the surface ------------------------------------------------------------

    def build_parts(self) -> None:
        """Append eyeballs, mouth interior, head shell and neck; set per-vertex part ids and UVs."""
        v = self.v
        verts = [v]
        faces = [self.faces]
        face_part = [np.zeros(len(self.faces), np.int64)]
        vert_part = [np.zeros(NUM_LANDMARKS, np.int64)]
        uvs = [np.zeros((NUM_LANDMARKS, 2))]
        offset = NUM_LANDMARKS
        self.jaw_weight_extra: list[np.ndarray] = []

        def add(part: str, pv: np.ndarray, pf: np.ndarray, puv: np.ndarray, jaw_weight: np.ndarray | float = 0.0):
            nonlocal offset
            verts.append(pv)
            faces.append(pf + offset)
            face_part.append(np.full(len(pf), PARTS.index(part)))
            vert_part.append(np.full(len(pv), PARTS.index(part)))
            u0, v0, u1, v1 = ATLAS[part]
            uvs.append(np.stack([u0 + puv[:, 0] * (u1 - u0), v0 + puv[:, 1] * (v1 - v0)], -1))
            self.jaw_weight_extra.append(np.broadcast_to(np.asarray(jaw_weight, float), (len(pv),)).copy())
            offset += len(pv)

        # Eyeballs: ellipsoids recessed just behind each eye opening; the iris landmarks sit on them.
        self.eye_center = {}
        for side, loop in self.eye_loop.items():
            contour = v[loop]
            corner_a, corner_b = self.eye[side]["corners"]
            width = abs(v[corner_b, 0] - v[corner_a, 0])
            radii = np.array([0.52 * width, 0.0115, 0.0115])
            center = contour.mean(0)
            center[2] = contour[:, 2].mean() + 0.0012 + radii[2]
            self.eye_center[side] = center
            ev, ef, unit = ellipsoid(center, radii, rows=12, cols=20)
            # Orthographic projection onto the eye's xy plane: the iris stays round.
            puv = 0.5 + (ev[:, :2] - center[:2]) / (2 * 0.016)
            add("eyeball", ev, ef, np.clip(puv, 0, 1))
            iris_r = 0.0059
            for k, (dx, dy) in zip(self.iris[side], [(0, 0), (1, 0), (0, -1), (-1, 0), (0, 1)]):
                xy = center[:2] + iris_r * np.array([dx, dy])
                q = (xy - center[:2]) / radii[:2]
                v[k] = [xy[0], xy[1], center[2] - radii[2] * np.sqrt(max(1 - q @ q, 0.0))]
            self.eye_radii = radii

        # Mouth interior, sized from the closed inner lip line.
        corner_r, corner_l = self.inner_corners
        mouth = v[self.mouth_loop].mean(0)
        half_w = 0.5 * abs(v[corner_l, 0] - v[corner_r, 0])
        lip_front_z = v[self.inner_upper + self.inner_lower, 2].min()
        self.mouth_center = mouth

        def surface_z(x: float, y: float) -> float:
            """Depth of the face surface along the camera ray through (x, y) (an xy height field)."""
            tri = v[self.faces]
            a, b, c = tri[:, 0, :2], tri[:, 1, :2], tri[:, 2, :2]
            den = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])
            l0 = ((b[:, 1] - c[:, 1]) * (x - c[:, 0]) + (c[:, 0] - b[:, 0]) * (y - c[:, 1])) / den
            l1 = ((c[:, 1] - a[:, 1]) * (x - c[:, 0]) + (a[:, 0] - c[:, 0]) * (y - c[:, 1])) / den
            lam = np.stack([l0, l1, 1 - l0 - l1], -1)
            inside = (lam >= -1e-9).all(-1)
            z = (lam * tri[:, :, 2]).sum(-1)
            return float(z[inside].min())

        def arch(half_width, behind, y_top, y_bottom, cols=28, rows=3):
            """A row of teeth: a ribbon following the face surface `behind` metres inside it."""
            s = np.linspace(-1, 1, cols)
            x = s * half_width
            # Behind the deepest point of the surface in front (the crease between closed lips).
            z = np.array([max(surface_z(xi, yi) for yi in np.linspace(y_top, y_bottom, 7)) for xi in x])
            z = z + behind + 0.004 * s**2
            ys = np.linspace(y_top, y_bottom, rows)
            pv = np.array([[xi, yi, zi] for yi in ys for xi, zi in zip(x, z)])
            puv = np.array([[(si + 1) / 2, r / (rows - 1)] for r in range(rows) for si in s])
            return pv, grid_mesh(rows, cols), puv

        pv, pf, puv = arch(0.8 * half_w, 0.002, mouth[1] - 0.008, mouth[1] + 0.0025)
        add("upper_teeth", pv, pf, puv)
        pv, pf, puv = arch(0.74 * half_w, 0.0035, mouth[1] + 0.0005, mouth[1] + 0.0095)
        add("lower_teeth", pv, pf, puv, jaw_weight=1.0)
        tv, tf, tunit = ellipsoid([0.0, mouth[1] + 0.010, lip_front_z + 0.032], [0.66 * half_w, 0.007, 0.020], rows=8, cols=16)
        add("tongue", tv, tf, 0.5 + 0.5 * tunit[:, [0, 2]], jaw_weight=1.0)

        # Cavity: lofted from the inner lip contour back to the throat, so it stays inside the
        # lips whatever they do (its rings follow the contour they hang from).
        loop = list(self.mouth_loop)
        upper = set(self.inner_upper)
        lower = set(self.inner_lower)
        back_z = surface_z(0.0, mouth[1]) + 0.032
        fractions = np.array([0.2, 0.45, 0.7, 0.9, 1.0])
        ring_pts, self.cavity_src, self.cavity_s, self.cavity_jaw = [], [], [], []
        for sk in fractions:
            for i in loop:
                vert = 1.0 if i in lower else (-1.0 if i in upper else 0.0)
                target = np.array([0.7 * v[i, 0], mouth[1] + 0.013 * vert, back_z])
                bulge = np.sin(np.pi * sk) * np.array([0.003 * np.sign(v[i, 0]), 0.006 * vert, 0.0])
                ring_pts.append((1 - sk) * v[i] + sk * target + bulge)
                self.cavity_src.append(i)
                self.cavity_s.append(sk)
                self.cavity_jaw.append(0.5 * (vert + 1) if vert else 0.5)
        ring_pts.append(np.array([0.0, mouth[1], back_z + 0.004]))
        self.cavity_src.append(-1)
        self.cavity_s.append(1.0)
        self.cavity_jaw.append(0.5)
        n_loop = len(loop)
        ids = [np.array(loop)] + [offset + k * n_loop + np.arange(n_loop) for k in range(len(fractions))]
        center_id = offset + len(fractions) * n_loop
        cf = []
        for r in range(len(fractions)):
            a, b = ids[r], ids[r + 1]
            for i in range(n_loop):
                j = (i + 1) % n_loop
                cf += [(a[i], a[j], b[i]), (a[j], b[j], b[i])]
        cf += [(ids[-1][i], ids[-1][(i + 1) % n_loop], center_id) for i in range(n_loop)]
        angle = np.arange(n_loop) / n_loop * 2 * np.pi
        cuv = [[0.5 + 0.5 * (1 - sk) * np.cos(a), 0.5 + 0.5 * (1 - sk) * np.sin(a)] for sk in fractions for a in angle]
        self.cavity_first = offset
        add("cavity", np.array(ring_pts), np.array(cf, dtype=np.int64) - offset, np.array(cuv + [[0.5, 0.5]]))

        # Head shell: lofted from the face oval around an ellipsoid to a pole at the back.
        self.head_center = np.array([0.0, -0.022, 0.0])
        self.head_radii = np.array([1.0 * np.abs(v[self.oval, 0]).max(), 0.10, 0.095])
        oval = self.oval_ordered()
        rings = 14
        t = np.linspace(0.0, 1.0, rings + 1)[1:]
        back = np.array([0.0, 0.0, 1.0])
        shell = [v[oval]]
        for tk in t[:-1]:
            ring = []
            for p in v[oval]:
                d = (p - self.head_center) / self.head_radii
                d /= np.linalg.norm(d)
                ang = np.arccos(np.clip(d @ back, -1, 1))
                w = np.sin((1 - tk) * ang) / np.sin(ang) * d + np.sin(tk * ang) / np.sin(ang) * back
                # A superellipsoid (exponent 2.5) is fuller than an ellipsoid: a cranium, not an egg.
                w = w / (np.abs(w) ** 2.5).sum() ** (1 / 2.5)
                ring.append(self.head_center + self.head_radii * w)
            shell.append(np.array(ring))
        # Relax the first rings along each meridian so the shell leaves the face without a crease.
        for _ in range(30):
            for r in range(1, 4):
                shell[r] = 0.25 * shell[r - 1] + 0.5 * shell[r] + 0.25 * shell[r + 1]
        n_oval = len(oval)
        shell_v = np.concatenate(shell[1:] + [[self.head_center + self.head_radii * back]])
        # Faces: ring 0 is the oval itself (surface vertex ids), rings 1.. are new vertices.
        ring_ids = [np.array(oval)] + [offset + k * n_oval + np.arange(n_oval) for k in range(rings - 1)]
        pole = offset + (rings - 1) * n_oval
        sf = []
        for r in range(rings - 1):
            a, b = ring_ids[r], ring_ids[r + 1]
            for i in range(n_oval):
                j = (i + 1) % n_oval
                sf += [(a[i], b[i], a[j]), (a[j], b[i], b[j])]
        for i in range(n_oval):
            sf.append((ring_ids[-1][i], pole, ring_ids[-1][(i + 1) % n_oval]))
        sf = np.array(sf, dtype=np.int64) - offset  # add() re-offsets; oval ids become negative here
        shell_uv = []
        for r in range(1, rings):
            for i in range(n_oval):
                shell_uv.append([i / n_oval, r / rings])
        shell_uv.append([0.5, 1.0])
        add("head", shell_v, sf, np.array(shell_uv))

        # Neck and shoulders: a surface of revolution under the jaw, flaring into the shoulders.
        rows, cols = 9, 24
        phi = np.linspace(0, 2 * np.pi, cols, endpoint=False)
        ys = np.linspace(0.04, 0.22, rows)
        flare = np.clip((ys - 0.13) / 0.09, 0, 1) ** 1.5
        rx = 0.047 + 0.10 * flare
        rz = 0.045 + 0.03 * flare
        zc = 0.02 + 0.01 * flare
        nv = np.array([[rx[r] * np.cos(p), ys[r], zc[r] + rz[r] * np.sin(p)] for r in range(rows) for p in phi])
        nuv = np.array([[c / cols, r / (rows - 1)] for r in range(rows) for c in range(cols)])
        add("neck", nv, grid_mesh(rows, cols, wrap_cols=True), nuv)

        self.vertices = np.concatenate(verts)
        self.all_faces = np.concatenate(faces)
        self.face_part = np.concatenate(face_part)
        self.vertex_part = np.concatenate(vert_part)
        self.vertex_uv = np.concatenate(uvs)
        self.interior_jaw_weight = np.concatenate([np.zeros(NUM_LANDMARKS)] + self.jaw_weight_extra)

    def mirror_map(self) -> np.ndarray:
        """mirror[i] = the vertex at vertex i's mirror position (every part is built symmetric)."""
        from scipy.spatial import cKDTree

        # Closed lips make upper and lower lip vertices coincide, so the surface uses the
        # FaceMesh pairing; the added parts have no coincident vertices and are matched by position.
        parts = self.vertices[NUM_SURFACE:]
        dist, nearest = cKDTree(parts).query(parts * np.array([-1.0, 1.0, 1.0]))
        mirror = np.concatenate([self.pairs, NUM_SURFACE + nearest])
        if dist.max() > 1e-6:
            raise RuntimeError(f"rig is not symmetric: a vertex has no mirror within {dist.max():.2e} m")
        return mirror

    def hang_cavity(self, field: np.ndarray, jaw_disp: np.ndarray | None) -> np.ndarray:
        """Cavity rings blend their lip vertex's displacement with the jaw's (or none) at the back."""
        for k, (src, sk, w) in enumerate(zip(self.cavity_src, self.cavity_s, self.cavity_jaw)):
            vid = self.cavity_first + k
            back = w * jaw_disp[vid] if jaw_disp is not None else np.zeros(3)
            front = field[src] if src >= 0 else back
            field[vid] = (1 - sk) * front + sk * back
        return field

    def oval_ordered(self) -> list[int]:
        """The face oval as a loop starting at the top (forehead), in a fixed direction."""
        oval = list(self.oval)
        start = int(np.argmin(self.v[oval, 1]))
        oval = oval[start:] + oval[:start]
        if self.v[oval[1], 0] < self.v[oval[0], 0]:
            oval = [oval[0]] + oval[1:][::-1]
        return oval

    def face_corner_uvs(self, photo_crop: tuple[float, float, float]) -> np.ndarray:
        """(F, 3, 2) atlas UVs per face corner; face UVs are the landmarks' places in the photo."""
        x0, y0, size = photo_crop
        uv = self.vertex_uv.copy()
        u0, v0, u1, v1 = ATLAS["face"]
        px = self.photo_landmarks[:NUM_LANDMARKS, :2]
        uv[:NUM_LANDMARKS, 0] = u0 + (px[:, 0] - x0) / size * (u1 - u0)
        uv[:NUM_LANDMARKS, 1] = v0 + (px[:, 1] - y0) / size * (v1 - v0)
        corner = uv[self.all_faces]
        # Head-shell faces that touch the oval take the shell's UV for the oval vertices too.
        head = self.face_part == PARTS.index("head")
        oval = self.oval_ordered()
        hu0, hv0, hu1, hv1 = ATLAS["head"]
        oval_uv = {vid: (hu0 + (k / len(oval)) * (hu1 - hu0), hv0) for k, vid in enumerate(oval)}
        for f in np.nonzero(head)[0]:
            for c in range(3):
                vid = self.all_faces[f, c]
                if vid in oval_uv:
                    corner[f, c] = oval_uv[vid]
        # The shell wraps around in u: faces across the seam map their u = 0 corners to u = 1.
        for f in np.nonzero(head)[0]:
            us = corner[f, :, 0]
            if us.max() - us.min() > 0.5 * (hu1 - hu0):
                corner[f, :, 0] = np.where(us < hu0 + 0.25 * (hu1 - hu0), hu1 - 1e-4, us)
        return corner

    # -- identity ------------------------------------------------------------------------------

    def identity_basis(self) -> tuple[list[str], np.ndarray]:
        """Named identity fields: displacement (V, 3) per unit coefficient, coefficients in [-1, 1].

        Each is a smooth region weight times an affine displacement. Rigid parts (eyeballs, teeth,
        tongue, cavity) take the weight at their own centre so that they move as a whole.
        """
        V = self.vertices
        S = self.v  # surface + landmark positions
        nose_tip, chin, mouth = S[1], S[152], self.mouth_center
        eye_c = self.eye_center
        brow_c = {s: S[self.brow[s]].mean(0) for s in self.brow}
        cheek_c = {"left": S[425], "right": S[205]}

        def gauss(center, sigma):
            d = np.linalg.norm(V - center, axis=-1)
            return np.exp(-0.5 * (d / sigma) ** 2)

        def smoothstep(x, a, b):
            t = np.clip((x - a) / (b - a), 0, 1)
            return t * t * (3 - 2 * t)

        x, y, z = V[:, 0], V[:, 1], V[:, 2]
        one = np.ones_like(x)
        eye_y = eye_c["left"][1]
        eye_x = np.where(x > 0, eye_c["left"][0], eye_c["right"][0])
        brow_y = brow_c["left"][1]
        eyes = np.maximum(gauss(eye_c["left"], 0.018), gauss(eye_c["right"], 0.018))
        brows = np.maximum(gauss(brow_c["left"], 0.02), gauss(brow_c["right"], 0.02))
        cheeks = np.maximum(gauss(cheek_c["left"], 0.02), gauss(cheek_c["right"], 0.02))
        vec = lambda a, b, c: np.stack([a * one, b * one, c * one], -1)  # noqa: E731
        # name -> (region weight (V,), affine displacement (V, 3)); the field is weight * affine.
        fields = {
            "face_width": (one, vec(0.09 * x, 0, 0)),
            "face_length": (smoothstep(y, eye_y - 0.01, eye_y + 0.03), vec(0, 0.12 * (y - eye_y), 0)),
            "face_depth": (one, vec(0, 0, 0.10 * z)),
            "jaw_width": (smoothstep(y, mouth[1] - 0.02, mouth[1] + 0.02), vec(0.16 * x, 0, 0)),
            "chin_length": (gauss(chin, 0.025), vec(0, 0.012, -0.003)),
            "forehead_height": (smoothstep(-y, -brow_y - 0.005, -brow_y + 0.03), vec(0, 0.18 * (y - brow_y), 0)),
            "nose_length": (gauss(nose_tip + [0, 0.005, 0], 0.014), vec(0, 0.006, 0)),
            "nose_width": (gauss(nose_tip + [0, 0.004, 0.01], 0.016), vec(0.25 * x, 0, 0)),
            "nose_projection": (gauss(nose_tip, 0.018), vec(0, 0, -0.007)),
            "eye_spacing": (eyes, vec(0.005 * np.sign(x), 0, 0)),
            "eye_size": (eyes, vec(0.12 * (x - eye_x), 0.12 * (y - eye_y), 0.12 * (z - eye_c["left"][2]))),
            "brow_height": (brows, vec(0, -0.005, 0)),
            "lip_fullness": (gauss(mouth, 0.012), vec(0, 0.22 * (y - mouth[1]), -0.003)),
            "mouth_width": (gauss(mouth, 0.02), vec(0.14 * (x - mouth[0]), 0, 0)),
            "cheekbones": (cheeks, vec(0.006 * np.sign(x), 0, -0.004)),
        }
        names = list(fields)
        weights = np.stack([fields[n][0] for n in names])  # (I, V)
        # Rigid parts take the region weight at their own centre, so they move and scale whole.
        eyeball = self.vertex_part == PARTS.index("eyeball")
        groups = [np.nonzero(self.vertex_part == PARTS.index(p))[0] for p in ("upper_teeth", "lower_teeth", "tongue", "cavity")]
        for side, sign in (("left", 1), ("right", -1)):
            groups.append(np.concatenate([np.nonzero(eyeball & (np.sign(x) == sign))[0], self.iris[side]]))
        for idx in groups:
            distance = np.linalg.norm(V - V[idx].mean(0), axis=-1)
            distance[idx] = np.inf
            weights[:, idx] = weights[:, [np.argmin(distance)]]  # the nearest vertex outside the part
        basis = weights[:, :, None] * np.stack([fields[n][1] for n in names])
        return names, basis.astype(np.float32)

    # -- expression ----------------------------------------------------------------------------

    def expression_basis(self) -> tuple[list[str], np.ndarray]:
        """Named ARKit-like blendshapes (V, 3) at coefficient 1; coefficients live in [0, 1].

        Left/Right are the subject's (the +x side of the head frame). Each shape pins a few
        semantic handles (lip, lid, brow chains) to hand-chosen displacements in metres and lets the
        bi-Laplacian fill the surface around them. Shapes that keep the lips sealed move the upper
        and lower inner chains by the same function of x, so a closed mouth stays closed.
        """
        S = self.v
        mouth = self.mouth_center
        c_r, c_l = self.inner_corners
        o_r, o_l = self.outer_corners
        half_w = 0.5 * abs(S[c_l, 0] - S[c_r, 0])
        inner = self.inner_upper + self.inner_lower
        lips_all = inner + self.outer_upper + self.outer_lower + [c_r, c_l, o_r, o_l]
        eye_fixed = set(self.eye_loop["left"]) | set(self.eye_loop["right"])
        nose_bottom_y = S[2, 1]
        upper_face = {i for i in range(NUM_SURFACE) if S[i, 1] < nose_bottom_y}
        deform = self.deformer.deform

        def bump(i: int) -> float:  # 1 at the mouth's middle, 0 at its corners
            t = (S[i, 0] - mouth[0]) / half_w
            return float(max(0.0, 1 - t * t))

        def toward(i: int, sign: float) -> float:  # 0 at the far corner, 1 at the near corner
            t = 0.5 + 0.5 * sign * (S[i, 0] - mouth[0]) / half_w
            return float(np.clip(t, 0, 1) ** 2)

        def sealed(corner_disp: np.ndarray, sign: float) -> dict[int, np.ndarray]:
            """Corner displacement carried along both inner chains (and the outer corners)."""
            h = {i: toward(i, sign) * corner_disp for i in inner}
            h[c_l if sign > 0 else c_r] = corner_disp
            h[o_l if sign > 0 else o_r] = corner_disp
            h[c_r if sign > 0 else c_l] = np.zeros(3)
            h[o_r if sign > 0 else o_l] = np.zeros(3)
            return h

        # Jaw: a rotation about a hinge in front of the ears; lower face pinned to it.
        pivot = np.array([0.0, nose_bottom_y - 0.005, 0.005])
        jaw_open_rot = Rotation.from_euler("x", 26, degrees=True).as_matrix()
        jaw_side_rot = {s: Rotation.from_euler("y", -7 * self.side_sign(s), degrees=True).as_matrix() for s in ("left", "right")}
        lower_face = [i for i in range(NUM_SURFACE) if S[i, 1] > mouth[1] + 0.012]
        jaw_lower = self.inner_lower + self.outer_lower + lower_face

        def jaw_shape(rot: np.ndarray) -> np.ndarray:
            disp_all = (self.vertices - pivot) @ rot.T + pivot - self.vertices
            h = {i: disp_all[i] for i in jaw_lower}
            for i in (c_r, c_l, o_r, o_l):
                h[i] = 0.5 * disp_all[i]
            for i in self.inner_upper + self.outer_upper:
                h[i] = np.zeros(3)
            field = np.zeros_like(self.vertices)
            field[:NUM_SURFACE] = deform(h, fixed_radius=0.05, fixed=upper_face - set(h))
            jaw_parts = self.interior_jaw_weight > 0
            field[jaw_parts] = self.interior_jaw_weight[jaw_parts, None] * disp_all[jaw_parts]
            return self.hang_cavity(field, disp_all)

        def surface(h: dict[int, np.ndarray], radius: float = 0.035, fixed: set[int] = frozenset()) -> np.ndarray:
            field = np.zeros_like(self.vertices)
            field[:NUM_SURFACE] = deform(h, fixed_radius=radius, fixed=set(fixed) - set(h))
            return self.hang_cavity(field, None)

        normals = np.zeros((NUM_SURFACE, 3))
        tri = S[self.faces]
        fn = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        for c in range(3):
            np.add.at(normals, self.faces[:, c], fn)
        normals /= np.linalg.norm(normals, axis=-1, keepdims=True) + 1e-12

        shapes: dict[str, np.ndarray] = {"jawOpen": jaw_shape(jaw_open_rot)}
        for side in ("Left", "Right"):
            s = side.lower()
            sign = self.side_sign(s)
            eye = self.eye[s]
            brow = self.brow[s]
            shapes[f"jaw{side}"] = jaw_shape(jaw_side_rot[s])
            cheek = 425 if s == "left" else 205
            h = sealed(np.array([0.008 * sign, -0.011, 0.005]), sign)
            h[cheek] = np.array([0.0, -0.003, -0.002])
            shapes[f"mouthSmile{side}"] = surface(h, fixed=eye_fixed)
            shapes[f"mouthFrown{side}"] = surface(sealed(np.array([0.002 * sign, 0.006, 0.0]), sign), fixed=eye_fixed)
            shapes[f"mouthStretch{side}"] = surface(sealed(np.array([0.007 * sign, 0.002, 0.002]), sign), fixed=eye_fixed)
            shapes[f"mouthDimple{side}"] = surface(sealed(np.array([0.003 * sign, 0.0, 0.004]), sign), fixed=eye_fixed)
            side_w = lambda i: float(np.clip(0.5 + sign * (S[i, 0] - mouth[0]) / half_w, 0, 1)) * bump(i) ** 0.3  # noqa: E731
            h = {i: np.array([0.0, 0.0055 * side_w(i), -0.001]) for i in self.inner_lower + self.outer_lower}
            h.update({i: np.zeros(3) for i in self.inner_upper + [c_r, c_l, o_r, o_l]})
            shapes[f"mouthLowerDown{side}"] = surface(h, fixed=eye_fixed)
            h = {i: np.array([0.0, -0.0045 * side_w(i), -0.001]) for i in self.inner_upper + self.outer_upper}
            h.update({i: np.zeros(3) for i in self.inner_lower + [c_r, c_l, o_r, o_l]})
            shapes[f"mouthUpperUp{side}"] = surface(h, fixed=eye_fixed)
            # Eyes: lids meet a quarter of the way up from the lower lid, just in front of the eyeball.
            up, lo = eye["upper"], eye["lower"]
            ox = lambda chain: np.argsort(S[chain, 0])  # noqa: E731
            up_x, lo_x = S[up][ox(up)], S[lo][ox(lo)]

            def lid_at(x, chain_sorted, k):
                return np.interp(x, chain_sorted[:, 0], chain_sorted[:, k])

            def meet(x):
                y = lid_at(x, lo_x, 1) + 0.25 * (lid_at(x, up_x, 1) - lid_at(x, lo_x, 1))
                zz = min(lid_at(x, up_x, 2), lid_at(x, lo_x, 2)) - 0.0015
                return np.array([x, y, zz])

            # Partners (same rank in x) meet at one point, so the closed lids leave no sliver.
            h = {}
            for a, b in zip(sorted(up, key=lambda i: S[i, 0]), sorted(lo, key=lambda i: S[i, 0]), strict=True):
                target = meet(0.5 * (S[a, 0] + S[b, 0]))
                h[a], h[b] = target - S[a], target - S[b]
            h.update({i: np.zeros(3) for i in eye["corners"]})
            shapes[f"eyeBlink{side}"] = surface(h, radius=0.022, fixed=set(brow))
            width = abs(S[eye["corners"][1], 0] - S[eye["corners"][0], 0])
            eye_c = S[up + lo].mean(0)
            lid_bump = lambda i: float(max(0.0, 1 - (2 * (S[i, 0] - eye_c[0]) / width) ** 2))  # noqa: E731
            h = {i: np.array([0.0, -0.003 * lid_bump(i), -0.0005]) for i in up}
            h.update({i: np.zeros(3) for i in lo + list(eye["corners"])})
            shapes[f"eyeWide{side}"] = surface(h, radius=0.022, fixed=set(brow))
            h = {i: np.array([0.0, 0.35 * (lid_at(S[i, 0], up_x, 1) - S[i, 1]) * lid_bump(i), -0.0005]) for i in lo}
            h.update({i: np.zeros(3) for i in up + list(eye["corners"])})
            shapes[f"eyeSquint{side}"] = surface(h, radius=0.025, fixed=set(brow))
            brow_x = np.abs(S[brow, 0])
            inner_t = (brow_x.max() - brow_x) / (brow_x.max() - brow_x.min())  # 1 at the inner end
            h = {i: np.array([-0.003 * sign * t, 0.006 * (0.4 + 0.6 * t), 0.0]) for i, t in zip(brow, inner_t)}
            shapes[f"browDown{side}"] = surface(h, radius=0.03, fixed=eye_fixed)
            h = {i: np.array([0.0, -0.008 * (1 - t) ** 1.5, 0.0]) for i, t in zip(brow, inner_t)}
            shapes[f"browOuterUp{side}"] = surface(h, radius=0.03, fixed=eye_fixed)
            ala = 327 if s == "left" else 98
            h = {i: np.array([0.0, -0.004, -0.001]) for i in range(NUM_SURFACE) if np.linalg.norm(S[i] - S[ala]) < 0.009}
            h.update({i: np.array([0.0, -0.0015 * side_w(i), 0.0]) for i in self.outer_upper})
            shapes[f"noseSneer{side}"] = surface(h, radius=0.025, fixed=eye_fixed)
        # Symmetric shapes.
        h = {}
        for s in ("left", "right"):
            brow = self.brow[s]
            brow_x = np.abs(S[brow, 0])
            inner_t = (brow_x.max() - brow_x) / (brow_x.max() - brow_x.min())
            h.update({i: np.array([0.0, -0.009 * t**1.5, 0.0]) for i, t in zip(brow, inner_t)})
        shapes["browInnerUp"] = surface(h, radius=0.035, fixed=eye_fixed)
        h = {i: np.array([-0.35 * (S[i, 0] - mouth[0]), 0.0, -0.009 * (0.4 + 0.6 * bump(i))]) for i in lips_all}
        shapes["mouthPucker"] = surface(h, radius=0.03, fixed=eye_fixed)
        h = {i: np.array([-0.25 * (S[i, 0] - mouth[0]), -0.0045 * bump(i), -0.007]) for i in self.inner_upper + self.outer_upper}
        h.update({i: np.array([-0.25 * (S[i, 0] - mouth[0]), 0.0065 * bump(i), -0.007]) for i in self.inner_lower + self.outer_lower})
        h.update({i: np.array([-0.25 * (S[i, 0] - mouth[0]), 0.0, -0.004]) for i in (c_r, c_l, o_r, o_l)})
        shapes["mouthFunnel"] = surface(h, radius=0.03, fixed=eye_fixed)
        h = {i: np.array([0.0, 0.0022 * bump(i), 0.001]) for i in self.outer_upper}
        h.update({i: np.array([0.0, -0.0022 * bump(i), 0.001]) for i in self.outer_lower})
        h.update({i: np.zeros(3) for i in inner + [c_r, c_l]})
        shapes["mouthPress"] = surface(h, radius=0.025, fixed=eye_fixed)
        h = {i: np.array([0.0, -0.0035 * bump(i), 0.004 * bump(i)]) for i in self.outer_lower}
        h.update({i: np.array([0.0, 0.0, 0.002 * bump(i)]) for i in inner})
        shapes["mouthRollLower"] = surface(h, radius=0.025, fixed=eye_fixed)
        h = {i: np.array([0.0, 0.003 * bump(i), 0.004 * bump(i)]) for i in self.outer_upper}
        h.update({i: np.array([0.0, 0.0, 0.002 * bump(i)]) for i in inner})
        shapes["mouthRollUpper"] = surface(h, radius=0.025, fixed=eye_fixed)
        h = {i: np.array([0.0, -0.003 * (0.5 + 0.5 * bump(i)), -0.001]) for i in lips_all}
        h.update({i: np.array([0.0, -0.004, -0.002]) for i in range(NUM_SURFACE) if np.linalg.norm(S[i] - S[152]) < 0.02})
        shapes["mouthShrugLower"] = surface(h, radius=0.035, fixed=eye_fixed)
        for side in ("Left", "Right"):
            sign = self.side_sign(side.lower())
            h = {i: np.array([0.008 * sign, 0.0, 0.0015 * sign * (S[i, 0] - mouth[0]) / half_w]) for i in lips_all}
            shapes[f"mouth{side}"] = surface(h, radius=0.035, fixed=eye_fixed)
        cheek_centers = [np.array([sgn * 0.046, mouth[1] - 0.004, 0.0]) for sgn in (-1, 1)]
        h = {}
        for cc in cheek_centers:
            d2 = np.linalg.norm(S[:NUM_SURFACE, :2] - cc[:2], axis=-1)
            for i in np.nonzero(d2 < 0.022)[0]:
                h[int(i)] = 0.009 * (1 - (d2[i] / 0.022) ** 2) * normals[i]
        h.update({i: np.zeros(3) for i in inner + [c_r, c_l]})
        shapes["cheekPuff"] = surface(h, radius=0.03, fixed=eye_fixed)

        # Right is the mirror image of Left by definition (the handle solve is not bit-symmetric).
        mirror = self.mirror_map()
        flip = np.array([-1.0, 1.0, 1.0])
        for name in list(shapes):
            if name.endswith("Left"):
                shapes[name[:-4] + "Right"] = shapes[name][mirror] * flip

        # The head shell's first rings follow the face oval they hang from.
        head = np.nonzero(self.vertex_part == PARTS.index("head"))[0]
        oval = self.oval_ordered()
        n_oval = len(oval)
        for name, field in shapes.items():
            for r in range(3):
                ids = head[r * n_oval:(r + 1) * n_oval]
                field[ids] = (1 - (r + 1) / 4) * field[oval]
        order = [
            "jawOpen", "jawLeft", "jawRight", "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft",
            "mouthFrownRight", "mouthStretchLeft", "mouthStretchRight", "mouthDimpleLeft", "mouthDimpleRight",
            "mouthPucker", "mouthFunnel", "mouthPress", "mouthRollLower", "mouthRollUpper", "mouthShrugLower",
            "mouthLowerDownLeft", "mouthLowerDownRight", "mouthUpperUpLeft", "mouthUpperUpRight", "mouthLeft",
            "mouthRight", "cheekPuff", "eyeBlinkLeft", "eyeBlinkRight", "eyeWideLeft", "eyeWideRight",
            "eyeSquintLeft", "eyeSquintRight", "browInnerUp", "browDownLeft", "browDownRight",
            "browOuterUpLeft", "browOuterUpRight", "noseSneerLeft", "noseSneerRight",
        ]
        assert sorted(order) == sorted(shapes), set(order) ^ set(shapes)
        return order, np.stack([shapes[n] for n in order]).astype(np.float32)


def face_photo_crop(landmarks_px: np.ndarray) -> tuple[float, float, float]:
    """(x0, y0, size) of the square photo crop that becomes the face texture."""
    lo, hi = landmarks_px[:, :2].min(0), landmarks_px[:, :2].max(0)
    center = 0.5 * (lo + hi)
    return float(round(center[0] - FACE_CROP_PX / 2)), float(round(center[1] - FACE_CROP_PX / 2)), float(FACE_CROP_PX)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "liftavatar/face/data")
    args = parser.parse_args()
    landmarks, photo = detect_astronaut()
    builder = RigBuilder(landmarks)
    builder.build_parts()
    identity_names, identity_basis = builder.identity_basis()
    expression_names, expression_basis = builder.expression_basis()
    crop = face_photo_crop(landmarks[:NUM_SURFACE])
    x0, y0, size = crop
    texture = Image.fromarray(photo).crop((int(x0), int(y0), int(x0 + size), int(y0 + size)))
    texture = texture.resize((FACE_TEXTURE_SIZE, FACE_TEXTURE_SIZE), Image.LANCZOS)
    args.out.mkdir(parents=True, exist_ok=True)
    texture.save(args.out / "face_texture.png")
    np.savez_compressed(
        args.out / "rig.npz",
        name=np.array(RIG_NAME),
        version=np.array(RIG_VERSION),
        template=builder.vertices.astype(np.float32),
        faces=builder.all_faces.astype(np.int32),
        face_uvs=builder.face_corner_uvs(crop).astype(np.float32),
        face_part=builder.face_part.astype(np.uint8),
        vertex_part=builder.vertex_part.astype(np.uint8),
        part_names=np.array(PARTS),
        atlas_parts=np.array(list(ATLAS)),
        atlas_boxes=np.array(list(ATLAS.values()), dtype=np.float32),
        identity_names=np.array(identity_names),
        identity_basis=identity_basis,
        expression_names=np.array(expression_names),
        expression_basis=expression_basis,
        mirror_pairs=builder.pairs.astype(np.int32),
        eye_loops=np.array([builder.eye_loop["left"], builder.eye_loop["right"]], dtype=np.int32),
        mouth_loop=np.array(builder.mouth_loop, dtype=np.int32),
        face_oval=np.array(builder.oval_ordered(), dtype=np.int32),
        lips_outline=np.array(builder.lips_outline, dtype=np.int32),
        brow_outlines=np.array([builder.brow_outline["left"], builder.brow_outline["right"]], dtype=np.int32),
    )
    print(f"wrote {args.out}/rig.npz: {len(builder.vertices)} vertices, {len(builder.all_faces)} faces, "
          f"{len(identity_names)} identity and {len(expression_names)} expression parameters")


if __name__ == "__main__":
    main()
