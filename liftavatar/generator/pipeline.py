"""Sampling: LiftAvatarPipeline (`liftavatar generate`), readable top to bottom.

Given K reference frames of a person (with their shading maps and kinematics) and a target
sequence of shading maps and kinematics, integrate the flow from noise to the target frames with a
diffusers flow-matching solver (Euler or UniPC), optionally guiding the controls with
classifier-free guidance (``v = v_drop + g · (v_cond − v_drop)``, the dropped branch being the one
the trainer's control dropout taught). Sequences longer than the trained clip are cut into
overlapping windows that share the references; windows run batched and are blended linearly at
the seams in pixel space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from liftavatar.errors import ConfigError
from liftavatar.io import to_uint8
from liftavatar.generator.codec import CodecConfig, build_codec
from liftavatar.generator.speed import SpeedConfig
from liftavatar.generator.transformer import LiftAvatarTransformer, group_controls, read_config

Solver = Literal["euler", "unipc"]
Controls = Literal["both", "shading", "coefficients"]


def make_scheduler(solver: Solver, shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if solver == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    if solver == "unipc":
        return UniPCMultistepScheduler(num_train_timesteps=1000, prediction_type="flow_prediction",
                                       use_flow_sigmas=True, flow_shift=shift)
    raise ConfigError(f"--solver {solver}: use euler or unipc.")


@dataclass
class GenerationInputs:
    """What to generate (images float in [0, 1], channels first)."""

    ref_frames: torch.Tensor  # (K, 3, H, W)
    ref_shading: torch.Tensor  # (K, 3, H, W)
    ref_controls: torch.Tensor  # (K, D)
    shading: torch.Tensor  # (N, 3, H, W) target shading maps
    controls: torch.Tensor  # (N, D) target kinematic controls


def video_to_uint8(video: torch.Tensor) -> np.ndarray:
    """The pipeline's (N, 3, H, W) float frames in [0, 1] → (N, H, W, 3) uint8, rounded, as captures store them."""
    return to_uint8(video.permute(0, 2, 3, 1))


def window_starts(num_frames: int, window: int, overlap: int) -> list[int]:
    """Starts of overlapping windows covering ``num_frames`` (the last one flush with the end)."""
    if num_frames <= window:
        return [0]
    stride = max(1, window - overlap)
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return starts


class LiftAvatarPipeline:
    def __init__(self, model: LiftAvatarTransformer, codec, window: int = 8, shift: float = 1.0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 speed: SpeedConfig | None = None):
        """``speed``: how the transformer runs (:class:`SpeedConfig`; None keeps the model's own setting)."""
        self.model = model.to(device=device, dtype=dtype).eval()
        if speed is not None:
            self.model.set_speed(speed)
        self.codec = codec.to(device)
        self.window = window
        self.shift = shift
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def from_pretrained(cls, prior: str | Path, device: str = "cpu", base_path: str | None = None,
                        vae_path: str | None = None, dtype: torch.dtype = torch.float32,
                        speed: SpeedConfig | None = None) -> LiftAvatarPipeline:
        """Load a prior directory (``config.json`` + safetensors) written by `liftavatar train`."""
        config = read_config(prior)
        extra = config.extra
        codec_cfg = CodecConfig(**extra.get("codec", {"kind": "pixel", "factor": 4}))
        if vae_path:
            codec_cfg.vae_path = vae_path
        model = LiftAvatarTransformer.from_pretrained(prior, base_path=base_path)
        return cls(model, build_codec(codec_cfg), window=int(extra.get("frames", 8)),
                   shift=float(extra.get("shift", 1.0)), device=device, dtype=dtype, speed=speed)

    @property
    def size(self) -> int | None:
        return self.model.config.extra.get("size")

    def check_inputs(self, inputs: GenerationInputs) -> None:
        d = self.model.config.num_controls
        for name in ("ref_controls", "controls"):
            got = getattr(inputs, name).shape[-1]
            if got != d:
                raise ConfigError(f"{name}: {got} kinematic controls per frame, the prior expects {d} "
                                  f"({d - 6} expression coefficients + pose); use kinematics of the prior's rig.")
        hw_ref, hw = tuple(inputs.ref_frames.shape[-2:]), tuple(inputs.shading.shape[-2:])
        if hw_ref != hw:
            raise ConfigError(f"references are {hw_ref[0]}x{hw_ref[1]} but target shading maps {hw[0]}x{hw[1]}; "
                              "resize them to one resolution.")
        if self.size and hw != (self.size, self.size):
            raise ConfigError(f"frames of {hw[0]}x{hw[1]}: this prior was trained at {self.size}x{self.size}; "
                              f"use captures of that size (e.g. `liftavatar track --size {self.size}`).")
        if len(inputs.ref_frames) < 1:
            raise ConfigError("no reference frames; pass at least one.")

    @torch.no_grad()
    def __call__(self, inputs: GenerationInputs, steps: int = 25, guidance: float = 1.0, seed: int = 0,
                 solver: Solver = "euler", overlap: int = 2, batch_size: int = 8, progress: bool = False,
                 controls: Controls = "both") -> torch.Tensor:
        """Generate the target frames: (N, 3, H, W) float in [0, 1] (on the CPU).

        ``controls`` other than "both" is the inference-time ablation of the paper's control study:
        "shading" replaces the target expression coefficients (and pose) by the learned null
        embedding, "coefficients" zeroes the target shading latents; the trainer dropped the two
        together, so each alone is a condition the prior never saw in training.
        """
        self.check_inputs(inputs)
        if controls not in ("both", "shading", "coefficients"):
            raise ConfigError(f"controls={controls!r}: use both, shading or coefficients.")
        n = inputs.shading.shape[0]
        # The VAE needs its trained 4n + 1 window (short inputs are padded); pixel latents may be shorter.
        window = min(self.window, n) if self.codec.temporal_factor == 1 else self.window
        starts = window_starts(n, window, overlap)
        dev, tf = self.device, self.codec.temporal_factor
        as5 = lambda x: x.to(dev).permute(1, 0, 2, 3).unsqueeze(0)  # noqa: E731  (F, C, H, W) → (1, C, F, H, W)
        ref_latents = self.codec.encode_frames(as5(inputs.ref_frames)).to(self.dtype)
        ref_shading = self.codec.encode_frames(as5(inputs.ref_shading)).to(self.dtype)
        ref_controls = group_controls(inputs.ref_controls.to(dev).unsqueeze(0).float(), 1).expand(-1, -1, tf, -1)

        out = torch.zeros(n, 3, *inputs.shading.shape[-2:])
        weight = torch.zeros(n, 1, 1, 1)
        ramp = _blend_weights(window, overlap)
        bar = tqdm(total=len(starts), desc="generate", unit="window", disable=not progress)
        for chunk in range(0, len(starts), batch_size):
            chunk_starts = starts[chunk:chunk + batch_size]
            shading = torch.cat([as5(_pad(inputs.shading[s:s + window], window)) for s in chunk_starts])
            kinematics = torch.stack([_pad(inputs.controls[s:s + window], window) for s in chunk_starts]).to(dev).float()
            shading_latents = self.codec.encode(shading).to(self.dtype)
            if controls == "coefficients":
                shading_latents = torch.zeros_like(shading_latents)
            video = self._sample(shading_latents, group_controls(kinematics, tf),
                                 ref_latents, ref_shading, ref_controls, steps, guidance,
                                 [_window_seed(seed, s) for s in chunk_starts], solver,
                                 drop_coefficients=controls == "shading")
            for i, s in enumerate(chunk_starts):
                length = min(window, n - s)
                frames = video[i].permute(1, 0, 2, 3)[:length].float().cpu()
                w = ramp[:length].view(-1, 1, 1, 1)
                if s == 0:
                    w = torch.where(torch.arange(length).view(-1, 1, 1, 1) < overlap, torch.ones_like(w), w)
                if s + length == n:
                    w = torch.where(torch.arange(length).view(-1, 1, 1, 1) >= length - overlap, torch.ones_like(w), w)
                out[s:s + length] += w * frames
                weight[s:s + length] += w
            bar.update(len(chunk_starts))
        bar.close()
        return out / weight.clamp_min(1e-8)

    def _sample(self, shading, controls, ref_latents, ref_shading, ref_controls, steps, guidance, seeds, solver,
                drop_coefficients: bool = False):
        b = shading.shape[0]
        shape = (b, self.codec.latent_channels, *shading.shape[2:])
        noise = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
        latents = noise.to(self.device, self.dtype)
        scheduler = make_scheduler(solver, self.shift)
        scheduler.set_timesteps(steps, device=self.device)
        expand = lambda x: x.expand(b, *x.shape[1:])  # noqa: E731
        refs = (expand(ref_latents), expand(ref_shading), expand(ref_controls))
        guided = guidance != 1.0
        only_shading = torch.full((b,), drop_coefficients, dtype=torch.bool, device=self.device)
        for t in scheduler.timesteps:
            timestep = t.expand(b).to(self.device, torch.float32)
            if guided:
                drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(self.device)
                two = lambda x: torch.cat([x, x])  # noqa: E731
                v = self.model(two(latents), two(timestep), two(shading), two(controls), *(two(r) for r in refs),
                               drop_controls=drop, drop_coefficients=two(only_shading))
                v_cond, v_drop = v.chunk(2)
                v = v_drop + guidance * (v_cond - v_drop)
            else:
                v = self.model(latents, timestep, shading, controls, *refs, drop_coefficients=only_shading)
            latents = scheduler.step(v.float(), t, latents.float(), return_dict=False)[0].to(self.dtype)
        return self.codec.decode(latents.float())


def _pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the frame axis to ``length`` by repeating the last frame (only the last window is short)."""
    if len(x) >= length:
        return x
    return torch.cat([x, x[-1:].expand(length - len(x), *x.shape[1:])])


def _blend_weights(window: int, overlap: int) -> torch.Tensor:
    """Linear ramps over the first and last ``overlap`` frames of a window, 1 in between."""
    w = torch.ones(window)
    if overlap > 0:
        ramp = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
        w[:overlap] = ramp
        w[-overlap:] = torch.minimum(w[-overlap:], ramp.flip(0))
    return w


def _window_seed(seed: int, start: int) -> int:
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0])

