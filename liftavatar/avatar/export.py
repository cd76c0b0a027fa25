"""Export an avatar: a standard 3D Gaussian Splatting ``.ply`` (plus its binding), a sequence of them for
another capture's kinematics, and rendered frames of those kinematics (``liftavatar avatar render``).

Layout (one ``vertex`` element, float32 unless noted), as written by the reference 3DGS code and
read by common viewers:

- ``x y z``: world-space means, metres;
- ``nx ny nz``: the unit normal of the bound triangle (3DGS writes zeros; viewers ignore them);
- ``f_dc_0..2``: DC SH coefficients (colour = 0.2820948 · f_dc + 0.5);
- ``f_rest_0..3(K-1)-1``: higher SH coefficients, channel-major (all of R, then G, then B), for view
  directions in this world frame (standard 3DGS);
- ``opacity``: logit of the opacity;
- ``scale_0..2``: log of the world-space standard deviations, metres;
- ``rot_0..3``: world rotation quaternion (w, x, y, z), normalised;

plus the binding, so the file re-rigs: ``binding`` (int32 triangle index into the rig's faces),
``local_x/y/z`` (position in the triangle frame, triangle-size units), ``local_scale_0..2`` (log),
``local_rot_0..3`` (w, x, y, z), the deformation of the exported frame folded in. See
:mod:`liftavatar.avatar.model` for the triangle frame (it is the rig's, OpenCV-like head frame).

The world of the file (:data:`Y_UP`) is the one splat viewers expect: right-handed, y up, metres, the head
frame turned 180° about x, so x points toward the subject's left, y up and z out of the face (the face looks
along +z; a viewer's default camera on +z looking at the origin sees it from the front). The head frame's
origin (near the centre of the head) is the world origin. An avatar trained with ``sh_frame`` "local"
evaluates its colour in each Gaussian's triangle frame; the export rotates those coefficients into the world
(:func:`rotate_sh`), so a standard 3DGS viewer shows the colours the avatar renders.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from liftavatar.avatar.model import (
    Avatar,
    AvatarError,
    bake_deformation,
    deform_condition,
    deform_features,
    gaussians_world,
    quaternion_multiply,
    render_avatar,
    triangle_frames,
)
from liftavatar.io import atomic_write, to_uint8, write_json
from liftavatar.video import check_frames_output, write_frames

__all__ = [
    "Y_UP",
    "check_kinematics",
    "export_ply",
    "export_ply_sequence",
    "read_ply",
    "reference_translation",
    "render_kinematics",
    "rotate_sh",
]

Y_UP = (1.0, -1.0, -1.0)
"""The exported (and viewed) world from the rig's OpenCV-like head frame: the diagonal of a turn of 180° about x
(x stays toward the subject's left, y turns up, z out of the face). It is its own inverse."""
_Y_UP_QUAT = (0.0, 1.0, 0.0, 0.0)  # (w, x, y, z) of that turn
SEQUENCE_INDEX = "frames.json"
"""Beside a sequence's .ply files: fps and, per frame, its file, provenance and validity."""


def _sphere_directions(count: int = 64) -> torch.Tensor:
    """(count, 3) unit directions spread evenly over the sphere (a Fibonacci lattice)."""
    i = torch.arange(count, dtype=torch.float64) + 0.5
    z = 1 - 2 * i / count
    phi = i * torch.pi * (3 - 5 ** 0.5)
    r = torch.sqrt(1 - z * z)
    return torch.stack((r * torch.cos(phi), r * torch.sin(phi), z), -1)


@torch.no_grad()
def rotate_sh(coeffs: torch.Tensor, matrix: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """SH coefficients (N, K, C) re-expressed for another frame of view directions.

    ``matrix`` (N, 3, 3) or (3, 3) maps a direction in the new frame to the old one; the result ``c'`` gives
    every direction ``d`` the colour the old coefficients gave ``matrix @ d``: Σ c'_k Y_k(d) = Σ c_k Y_k(M d).
    Any degree: the basis functions of one degree span a space closed under rotation, so the coefficients are
    fitted exactly (to float precision) by least squares over directions spread over the sphere.
    """
    from gsplat.cuda._torch_impl import _eval_sh_bases_fast

    num = coeffs.shape[1]
    if num == 1:
        return coeffs.clone()
    dirs = _sphere_directions(max(64, 4 * num))
    basis_pinv = torch.linalg.pinv(_eval_sh_bases_fast(num, dirs))  # (K, S)
    matrix = torch.as_tensor(matrix, dtype=torch.float64).expand(coeffs.shape[0], 3, 3)
    out = torch.empty_like(coeffs)
    for start in range(0, coeffs.shape[0], chunk):
        sl = slice(start, start + chunk)
        moved = _eval_sh_bases_fast(num, torch.einsum("nij,sj->nsi", matrix[sl], dirs))  # (n, S, K): Y(M d)
        transform = basis_pinv @ moved  # (n, K, K)
        out[sl] = (transform @ coeffs[sl].double()).to(coeffs.dtype)
    return out


@torch.no_grad()
def _ply_rows(avatar: Avatar, expression: np.ndarray, rotation: np.ndarray, translation: np.ndarray,
              rig) -> np.ndarray:
    """One frame of ``avatar`` (CPU) as the structured rows of the .ply (see the module docstring): expression
    (E,), rotation (3,) axis-angle of the head and translation (3,) metres of its origin, both in the head frame's
    OpenCV-like axes; written in :data:`Y_UP`."""
    expression = torch.as_tensor(expression, dtype=torch.float32)[None]
    rotation = torch.as_tensor(rotation, dtype=torch.float32)[None]
    translation = torch.as_tensor(translation, dtype=torch.float32)[None]
    avatar = bake_deformation(avatar, deform_condition(expression, rotation))  # this frame's Gaussians
    verts = avatar.vertices(expression, rotation, translation, rig)
    world = gaussians_world(avatar.params, avatar.binding, verts, avatar.faces, 0)
    _, rot, _ = triangle_frames(verts, avatar.faces[avatar.binding])
    flip = torch.tensor(Y_UP)
    p = avatar.params
    n = avatar.num_gaussians
    coeffs = torch.cat((p["sh0"], p["shN"]), 1)
    # Directions of the file's world, in the frame the avatar's SH reads: Y_UP back to the head frame, then
    # (sh_frame "local") into the triangle's frame (Rᵀ).
    to_sh = torch.diag(flip)
    if avatar.meta.config.sh_frame == "local":
        to_sh = rot[0].transpose(-1, -2) * flip  # Rᵀ · diag(flip)
    rest = rotate_sh(coeffs, to_sh)[:, 1:]
    rest = rest.transpose(1, 2).reshape(n, -1)  # (N, 3 * (K - 1)), channel-major
    columns: list[tuple[str, np.ndarray, str]] = []

    def add(prefix: str | list[str], values: torch.Tensor, dtype: str = "f4") -> None:
        values = values.reshape(n, -1).numpy()
        names = prefix if isinstance(prefix, list) else [f"{prefix}{k}" for k in range(values.shape[1])]
        for name, col in zip(names, values.T):
            columns.append((name, col, dtype))

    add(["x", "y", "z"], world.means[0] * flip)
    add(["nx", "ny", "nz"], rot[0, :, :, 2] * flip)
    add("f_dc_", p["sh0"][:, 0])
    add("f_rest_", rest)
    add(["opacity"], p["opacities"])
    add("scale_", torch.log(world.scales[0]))
    quats = quaternion_multiply(torch.tensor(_Y_UP_QUAT), torch.nn.functional.normalize(world.quats[0], dim=-1))
    add("rot_", quats)
    add(["binding"], avatar.binding.to(torch.int32), "i4")
    add(["local_x", "local_y", "local_z"], p["means"])
    add("local_scale_", p["scales"])
    add("local_rot_", torch.nn.functional.normalize(p["quats"], dim=-1))
    data = np.empty(n, dtype=[(name, dtype) for name, _, dtype in columns])
    for name, col, _ in columns:
        data[name] = col
    return data


def _write_ply(path: Path, rows: np.ndarray) -> Path:
    from plyfile import PlyData, PlyElement

    return atomic_write(path, lambda tmp: PlyData([PlyElement.describe(rows, "vertex")], byte_order="<").write(str(tmp)))


def _check_ply_path(path: Path) -> None:
    if path.is_dir():
        raise AvatarError(f"{path}: is a directory; pass the path of the .ply file to write (for example "
                          f"{path / 'avatar.ply'}).")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise AvatarError(f"{path}: a folder above it is a file; pass a .ply path under a folder.") from None


@torch.no_grad()
def export_ply(avatar: Avatar, path: str | Path) -> Path:
    """Write ``avatar`` with the neutral expression and no head rotation, in :data:`Y_UP` with the head frame's
    origin at the world origin, to ``path`` (binary little-endian PLY, atomically).

    Raises:
        AvatarError: ``path`` is a directory, or lies under a file.
    """
    from liftavatar.face.rig import FaceRig

    path = Path(path)
    _check_ply_path(path)
    rig = FaceRig.load()
    zeros = np.zeros(3, np.float32)
    return _write_ply(path, _ply_rows(avatar.to("cpu"), rig.neutral_expression(), zeros, zeros, rig))


def check_kinematics(capture, avatar: Avatar) -> None:
    """Refuse a capture whose expression coefficients are not the avatar's (another rig or expression set).

    Raises:
        AvatarError: naming the capture and the fix.
    """
    names = list(capture.meta.expression_names)
    if names != list(avatar.meta.expression_names):
        raise AvatarError(
            f"{capture.path}: its kinematics have {len(names)} expression coefficients, the avatar's "
            f"rig has {len(avatar.meta.expression_names)} ({avatar.meta.rig.get('name')}); use a capture tracked "
            f"or synthesised with the same rig."
        )


def reference_translation(kinematics) -> np.ndarray:
    """(3,) metres: the median head position of a capture's valid frames (all frames when none is valid); the
    export and the viewer place the head frame's origin there at the world origin, so the head moves about it."""
    valid = kinematics.valid if kinematics.valid.any() else np.ones_like(kinematics.valid)
    return np.median(kinematics.translation[valid], axis=0).astype(np.float32)


@torch.no_grad()
def export_ply_sequence(avatar: Avatar, capture_path: str | Path, out_dir: str | Path, force: bool = False,
                        progress: bool = True) -> tuple[Path, int]:
    """Write one .ply per frame of a capture's kinematics (``000000.ply`` …) to ``out_dir``, for offline splat
    players, plus :data:`SEQUENCE_INDEX` (fps; per frame: file, provenance 0 observed / 1 lifted / 2 synthetic,
    valid). Every frame is in :data:`Y_UP` about the capture's :func:`reference_translation`.

    Raises:
        AvatarError: the capture's expression set differs from the avatar's; ``out_dir`` is a file, or holds
            anything but an earlier sequence (replaced only with ``force``).
        CaptureError: the capture does not load.
    """
    from tqdm import tqdm

    from liftavatar.capture import Capture
    from liftavatar.face.rig import FaceRig

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AvatarError(f"{out}: is a file; with --kinematics, OUT is a folder for one .ply per frame.")
    if out.is_dir() and any(out.iterdir()):
        ours = all(p.suffix == ".ply" or p.name == SEQUENCE_INDEX for p in out.iterdir())
        if not (force and ours):
            raise AvatarError(f"{out}: is not empty; pass an empty or new folder"
                              f"{', or --force to replace the sequence there' if ours else ''}.")
        for old in out.iterdir():
            old.unlink()
    capture = Capture.load(capture_path)
    check_kinematics(capture, avatar)
    kin = capture.kinematics
    ref = reference_translation(kin)
    rig = FaceRig.load()
    avatar = avatar.to("cpu")
    out.mkdir(parents=True, exist_ok=True)
    frames = []
    for i in tqdm(range(capture.num_frames), desc="export", unit="frame", disable=not progress):
        name = f"{i:06d}.ply"
        _write_ply(out / name, _ply_rows(avatar, kin.expression[i], kin.rotation[i], kin.translation[i] - ref, rig))
        frames.append({"file": name, "provenance": int(kin.provenance[i]), "valid": bool(kin.valid[i])})
    write_json(out / SEQUENCE_INDEX, {"fps": capture.meta.fps, "capture": str(capture.path), "frames": frames})
    return out, capture.num_frames


def read_ply(path: str | Path) -> dict[str, np.ndarray]:
    """The ``vertex`` properties of a PLY as arrays by name (for checks and tools)."""
    from plyfile import PlyData

    vertex = PlyData.read(str(path))["vertex"]
    return {prop.name: np.asarray(vertex[prop.name]) for prop in vertex.properties}


@torch.no_grad()
def render_frames(avatar: Avatar, kinematics, intrinsics, size: tuple[int, int],
                  background: tuple[float, float, float] = (0.0, 0.0, 0.0), batch: int = 8,
                  backend: str = "auto") -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 frames of ``avatar`` (on its device) driven by ``kinematics`` (a Capture's) and seen
    through ``intrinsics`` (fx, fy, cx, cy) at ``size`` (H, W), rendered in batches; frames marked
    invalid are plain background."""
    from liftavatar.face.rig import FaceRig

    rig = FaceRig.load()
    device = avatar.device
    k = torch.tensor(intrinsics, dtype=torch.float32, device=device)
    bg = torch.tensor(background, dtype=torch.float32, device=device)
    n = len(kinematics.expression)
    features = None if avatar.deform is None else deform_features(avatar, rig=rig)  # once, not per batch
    for start in range(0, n, batch):
        sl = slice(start, min(n, start + batch))
        verts = avatar.vertices(torch.from_numpy(kinematics.expression[sl]), torch.from_numpy(kinematics.rotation[sl]),
                                torch.from_numpy(kinematics.translation[sl]), rig)
        condition = deform_condition(kinematics.expression[sl], kinematics.rotation[sl])
        rgb, _, _ = render_avatar(avatar, verts, k, size, background=bg, backend=backend, condition=condition,
                                  features=features)
        rgb[torch.from_numpy(~kinematics.valid[sl]).to(device)] = bg
        yield from to_uint8(rgb)


@torch.no_grad()
def render_kinematics(
    avatar: Avatar,
    capture_path: str | Path,
    out: str | Path,
    size: int | None = None,
    background: tuple[float, float, float] = (0.0, 0.0, 0.0),
    device: str = "cpu",
    batch: int = 8,
    backend: str = "auto",
    progress: bool = True,
    force: bool = False,
) -> tuple[Path, int]:
    """Render ``avatar`` performing the kinematics of the capture at ``capture_path``.

    The avatar keeps its own identity; the capture supplies expression, head rotation and
    translation per frame and its camera (intrinsics rescaled to ``size``, the image height in
    pixels; default the capture's size). Frames the capture marks invalid are rendered as plain
    background. ``out`` is written by :func:`liftavatar.video.write_frames`: a video (H.264) when it ends in a
    video suffix, else a folder of ``000000.png`` … frames; what is there is replaced only with ``force``, and
    only when it is a video or frames an earlier render wrote.

    Returns:
        (out path, number of frames).

    Raises:
        AvatarError: the capture's expression set differs from the avatar's.
        ConfigError: ``out`` may not be written (see :func:`liftavatar.video.check_frames_output`).
        CaptureError: the capture does not load.
    """
    from tqdm import tqdm

    from liftavatar.capture import Capture

    check_frames_output(out, force)  # before rendering, not after
    capture = Capture.load(capture_path)
    check_kinematics(capture, avatar)
    h0, w0 = capture.size
    height = int(size) if size else h0
    width = max(1, round(height * w0 / h0))
    fx, fy, cx, cy = capture.meta.intrinsics
    k = (fx * width / w0, fy * height / h0, cx * width / w0, cy * height / h0)
    n = capture.num_frames
    frames = render_frames(avatar.to(device), capture.kinematics, k, (height, width), background, batch, backend)
    stream = tqdm(frames, total=n, desc="render", unit="frame", disable=not progress)
    return write_frames(stream, out, capture.meta.fps, force), n
