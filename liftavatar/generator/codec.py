"""Latent codecs: what the transformer sees instead of pixels (DESIGN.md §6).

A codec turns videos (B, 3, F, H, W) in [0, 1] into latents (B, C, T, h, w) and back. Two kinds:

- :class:`PixelCodec`: pixel-unshuffle (space-to-depth) by ``factor``, values mapped to [-1, 1].
  Exact and free; it lets a small prior be trained and run with no VAE weights at all.
- :class:`WanVAECodec`: the Wan2.1 VAE (diffusers ``AutoencoderKLWan``), 8× spatial and 4×
  temporal compression, so a clip has 4n + 1 frames; reference frames are encoded one by one as
  single-frame clips (one latent frame each). Latents are normalised with the VAE's
  ``latents_mean`` / ``latents_std`` as Wan's pipelines do.

Both follow the same small interface, so the transformer, trainer and pipeline never ask which.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from liftavatar.errors import ConfigError


class Codec(Protocol):
    latent_channels: int
    spatial_factor: int
    temporal_factor: int

    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor: ...

    def latent_frames(self, num_frames: int) -> int: ...

    def check_frames(self, num_frames: int) -> None: ...

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Codec: ...


@dataclass
class CodecConfig:
    """Which codec a prior was trained with (saved in the prior's config.json)."""

    kind: str = "pixel"  # "pixel" or "wan-vae"
    factor: int = 4  # pixel codec: space-to-depth factor
    vae_path: str | None = None  # wan-vae: a local diffusers AutoencoderKLWan directory


class PixelCodec:
    """Space-to-depth by ``factor`` (``F.pixel_unshuffle``): (B, 3, F, H, W) → (B, 3·f², F, H/f, W/f) in [-1, 1]."""

    temporal_factor = 1

    def __init__(self, factor: int = 4):
        if factor < 1:
            raise ConfigError(f"pixel codec factor {factor}: use 1 or more.")
        self.factor = factor
        self.spatial_factor = factor
        self.latent_channels = 3 * factor * factor

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = video.shape
        if h % self.factor or w % self.factor:
            raise ConfigError(f"frames of {h}x{w} pixels: the pixel codec needs sizes divisible by {self.factor}.")
        frames = video.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        latents = F.pixel_unshuffle(frames * 2 - 1, self.factor)
        return latents.reshape(b, f, *latents.shape[1:]).permute(0, 2, 1, 3, 4)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = latents.shape
        frames = F.pixel_shuffle(latents.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w), self.factor)
        video = frames.reshape(b, t, *frames.shape[1:]).permute(0, 2, 1, 3, 4)
        return ((video + 1) / 2).clamp(0, 1)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Independent frames (B, 3, K, H, W) → one latent frame each (B, C, K, h, w)."""
        return self.encode(frames)

    def latent_frames(self, num_frames: int) -> int:
        return num_frames

    def check_frames(self, num_frames: int) -> None:
        if num_frames < 1:
            raise ConfigError("a clip needs at least one frame.")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PixelCodec:
        return self


class WanVAECodec:
    """The Wan2.1 VAE: 4n + 1 frames → n + 1 latent frames, 8× smaller, 16 normalised channels."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.latent_channels = cfg.z_dim
        self.spatial_factor = cfg.scale_factor_spatial or 8
        self.temporal_factor = cfg.scale_factor_temporal or 4
        self._mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        self._std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype = torch.float32) -> WanVAECodec:
        from diffusers import AutoencoderKLWan

        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path}: not a diffusers AutoencoderKLWan directory (no config.json); "
                              "pass the 'vae' folder of a local Wan2.1 diffusers checkpoint.")
        return cls(AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype))

    def _vae_param(self) -> torch.Tensor:
        return next(self.vae.parameters())

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.check_frames(video.shape[2])
        p = self._vae_param()
        latents = self.vae.encode((video * 2 - 1).to(p)).latent_dist.mode()
        return (latents - self._mean.to(latents)) / self._std.to(latents)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        p = self._vae_param()
        z = latents.to(p) * self._std.to(p) + self._mean.to(p)
        return ((self.vae.decode(z).sample.float() + 1) / 2).clamp(0, 1)

    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """Each frame of (B, 3, K, H, W) encoded alone (a one-frame clip) → (B, C, K, h, w)."""
        b, c, k, h, w = frames.shape
        single = frames.permute(0, 2, 1, 3, 4).reshape(b * k, c, 1, h, w)
        latents = self.encode(single)
        return latents.reshape(b, k, *latents.shape[1:2], *latents.shape[3:]).permute(0, 2, 1, 3, 4)

    def latent_frames(self, num_frames: int) -> int:
        return (num_frames - 1) // self.temporal_factor + 1

    def check_frames(self, num_frames: int) -> None:
        if num_frames < 1 or (num_frames - 1) % self.temporal_factor:
            raise ConfigError(f"a clip of {num_frames} frames: the Wan VAE needs "
                              f"{self.temporal_factor}n + 1 frames (e.g. 17 or 33).")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> WanVAECodec:
        self.vae.to(device=device, dtype=dtype)
        return self


def build_codec(config: CodecConfig) -> PixelCodec | WanVAECodec:
    if config.kind == "pixel":
        return PixelCodec(config.factor)
    if config.kind == "wan-vae":
        if not config.vae_path:
            raise ConfigError("codec wan-vae needs --vae PATH, a local diffusers AutoencoderKLWan directory.")
        return WanVAECodec.from_pretrained(config.vae_path)
    raise ConfigError(f"codec {config.kind!r}: use 'pixel' or 'wan-vae'.")


def frame_groups(num_frames: int, temporal_factor: int) -> list[list[int]]:
    """Which video frames each latent frame covers: [[0], [1..4], [5..8], …] for the Wan VAE."""
    if temporal_factor == 1:
        return [[i] for i in range(num_frames)]
    groups = [[0]]
    for start in range(1, num_frames, temporal_factor):
        groups.append(list(range(start, min(num_frames, start + temporal_factor))))
    return groups

