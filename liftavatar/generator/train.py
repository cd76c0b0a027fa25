"""Flow-matching trainer for the LiftAvatar generator (`liftavatar train`).

Rectified flow: ``x_t = (1 − σ) x_0 + σ ε``, the model predicts ``v = ε − x_0`` and the loss is the
MSE over target tokens only (references are in context, never predicted). σ is drawn logit-normal
and shifted (``σ' = s σ / (1 + (s − 1) σ)``, as SD3 / Wan). The target shading and kinematic
controls are dropped together with probability ``control_dropout`` so the sampler can guide.

accelerate does devices, mixed precision, gradient accumulation and multi-process training (DDP /
FSDP under ``accelerate launch``). Exact resume: every random draw of step *s* comes from a
generator seeded by ``(seed, s)``, the data stream is a pure function of the clip index, and a
checkpoint holds the trainable weights, optimizer, LR scheduler, EMA and step — so ``--resume``
continues bit-for-bit (a CPU test checks 4 straight steps against 2 + resume + 2).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from liftavatar.errors import ConfigError
from liftavatar.generator.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from liftavatar.generator.codec import CodecConfig, build_codec
from liftavatar.generator.data import (
    CaptureClips,
    SyntheticBatches,
    SyntheticDataConfig,
    as_float_images,
    collate,
    num_controls,
)
from liftavatar.generator.transformer import LiftAvatarTransformer, group_controls, json_safe


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
    pools: list[Path] = field(default_factory=list)
    """Optional reference pools, one per capture (same subject)."""
    frames: int = 8
    refs: int = 5
    ref_method: str = "kmeans"
    size: int = 128
    seed_range: tuple[int, int] = (100_000, 200_000)
    """Synthetic training subjects' seeds [low, high)."""
    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup: int = 100
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    """After warmup: constant, or cosine decay to a tenth of --lr at --steps."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0
    """σ shift (1 = none; Wan uses 3–5 at high resolution)."""
    control_dropout: float = 0.1
    gradient_checkpointing: bool = False
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


def sample_sigmas(generator: torch.Generator, n: int, mean: float, std: float, shift: float) -> torch.Tensor:
    """Logit-normal σ in (0, 1), then shifted: ``s σ / (1 + (s − 1) σ)``."""
    sigma = torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=generator.device))
    return shift * sigma / (1 + (shift - 1) * sigma)


def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, then constant or cosine decay to 0.1 at ``config.steps``."""
    warm = min(1.0, (step + 1) / max(1, config.warmup))
    if config.lr_schedule == "constant":
        return warm
    progress = min(1.0, step / max(1, config.steps))
    return warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def flow_matching_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], codec, generator: torch.Generator,
                       config: TrainConfig) -> torch.Tensor:
    """One rectified-flow loss on a batch of clips (see the module docstring)."""
    device = next(model.parameters()).device
    to5 = lambda x: as_float_images(x.to(device)).permute(0, 2, 1, 3, 4)  # noqa: E731  (B, F, C, H, W) → (B, C, F, H, W)
    with torch.no_grad():
        x0 = codec.encode(to5(batch["frames"]))
        shading = codec.encode(to5(batch["shading"]))
        ref_latents = codec.encode_frames(to5(batch["ref_frames"]))
        ref_shading = codec.encode_frames(to5(batch["ref_shading"]))
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=generator.device)
    sigma = sample_sigmas(generator, b, config.logit_mean, config.logit_std, config.shift)
    drop = torch.rand(b, generator=generator, device=generator.device) < config.control_dropout
    s = sigma.view(b, 1, 1, 1, 1)
    xt = (1 - s) * x0 + s * noise
    tf = codec.temporal_factor
    # Each reference is its own one-frame latent, so its control group is that frame repeated.
    ref_controls = group_controls(batch["ref_controls"].to(device), 1).expand(-1, -1, tf, -1)
    pred = model(xt, sigma * 1000, shading, group_controls(batch["controls"].to(device), tf), ref_latents,
                 ref_shading, ref_controls, drop_controls=drop)
    return torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())


def build_model(config: TrainConfig, n_controls: int) -> LiftAvatarTransformer:
    if config.base is not None:
        model = LiftAvatarTransformer.from_base(config.base, n_controls, config.injection, config.base_config,
                                                seed=config.seed)
    else:
        overrides = {}
        if config.codec == "pixel":
            overrides = dict(in_channels=3 * config.pixel_factor ** 2, out_channels=3 * config.pixel_factor ** 2)
        model = LiftAvatarTransformer.from_preset(config.preset, n_controls, config.injection, seed=config.seed,
                                                  **overrides)
    if config.init_from is not None:
        start = LiftAvatarTransformer.from_pretrained(config.init_from, base_path=config.base)
        if start.config.base != model.config.base or start.config.num_controls != n_controls:
            raise ConfigError(f"--init-from {config.init_from}: that prior has another shape than --preset "
                              f"{config.preset}; start from a prior of the same preset and codec.")
        model.load_state_dict(start.state_dict(), strict=False)
    if config.prompt_embedding is not None:
        model.load_prompt_embedding(config.prompt_embedding)
    if config.train_mode == "lora":
        model.add_lora(config.lora_rank)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def prior_metadata(config: dict[str, Any], step: int, history: list[list[float]],
                   expression_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """What a prior records of its training (its config.json ``extra``), from a JSON-safe TrainConfig dict."""
    return {"codec": asdict(CodecConfig(config["codec"], config["pixel_factor"], config["vae"])),
            "frames": config["frames"], "refs": config["refs"], "size": config["size"], "shift": config["shift"],
            "expression_names": list(expression_names), "steps": step, "seed_range": list(config["seed_range"]),
            "final_loss": history[-1][1] if history else None}


class _StopFlag:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the end of the step and stops."""

    def __init__(self):
        self.stop = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
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
    at ``stop_after`` / ``time_limit_min`` (checkpointed). Resumable with ``config.resume``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

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

    accelerator = Accelerator(mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.grad_accum,
                              cpu=config.device == "cpu")
    device = accelerator.device
    set_seed(config.seed)
    rig = FaceRig.load()
    n_controls = num_controls(rig.num_expressions)
    codec = build_codec(CodecConfig(config.codec, config.pixel_factor, str(config.vae) if config.vae else None))
    codec.to(device)
    model = build_model(config, n_controls)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))

    render_device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if config.captures:
        dataset = CaptureClips(config.captures, config.frames, config.refs, config.ref_method,
                               config.pools or None, seed=config.seed)
        for note in dataset.notes:
            print(note)
        synthetic = None
    else:
        dataset = None
        synthetic = SyntheticDataConfig(
            seed_range=tuple(config.seed_range), frames=config.frames, refs=config.refs, size=config.size,
            ref_method=config.ref_method, stream_seed=config.seed, clips_per_subject=config.clips_per_subject,
            subject_cache=config.subject_pool or 256, identity_shards=max(1, config.data_workers))

    ema_state = None
    if config.ema:
        ema_state = {k: v.detach().float().cpu().clone() for k, v in model.trainable_state_dict().items()}

    start_step, history = 0, []
    if existing:
        ckpt = load_checkpoint(existing[-1])
        model.load_state_dict(ckpt["model"], strict=False)
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["ema"] is not None:
            ema_state = ckpt["ema"]
        start_step, history = ckpt["step"], ckpt.get("history", [])
        print(f"resuming {out} from step {start_step}")
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if progress and accelerator.is_main_process:
        print(f"LiftAvatarTransformer ({sum(p.numel() for p in trainable) / 1e6:.2f} M trainable) on "
              f"{accelerator.num_processes} "
              f"process(es), {accelerator.distributed_type.value}, {device}, precision {config.mixed_precision}")
    batches = None
    if synthetic is not None:
        # Batch index of (step, micro, process): a pure function, so resume needs only the step.
        procs = accelerator.num_processes
        source = SyntheticBatches(synthetic, config.batch_size, render_device,
                                  first=start_step * config.grad_accum * procs, stride=procs,
                                  offset=accelerator.process_index)
        if config.data_workers > 0:
            batches = iter(torch.utils.data.DataLoader(
                source, batch_size=None, num_workers=config.data_workers, multiprocessing_context="spawn",
                prefetch_factor=4, pin_memory=torch.cuda.is_available(), worker_init_fn=_single_threaded_worker))
        else:
            batches = iter(source)

    def next_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        if batches is not None:
            return next(batches)
        g = torch.Generator().manual_seed(_step_seed(config.seed, step, 1000 + micro + 7919 * accelerator.process_index))
        idx = torch.randint(len(dataset), (config.batch_size,), generator=g).tolist()
        return collate([dataset[i] for i in idx])

    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(json_safe(asdict(config)), indent=2))
    writer = _tensorboard(out / "logs") if accelerator.is_main_process else None
    unwrapped = accelerator.unwrap_model(model)

    def checkpoint_now(step: int) -> None:
        if accelerator.is_main_process:
            save_checkpoint(ckpt_dir, unwrapped.trainable_state_dict(), optimizer.state_dict(),
                            scheduler.state_dict(), step, {"history": history, "config": json_safe(asdict(config))},
                            ema_state)

    bar = tqdm(total=config.steps, initial=start_step, desc="train", unit="step",
               disable=not progress or not accelerator.is_main_process)
    model.train()
    step = start_step
    run_start = tic = time.perf_counter()
    window_loss = []
    last_step = min(config.steps, start_step + config.stop_after) if config.stop_after else config.steps

    def out_of_time() -> bool:
        return config.time_limit_min is not None and time.perf_counter() - run_start > 60 * config.time_limit_min

    with _StopFlag() as flag:
        while step < last_step and not flag.stop and not out_of_time():
            for micro in range(config.grad_accum):
                batch = next_batch(step, micro)
                g = torch.Generator(device).manual_seed(
                    _step_seed(config.seed, step, micro + 7919 * accelerator.process_index))
                with accelerator.accumulate(model), accelerator.autocast():
                    loss = flow_matching_loss(model, batch, codec, g, config)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable, 1.0)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                window_loss.append(loss.detach().float().item())
            step += 1
            if ema_state is not None:
                with torch.no_grad():
                    for k, v in unwrapped.trainable_state_dict().items():
                        ema_state[k].mul_(config.ema).add_(v.detach().float().cpu(), alpha=1 - config.ema)
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
        if flag.stop:
            raise KeyboardInterrupt(f"stopped at step {step}; checkpoint saved, continue with --resume")
        print(f"paused at step {step} of {config.steps} (checkpoint saved); continue with --resume")
        return None
    prior_dir = out / "prior"
    if accelerator.is_main_process:
        if ema_state is not None:
            current = unwrapped.trainable_state_dict()
            unwrapped.load_state_dict({k: v.to(current[k].dtype) for k, v in ema_state.items()}, strict=False)
        unwrapped.save_pretrained(prior_dir, extra=prior_metadata(json_safe(asdict(config)), step, history,
                                                                  rig.expression_names))
        plot_history(history, out / "loss.png")
    accelerator.wait_for_everyone()
    return prior_dir


def _single_threaded_worker(_: int) -> None:
    """One CPU thread per data worker: N workers × all cores each oversubscribe the machine (measured on an
    H100 host with 16 cores: 10 workers at torch's default threads gave 1.5 training steps/s)."""
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def _step_seed(seed: int, step: int, stream: int) -> int:
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0])


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but training must not fail for a logger
        return None
    return SummaryWriter(str(path))


def plot_history(history: list[list[float]], path: Path) -> Path | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*history)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot(steps, losses, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
