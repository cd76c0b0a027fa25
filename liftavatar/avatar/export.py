"""Export an avatar: a standard 3D Gaussian Splatting ``.ply`` (plus its binding), and rendered
frames of another capture's kinematics (``liftavatar avatar render``).

Layout (one ``vertex`` element, float32 unless noted), as written by the reference 3DGS code and
read by common viewers:

- ``x y z``: world-space means, metres;
- ``nx ny nz``: the unit normal of the bound triangle (3DGS writes zeros; viewers ignore them);
- ``f_dc_0..2``: DC SH coefficients (colour = 0.2820948 · f_dc + 0.5);
- ``f_rest_0..3(K-1)-1``: higher SH coefficients, channel-major (all of R, then G, then B);
- ``opacity``: logit of the opacity;
- ``scale_0..2``: log of the world-space standard deviations, metres;
- ``rot_0..3``: world rotation quaternion (w, x, y, z), normalised;

plus the binding, so the file re-rigs: ``binding`` (int32 triangle index into the rig's faces),
``local_x/y/z`` (position in the triangle frame, triangle-size units), ``local_scale_0..2`` (log),
``local_rot_0..3`` (w, x, y, z). See :mod:`liftavatar.avatar.model` for the triangle frame.

The pose is the subject's neutral expression in the head frame (rotation 0, translation 0):
metres, x toward the subject's left, y down, z into the head (OpenCV-like, so a y-up viewer
shows the head upside down; flip y and z there). ``f_rest`` is expressed in the frame the
avatar was trained with (``sh_frame``; "local" means the bound triangle's frame).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from liftavatar.io import atomic_write, to_uint8
from liftavatar.video import check_frames_output, write_frames
from liftavatar.avatar.model import (Avatar, AvatarError, bake_deformation, deform_condition, deform_features,
                                     gaussians_world, render_avatar, triangle_frames)

__all__ = ["export_ply", "read_ply", "render_kinematics"]


@torch.no_grad()
def export_ply(avatar: Avatar, path: str | Path) -> Path:
    """Write ``avatar`` at the neutral pose to ``path`` (binary little-endian PLY, atomically).

    Raises:
        AvatarError: ``path`` is a directory, or lies under a file.
    """
    from plyfile import PlyData, PlyElement

    from liftavatar.face.rig import FaceRig

    path = Path(path)
    if path.is_dir():
        raise AvatarError(f"{path}: is a directory; pass the path of the .ply file to write (for example "
                          f"{path / 'avatar.ply'}).")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise AvatarError(f"{path}: a folder above it is a file; pass a .ply path under a folder.") from None
    rig = FaceRig.load()
    zeros = torch.zeros(1, 3)
    neutral = torch.as_tensor(rig.neutral_expression(1))
    avatar = bake_deformation(avatar.to("cpu"), deform_condition(neutral, zeros))  # the neutral head's Gaussians
    verts = avatar.vertices(neutral, zeros, zeros, rig)
    world = gaussians_world(avatar.params, avatar.binding, verts, avatar.faces, 0)
    _, rot, _ = triangle_frames(verts, avatar.faces[avatar.binding])
    p = avatar.params
    n = avatar.num_gaussians
    rest = p["shN"].transpose(1, 2).reshape(n, -1)  # (N, 3 * (K - 1)), channel-major
    columns: list[tuple[str, np.ndarray, str]] = []

    def add(prefix: str | list[str], values: torch.Tensor, dtype: str = "f4") -> None:
        values = values.reshape(n, -1).numpy()
        names = prefix if isinstance(prefix, list) else [f"{prefix}{k}" for k in range(values.shape[1])]
        for name, col in zip(names, values.T):
            columns.append((name, col, dtype))

    add(["x", "y", "z"], world.means[0])
    add(["nx", "ny", "nz"], rot[0, :, :, 2])
    add("f_dc_", p["sh0"][:, 0])
    add("f_rest_", rest)
    add(["opacity"], p["opacities"])
    add("scale_", torch.log(world.scales[0]))
    add("rot_", torch.nn.functional.normalize(world.quats[0], dim=-1))
    add(["binding"], avatar.binding.to(torch.int32), "i4")
    add(["local_x", "local_y", "local_z"], p["means"])
    add("local_scale_", p["scales"])
    add("local_rot_", p["quats"])
    data = np.empty(n, dtype=[(name, dtype) for name, _, dtype in columns])
    for name, col, _ in columns:
        data[name] = col
    return atomic_write(path, lambda tmp: PlyData([PlyElement.describe(data, "vertex")], byte_order="<").write(str(tmp)))


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
    names = list(capture.meta.expression_names)
    if names != list(avatar.meta.expression_names):
        raise AvatarError(
            f"{capture.path}: its kinematics have {len(names)} expression coefficients, the avatar's "
            f"rig has {len(avatar.meta.expression_names)} ({avatar.meta.rig.get('name')}); use a capture tracked "
            f"or synthesised with the same rig."
        )
    h0, w0 = capture.size
    height = int(size) if size else h0
    width = max(1, round(height * w0 / h0))
    fx, fy, cx, cy = capture.meta.intrinsics
    k = (fx * width / w0, fy * height / h0, cx * width / w0, cy * height / h0)
    n = capture.num_frames
    frames = render_frames(avatar.to(device), capture.kinematics, k, (height, width), background, batch, backend)
    stream = tqdm(frames, total=n, desc="render", unit="frame", disable=not progress)
    return write_frames(stream, out, capture.meta.fps, force), n
