"""Benchmark the mesh rasterizer (liftavatar.face.render) at a realistic load.

Renders a batch of meshes at 128² and 256² and reports frames per second (one frame = one image
of the batch) for rasterization alone and for the full ``render_mesh`` at supersample 1 and 2.
The mesh is the face rig's textured template (2,040 vertices, 3,748 faces), framed to cover about
40% of the image, each batch item turned a little, both sides of faces drawn. Also times a whole
`liftavatar synth` run per size (seconds per frame, PNG writing included).

    python benchmarks/render.py                   # CPU, writes benchmarks/results/render.json
    python benchmarks/render.py --device cuda --out benchmarks/results/render_cuda.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from liftavatar.face.render import Lighting, rasterize, render_mesh
from liftavatar.face.rig import FaceRig, face_texture
from liftavatar.report import machine_info
from liftavatar.synth.world import SynthSpec, synthesize

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "render.json"


@dataclass
class Mesh:
    """A mesh in its own frame (metres, OpenCV-like axes: y down, z away from the viewer),
    centred on the origin, with an optional UV texture."""

    source: str
    vertices: torch.Tensor  # (V, 3)
    faces: torch.Tensor  # (F, 3)
    face_uvs: torch.Tensor | None = None  # (F, 3, 2)
    texture: torch.Tensor | None = None  # (Ht, Wt, 3) in [0, 1]


def rig_mesh() -> Mesh:
    """The face rig's neutral template (eyes, mouth interior, head shell, neck) with its texture."""
    rig = FaceRig.load()
    vertices = torch.as_tensor(rig.template, dtype=torch.float32)
    faces = torch.as_tensor(rig.faces, dtype=torch.long)
    face_uvs = torch.as_tensor(rig.face_uvs, dtype=torch.float32)
    texture = torch.from_numpy(np.array(face_texture(), dtype=np.float32)) / 255
    return Mesh("face rig template", vertices - vertices.mean(0), faces, face_uvs, texture)


def synth_seconds_per_frame(device: torch.device, size: int, frames: int) -> float:
    """Wall-clock seconds per frame of `liftavatar synth` (subject, render at supersample 2, PNGs, capture)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        synthesize(SynthSpec(seed=4242, preset="full", frames=frames, size=size), Path(tmp) / "capture",
                   device=str(device), progress=False)
        return (time.perf_counter() - start) / frames


def posed_batch(mesh: Mesh, batch: int, distance: float, seed: int = 0) -> torch.Tensor:
    """(B, V, 3) camera-frame copies of the mesh, each turned up to ±0.3 rad about every axis,
    ``distance`` metres in front of the camera."""
    gen = torch.Generator().manual_seed(seed)
    angles = (torch.rand(batch, 3, generator=gen) - 0.5) * 0.6
    skew = torch.cross(torch.eye(3).expand(batch, 3, 3), angles[:, None].expand(batch, 3, 3), dim=-1)
    rotations = torch.linalg.matrix_exp(skew)
    return mesh.vertices @ rotations.transpose(1, 2) + torch.tensor([0.0, 0.0, distance])


def framing(verts: torch.Tensor, faces: torch.Tensor, target: float = 0.4) -> float:
    """Focal length, in units of the image side, at which the posed meshes cover ``target`` of
    the image on average (coverage grows with the focal length squared)."""
    scale = 1.0
    for _ in range(4):
        k = torch.tensor([64 * scale, 64 * scale, 32.0, 32.0], device=verts.device)
        coverage = rasterize(verts, faces, k, (64, 64)).mask.float().mean().item()
        scale *= math.sqrt(target / max(coverage, 1e-3))
    return scale


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Best wall-clock seconds of ``repeats`` calls after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def run(device: torch.device, sizes: list[int], batch: int, repeats: int, synth_frames: int) -> dict[str, object]:
    mesh = rig_mesh()
    extent = mesh.vertices.norm(dim=-1).max().item()
    verts = posed_batch(mesh, batch, distance=3 * extent).to(device)
    faces = mesh.faces.to(device)
    albedo = {"face_uvs": mesh.face_uvs.to(device), "texture": mesh.texture.to(device)}
    focal = framing(verts, faces)
    lighting = Lighting()
    results: dict[str, object] = {}
    for size in sizes:
        k = torch.tensor([focal * size, focal * size, size / 2, size / 2], device=device)
        coverage = rasterize(verts, faces, k, (size, size)).mask.float().mean().item()
        row: dict[str, float] = {"coverage": round(coverage, 3)}
        cases = {
            "rasterize": lambda: rasterize(verts, faces, k, (size, size)),
            "render_ss1": lambda: render_mesh(
                verts, faces, k, (size, size), lighting=lighting, **albedo
            ),
            "render_ss2": lambda: render_mesh(
                verts, faces, k, (size, size), lighting=lighting, supersample=2, **albedo
            ),
        }
        for name, fn in cases.items():
            seconds = timed(fn, device, repeats)
            row[f"{name}_fps"] = round(batch / seconds, 1)
            row[f"{name}_s_per_batch"] = round(seconds, 4)
        row["synth_s_per_frame"] = round(synth_seconds_per_frame(device, size, synth_frames), 4)
        results[f"{size}x{size}"] = row
        print(f"{size}x{size}: " + ", ".join(f"{key}={value}" for key, value in row.items()))
    return {
        "benchmark": "face.render",
        "machine": machine_info(str(device)),
        "mesh": {
            "source": mesh.source,
            "vertices": mesh.vertices.shape[0],
            "faces": mesh.faces.shape[0],
            "albedo": "texture",
            "both sides drawn": True,
        },
        "batch": batch,
        "repeats": repeats,
        "timing": "best of the repeats after one warm-up; fps = images per second; synth_s_per_frame = "
                  f"one `synth` run of {synth_frames} frames (full preset, supersample 2, PNGs written) / frames",
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON file to write")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sides")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synth-frames", type=int, default=32, help="frames of the timed synth run")
    args = parser.parse_args()

    with torch.no_grad():
        report = run(torch.device(args.device), args.sizes, args.batch, args.repeats, args.synth_frames)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
