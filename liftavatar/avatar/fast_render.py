"""Single-frame rendering of a fixed avatar at high frame rates (issue 6: ≥ 1000 frames/s at 512²
on one H100, mesh deformation included).

Why this exists next to :func:`liftavatar.avatar.model.render_avatar`: rendering *one* frame per
call with ``avatar.vertices`` + ``render_avatar`` costs ~3.8 ms on an H100, while batches of 32
cost ~0.16 ms per frame, so the single-frame cost is launch and host overhead, not GPU work: a
few hundred small kernels launched one by one from Python (rig blendshapes, pose, triangle
frames, quaternions, SH colours), per-call set-up (activating the parameters, building the
intrinsics and view matrices, the background) and gsplat's Python wrapper. :class:`AvatarRenderer`
removes that overhead in three steps:

1. Everything that does not depend on the frame is computed once per (avatar, camera, size):
   the activated Gaussians (``exp`` scales, unit quaternions, ``sigmoid`` opacities, joined SH
   coefficients: :func:`~liftavatar.avatar.model.activate_gaussians`), the subject's rig shaped
   by its identity (template + identity blendshapes), the expression basis, the intrinsics and
   view matrices, the camera centre, the background and the tile grid.
2. The frame-dependent part with fixed shapes — expression blendshapes and head pose →
   vertices → triangle frames → Gaussian means / covariances / colours
   (:func:`~liftavatar.avatar.model.pose_gaussians`) → gsplat's EWA projection to the image
   (unpacked, so its outputs are (1, N, ·) whatever the frame) — is recorded once in a CUDA
   graph. A frame copies its expression, rotation and translation into the graph's static
   input buffers and replays it: one launch instead of ~100 (a graph still runs its kernels
   one after another, so it also pays to have fewer of them: gsplat is given world
   covariances k² R Σ_l Rᵀ, with the local Σ_l precomputed, rather than quaternions and scales,
   which cost ~70 small kernels per frame for the triangle-rotation quaternions).
3. Capture stops before gsplat's tile intersection: ``isect_tiles`` counts the tiles each
   Gaussian overlaps and reads the total back to the host (``.item()``) to allocate the
   intersection list, whose length changes every frame. A CUDA graph can hold neither a host
   synchronisation nor a data-dependent allocation, so tile intersection, offset encoding and
   ``rasterize_to_pixels`` run eagerly after the replay: three gsplat calls and the one host
   sync per frame that gsplat needs.

The eager gsplat calls are exactly those :func:`gsplat.rasterization` makes for one camera with
``packed=False``, "classic" mode and plain RGB colours (colours are evaluated here, as
``render_avatar`` does, since the SH direction may be the triangle's frame), with the same near /
far planes, ``eps2d``, ``radius_clip`` (0) and tile size (16); so the images are
``render_avatar``'s up to float rounding (covariances computed in another order; the benchmark
and a GPU test check ≥ 50 dB PSNR; ``covariances=False`` gives gsplat quaternions and scales
computed by the same operations as ``render_avatar``'s).

``graph=False`` runs the same split pipeline eagerly (to measure the graph's gain, and as the
fallback when capture fails: :attr:`AvatarRenderer.graph_error` then says why). On CPU there
are no graphs and no gsplat: the pre-raster part runs eagerly and the PyTorch rasterizer of
:mod:`liftavatar.avatar.raster` renders, as ``render_avatar`` does there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from liftavatar.avatar.model import (
    Avatar,
    AvatarError,
    activate_gaussians,
    intrinsics_matrix,
    local_covariances,
    pose_gaussians,
)
from liftavatar.face.rig import FaceRig, axis_angle_to_matrix

__all__ = ["EPS2D", "FAR_PLANE", "NEAR_PLANE", "TILE_SIZE", "AvatarRenderer"]

# The rasterization settings of liftavatar.avatar.raster.rasterization's defaults (and gsplat's),
# which render_avatar uses; tests check that they agree.
NEAR_PLANE = 0.01
FAR_PLANE = 1e10
EPS2D = 0.3
TILE_SIZE = 16


class AvatarRenderer:
    """Renders single frames of one avatar seen by one fixed camera (at the world origin).

    Args:
        avatar: the avatar (its parameters are copied, detached and activated once; later
            changes to ``avatar.params`` are not seen).
        intrinsics: (4,) (fx, fy, cx, cy) pixels at ``size``; None: the avatar's training
            camera rescaled to ``size``.
        size: (H, W) pixels.
        device: where to render; None: the avatar's device.
        background: (3,) RGB in [0, 1] behind the avatar; None is black.
        graph: on CUDA, record the pre-raster part in a CUDA graph (see the module docstring).
        backend: "auto" (gsplat on CUDA, the PyTorch rasterizer on CPU), "gsplat" or "torch".
        graph_projection: also record gsplat's projection in the graph (when that capture fails,
            the renderer retries without it, then falls back to eager).
        covariances: (gsplat only) give gsplat world covariances k² R Σ_l Rᵀ (Σ_l precomputed)
            instead of quaternions and scales: the same Gaussians up to float rounding, with
            ~60 fewer small kernels per frame than the quaternion path of ``render_avatar``.
        rig: the face rig (default the packaged one).

    Call it with one frame's ``expression`` (E,) or (1, E), ``rotation`` and ``translation``
    (3,) or (1, 3); pass tensors already on ``device`` to avoid host-to-device copies (which
    block the host). Returns ``rgb (1, H, W, 3)`` and ``alpha (1, H, W, 1)``, as
    ``render_avatar`` does for one frame; they are new tensors every call (not graph buffers).

    Attributes:
        mode: "graph+projection", "graph", "eager" (CUDA, gsplat) or "eager-torch".
        graph_error: why graph capture failed (None when it did not, or was not asked for).
    """

    def __init__(
        self,
        avatar: Avatar,
        intrinsics: Tensor | tuple[float, float, float, float] | None,
        size: tuple[int, int],
        device: torch.device | str | None = None,
        *,
        background: Tensor | tuple[float, float, float] | None = None,
        graph: bool = True,
        backend: str = "auto",
        graph_projection: bool = True,
        covariances: bool = True,
        rig=None,
    ) -> None:
        device = torch.device(device) if device is not None else avatar.device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if backend == "auto":
            backend = "gsplat" if device.type == "cuda" else "torch"
        if backend not in ("gsplat", "torch"):
            raise ValueError(f"backend must be 'auto', 'gsplat' or 'torch', got {backend!r}")
        if backend == "gsplat" and device.type != "cuda":
            raise ValueError(f"the gsplat backend needs a CUDA device, not {device}; use backend='torch'.")
        self.device, self.backend = device, backend
        self.height, self.width = int(size[0]), int(size[1])
        cfg = avatar.meta.config
        self.sh_degree, self.sh_frame = cfg.sh_degree, cfg.sh_frame
        self.num_gaussians = avatar.num_gaussians
        rig = rig or FaceRig.load()
        f32: dict[str, Any] = {"dtype": torch.float32, "device": device}

        if intrinsics is None:
            h0, w0 = avatar.meta.size
            fx, fy, cx, cy = avatar.meta.intrinsics
            intrinsics = (fx * self.width / w0, fy * self.height / h0, cx * self.width / w0, cy * self.height / h0)
        # Host values once (a sync here, at set-up, is fine), then float32 as render_avatar makes them.
        k = [float(v) for v in torch.as_tensor(intrinsics, dtype=torch.float32).reshape(-1).cpu().tolist()]
        if len(k) != 4:
            raise ValueError(f"intrinsics must be (fx, fy, cx, cy), got {len(k)} values")

        if avatar.deform is not None:
            raise AvatarError("AvatarRenderer renders avatars whose Gaussians do not deform with the expression; "
                              "render this one with render_avatar, or bake its deformation at one frame first "
                              "(liftavatar.avatar.model.bake_deformation).")
        with torch.no_grad():
            avatar = avatar.to(device)
            # Own copies: the graph reads these buffers, so nobody else may change them.
            self._local = activate_gaussians({name: t.detach().float().clone() for name, t in avatar.params.items()})
            self._binding = avatar.binding.long().clone()
            self._faces = avatar.faces.long().clone()
            # The subject's identity-shaped rig: rig.shape(identity, 0) is template + identity
            # term (+ 0), bit for bit what rig.vertices adds the expression term to.
            self._exp_basis = torch.as_tensor(rig.expression_basis, **f32)
            self._base = rig.shape(avatar.identity.to(**f32)[None], torch.zeros(1, rig.num_expressions, **f32))
            self._viewmat = torch.eye(4, **f32)[None].contiguous()  # (C=1, 4, 4)
            self._K = intrinsics_matrix(torch.tensor(k, dtype=torch.float32)).to(device)[None].contiguous()  # (1, 3, 3)
            self._campos = torch.zeros(1, 1, 3, **f32)
            self.covariances, self._cov_local = False, None
            self._opacities_c = self._local.opacities[None].contiguous()  # (C=1, N) for rasterize_to_pixels
            self._background = None
            if background is not None:
                self._background = torch.as_tensor(background, **f32).reshape(1, 3).contiguous()
            # Static input buffers of the graph (also the warm-up frame).
            self._inputs = (torch.zeros(1, rig.num_expressions, **f32), torch.zeros(1, 3, **f32),
                            torch.tensor([[0.0, 0.0, 0.6]], **f32))
        self._tile_width = math.ceil(self.width / TILE_SIZE)
        self._tile_height = math.ceil(self.height / TILE_SIZE)
        if backend == "gsplat":
            self._setup_gsplat(covariances)

        self.mode = "eager" if backend == "gsplat" else "eager-torch"
        self.graph_error: str | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._graph_out: dict[str, Tensor] | None = None
        self._graph_projects = False
        if graph and backend == "gsplat":
            errors = []
            for with_projection in ((True, False) if graph_projection else (False,)):
                try:
                    self._capture(with_projection)
                    self.mode = "graph+projection" if with_projection else "graph"
                    break
                except Exception as exc:  # noqa: BLE001 — any failure: fall back, and say why
                    errors.append(f"{'with' if with_projection else 'without'} projection: "
                                  f"{type(exc).__name__}: {exc}")
                    self._graph, self._graph_out = None, None
                    try:
                        torch.cuda.synchronize(device)
                    except Exception as sync_exc:  # noqa: BLE001
                        errors.append(f"synchronize after the failed capture: {sync_exc}")
            self.graph_error = "; ".join(errors) or None

    def _setup_gsplat(self, covariances: bool) -> None:
        """gsplat's functions, looked up once, and the local covariances when asked for."""
        import gsplat

        self.backend = "gsplat"
        self._gs_project = gsplat.fully_fused_projection
        self._gs_isect = gsplat.isect_tiles
        self._gs_offsets = gsplat.isect_offset_encode
        self._gs_raster = gsplat.rasterize_to_pixels
        self.covariances = bool(covariances)
        with torch.no_grad():
            self._cov_local = local_covariances(self._local).contiguous() if self.covariances else None

    # ----------------------------------------------------------------------------------------
    # The parts of a frame

    def _forward(self, expression: Tensor, rotation: Tensor, translation: Tensor, project: bool) -> dict[str, Tensor]:
        """The fixed-shape pre-raster part: frame inputs (1, E), (1, 3), (1, 3) on the device ->
        world (camera-frame) Gaussians, and their projection when ``project``. The vertices
        are :meth:`FaceRig.vertices`' computation with the identity term precomputed."""
        verts = self._base + torch.einsum("be,evc->bvc", expression, self._exp_basis)
        rot = axis_angle_to_matrix(rotation.reshape(1, 3))
        verts = verts @ rot.transpose(1, 2) + translation.reshape(1, 1, 3)
        world = pose_gaussians(self._local, self._binding, verts, self._faces, self.sh_degree, self.sh_frame,
                               self._campos, covariances=self._cov_local)
        out = {"means": world.means[0], "colors": world.colors}  # colors (C=1, N, 3): the camera's colours
        if world.covars is not None:
            out["covars"] = world.covars[0]
        else:
            out["quats"], out["scales"] = world.quats[0], world.scales[0]
        if project:
            out.update(self._project(out))
        return out

    def _project(self, world: dict[str, Tensor]) -> dict[str, Tensor]:
        """gsplat's fused EWA projection, as gsplat.rasterization calls it (unpacked, C = 1)."""
        radii, means2d, depths, conics, _ = self._gs_project(
            world["means"], world.get("covars"), world.get("quats"), world.get("scales"), self._viewmat, self._K,
            self.width, self.height, eps2d=EPS2D, near_plane=NEAR_PLANE, far_plane=FAR_PLANE, radius_clip=0.0,
            packed=False, calc_compensations=False, opacities=self._local.opacities,
        )
        return {"radii": radii, "means2d": means2d, "depths": depths, "conics": conics}

    def _capture(self, with_projection: bool) -> None:
        """Record :meth:`_forward` in a CUDA graph, warmed up on a side stream first (as the
        PyTorch CUDA-graph docs show: lazy initialisation, cuBLAS workspaces and gsplat's JIT
        module must not happen during capture), then check a replay against eager."""
        device = self.device
        with torch.cuda.device(device), torch.no_grad():
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(3):
                    self._forward(*self._inputs, project=with_projection)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._forward(*self._inputs, project=with_projection)
        self._graph, self._graph_out, self._graph_projects = graph, out, with_projection
        self._check_graph()

    @torch.no_grad()
    def _check_graph(self) -> None:
        """A replay with inputs other than the capture's must give what eager gives (catches
        inputs that the graph does not read, i.e. stale buffers). Raises RuntimeError."""
        expr = torch.linspace(0.0, 0.5, self._inputs[0].shape[1], dtype=torch.float32, device=self.device)[None]
        rot = torch.tensor([[0.1, -0.2, 0.05]], dtype=torch.float32, device=self.device)
        trans = torch.tensor([[0.01, -0.02, 0.6]], dtype=torch.float32, device=self.device)
        graph_out = self.pre_raster(expr, rot, trans)
        eager = self._forward(expr, rot, trans, project=True)
        # gsplat leaves the projection outputs of culled Gaussians (radius 0) unwritten (torch.empty),
        # so only the Gaussians both sides keep are compared; which ones are kept must agree.
        kept = lambda radii: (radii > 0).reshape(*radii.shape[:2], -1).all(-1)  # noqa: E731
        visible = kept(eager["radii"])
        if not torch.equal(kept(graph_out["radii"]), visible):
            raise RuntimeError("graph replay culls other Gaussians than eager")
        tolerances = {"means": 1e-5, "colors": 1e-4, "means2d": 1e-2, "conics": 1e-3}
        for name, tol in tolerances.items():
            a, b = graph_out[name], eager[name]
            if name in ("means2d", "conics"):
                a, b = a[visible], b[visible]
            diff = float((a - b).abs().max()) if a.numel() else 0.0
            if not diff <= tol:
                raise RuntimeError(f"graph replay differs from eager in {name} by {diff:g} (> {tol:g})")

    def pre_raster(self, expression: Tensor, rotation: Tensor, translation: Tensor) -> dict[str, Tensor]:
        """The pre-raster part of one frame (graph replay, or eager): world Gaussians and, with
        gsplat, their projection. With a graph the tensors are the graph's buffers, overwritten
        by the next call."""
        with torch.no_grad():
            if self._graph is not None:
                e, r, t = self._inputs
                e.copy_(torch.as_tensor(expression).reshape(1, -1))
                r.copy_(torch.as_tensor(rotation).reshape(1, 3))
                t.copy_(torch.as_tensor(translation).reshape(1, 3))
                self._graph.replay()
                out = self._graph_out
                if not self._graph_projects:
                    out = {**out, **self._project(out)}
                return out
            f32 = {"dtype": torch.float32, "device": self.device}
            expr = torch.as_tensor(expression, **f32).reshape(1, -1)
            rot = torch.as_tensor(rotation, **f32).reshape(1, 3)
            trans = torch.as_tensor(translation, **f32).reshape(1, 3)
            return self._forward(expr, rot, trans, project=self.backend == "gsplat")

    def raster(self, out: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Rasterize :meth:`pre_raster`'s output: rgb (1, H, W, 3), alpha (1, H, W, 1).

        gsplat: tile intersection (data-dependent size, one host sync), offsets, compositing —
        what gsplat.rasterization does after its projection for one camera, packed=False."""
        with torch.no_grad():
            if self.backend == "gsplat":
                tw, th = self._tile_width, self._tile_height
                _, isect_ids, flatten_ids = self._gs_isect(
                    out["means2d"], out["radii"], out["depths"], TILE_SIZE, tw, th, packed=False, n_images=1,
                )
                offsets = self._gs_offsets(isect_ids, 1, tw, th).reshape(1, th, tw)
                return self._gs_raster(
                    out["means2d"], out["conics"], out["colors"], self._opacities_c, self.width, self.height,
                    TILE_SIZE, offsets, flatten_ids, backgrounds=self._background, packed=False,
                )
            from liftavatar.avatar.raster import rasterization

            rgb, alpha, _ = rasterization(
                out["means"], out["quats"], out["scales"], self._local.opacities, out["colors"][0], self._viewmat,
                self._K, self.width, self.height, near_plane=NEAR_PLANE, far_plane=FAR_PLANE, eps2d=EPS2D,
                backgrounds=self._background, backend="torch",
            )
            return rgb, alpha

    def __call__(self, expression: Tensor, rotation: Tensor, translation: Tensor) -> tuple[Tensor, Tensor]:
        """Render one frame: rgb (1, H, W, 3), alpha (1, H, W, 1) (see the class docstring)."""
        return self.raster(self.pre_raster(expression, rotation, translation))
