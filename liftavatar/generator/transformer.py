"""LiftAvatarTransformer: a diffusers ``WanTransformer3DModel`` plus LiftAvatar's controls (DESIGN.md §6).

What is added to the Wan backbone, and why each addition starts at exactly zero:

- **Multi-reference conditioning.** K reference frames (latents + their own shading maps and
  kinematics) are prepended to the target frames as extra latent frames. They are clean, get
  timestep 0 through diffusers' per-token timestep (shape (B, seq_len)), and their outputs are
  dropped: only target tokens are predicted (and trained).
- **Shading maps** (dense control): the shading latents, from the same codec, go through their own
  patch embedding whose weights start at zero and are added to the frame tokens. This is the same
  function as growing the base patch embedding's input channels with zero-initialised weights, but
  leaves the base module untouched, so the sum is *bitwise* the base output at initialisation.
- **Kinematic controls** (fine-grained control): each frame's expression coefficients, head
  rotation (axis-angle) and translation go through an MLP; per latent frame the embedding is
  ``add``-ed to that frame's tokens through a zero-initialised projection, and/or attended to by
  that frame's tokens in a per-block, decoupled cross-attention (``xattn``, IP-Adapter style) whose
  output projection is zero-initialised. ``injection`` picks ``add``, ``xattn`` or ``both``.
- **Prompt.** LiftAvatar uses one fixed prompt, so the model holds a learned prompt embedding (or
  loads a precomputed text-encoder output) and needs no text encoder.

The forward pass re-states ``WanTransformer3DModel.forward`` (diffusers 0.42) step by step, because
the controls enter between its steps; it calls the base model's own modules for every step.
:meth:`LiftAvatarTransformer.set_speed` selects a faster path computing the same function
(liftavatar/generator/speed.py: per-frame timestep modulation, fused LoRA, attention backend,
selective checkpointing, torch.compile); the default is the plain path.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, noop_context_fn

from liftavatar.errors import ConfigError
from liftavatar.io import atomic_write, json_safe, write_json
from liftavatar.generator import speed as fast
from liftavatar.generator.speed import SpeedConfig

Injection = Literal["add", "xattn", "both"]

# WanTransformer3DModel configs. `wan2.1-*` are the published checkpoints' configs (diffusers format);
# `tiny` and `small` are ours: `small` is the embedded default prior's size (pixel codec ×4 → 48 channels).
_WAN_COMMON = dict(patch_size=(1, 2, 2), freq_dim=256, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                   eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
BASE_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(_WAN_COMMON, num_attention_heads=4, attention_head_dim=32, in_channels=48, out_channels=48,
                 text_dim=64, freq_dim=64, ffn_dim=512, num_layers=2),
    "small": dict(_WAN_COMMON, num_attention_heads=6, attention_head_dim=64, in_channels=48, out_channels=48,
                  text_dim=256, ffn_dim=1536, num_layers=8),
    "wan2.1-1.3b": dict(_WAN_COMMON, num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, ffn_dim=8960, num_layers=30),
    "wan2.1-14b": dict(_WAN_COMMON, num_attention_heads=40, attention_head_dim=128, in_channels=16,
                       out_channels=16, text_dim=4096, ffn_dim=13824, num_layers=40),
}
# Control-module sizes per preset: (control MLP width, cross-attention adapter width, prompt tokens).
_CONTROL_SIZES = {"tiny": (64, 64, 4), "small": (256, 128, 8), "wan2.1-1.3b": (512, 512, 16),
                  "wan2.1-14b": (1024, 1024, 16)}

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_NAME = "adapter.safetensors"
SHARD_PATTERN = "model-*-of-*.safetensors"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")


@dataclass
class TransformerConfig:
    """Everything needed to rebuild a LiftAvatarTransformer (saved as the prior's config.json)."""

    base: dict[str, Any]
    """WanTransformer3DModel config."""
    num_controls: int
    """Per-frame kinematic control size: expression coefficients + 3 rotation + 3 translation."""
    injection: Injection = "both"
    control_width: int = 256
    adapter_width: int = 128
    prompt_tokens: int = 8
    preset: str = "custom"
    base_path: str | None = None
    """Where the base weights came from (a LoRA prior needs them again at load time)."""
    lora: dict[str, Any] | None = None
    """peft LoraConfig fields when the base is fine-tuned with LoRA."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form metadata: codec, training summary, expression names."""

    @classmethod
    def from_preset(cls, preset: str, num_controls: int, injection: Injection = "both", **overrides) -> TransformerConfig:
        if preset not in BASE_PRESETS:
            raise ConfigError(f"--preset {preset}: choose one of {', '.join(BASE_PRESETS)}.")
        width, adapter, tokens = _CONTROL_SIZES[preset]
        base = dict(BASE_PRESETS[preset])
        base.update(overrides)
        return cls(base=base, num_controls=num_controls, injection=injection, control_width=width,
                   adapter_width=adapter, prompt_tokens=tokens, preset=preset)


class ControlCrossAttention(nn.Module):
    """Tokens of one latent frame attend to that frame's control embeddings; output starts at zero."""

    def __init__(self, dim: int, control_width: int, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.to_q = nn.Linear(dim, width)
        self.to_k = nn.Linear(control_width, width)
        self.to_v = nn.Linear(control_width, width)
        self.to_out = nn.Linear(width, dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, tokens: torch.Tensor, controls: torch.Tensor) -> torch.Tensor:
        """tokens (N, L, dim), controls (N, G, control_width) → (N, L, dim)."""
        n = tokens.shape[0]
        split = lambda x: x.view(n, x.shape[1], self.heads, -1).transpose(1, 2)  # noqa: E731
        q = split(self.to_q(self.norm(tokens.float()).type_as(tokens)))
        k, v = split(self.to_k(controls)), split(self.to_v(controls))
        out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
        return self.to_out(out.transpose(1, 2).reshape(n, tokens.shape[1], -1))


class LiftAvatarTransformer(nn.Module):
    """Wan2.1 backbone + references, shading and kinematic controls. See the module docstring."""

    def __init__(self, config: TransformerConfig, base: nn.Module | None = None):
        super().__init__()
        from diffusers import WanTransformer3DModel

        if config.injection not in ("add", "xattn", "both"):
            raise ConfigError(f"injection {config.injection!r}: use add, xattn or both.")
        self.config = config
        self.base = base if base is not None else WanTransformer3DModel(**config.base)
        bc = self.base.config
        dim = bc.num_attention_heads * bc.attention_head_dim
        self.inner_dim = dim
        self.shading_embedding = nn.Conv3d(bc.in_channels, dim, kernel_size=tuple(bc.patch_size),
                                           stride=tuple(bc.patch_size), bias=False)
        nn.init.zeros_(self.shading_embedding.weight)
        w = config.control_width
        self.control_encoder = nn.Sequential(nn.Linear(config.num_controls, w), nn.SiLU(), nn.Linear(w, w), nn.SiLU(),
                                             nn.Linear(w, w))
        # Stands in for the control embedding of frames whose controls are dropped (guidance).
        self.null_control = nn.Parameter(torch.zeros(w))
        self.control_to_tokens = None
        if config.injection in ("add", "both"):
            self.control_to_tokens = nn.Linear(w, dim)
            nn.init.zeros_(self.control_to_tokens.weight)
            nn.init.zeros_(self.control_to_tokens.bias)
        self.control_xattn = None
        if config.injection in ("xattn", "both"):
            heads = max(1, config.adapter_width // 64) if config.adapter_width >= 64 else 1
            self.control_xattn = nn.ModuleList(ControlCrossAttention(dim, w, config.adapter_width, heads)
                                               for _ in range(bc.num_layers))
        self.prompt_embedding = nn.Parameter(torch.randn(config.prompt_tokens, bc.text_dim))
        self.gradient_checkpointing = False
        self.speed = SpeedConfig()
        self._compiled: dict = {}
        self._offload: fast.ActivationOffload | None = None

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, preset: str, num_controls: int, injection: Injection = "both", seed: int | None = 0,
                    **overrides) -> LiftAvatarTransformer:
        """A randomly initialised model of a preset (``seed`` makes the initialisation reproducible)."""
        config = TransformerConfig.from_preset(preset, num_controls, injection, **overrides)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return cls(config)

    @classmethod
    def from_base(cls, base_path: str | Path, num_controls: int, injection: Injection = "both",
                  config_dir: str | Path | None = None, seed: int | None = 0) -> LiftAvatarTransformer:
        """Wrap pretrained Wan2.1 weights: a diffusers directory or an original single-file checkpoint."""
        base = load_wan_base(base_path, config_dir)
        preset = next((name for name, c in BASE_PRESETS.items()
                       if all(base.config.get(k) == (tuple(v) if isinstance(v, list) else v)
                              for k, v in c.items() if k in ("num_layers", "num_attention_heads", "ffn_dim"))),
                      "custom")
        width, adapter, tokens = _CONTROL_SIZES.get(preset, (512, 512, 16))
        config = TransformerConfig(base=json_safe(dict(base.config)), num_controls=num_controls, injection=injection,
                                   control_width=width, adapter_width=adapter, prompt_tokens=tokens,
                                   preset=preset, base_path=str(Path(base_path).resolve()))
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            return cls(config, base=base)

    def load_prompt_embedding(self, path: str | Path, trainable: bool = False) -> None:
        """Replace the learned prompt with a precomputed text-encoder output (safetensors key ``prompt_embeds``)."""
        from safetensors.torch import load_file

        try:
            embeds = load_file(str(path))["prompt_embeds"]
        except (OSError, KeyError) as exc:
            raise ConfigError(f"--prompt-embedding {path}: no 'prompt_embeds' tensor in a safetensors file there; "
                              "save the text encoder's output under that key.") from exc
        embeds = embeds.squeeze(0) if embeds.ndim == 3 else embeds
        if embeds.ndim != 2 or embeds.shape[1] != self.base.config.text_dim:
            raise ConfigError(f"--prompt-embedding {path}: shape {tuple(embeds.shape)}, the base expects "
                              f"(tokens, {self.base.config.text_dim}).")
        self.prompt_embedding = nn.Parameter(embeds.float().clone(), requires_grad=trainable)
        self.config.prompt_tokens = embeds.shape[0]

    # ---- LoRA ---------------------------------------------------------------------------------

    def add_lora(self, rank: int = 32, alpha: float | None = None, targets: tuple[str, ...] = LORA_TARGETS) -> None:
        """Inject peft LoRA into the base's attention and FFN projections; freeze the rest of the base.

        Trainable afterwards: the LoRA weights and every LiftAvatar module (shading, controls, prompt).
        """
        from peft import LoraConfig

        lora = dict(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets),
                    init_lora_weights=True)
        self.base.requires_grad_(False)
        self.base.add_adapter(LoraConfig(**lora))  # LoRA weights are created trainable; B starts at zero
        self.config.lora = lora

    @property
    def uses_lora(self) -> bool:
        return self.config.lora is not None

    def merge_lora(self) -> None:
        """Fold the LoRA adapter into the base weights (diffusers' ``fuse_lora``) and remove it: the model computes
        what it computed, as a plain (full) model that saves and loads without its Wan base. A no-op without LoRA."""
        if not self.uses_lora:
            return
        self.base.fuse_lora()
        self.base.unload_lora()
        self.config.lora = None

    def zero_initialised_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The parameters that start at exactly zero so that a new model computes the base's function: LoRA B,
        the shading embedding, the control projection and the adapters' output projections (in
        ``named_parameters`` order). Tests and benchmarks move them so that every path carries signal."""
        for name, param in self.named_parameters():
            if "lora_B" in name or name.startswith(("shading_embedding", "control_to_tokens")) or (
                    "control_xattn" in name and "to_out" in name):
                yield name, param

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint must hold: everything with LoRA off; LoRA + LiftAvatar modules with it on."""
        state = self.state_dict()
        if not self.uses_lora:
            return state
        return {k: v for k, v in state.items() if not k.startswith("base.") or "lora_" in k}

    # ---- save / load --------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Write ``config.json`` + ``model.safetensors`` (or, for a LoRA prior, only the adapter and
        LiftAvatar modules: the base weights stay where ``base_path`` says)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if extra:
            self.config.extra.update(extra)
        state = {k: v.detach().contiguous().cpu() for k, v in self.trainable_state_dict().items()}
        name = ADAPTER_NAME if self.uses_lora else WEIGHTS_NAME
        atomic_write(directory / name, lambda tmp: save_file(state, str(tmp)))
        write_json(directory / CONFIG_NAME, asdict(self.config))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, base_path: str | Path | None = None) -> LiftAvatarTransformer:
        """Load a prior directory written by :meth:`save_pretrained` (``base_path`` overrides the recorded one).

        Every tensor of the prior must find its place in the model its config describes, and every weight the
        model needs from it must be there; a damaged or foreign file is a :class:`ConfigError` naming it."""
        directory = Path(directory)
        config = read_config(directory)
        lora = config.lora
        incomplete = "the prior is incomplete or not of this config; copy or train it again"
        if lora is None:
            weights = directory / WEIGHTS_NAME
            shards = sorted(directory.glob(SHARD_PATTERN))
            if weights.is_file():
                state = read_weights(weights)
            elif shards:  # fp16 shards of a shipped prior (scripts/export_prior.py)
                state = {k: v for shard in shards for k, v in read_weights(shard).items()}
            else:
                raise ConfigError(f"{directory}: no {WEIGHTS_NAME}; pass a prior directory written by `liftavatar train`.")
            config.lora = None
            model = cls(config)
            own = model.state_dict()
            state = {k: v.to(own[k].dtype) if k in own else v for k, v in state.items()}
            load_state_exactly(model, state, weights if weights.is_file() else directory, fix=incomplete)
            return model
        path = base_path or config.base_path
        if not path or not Path(path).exists():
            raise ConfigError(f"{directory} is a LoRA prior of the Wan base at {path!r}, which is not here; "
                              "pass --base PATH to the local Wan2.1 weights it was trained on.")
        config.lora = None
        model = cls(config, base=load_wan_base(path))
        model.add_lora(rank=lora["r"], alpha=lora["lora_alpha"], targets=tuple(lora["target_modules"]))
        weights = directory / ADAPTER_NAME
        if not weights.is_file():
            raise ConfigError(f"{directory}: no {ADAPTER_NAME}; the LoRA prior is incomplete, train it again.")
        # The base's own weights come from the base; the adapter file holds everything else.
        load_state_exactly(model, read_weights(weights), weights, required=model.trainable_state_dict(), fix=incomplete)
        return model

    # ---- forward ------------------------------------------------------------------------------

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def set_speed(self, config: SpeedConfig | None = None, **fields) -> SpeedConfig:
        """Choose how the forward pass runs (see liftavatar/generator/speed.py); returns the new setting.

        ``set_speed()`` restores the plain path; ``set_speed(SpeedConfig.fast())`` or
        ``set_speed(fast_path=True, attention="cudnn", save_attention=10)`` pick the fast one.
        """
        self.speed = replace(config or SpeedConfig(), **fields)
        self._compiled = {}
        self._offload = None
        return self.speed

    def _compiled_fn(self, fn):
        """``fn`` itself, or compiled once per speed setting when ``speed.compile`` asks for it."""
        if not self.speed.compile:
            return fn
        if fn not in self._compiled:
            backend = self.speed.compile if isinstance(self.speed.compile, str) else "inductor"
            # Static shapes: one specialised graph per token count (training runs one shape).
            self._compiled[fn] = torch.compile(fn, backend=backend, dynamic=False)
        return self._compiled[fn]

    def embed_controls(self, controls: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """controls (B, T, G, num_controls) → (B, T, G, control_width); rows with drop[b] use the null embedding."""
        embedded = self.control_encoder(controls.to(self.null_control.dtype))
        if drop is not None:
            embedded = torch.where(drop.view(-1, 1, 1, 1), self.null_control.to(embedded.dtype), embedded)
        return embedded

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        shading: torch.Tensor,
        controls: torch.Tensor,
        ref_latents: torch.Tensor | None = None,
        ref_shading: torch.Tensor | None = None,
        ref_controls: torch.Tensor | None = None,
        drop_controls: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        drop_coefficients: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the flow-matching velocity of the target latents.

        Args:
            latents: (B, C, T, h, w) noisy target latents.
            timestep: (B,) diffusion time in [0, 1000] (σ · 1000).
            shading: (B, C, T, h, w) target shading-map latents (same codec).
            controls: (B, T, G, num_controls) kinematic controls per latent frame (G video frames each,
                see :func:`group_controls`).
            ref_latents, ref_shading: (B, C, K, h, w) clean references and their shading latents.
            ref_controls: (B, K, G, num_controls) the references' own kinematic controls.
            drop_controls: (B,) bool; True drops the target shading and controls (classifier-free
                guidance's unconditional branch). References keep theirs.
            prompt_embeds: (B, S, text_dim) precomputed text states; default: the learned prompt.
            drop_coefficients: (B,) bool; True drops only the target kinematic controls (null embedding)
                and keeps the shading maps: the shading-only ablation (zero ``shading`` for the other one).

        Returns:
            (B, C, T, h, w) velocity for the target frames only.
        """
        base = self.base
        b, _, t, h, w = latents.shape
        p_t, p_h, p_w = base.config.patch_size
        if drop_controls is not None:
            keep = (~drop_controls).view(-1, 1, 1, 1, 1).to(shading.dtype)
            shading = shading * keep
        drop_embedding = drop_controls
        if drop_coefficients is not None:
            drop_embedding = drop_coefficients if drop_controls is None else drop_controls | drop_coefficients
        target_controls = self.embed_controls(controls, drop_embedding)
        k = 0 if ref_latents is None else ref_latents.shape[2]
        if k:
            if ref_shading is None or ref_controls is None:
                raise ConfigError("references need their shading latents and controls too.")
            latents = torch.cat([ref_latents.to(latents.dtype), latents], dim=2)
            shading = torch.cat([ref_shading.to(shading.dtype), shading], dim=2)
            frame_controls = torch.cat([self.embed_controls(ref_controls), target_controls], dim=1)
        else:
            frame_controls = target_controls
        frames = (k + t) // p_t
        tokens_per_frame = (h // p_h) * (w // p_w)
        if prompt_embeds is None:
            prompt_embeds = self.prompt_embedding.unsqueeze(0).expand(b, -1, -1)
        # Two paths compute one function. The plain one below re-states diffusers' forward and runs its blocks as
        # they are, so a wrapped Wan2.1 is bitwise the base at initialisation and follows diffusers' own code; the
        # fast one (speed.py) re-implements the blocks to do less work at real shapes, which only a GPU measures
        # (benchmarks/generator_speed.py), so it cannot be shown here to cost nothing as a switch inside one path.
        # tests/generator/test_speed_paths.py holds them equal (outputs and gradients, every injection, with and
        # without references); test_train_and_sample.py::test_fast_path_trains_the_same_weights, training too.
        if self.speed.fast_path and p_t == 1:
            return self._forward_fast(latents, timestep, shading, frame_controls, prompt_embeds, k, t, h, w)

        rotary_emb = base.rope(latents)
        hidden = base.patch_embedding(latents)
        hidden = hidden + self.shading_embedding(shading.to(hidden.dtype))
        hidden = hidden.flatten(2).transpose(1, 2).contiguous()  # (B, frames · tokens_per_frame, dim)
        if self.control_to_tokens is not None:
            per_frame = self.control_to_tokens(frame_controls.mean(dim=2)).to(hidden.dtype)  # (B, frames, dim)
            hidden = hidden + per_frame.repeat_interleave(tokens_per_frame, dim=1)

        # References sit at timestep 0 (clean); targets at `timestep`. Without references the plain
        # (B,) timestep keeps the base model's exact code path.
        if k:
            per_token = torch.cat([torch.zeros(b, k * tokens_per_frame, device=timestep.device, dtype=timestep.dtype),
                                   timestep.view(b, 1).expand(b, t * tokens_per_frame)], dim=1)
            ts_seq_len = per_token.shape[1]
            flat_timestep = per_token.flatten()
        else:
            ts_seq_len = None
            flat_timestep = timestep
        temb, timestep_proj, encoder_hidden_states, _ = base.condition_embedder(
            flat_timestep, prompt_embeds.to(hidden.dtype), None, timestep_seq_len=ts_seq_len)
        timestep_proj = timestep_proj.unflatten(2, (6, -1)) if ts_seq_len else timestep_proj.unflatten(1, (6, -1))

        xattn_controls = frame_controls.reshape(b * frames, -1, frame_controls.shape[-1])
        for i, block in enumerate(base.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                hidden = checkpoint(block, hidden, encoder_hidden_states, timestep_proj, rotary_emb, use_reentrant=False)
            else:
                hidden = block(hidden, encoder_hidden_states, timestep_proj, rotary_emb)
            if self.control_xattn is not None:
                per_frame_tokens = hidden.reshape(b * frames, tokens_per_frame, -1)
                adapter = self.control_xattn[i]
                if torch.is_grad_enabled() and self.gradient_checkpointing:
                    delta = checkpoint(adapter, per_frame_tokens, xattn_controls, use_reentrant=False)
                else:
                    delta = adapter(per_frame_tokens, xattn_controls)
                hidden = hidden + delta.reshape(hidden.shape).to(hidden.dtype)

        if temb.ndim == 3:
            shift, scale = (base.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (base.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (base.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = base.proj_out(hidden)
        hidden = hidden.reshape(b, frames, h // p_h, w // p_w, p_t, p_h, p_w, -1)
        out = hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return out[:, :, k * p_t:]

    def _forward_fast(self, latents: torch.Tensor, timestep: torch.Tensor, shading: torch.Tensor,
                      frame_controls: torch.Tensor, prompt_embeds: torch.Tensor, k: int, t: int, h: int,
                      w: int) -> torch.Tensor:
        """The rest of :meth:`forward` on the fast path (``latents``/``shading`` already hold the
        references first; patch size 1 in time, so a latent frame is a token group)."""
        base = self.base
        b = latents.shape[0]
        _, p_h, p_w = base.config.patch_size
        frames, tokens_per_frame = k + t, (h // p_h) * (w // p_w)

        rotary_emb = base.rope(latents)
        hidden = base.patch_embedding(latents)
        hidden = hidden + self.shading_embedding(shading.to(hidden.dtype))
        hidden = hidden.flatten(2).transpose(1, 2).contiguous()  # (B, frames · tokens_per_frame, dim)
        dim = hidden.shape[-1]
        if self.control_to_tokens is not None:
            per_frame = self.control_to_tokens(frame_controls.mean(dim=2)).to(hidden.dtype)  # (B, frames, dim)
            hidden = (hidden.view(b, frames, tokens_per_frame, dim) + per_frame.unsqueeze(2)).view(b, -1, dim)

        # One timestep per latent frame (references 0, targets t) instead of one per token.
        if k:
            per_frame_t = torch.cat([torch.zeros(b, k, device=timestep.device, dtype=timestep.dtype),
                                     timestep.view(b, 1).expand(b, t)], dim=1)
            temb, modulation, context, _ = base.condition_embedder(
                per_frame_t.flatten(), prompt_embeds.to(hidden.dtype), None, timestep_seq_len=frames)
            modulation = modulation.unflatten(2, (6, -1))  # (B, frames, 6, dim)
        else:
            temb, modulation, context, _ = base.condition_embedder(timestep, prompt_embeds.to(hidden.dtype), None)
            temb, modulation = temb.unsqueeze(1), modulation.unflatten(1, (6, -1)).unsqueeze(1)  # one group

        controls = None
        if self.control_xattn is not None:
            controls = frame_controls.reshape(b * frames, -1, frame_controls.shape[-1])
        speed = self.speed
        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
        offload = None
        if checkpointing and speed.offload_activations:
            offload = self._offload = self._offload or fast.ActivationOffload()
        shared = (context, modulation, controls, *rotary_emb)
        with offload.hooks([*self.parameters(), *shared]) if offload else contextlib.nullcontext():
            hidden = self._blocks(hidden, context, modulation, rotary_emb, frames, controls, checkpointing, offload)

        # Output head on the target tokens only.
        hidden = hidden[:, k * tokens_per_frame:]
        groups = temb.shape[1]
        shift, scale = (base.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)  # (B, G, 1, dim)
        if groups > 1:
            shift, scale, groups = shift[:, k:], scale[:, k:], t
        normed = base.norm_out(hidden.float())
        hidden = (normed.view(b, groups, -1, dim) * (1 + scale) + shift).view(normed.shape).type_as(hidden)
        hidden = base.proj_out(hidden)
        hidden = hidden.reshape(b, t, h // p_h, w // p_w, 1, p_h, p_w, -1)
        return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def _blocks(self, hidden, context, modulation, rotary_emb, frames: int, controls, checkpointing: bool,
                offload: fast.ActivationOffload | None) -> torch.Tensor:
        """The transformer blocks (each with its control adapter) on the fast path."""
        speed = self.speed
        for i, block in enumerate(self.base.blocks):
            adapter = self.control_xattn[i] if self.control_xattn is not None else None
            args = (block, adapter, hidden, context, modulation, rotary_emb, frames, controls)
            if not checkpointing:
                hidden = fast.run_unit(self._compiled_fn(fast.block_unit), speed.attention, *args)
                continue
            if offload is not None:
                offload.unit = i if i < speed.offload_activations else None
            save_keys = hidden.shape[1] if i < speed.save_attention else 0
            if speed.compile and speed.compile_scope == "checkpoint":
                hidden = fast.run_unit(self._compiled_fn(fast.checkpointed_unit(save_keys)), speed.attention, *args)
            else:
                context_fn = fast.save_attention_context(save_keys) if save_keys else noop_context_fn
                hidden = checkpoint(fast.run_unit, self._compiled_fn(fast.block_unit), speed.attention, *args,
                                    use_reentrant=False, context_fn=context_fn)
        return hidden

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def group_controls(controls: torch.Tensor, temporal_factor: int) -> torch.Tensor:
    """Per-video-frame controls (B, F, D) → per-latent-frame groups (B, T, G, D), G = ``temporal_factor``.

    Latent frame 0 covers video frame 0 alone (Wan's causal VAE), later ones ``temporal_factor``
    frames each; short groups repeat their last frame.
    """
    from liftavatar.generator.codec import frame_groups

    if temporal_factor == 1:
        return controls.unsqueeze(2)
    groups = frame_groups(controls.shape[1], temporal_factor)
    index = torch.tensor([g + [g[-1]] * (temporal_factor - len(g)) for g in groups], device=controls.device)
    return controls[:, index]


def load_wan_base(path: str | Path, config_dir: str | Path | None = None):
    """A ``WanTransformer3DModel`` from a local diffusers directory (``from_pretrained``; a full
    pipeline folder's ``transformer/`` is found too) or an original single-file checkpoint
    (``from_single_file``, with ``config_dir`` or a ``config.json`` beside the file giving its config)."""
    from diffusers import WanTransformer3DModel

    path = Path(path)
    if path.is_dir():
        for candidate in (path, path / "transformer"):
            if (candidate / "config.json").is_file():
                return WanTransformer3DModel.from_pretrained(candidate, local_files_only=True)
        raise ConfigError(f"--base {path}: no config.json there or in {path}/transformer; pass a diffusers-format "
                          "Wan2.1 directory or an original .safetensors checkpoint.")
    if path.is_file():
        config_dir = Path(config_dir) if config_dir else path.parent
        if not (config_dir / "config.json").is_file():
            raise ConfigError(f"--base {path}: a single-file checkpoint needs its diffusers config.json beside it "
                              "(or --base-config DIR); copy the transformer config of the matching Wan2.1 release.")
        return WanTransformer3DModel.from_single_file(str(path), config=str(config_dir), local_files_only=True)
    raise ConfigError(f"--base {path}: no such file or directory; pass a local Wan2.1 checkpoint.")


def read_config(directory: str | Path) -> TransformerConfig:
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise ConfigError(f"--prior {directory}: no such directory; pass a prior written by `liftavatar train`.")
    if not path.is_file():
        raise ConfigError(f"{directory}: no {CONFIG_NAME}; pass a prior directory written by `liftavatar train`.")
    try:
        data = json.loads(path.read_text())
        data["base"]["patch_size"] = tuple(data["base"]["patch_size"])
        return TransformerConfig(**data)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a LiftAvatar prior config ({exc}); train the prior again.") from exc


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, truncated or corrupt file is a :class:`ConfigError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{path}: not a readable safetensors file ({exc}); the file is damaged or truncated, "
                          "copy it again (or train again).") from None


def _names(keys: list[str], shown: int = 3) -> str:
    more = f", … ({len(keys)} in all)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def load_state_exactly(model: nn.Module, state: Mapping[str, torch.Tensor], source: str | Path,
                       required: Iterable[str] | None = None, fix: str = "the weights are not of this model") -> None:
    """Load ``state`` into ``model`` so that nothing is dropped silently (``load_state_dict(strict=False)`` drops
    what it cannot place): every tensor of ``state`` must have a place of its shape in the model, and every key
    of ``required`` (default: all of the model's) must be in ``state``. Otherwise a :class:`ConfigError`
    ``"{source}: <what, naming the keys>; {fix}."``."""
    own = model.state_dict()
    foreign = [k for k in state if k not in own]
    if foreign:
        raise ConfigError(f"{source}: {len(foreign)} weights have no place in this model ({_names(foreign)}); {fix}.")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ConfigError(f"{source}: weight {key} has shape {tuple(value.shape)}, the model expects "
                              f"{tuple(own[key].shape)} (another shape); {fix}.")
    missing = [k for k in (own if required is None else required) if k not in state]
    if missing:
        raise ConfigError(f"{source}: {len(missing)} weights missing ({_names(missing)}); {fix}.")
    model.load_state_dict(state, strict=False)
