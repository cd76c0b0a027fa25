"""FaceRig: the one face geometry that tracker, generator, lifting and avatar share (DESIGN.md §5).

Topology: MediaPipe FaceMesh's 468 surface vertices plus its 10 iris landmarks (vertex ids 0–477
are FaceMesh landmark ids), followed by the parts the bare surface lacks for rendering: eyeballs,
upper teeth (fixed to the skull), lower teeth, tongue and mouth cavity (on the jaw), a head shell
lofted from the face oval, and a neck.

Shape, in the head frame (metres; x toward the subject's left, y down, z into the head, so at zero
rotation the face looks at an OpenCV camera)::

    v = template + identity_basis · identity + expression_basis · expression

then head pose: ``v_cam = R(rotation) · v + translation`` with ``rotation`` an axis-angle vector
(radians) and ``translation`` in metres, in the OpenCV camera frame (x right, y down, z forward).

Identity coefficients are named smooth shape fields bounded to [-1, 1]; expression coefficients
are named, ARKit-like blendshapes bounded to [0, 1] (Left/Right are the subject's sides). The rig
is linear in both, which keeps fitting (tracking) a least-squares problem.

The data file is made by ``scripts/build_rig.py`` from scikit-image's astronaut photo run through
MediaPipe FaceMesh; see that script for the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch

DATA = resources.files("liftavatar.face") / "data"


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: (..., 3) axis-angle in radians -> (..., 3, 3) rotation matrices."""
    angle = axis_angle.norm(dim=-1, keepdim=True)
    small = angle < 1e-8
    axis = axis_angle / torch.where(small, torch.ones_like(angle), angle)
    x, y, z = axis.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*axis.shape[:-1], 3, 3)
    s = torch.sin(angle)[..., None]
    c = torch.cos(angle)[..., None]
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device).expand_as(k)
    rot = eye + s * k + (1 - c) * (k @ k)
    return torch.where(small[..., None], eye, rot)


def matrix_to_axis_angle(matrix: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) rotation matrices -> (..., 3) axis-angle in radians (angle in [0, π])."""
    from scipy.spatial.transform import Rotation

    flat = matrix.detach().cpu().double().reshape(-1, 3, 3).numpy()
    rotvec = Rotation.from_matrix(flat).as_rotvec()
    return torch.as_tensor(rotvec, dtype=matrix.dtype, device=matrix.device).reshape(*matrix.shape[:-2], 3)


@dataclass(frozen=True, eq=False)
class FaceRig:
    """The rig's data; all arrays are numpy, evaluation is batched torch (CPU or CUDA)."""

    name: str
    version: int
    template: np.ndarray  # (V, 3) float32, head frame, metres
    faces: np.ndarray  # (F, 3) int64, counter-clockwise seen from outside
    face_uvs: np.ndarray  # (F, 3, 2) float32 texture-atlas coordinates, v = 0 at the top row
    face_part: np.ndarray  # (F,) uint8 index into part_names
    vertex_part: np.ndarray  # (V,) uint8
    part_names: tuple[str, ...]
    atlas: dict[str, tuple[float, float, float, float]]  # part -> (u0, v0, u1, v1)
    identity_names: tuple[str, ...]
    identity_basis: np.ndarray  # (I, V, 3) metres per unit coefficient
    expression_names: tuple[str, ...]
    expression_basis: np.ndarray  # (E, V, 3) metres at coefficient 1
    mirror_pairs: np.ndarray  # (468,) the subject-side mirror of each surface vertex
    eye_loops: np.ndarray  # (2, 16) eye-opening contours: subject's left, right
    mouth_loop: np.ndarray  # (20,) inner lip contour
    face_oval: np.ndarray  # (36,) outer contour, from the forehead
    lips_outline: np.ndarray  # (20,) outer lip contour, a loop
    brow_outlines: np.ndarray  # (2, 10) eyebrow outlines: subject's left, right

    identity_bounds = (-1.0, 1.0)
    expression_bounds = (0.0, 1.0)
    num_landmarks = 478

    @classmethod
    def load(cls, path: str | Path | None = None) -> "FaceRig":
        """Load the packaged rig (default) or a rig ``.npz`` written by ``scripts/build_rig.py``."""
        return _load(str(path) if path is not None else None)

    @property
    def num_vertices(self) -> int:
        return len(self.template)

    @property
    def num_identity(self) -> int:
        return len(self.identity_names)

    @property
    def num_expressions(self) -> int:
        return len(self.expression_names)

    def part_mask(self, *parts: str) -> np.ndarray:
        """(F,) bool: faces that belong to any of the named parts."""
        ids = [self.part_names.index(p) for p in parts]
        return np.isin(self.face_part, ids)

    def expression_index(self, name: str) -> int:
        return self.expression_names.index(name)

    def neutral_expression(self, batch: int | None = None) -> np.ndarray:
        shape = (self.num_expressions,) if batch is None else (batch, self.num_expressions)
        return np.zeros(shape, np.float32)

    def shape(self, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """Head-frame vertices (B, V, 3) in metres from identity (B, I) and expression (B, E)."""
        template, id_basis, exp_basis = _tensors(self, identity.device, identity.dtype)
        return (
            template
            + torch.einsum("bi,ivc->bvc", identity, id_basis)
            + torch.einsum("be,evc->bvc", expression, exp_basis)
        )

    def vertices(
        self,
        identity: torch.Tensor | np.ndarray,
        expression: torch.Tensor | np.ndarray,
        rotation: torch.Tensor | np.ndarray,
        translation: torch.Tensor | np.ndarray,
    ) -> torch.Tensor:
        """Camera-frame vertices (B, V, 3), metres, OpenCV axes.

        identity (I,) or (B, I); expression (B, E); rotation (B, 3) axis-angle in radians, head
        frame to camera; translation (B, 3) metres (the head-frame origin, near the centre of the
        head, in the camera frame).
        """
        expression = torch.as_tensor(expression, dtype=torch.float32)
        device = expression.device
        identity = torch.as_tensor(identity, dtype=torch.float32, device=device)
        rotation = torch.as_tensor(rotation, dtype=torch.float32, device=device)
        translation = torch.as_tensor(translation, dtype=torch.float32, device=device)
        if expression.ndim == 1:
            expression = expression[None]
        batch = expression.shape[0]
        if identity.ndim == 1:
            identity = identity[None].expand(batch, -1)
        verts = self.shape(identity, expression)
        rot = axis_angle_to_matrix(rotation.reshape(batch, 3))
        return verts @ rot.transpose(1, 2) + translation.reshape(batch, 1, 3)

    def landmarks(self, vertices: torch.Tensor) -> torch.Tensor:
        """The 478 FaceMesh landmarks (B, 478, 3) of rig vertices (B, V, 3)."""
        return vertices[:, : self.num_landmarks]


@lru_cache(maxsize=4)
def _load(path: str | None) -> FaceRig:
    source = Path(path) if path is not None else DATA / "rig.npz"
    with np.load(source, allow_pickle=False) as z:
        return FaceRig(
            name=str(z["name"]),
            version=int(z["version"]),
            template=z["template"],
            faces=z["faces"].astype(np.int64),
            face_uvs=z["face_uvs"],
            face_part=z["face_part"],
            vertex_part=z["vertex_part"],
            part_names=tuple(str(p) for p in z["part_names"]),
            atlas={str(p): tuple(float(x) for x in box) for p, box in zip(z["atlas_parts"], z["atlas_boxes"])},
            identity_names=tuple(str(n) for n in z["identity_names"]),
            identity_basis=z["identity_basis"],
            expression_names=tuple(str(n) for n in z["expression_names"]),
            expression_basis=z["expression_basis"],
            mirror_pairs=z["mirror_pairs"].astype(np.int64),
            eye_loops=z["eye_loops"].astype(np.int64),
            mouth_loop=z["mouth_loop"].astype(np.int64),
            face_oval=z["face_oval"].astype(np.int64),
            lips_outline=z["lips_outline"].astype(np.int64),
            brow_outlines=z["brow_outlines"].astype(np.int64),
        )


_TENSOR_CACHE: dict[tuple[int, str, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _tensors(rig: FaceRig, device: torch.device, dtype: torch.dtype):
    if not dtype.is_floating_point:
        dtype = torch.float32
    key = (id(rig), str(device), dtype)
    if key not in _TENSOR_CACHE:
        _TENSOR_CACHE[key] = tuple(
            torch.as_tensor(a, dtype=dtype, device=device)
            for a in (rig.template, rig.identity_basis, rig.expression_basis)
        )
    return _TENSOR_CACHE[key]


def face_texture() -> np.ndarray:
    """The packaged face texture (512, 512, 3) uint8: the astronaut photo's face crop."""
    from PIL import Image

    with Image.open(DATA / "face_texture.png") as im:
        return np.asarray(im.convert("RGB"))
