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

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from liftavatar.errors import ConfigError
from liftavatar.io import to_uint8
from liftavatar.generator.codec import CodecConfig, build_codec
from liftavatar.generator.prior import PriorConfig
from liftavatar.generator.speed import SpeedConfig
from liftavatar.generator.transformer import LiftAvatarTransformer, group_controls, read_config

Solver = Literal["euler", "unipc"]
Controls = Literal["both", "shading", "coefficients"]


@dataclass
class SamplerConfig:
    """How the prior samples: one config for `generate`, `lift` and the bench (the defaults are `generate`'s;
    :class:`liftavatar.lift.LiftConfig` extends it with lift's own)."""

    steps: int = 25
    """Solver steps."""
    guidance: float = 1.0
    """Classifier-free guidance scale over the controls (1 = off)."""
    solver: Solver = "euler"
    """Flow-matching solver: euler, or unipc (as good in fewer steps)."""
    seed: int = 0
    """Seed of the noise (and of the reference frames' choice when they are chosen now)."""
    batch_size: int = 8
    """Windows (generate) or clips (lift) sampled at once: faster on a GPU, more memory; the frames are the same
    up to float rounding."""

    def sampling(self) -> dict[str, Any]:
        """The sampler's fields as :meth:`LiftAvatarPipeline.__call__` takes them (also from a subclass)."""
        return {f.name: getattr(self, f.name) for f in fields(SamplerConfig)}


def check_sampling(steps: int, guidance: float, solver: str, batch_size: int) -> None:
    """A :class:`ConfigError` naming the option when a sampler setting is out of range."""
    if steps < 1:
        raise ConfigError(f"--steps {steps}: the solver needs at least 1 step.")
    if batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: sample at least 1 at a time.")
    if not np.isfinite(guidance):
        raise ConfigError(f"--guidance {guidance}: use a finite scale (1 = off).")
    if solver not in ("euler", "unipc"):
        raise ConfigError(f"--solver {solver}: use euler or unipc.")


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
    def from_pretrained(cls, prior: PriorConfig | str | Path | None = None, speed: SpeedConfig | None = None,
                        **fields: Any) -> LiftAvatarPipeline:
        """Load a prior written by `liftavatar train` (``config.json`` + safetensors) as :class:`PriorConfig` says.

        ``prior``: a :class:`PriorConfig`, or the prior directory (None: the embedded prior) with the config's
        other fields (``base``, ``vae``, ``dtype``, ``device``) as keywords, which also override a given
        config's. ``speed``: how the transformer runs (:class:`SpeedConfig`; None: the plain path)."""
        config = prior if isinstance(prior, PriorConfig) else PriorConfig(prior=prior)
        config = replace(config, **fields) if fields else config
        path = config.path
        extra = read_config(path).extra
        codec_cfg = CodecConfig(**extra.get("codec", {"kind": "pixel", "factor": 4}))
        if config.vae:
            codec_cfg.vae_path = str(config.vae)
        model = LiftAvatarTransformer.from_pretrained(path, base_path=config.base)
        return cls(model, build_codec(codec_cfg), window=int(extra.get("frames", 8)),
                   shift=float(extra.get("shift", 1.0)), device=config.device, dtype=config.torch_dtype, speed=speed)

    @property
    def size(self) -> int | None:
        """The square resolution (pixels a side) the prior was trained at, when it records one."""
        return self.model.config.extra.get("size")

    @property
    def num_controls(self) -> int:
        """Kinematic controls per frame the prior expects (its rig's expression coefficients + 6 pose)."""
        return self.model.config.num_controls

    def check_controls(self, got: int, what: str) -> None:
        """A :class:`ConfigError` naming ``what`` unless it gives ``got`` = :attr:`num_controls` controls a frame."""
        d = self.num_controls
        if got != d:
            raise ConfigError(f"{what}: {got} kinematic controls per frame, the prior expects {d} "
                              f"({d - 6} expression coefficients + pose); use kinematics of the prior's rig, "
                              "or a prior trained on this one.")

    def check_inputs(self, inputs: GenerationInputs) -> None:
        for name in ("ref_controls", "controls"):
            self.check_controls(getattr(inputs, name).shape[-1], name)
        hw_ref, hw = tuple(inputs.ref_frames.shape[-2:]), tuple(inputs.shading.shape[-2:])
        if hw_ref != hw:
            raise ConfigError(f"references are {hw_ref[0]}x{hw_ref[1]} but target shading maps {hw[0]}x{hw[1]}; "
                              "resize them to one resolution.")
        # Tensors given directly must be at the prior's size; Captures of any size are resized to it
        # (liftavatar.generator.inputs.generation_inputs(..., size=pipe.size)).
        if self.size and hw != (self.size, self.size):
            raise ConfigError(f"images of {hw[0]}x{hw[1]}: this prior generates at {self.size}x{self.size}; "
                              f"resize the inputs to it (generation_inputs(..., size={self.size}) does).")
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
        check_sampling(steps, guidance, solver, batch_size)
        if controls not in ("both", "shading", "coefficients"):
            raise ConfigError(f"controls={controls!r}: use both, shading or coefficients.")
        n = inputs.shading.shape[0]
        # The VAE needs its trained 4n + 1 window (short inputs are padded); pixel latents may be shorter.
        window = min(self.window, n) if self.codec.temporal_factor == 1 else self.window
        starts = window_starts(n, window, overlap)
        refs = self._encode_references(inputs)

        out = torch.zeros(n, 3, *inputs.shading.shape[-2:])
        weight = torch.zeros(n, 1, 1, 1)
        ramp = _blend_weights(window, overlap)
        bar = tqdm(total=len(starts), desc="generate", unit="window", disable=not progress)
        for chunk in range(0, len(starts), batch_size):
            chunk_starts = starts[chunk:chunk + batch_size]
            video = self._generate([_pad(inputs.shading[s:s + window], window) for s in chunk_starts],
                                   [_pad(inputs.controls[s:s + window], window) for s in chunk_starts],
                                   [_window_seed(seed, s) for s in chunk_starts], refs, steps, guidance, solver,
                                   controls)
            for i, s in enumerate(chunk_starts):
                length = min(window, n - s)
                frames = video[i, :length]
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

    @torch.no_grad()
    def generate_clips(self, inputs: GenerationInputs, clip_frames: int, seeds: list[int], steps: int = 25,
                       guidance: float = 1.0, solver: Solver = "euler", batch_size: int = 8) -> torch.Tensor:
        """Independent clips that share the references (what `lift` generates): the targets of ``inputs`` are
        C = len(seeds) clips of ``clip_frames`` frames (at most the prior's window) one after another, and
        clip c is sampled as ``self(clip_c, seed=seeds[c])`` samples it, ``batch_size`` clips at once (equal
        frames up to float rounding). Returns (C · clip_frames, 3, H, W) float in [0, 1] on the CPU."""
        self.check_inputs(inputs)
        check_sampling(steps, guidance, solver, batch_size)
        n, count = inputs.shading.shape[0], len(seeds)
        if not 1 <= clip_frames <= self.window or n != count * clip_frames:
            raise ConfigError(f"{n} target frames are not {count} clips of {clip_frames} frames (at most the "
                              f"prior's window of {self.window}); pass one seed per clip.")
        window = clip_frames if self.codec.temporal_factor == 1 else self.window
        refs = self._encode_references(inputs)
        clips = []
        for chunk in range(0, count, batch_size):
            chosen = range(chunk, min(count, chunk + batch_size))
            frames = [slice(c * clip_frames, (c + 1) * clip_frames) for c in chosen]
            video = self._generate([_pad(inputs.shading[f], window) for f in frames],
                                   [_pad(inputs.controls[f], window) for f in frames],
                                   [_window_seed(seeds[c], 0) for c in chosen], refs, steps, guidance, solver)
            clips += [v[:clip_frames] for v in video]
        return torch.cat(clips)

    def _encode_references(self, inputs: GenerationInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The references' latents, shading latents and grouped controls, each with a batch axis of 1."""
        tf = self.codec.temporal_factor
        ref_latents = self.codec.encode_frames(_as_video(inputs.ref_frames, self.device)).to(self.dtype)
        ref_shading = self.codec.encode_frames(_as_video(inputs.ref_shading, self.device)).to(self.dtype)
        ref_controls = group_controls(inputs.ref_controls.to(self.device).unsqueeze(0).float(), 1).expand(-1, -1, tf, -1)
        return ref_latents, ref_shading, ref_controls

    def _generate(self, shading: list[torch.Tensor], controls: list[torch.Tensor], seeds: list[int],
                  refs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], steps: int, guidance: float, solver: Solver,
                  which: Controls = "both") -> torch.Tensor:
        """Windows of (F, 3, H, W) target shading maps and (F, D) controls, sampled together from noise of
        ``seeds`` → (B, F, 3, H, W) float frames on the CPU."""
        tf = self.codec.temporal_factor
        shading_latents = self.codec.encode(torch.cat([_as_video(x, self.device) for x in shading])).to(self.dtype)
        if which == "coefficients":
            shading_latents = torch.zeros_like(shading_latents)
        kinematics = torch.stack(controls).to(self.device).float()
        video = self._sample(shading_latents, group_controls(kinematics, tf), *refs, steps, guidance, seeds, solver,
                             drop_coefficients=which == "shading")
        return video.permute(0, 2, 1, 3, 4).float().cpu()

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


def _as_video(frames: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(F, C, H, W) frames → (1, C, F, H, W), the codec's layout, on ``device``."""
    return frames.to(device).permute(1, 0, 2, 3).unsqueeze(0)


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

