"""Flow-matching trainer for the LiftAvatar generator (`liftavatar train`).

Rectified flow: ``x_t = (1 − σ) x_0 + σ ε``, the model predicts ``v = ε − x_0`` and the loss is the
MSE over target tokens only (references are in context, never predicted). σ is drawn logit-normal
and shifted (``σ' = s σ / (1 + (s − 1) σ)``, as SD3 / Wan). The target shading and kinematic
controls are dropped together with probability ``control_dropout`` so the sampler can guide.

accelerate does devices, mixed precision, gradient accumulation and multi-process training (DDP /
FSDP2 under ``accelerate launch``, configs in ``configs/accelerate/``, docs/multi_gpu.md). Exact resume:
every random draw of step *s* comes from a generator seeded by ``(seed, s)``, the data stream is a
pure function of the clip index, and a checkpoint holds the trainable weights, optimizer, LR
scheduler, EMA and step — so ``--resume`` continues bit-for-bit (a CPU test checks 4 straight steps
against 2 + resume + 2).

Process-count independence: ``--batch-size`` is per process, the *global* batch of a step is
``batch_size × processes``, and every draw is made for the global batch — the clip indices (Captures),
the noise, σ and the control dropout — of which process *p* takes rows ``p·B … p·B + B − 1``. So P
processes × batch B train on exactly the samples and noise of 1 process × batch P·B, the weights agree
to float rounding, and a checkpoint written by P processes resumes on Q processes (same global batch)
as if never interrupted (CPU tests check both over DDP and FSDP2). With one process every draw is
what it always was. The synthetic stream is layout-independent when the per-process batch is a
multiple of ``--clips-per-subject`` and ``--data-workers`` ≤ 1 (its batch *b* is a run of whole
subject draws); otherwise it is an equally valid but different sample of the same distribution.

Under FSDP2 (``configs/accelerate/fsdp_14b.yaml``): the model and optimizer are prepared together;
with ``fsdp_cpu_ram_efficient_loading`` only rank 0 builds (or loads) the weights and the other ranks
build an empty replica of its config that accelerate fills by broadcast; a LoRA run keeps the frozen
base in bf16 under bf16 mixed precision; activation checkpointing is the config's (whole
``WanTransformerBlock``s), so ``--gradient-checkpointing`` is not applied twice; checkpoints and the
final prior are gathered to rank 0 through ``torch.distributed.checkpoint`` (see checkpoint.py); the
EMA is kept *sharded* like the parameters it follows (each process averages its own shard, no
communication per step) and is gathered only when written.
"""

from __future__ import annotations

import copy
import logging
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, Protocol

import numpy as np
import torch
from tqdm import tqdm

from liftavatar.errors import ConfigError
from liftavatar.generator.checkpoint import (
    complete_checkpoints,
    full_tensors,
    gather_model_state,
    gather_optimizer_state,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
    shard_like,
)
from liftavatar.generator.codec import CodecConfig, build_codec
from liftavatar.generator.data import (
    CaptureClips,
    SyntheticBatches,
    SyntheticDataConfig,
    as_float_images,
    collate,
)
from liftavatar.generator.inputs import num_controls
from liftavatar.generator.speed import SpeedConfig
from liftavatar.generator.transformer import (
    LiftAvatarTransformer,
    TransformerConfig,
    group_controls,
    load_state_exactly,
)
from liftavatar.io import json_safe, write_json

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """`liftavatar train`: one typed config (saved next to the outputs)."""

    out: Path
    """Run directory: checkpoints/, logs/ (TensorBoard), prior/ (the final prior), loss.png."""
    preset: str = "small"
    """Backbone preset: tiny, small, wan2.1-1.3b, wan2.1-14b (random init unless --base)."""
    base: Path | None = None
    """Local Wan2.1 transformer weights: a diffusers directory or an original single-file checkpoint."""
    base_config: Path | None = None
    """Directory holding the diffusers config.json of a single-file --base."""
    init_from: Path | None = None
    """Start from this prior's weights (a warm start; ignored when resuming a checkpoint)."""
    prompt_embedding: Path | None = None
    """A precomputed text-encoder output (safetensors, key 'prompt_embeds', shape (S, text_dim)), e.g. umT5 of
    the fixed prompt for a real Wan2.1 base; kept frozen. Default: a learned prompt embedding."""
    train_mode: Literal["full", "lora"] = "full"
    """full: train every weight (a preset from scratch); lora: peft LoRA on the base + the new modules."""
    lora_rank: int = 32
    injection: Literal["add", "xattn", "both"] = "both"
    """How expression controls enter: added to frame tokens, per-frame cross-attention, or both."""
    codec: Literal["pixel", "wan-vae"] = "pixel"
    pixel_factor: int = 4
    vae: Path | None = None
    """Local diffusers AutoencoderKLWan directory (codec wan-vae)."""
    captures: list[Path] = field(default_factory=list)
    """Train on these Captures; empty: the synthetic stream."""
    captures_in_memory: bool = True
    """Decode the captures' frames once and keep them in memory (112 KiB a frame at 128²) rather than read their
    PNGs for every clip drawn; --no-captures-in-memory for captures too large to hold."""
    synthetic_share: float = 0.0
    """With --captures: this share of every batch's clips comes from the synthetic stream (--seed-range), the rest
    from the captures; 0 trains on the captures alone. A generic prior that has seen real people keeps learning the
    synthetic world's controls (exact shading and coefficients) while it learns real faces (issue 20)."""
    pools: list[Path] = field(default_factory=list)
    """Optional reference pools, one per capture (same subject)."""
    capture_references: Literal["whole", "other-half"] = "other-half"
    """Where a capture clip's K references come from: the other half of its capture in time (no clip holds one
    of its own references to copy, as at lift time), or the whole capture (CaptureClips says why the default)."""
    capture_color_jitter: float = 0.0
    """With --captures: each capture clip's frames and references are multiplied by one per-channel gain drawn
    in [1 - j, 1 + j] (the same for the clip's targets and its references, so the model still takes colour from
    the references): more apparent people and lights out of a few real clips."""
    frames: int = 8
    refs: int = 5
    ref_method: str = "kmeans"
    size: int = 128
    seed_range: tuple[int, int] = (100_000, 200_000)
    """Synthetic training subjects' seeds [low, high)."""
    steps: int = 1000
    batch_size: int = 8
    """Clips per process and step; the global batch is this × the number of processes."""
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 100
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """After warmup: constant, or cosine decay to a tenth of --lr at --steps."""
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    """Default: the `accelerate launch` config's (bf16 in configs/accelerate/fsdp_14b.yaml), else no."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    """σ shift (1 = none; Wan uses 3–5 at high resolution)."""
    control_dropout: float = 0.1
    gradient_checkpointing: bool = False
    fast_path: bool = False
    """Run the transformer's fast path (liftavatar/generator/speed.py: per-frame timestep modulation,
    one checkpoint per block, fused LoRA); equal to the plain path up to float rounding."""
    attention: Literal["default", "cudnn", "flash", "efficient", "math"] = "default"
    """Preferred attention backend on the fast path."""
    compile: bool = False
    """torch.compile the fast path's checkpointed block unit (benchmarks/results/generator_speed.json)."""
    save_attention: int = 0
    """With gradient checkpointing on the fast path: the first N blocks keep their self-attention output."""
    offload_activations: int = 0
    """With --compile and gradient checkpointing: what the first N blocks keep for the backward pass waits
    in pinned host memory (with --save-attention, less recomputation at no more GPU memory)."""
    ema: float | None = None
    """EMA decay (e.g. 0.999); the final prior takes the EMA weights."""
    save_every: int = 500
    log_every: int = 10
    seed: int = 0
    resume: bool = False
    stop_after: int | None = None
    """End this run after this many steps (checkpointed; --resume continues): time-sliced jobs."""
    time_limit_min: float | None = None
    """End this run after this many minutes (checkpointed; --resume continues)."""
    device: str | None = None
    """Render / train device (default: accelerate's choice)."""
    subject_pool: int | None = None
    """Keep this many synthetic subjects in memory (default 256)."""
    clips_per_subject: int = 4
    """Synthetic clips rendered per subject draw."""
    data_workers: int = 0
    """Worker processes rendering synthetic batches (each renders on --device; 0: in the training loop)."""


def mixed_rows(config: TrainConfig) -> int:
    """How many of a batch's clips come from the synthetic stream when training on captures
    (``synthetic_share`` × batch size, rounded, at least one and at most all but one); 0 without a mix."""
    share = config.synthetic_share
    if not 0 <= share < 1:
        raise ConfigError(f"--synthetic-share {share}: give a share in [0, 1) (0 trains on the captures alone).")
    if not share:
        return 0
    if not config.captures:
        raise ConfigError("--synthetic-share mixes the synthetic stream into --captures; pass captures, or leave it "
                          "out to train on the synthetic stream alone.")
    if config.batch_size < 2:
        raise ConfigError(f"--synthetic-share needs --batch-size 2 or more (one clip of each kind); got "
                          f"{config.batch_size}.")
    return min(config.batch_size - 1, max(1, round(share * config.batch_size)))


def check_capture_size(dataset: CaptureClips, size: int) -> None:
    """Captures mixed with the synthetic stream must be at its resolution (``--size``): their clips share batches."""
    for capture in dataset.captures:
        if capture.size != (size, size):
            h, w = capture.size
            raise ConfigError(f"{capture.path}: {w}×{h} frames, but this run trains at --size {size}; track the clip "
                              f"with `liftavatar track CLIP --size {size}` or pass --size {h}.")


def concat_batches(*batches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One batch of the clips of several (the same keys), images as float in [0, 1] on the CPU: the synthetic
    stream gives 8-bit images, captures float ones."""
    def rows(key: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        value = batch[key].cpu()
        return value if key.endswith("controls") else as_float_images(value)

    keys = batches[0].keys()
    if any(b.keys() != keys for b in batches):
        raise ValueError(f"batches with different keys: {[sorted(b) for b in batches]}")
    return {key: torch.cat([rows(key, b) for b in batches]) for key in keys}


def sample_sigmas(generator: torch.Generator, n: int, mean: float, std: float, shift: float) -> torch.Tensor:
    """Logit-normal σ in (0, 1), then shifted: ``s σ / (1 + (s − 1) σ)``."""
    sigma = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=generator.device))
    return shift * sigma / (1 + (shift - 1) * sigma)


class FlowSettings(Protocol):
    """What the rectified-flow loss reads of a config (:class:`TrainConfig`, the adaptation's config)."""

    logit_mean: float
    logit_std: float
    shift: float
    control_dropout: float


class ScheduleSettings(Protocol):
    """What the learning-rate schedule reads of a config (:class:`TrainConfig`, the adaptation's config)."""

    warmup: int
    lr_schedule: str
    steps: int


def lr_factor(step: int, config: ScheduleSettings) -> float:
    """Linear warmup, then constant or cosine decay to 0.1 at ``config.steps``."""
    warm = min(1.0, (step + 1) / max(1, config.warmup))
    if config.lr_schedule == "constant":
        return warm
    progress = min(1.0, step / max(1, config.steps))
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def encode_clips(batch: dict[str, torch.Tensor], codec, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The model's inputs from a batch of clips (the keys of :mod:`liftavatar.generator.data`, (B, F, C, H, W)
    images float in [0, 1] or 8-bit), on ``device``, without gradients: ``x0`` and ``shading`` (codec latents of
    the targets and their shading maps), ``ref_latents`` and ``ref_shading`` (each reference its own one-frame
    latent), ``controls`` grouped by the codec's frame groups and ``ref_controls`` (each reference's repeated over
    a group). Only the keys the batch holds are encoded, so fixed inputs (the references of one capture) can be
    encoded once and reused."""
    to5 = lambda x: as_float_images(x.to(device)).permute(0, 2, 1, 3, 4)  # noqa: E731  (B, F, C, H, W) → (B, C, F, H, W)
    tf = codec.temporal_factor
    out = {}
    with torch.no_grad():
        for key, name, encode in (("frames", "x0", codec.encode), ("shading", "shading", codec.encode),
                                  ("ref_frames", "ref_latents", codec.encode_frames),
                                  ("ref_shading", "ref_shading", codec.encode_frames)):
            if key in batch:
                out[name] = encode(to5(batch[key]))
    if "controls" in batch:
        out["controls"] = group_controls(batch["controls"].to(device), tf)
    if "ref_controls" in batch:
        # Each reference is its own one-frame latent, so its control group is that frame repeated.
        out["ref_controls"] = group_controls(batch["ref_controls"].to(device), 1).expand(-1, -1, tf, -1)
    return out


def draw_flow_noise(generator: torch.Generator, shape: tuple[int, ...], config: FlowSettings,
                    global_batch: int | None = None, offset: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noise, σ, control dropout) for a batch of latents of ``shape`` (B, C, F, h, w), in this order from
    ``generator``: drawn for ``global_batch`` clips (default: B) of which this batch takes rows ``offset …``."""
    b = shape[0]
    n = global_batch or b
    rows = slice(offset, offset + b)
    noise = torch.randn((n, *shape[1:]), generator=generator, device=generator.device)[rows]
    sigma = sample_sigmas(generator, n, config.logit_mean, config.logit_std, config.shift)[rows]
    drop = (torch.rand(n, generator=generator, device=generator.device) < config.control_dropout)[rows]
    return noise, sigma, drop


def velocity_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], noise: torch.Tensor, sigma: torch.Tensor,
                  drop: torch.Tensor) -> torch.Tensor:
    """The rectified-flow MSE of ``model`` on encoded clips (:func:`encode_clips`) for given draws:
    ``x_t = (1 − σ) x_0 + σ ε``, target ``ε − x_0``, target tokens only."""
    x0 = inputs["x0"]
    s = sigma.view(x0.shape[0], 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    pred = model(xt, sigma * 1000, inputs["shading"], inputs["controls"], inputs["ref_latents"],
                 inputs["ref_shading"], inputs["ref_controls"], drop_controls=drop)
    return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())


def flow_matching_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], codec, generator: torch.Generator,
                       config: FlowSettings, global_batch: int | None = None, offset: int = 0) -> torch.Tensor:
    """One rectified-flow loss on a batch of clips (see the module docstring).

    The noise, σ and dropout are drawn for ``global_batch`` clips (default: this batch's) and this batch
    takes rows ``offset …``: every process of a multi-process step draws the same global numbers."""
    inputs = encode_clips(batch, codec, next(model.parameters()).device)
    return velocity_loss(model, inputs, *draw_flow_noise(generator, tuple(inputs["x0"].shape), config,
                                                         global_batch, offset))


def build_model(config: TrainConfig, n_controls: int) -> LiftAvatarTransformer:
    """The model a run starts from: a preset or ``--base``, warm-started from ``--init-from`` (every tensor of
    that prior loaded, see :func:`warm_start`), with ``--prompt-embedding`` and LoRA applied."""
    start = None
    if config.init_from is not None:
        start = LiftAvatarTransformer.from_pretrained(config.init_from, base_path=config.base)
    base, base_config = config.base, config.base_config
    if base is None and start is not None and start.uses_lora:
        # A LoRA prior is an adapter of the base it records (from_pretrained found it there): build on that base,
        # so the adapter continues where it was trained and the new prior records the base again.
        base, base_config = start.config.base_path, None
    if base is not None:
        model = LiftAvatarTransformer.from_base(base, n_controls, config.injection, base_config, seed=config.seed)
    else:
        overrides = {}
        if config.codec == "pixel":
            overrides = dict(in_channels=3 * config.pixel_factor ** 2, out_channels=3 * config.pixel_factor ** 2)
        model = LiftAvatarTransformer.from_preset(config.preset, n_controls, config.injection, seed=config.seed,
                                                  **overrides)
    if start is not None:
        warm_start(model, start, config)
    if config.prompt_embedding is not None:
        model.load_prompt_embedding(config.prompt_embedding)
    if config.train_mode == "lora" and not model.uses_lora:
        model.add_lora(config.lora_rank)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def warm_start(model: LiftAvatarTransformer, start: LiftAvatarTransformer, config: TrainConfig) -> None:
    """Load every tensor of the prior ``start`` into the new ``model`` (built without LoRA), or raise a
    :class:`ConfigError` naming the tensors that have no place in it (another preset, injection or codec).

    A LoRA prior continues as a LoRA run: ``model`` gets an adapter of the prior's rank and targets and its
    weights. Into a full run, a LoRA prior's adapter is merged into the base weights first (diffusers'
    ``fuse_lora``), so the run starts from the function the prior computes. A full prior loads as it is; a
    LoRA run adds its fresh adapter afterwards (LoRA B starts at zero, so the function is the prior's)."""
    source = f"--init-from {config.init_from}"
    if start.uses_lora:
        lora = start.config.lora
        if config.train_mode == "lora":
            if lora["r"] != config.lora_rank:
                raise ConfigError(f"{source}: a LoRA prior of rank {lora['r']}, but this run asks for --lora-rank "
                                  f"{config.lora_rank}; pass --lora-rank {lora['r']} to continue its adapter.")
            model.add_lora(rank=lora["r"], alpha=lora["lora_alpha"], targets=tuple(lora["target_modules"]))
        else:
            start.merge_lora()
    state = start.state_dict()
    prompt = state.get("prompt_embedding")
    if prompt is not None and prompt.shape != model.prompt_embedding.shape \
            and prompt.shape[1:] == model.prompt_embedding.shape[1:]:
        # The number of prompt tokens is the prior's (a precomputed text-encoder output has its own), not the preset's.
        model.prompt_embedding = torch.nn.Parameter(prompt.clone())
        model.config.prompt_tokens = prompt.shape[0]
    load_state_exactly(model, state, source, fix="start from a prior of the same preset (or --base), injection "
                                                 "and codec, or train without --init-from")


def build_distributed_model(accelerator, config: TrainConfig, n_controls: int) -> LiftAvatarTransformer:
    """:func:`build_model` as a (multi-process) run needs it, before ``accelerator.prepare``.

    Not under FSDP: every process builds the model. Under FSDP2: with ``fsdp_cpu_ram_efficient_loading``
    only rank 0 builds (or loads) the weights and the others get an empty replica of its structure that
    accelerate fills by broadcast; activation checkpointing is the config's, not ours on top; a LoRA run
    under bf16 keeps the frozen base in bf16 (FSDP's mixed precision computes it in bf16 anyway)."""
    from accelerate.utils import DistributedType

    main = accelerator.is_main_process
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    plugin = accelerator.state.fsdp_plugin if fsdp else None
    # Under FSDP with cpu_ram_efficient_loading only rank 0 holds real weights before sharding.
    replica = fsdp and plugin.cpu_ram_efficient_loading and accelerator.num_processes > 1
    model = build_model(config, n_controls) if main or not replica else None
    if replica:
        model = _replicate_structure(accelerator, model, config)
    if fsdp:
        if plugin.activation_checkpointing and model.gradient_checkpointing:
            model.gradient_checkpointing = False
            if main:
                logger.info("activation checkpointing: the FSDP config's (whole WanTransformerBlocks); "
                      "--gradient-checkpointing is not applied on top")
        if accelerator.mixed_precision == "bf16" and config.train_mode == "lora":
            for name, p in model.named_parameters():  # the frozen base is computed in bf16 anyway
                if name.startswith("base.") and not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        wrap = plugin.transformer_cls_names_to_wrap
        if wrap:  # e.g. ControlCrossAttention, absent with --injection add: accelerate would refuse the config
            present = {type(m).__name__ for m in model.modules()}
            plugin.transformer_cls_names_to_wrap = [name for name in wrap if name in present]
        if plugin.cpu_ram_efficient_loading and not hasattr(model, "get_parameter_or_buffer"):
            # accelerate 1.15's fsdp2_load_full_state_dict looks each weight up with transformers'
            # `get_parameter_or_buffer` and, failing that, splits the name at its last dot — which fails
            # for a top-level parameter such as `null_control` (ValueError). nn.Module's own lookups do it.
            model.get_parameter_or_buffer = _parameter_or_buffer(model)
    return model


def prior_metadata(config: dict[str, Any], step: int, history: list[list[float]],
                   expression_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """What a prior records of its training (its config.json ``extra``), from a JSON-safe TrainConfig dict."""
    return {"codec": asdict(CodecConfig(config["codec"], config["pixel_factor"], config["vae"])),
            "frames": config["frames"], "refs": config["refs"], "size": config["size"], "shift": config["shift"],
            "expression_names": list(expression_names), "steps": step, "seed_range": list(config["seed_range"]),
            "final_loss": history[-1][1] if history else None}


class StopFlag:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the end of the step and stops."""

    def __init__(self):
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.stop = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train(config: TrainConfig, progress: bool = True) -> Path | None:
    """Train; returns the final prior directory (``out/prior``), or None when this run ended early
    at ``stop_after`` / ``time_limit_min`` (checkpointed). Resumable with ``config.resume``, under any
    number of processes (see the module docstring)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    from liftavatar.face.rig import FaceRig

    out = Path(config.out)
    ckpt_dir = out / "checkpoints"
    existing = complete_checkpoints(ckpt_dir)
    if existing and not config.resume:
        raise ConfigError(f"{out} already holds checkpoints; pass --resume to continue them or choose another --out.")
    if config.codec == "wan-vae" and (config.frames - 1) % 4:
        raise ConfigError(f"--frames {config.frames}: the Wan VAE needs 4n + 1 frames (e.g. 9 or 17).")
    if config.grad_accum < 1 or config.batch_size < 1:
        raise ConfigError("--batch-size and --grad-accum must be at least 1.")
    synthetic_rows = mixed_rows(config)
    if not 0 <= config.capture_color_jitter < 1:
        raise ConfigError(f"--capture-color-jitter {config.capture_color_jitter}: give a gain spread in [0, 1) "
                          "(0.1 multiplies each channel by 0.9 to 1.1).")

    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              cpu=config.device == "cpu")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("DeepSpeed is not supported by `liftavatar train`; launch with configs/accelerate/"
                          "fsdp_14b.yaml (FSDP2) or configs/accelerate/ddp.yaml instead.")
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if fsdp and not accelerator.is_fsdp2:
        raise ConfigError("FSDP1 is not supported by `liftavatar train`; set `fsdp_version: 2` in the accelerate "
                          "config (as configs/accelerate/fsdp_14b.yaml does).")
    procs, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    global_batch = config.batch_size * procs
    device = accelerator.device
    set_seed(config.seed)
    rig = FaceRig.load()
    n_controls = num_controls(rig.num_expressions)
    codec = build_codec(CodecConfig(config.codec, config.pixel_factor, str(config.vae) if config.vae else None))
    codec.to(device)

    model = build_distributed_model(accelerator, config, n_controls)
    # Every rank, after the model exists and before accelerate wraps it (FSDP shards the blocks it runs);
    # the defaults are the plain path.
    model.set_speed(SpeedConfig(fast_path=config.fast_path, attention=config.attention, compile=config.compile,
                                save_attention=config.save_attention, offload_activations=config.offload_activations))
    trainable_keys = list(model.trainable_state_dict())
    frozen_names = {n for n, p in model.named_parameters() if not p.requires_grad}
    # Frozen tensors a prior must hold (a precomputed prompt embedding): never change, kept as they are.
    frozen_kept = {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()
                   if k in frozen_names} if main else {}
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    # Not prepared by accelerate: its scheduler wrapper steps once per process (the LR schedule would
    # run P times too fast); stepped here once per optimizer step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))

    # This process's GPU (cuda:k under a multi-GPU launch), not cuda:0 for every rank's renderer.
    render_device = config.device or ((str(device) if procs > 1 else "cuda") if device.type == "cuda" else "cpu")
    dataset, synthetic = None, None
    if config.captures:
        dataset = CaptureClips(config.captures, config.frames, config.refs, config.ref_method,
                               config.pools or None, seed=config.seed, in_memory=config.captures_in_memory,
                               references=config.capture_references)
        if synthetic_rows:
            check_capture_size(dataset, config.size)
        if main:
            for note in dataset.notes:
                logger.info(note)
    if not config.captures or synthetic_rows:
        synthetic = SyntheticDataConfig(
            seed_range=tuple(config.seed_range), frames=config.frames, refs=config.refs, size=config.size,
            ref_method=config.ref_method, stream_seed=config.seed, clips_per_subject=config.clips_per_subject,
            subject_cache=config.subject_pool or 256, identity_shards=max(1, config.data_workers))

    start_step, history, ckpt = 0, [], None
    if existing:
        ckpt = load_checkpoint(existing[-1])
        if not any(p.is_meta for p in model.parameters()):  # an empty replica gets rank 0's weights
            load_state_exactly(model, ckpt["model"], existing[-1], required=trainable_keys,
                               fix=f"resume with the settings {out} was started with (its train_config.json), "
                                   "or choose another --out")
        start_step, history = ckpt["step"], ckpt.get("history", [])
        if main:
            logger.info(f"resuming {out} from step {start_step}")
            written = ckpt.get("global_batch")
            if written is not None and written != global_batch:
                logger.warning(f"note: the checkpoint was written with a global batch of {written} "
                      f"({ckpt.get('processes')} process(es)); this run's is {global_batch} "
                      f"({procs} × {config.batch_size}), so the continuation differs from an uninterrupted "
                      "run; keep --batch-size × processes equal to continue it exactly.")
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP2 replaced them by sharded ones
    if ckpt is not None:
        load_optimizer_state(unwrapped, optimizer.optimizer, ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])

    ema_state = None
    if config.ema:
        # On the training device in fp32, sharded like the parameters under FSDP: a per-step copy to host
        # memory cost ~45 ms of a 270 ms step (small preset, batch 32, H100).
        ema_state = {k: v.detach().float().clone() for k, v in unwrapped.trainable_state_dict().items()}
        if ckpt is not None and ckpt["ema"] is not None:
            ema_state = shard_like(ckpt["ema"], ema_state)

    if progress and main:
        logger.info(f"LiftAvatarTransformer ({n_trainable / 1e6:.2f} M trainable) on "
              f"{accelerator.num_processes} "
              f"process(es), {accelerator.distributed_type.value}, {device}, precision {accelerator.mixed_precision}"
              + (f", global batch {global_batch}" if procs > 1 else ""))
    batches = None
    if synthetic is not None:
        # Batch index of (step, micro, process): a pure function, so resume needs only the step.
        source = SyntheticBatches(synthetic, synthetic_rows or config.batch_size, render_device,
                                  first=start_step * config.grad_accum * procs, stride=procs, offset=rank)
        if config.data_workers > 0:
            batches = iter(torch.utils.data.DataLoader(
                source, batch_size=None, num_workers=config.data_workers, multiprocessing_context="spawn",
                prefetch_factor=4, pin_memory=torch.cuda.is_available(), worker_init_fn=_single_threaded_worker))
        else:
            batches = iter(source)

    def capture_rows(step: int, micro: int, rows: int) -> dict[str, torch.Tensor]:
        # The global batch's clip indices, drawn alike on every process; this process takes its rows.
        g = torch.Generator().manual_seed(step_seed(config.seed, step, 1000 + micro))
        idx = torch.randint(len(dataset), (rows * procs,), generator=g)
        gains = 1 + config.capture_color_jitter * (2 * torch.rand(rows * procs, 1, 3, 1, 1, generator=g) - 1)
        batch = collate([dataset[i] for i in idx[rank * rows:(rank + 1) * rows].tolist()])
        if config.capture_color_jitter:
            mine = gains[rank * rows:(rank + 1) * rows]
            for key in ("frames", "ref_frames"):
                batch[key] = (batch[key] * mine).clamp(0, 1)
        return batch

    def next_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        if dataset is None:
            return next(batches)
        if not synthetic_rows:
            return capture_rows(step, micro, config.batch_size)
        return concat_batches(capture_rows(step, micro, config.batch_size - synthetic_rows), next(batches))

    (out / "logs").mkdir(parents=True, exist_ok=True)
    if main:
        write_json(out / "train_config.json", asdict(config))
    writer = _tensorboard(out / "logs") if main else None

    def weights_to_save() -> dict[str, torch.Tensor]:
        """The trainable state dict, whole, on rank 0 (a collective under FSDP; {} on other ranks)."""
        if not fsdp:
            return unwrapped.trainable_state_dict() if main else {}
        state = gather_model_state(unwrapped, trainable_keys)
        return {**frozen_kept, **state} if main else {}

    def checkpoint_now(step: int) -> None:
        model_state = weights_to_save()
        optimizer_state = gather_optimizer_state(unwrapped, optimizer.optimizer)
        ema = None if ema_state is None else full_tensors(ema_state)
        if main:
            save_checkpoint(ckpt_dir, model_state, optimizer_state, scheduler.state_dict(), step,
                            {"history": history, "config": json_safe(asdict(config)), "processes": procs,
                             "global_batch": global_batch}, ema)
        accelerator.wait_for_everyone()

    bar = tqdm(total=config.steps, initial=start_step, desc="train", unit="step",
               disable=not progress or not main)
    model.train()
    step = start_step
    run_start = tic = time.perf_counter()
    window_loss = []
    last_step = min(config.steps, start_step + config.stop_after) if config.stop_after else config.steps

    def stop_reasons(flag: StopFlag) -> tuple[bool, bool]:
        """(signalled, out of time), agreed by all processes: one stopping alone would hang the others."""
        late = config.time_limit_min is not None and time.perf_counter() - run_start > 60 * config.time_limit_min
        if procs == 1:
            return flag.stop, late
        agreed = accelerator.reduce(torch.tensor([float(flag.stop), float(late)], device=device), "max").tolist()
        return agreed[0] > 0, agreed[1] > 0

    signalled = False
    with StopFlag() as flag:
        while step < last_step:
            signalled, late = stop_reasons(flag)
            if signalled or late:
                break
            for micro in range(config.grad_accum):
                batch = next_batch(step, micro)
                g = torch.Generator(device).manual_seed(step_seed(config.seed, step, micro))
                with accelerator.accumulate(model), accelerator.autocast():
                    loss = flow_matching_loss(model, batch, codec, g, config, global_batch,
                                              rank * config.batch_size)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable, 1.0)
                    optimizer.step()
                    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss = loss.detach().float()
                window_loss.append((accelerator.reduce(loss, "mean") if procs > 1 else loss).item())
            step += 1
            if ema_state is not None:
                with torch.no_grad():
                    _ema_update(ema_state, unwrapped.trainable_state_dict(), config.ema)
            if step % config.log_every == 0 or step == config.steps:
                mean_loss = float(np.mean(window_loss))
                rate = len(window_loss) / config.grad_accum / (time.perf_counter() - tic)
                history.append([step, mean_loss])
                if writer is not None:
                    writer.add_scalar("loss", mean_loss, step)
                    writer.add_scalar("lr", scheduler.get_last_lr()[0], step)
                    writer.add_scalar("steps_per_s", rate, step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", it_s=f"{rate:.2f}")
                tic, window_loss = time.perf_counter(), []
            bar.update(1)
            if step % config.save_every == 0:
                checkpoint_now(step)
    bar.close()
    if step % config.save_every:
        checkpoint_now(step)
    if writer is not None:
        writer.close()
    if step < config.steps:
        if signalled or flag.stop:
            raise KeyboardInterrupt(f"stopped at step {step}; checkpoint saved, continue with --resume")
        if main:
            logger.info(f"paused at step {step} of {config.steps} (checkpoint saved); continue with --resume")
        return None
    prior_dir = out / "prior"
    extra = prior_metadata(json_safe(asdict(config)), step, history, rig.expression_names)
    if not fsdp:
        if main:
            if ema_state is not None:
                current = unwrapped.trainable_state_dict()
                unwrapped.load_state_dict({k: v.to(current[k].dtype) for k, v in ema_state.items()}, strict=False)
            unwrapped.save_pretrained(prior_dir, extra=extra)
    else:
        state = weights_to_save()
        ema = None if ema_state is None else full_tensors(ema_state)
        if main:
            if ema is not None:
                state = {k: ema[k].to(v.dtype) if k in ema else v for k, v in state.items()}
            # save_pretrained's own file layout, written from the gathered tensors.
            LiftAvatarTransformer.save_pretrained(_GatheredPrior(copy.deepcopy(unwrapped.config), state),
                                                  prior_dir, extra=extra)
    if main:
        plot_history(history, out / "loss.png")
    accelerator.wait_for_everyone()
    return prior_dir


def exit_process(code: int = 0) -> NoReturn:
    """End a process of a multi-process run (torchrun, ``accelerate launch``) once its work is written.

    Gloo's worker threads can still hold work objects whose tensors reference Python objects; when
    interpreter finalisation destroys them, the process aborts ("terminate called without an active
    exception", SIGABRT) and the launcher reports the run as failed after it finished. CI saw it in the
    2-process CPU runs, twice in about ten, even after ``destroy_process_group`` (DDP's reducer keeps the group
    alive). So: tear the group down, flush, and leave with ``os._exit``, skipping the finalisation."""
    import os
    import sys

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@dataclass
class _GatheredPrior:
    """What :meth:`LiftAvatarTransformer.save_pretrained` reads of a model, from gathered (FSDP) weights."""

    config: TransformerConfig
    state: dict[str, torch.Tensor]

    @property
    def uses_lora(self) -> bool:
        return self.config.lora is not None

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state


def _parameter_or_buffer(model: torch.nn.Module):
    def lookup(name: str) -> torch.Tensor:
        try:
            return model.get_parameter(name)
        except AttributeError:
            return model.get_buffer(name)

    return lookup


def _ema_update(ema: dict[str, torch.Tensor], current: dict[str, torch.Tensor], decay: float) -> None:
    """``ema ← decay · ema + (1 − decay) · current``, one fused call per kind of tensor (sharded or not)."""
    from torch.distributed.tensor import DTensor

    for sharded in (False, True):
        keys = [k for k in ema if isinstance(ema[k], DTensor) == sharded]
        if keys:
            torch._foreach_lerp_([ema[k] for k in keys], [current[k].detach().float() for k in keys], 1 - decay)


def _replicate_structure(accelerator, model: LiftAvatarTransformer | None,
                         config: TrainConfig) -> LiftAvatarTransformer:
    """Rank 0's model as is; on the other ranks an empty (meta-device) model of rank 0's config —
    the same parameters, shapes, dtypes and trainability — that accelerate's FSDP2 preparation
    (``cpu_ram_efficient_loading``) fills with rank 0's weights by broadcast. Spares every rank
    but one building or loading a 14B model in host memory."""
    from accelerate import init_empty_weights
    from accelerate.utils import broadcast_object_list

    signature = None if model is None else [(n, tuple(p.shape), p.requires_grad) for n, p in model.named_parameters()]
    shared = broadcast_object_list([None if model is None else model.config, signature])
    if model is not None:
        return model
    tc: TransformerConfig = copy.deepcopy(shared[0])
    lora, tc.lora = tc.lora, None
    if isinstance(tc.base.get("patch_size"), list):
        tc.base["patch_size"] = tuple(tc.base["patch_size"])
    with init_empty_weights():
        replica = LiftAvatarTransformer(tc)
        if lora is not None:
            replica.add_lora(rank=lora["r"], alpha=lora["lora_alpha"], targets=tuple(lora["target_modules"]))
    if config.prompt_embedding is not None:
        replica.prompt_embedding.requires_grad_(False)
    # What the optimizer holds needs storage of its own: accelerate maps the optimizer's parameters to
    # their sharded successors by data_ptr, and every meta tensor's is 0 (all would map to one).
    for module in replica.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and p.is_meta:
                module._parameters[name] = torch.nn.Parameter(torch.empty_like(p, device="cpu"))
    if config.gradient_checkpointing:
        replica.enable_gradient_checkpointing()
    mine = [(n, tuple(p.shape), p.requires_grad) for n, p in replica.named_parameters()]
    if mine != shared[1]:
        diff = next((a, b) for a, b in zip(mine + [None] * len(shared[1]), shared[1] + [None] * len(mine)) if a != b)
        raise RuntimeError(f"rank {accelerator.process_index}: the empty replica differs from rank 0's model at {diff}")
    return replica


def _single_threaded_worker(_: int) -> None:
    """One CPU thread per data worker: N workers × all cores each oversubscribe the machine (measured on an
    H100 host with 16 cores: 10 workers at torch's default threads gave 1.5 training steps/s)."""
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def step_seed(seed: int, step: int, stream: int) -> int:
    """The seed of random stream ``stream`` at step ``step`` of a run seeded ``seed``: every draw of a step comes
    from its own generator, so a resumed run draws what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but training must not fail for a logger
        return None
    return SummaryWriter(str(path))


def plot_history(history: list[list[float]], path: Path, validation: list[list[float]] | None = None) -> Path | None:
    """The loss curve ([step, loss] pairs, log scale) as a PNG; ``validation`` pairs are drawn as a second line."""
    if not history and not validation:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    for pairs, label, style in ((history, "train", "-"), (validation, "validation", "o-")):
        if pairs:
            steps, losses = zip(*pairs)
            ax.plot(steps, losses, style, lw=1.2, ms=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(alpha=0.3)
    if validation:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
