"""LiftAvatar: kinematic-space completion for expression-controlled 3D Gaussian head avatars."""

__version__ = "0.1.0"
