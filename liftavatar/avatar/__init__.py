"""The mesh-rigged 3D Gaussian avatar (DESIGN.md §7): ``liftavatar avatar train | render | export``.

- :mod:`liftavatar.avatar.model`: Gaussians bound to rig triangles, world-space evaluation,
  save / load (safetensors + json).
- :mod:`liftavatar.avatar.raster`: rasterization — gsplat on CUDA, a PyTorch backend on CPU.
- :mod:`liftavatar.avatar.train`: optimisation, densification (gsplat's strategy, binding kept),
  checkpoints and resume.
- :mod:`liftavatar.avatar.export`: the standard 3DGS ``.ply`` plus the binding; rendered frames.
"""
