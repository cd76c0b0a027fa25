"""Per-subject adaptation of the generator prior (`liftavatar adapt`): fine-tune a prior on one person's capture.

The prior generates a person from K reference frames; it never saw this person, so what the references do not
show (teeth, the inside of the mouth, the side of the face) it fills with what its training subjects looked like.
Adapting it on the capture itself (the frames, their shading maps and kinematics, the same K references as `lift`
takes) teaches it this person under the expressions and poses the capture holds, before `lift` asks it for the
ones the capture lacks.

**Data, decoded once.** The capture's valid own frames (not lifted ones) and their shading maps are read once,
resized to the prior's resolution (the prior trains and generates at its own size, as `lift` uses it:
:mod:`liftavatar.generator.inputs`) and held as uint8 tensors on the training device with their kinematic
controls; the K references are chosen once (K-means, as `lift` chooses them: same K, method and seed give the
same frames) and encoded once. A step's batch is ``batch_size`` windows of ``frames`` consecutive valid frames
indexed out of those tensors: no image file is read after the start. Masks are not read: the loss covers the
whole frame, as the prior's training did (lifted frames get their masks by the capture's rule afterwards).

**Validation split.** ``val_clips`` held-out clips (6, or a quarter of a short capture's valid frames) of
``frames`` consecutive valid frames, in blocks of up to three clips (3 · frames consecutive frames), blocks spread
evenly over the capture (block j as near as possible to the middle of the j-th of as many equal stretches of the
capture), preferably where no reference frame lies (a reference inside a validation clip would let the model copy
it). Around each block a guard band of
``frames // 2`` frames on each side belongs to neither split, so no training window overlaps a validation clip
or touches its nearest neighbours in time. Training windows are every start (stride 1) whose ``frames``
consecutive frames are valid and outside every block and guard band; there must be at least as many distinct
training frames as validation frames. The validation loss is the same flow-matching loss with *fixed* draws:
clip i's noise and σ come from a generator seeded by ``(seed, i)`` and controls are never dropped, so every
evaluation measures the same thing and evaluations compare. It is evaluated before the first step and every
``val_every`` steps; ``patience`` evaluations in a row without a new best end the run (early stopping), and the
written prior holds the weights of the best evaluation (the source's, if none improved on it).

**Output.** A prior directory like any other (``config.json`` with the source's ``extra``: codec, size, frames,
refs, expression names…, plus ``extra.adaptation``: the capture, the source prior, mode, steps, validation
losses), loadable by :meth:`LiftAvatarTransformer.from_pretrained` and
:meth:`LiftAvatarPipeline.from_pretrained`, with ``adapt.json`` (settings, split, history) and ``loss.png``.
In LoRA mode the adapter of a full prior (such as the embedded one) is *merged* into the weights and saved as a
full prior: it loads with no base to find, exactly as the source did, and costs no time per sampling step; the
files are fp32 (about twice the embedded prior's fp16 shards: rounding to fp16 would round away part of a small
update). A LoRA prior of a Wan base keeps its base: its adapter is continued and saved as a LoRA prior of the same
base (merging would copy the whole base). Written atomically: the run works in ``<out>.partial/`` (a marker with
the run's fingerprint, checkpoints), writes the prior there, and renames it to ``<out>`` when complete, so a
half-written prior never looks like one.

**Resume.** A checkpoint (trainable weights, optimizer, LR schedule, step, the best weights and validation loss
so far, history, early-stopping count) is written every ``save_every`` steps and when SIGINT / SIGTERM stop the
run; running the same command again continues it exactly (every random draw of step s comes from a generator
seeded by ``(seed, s)``, as in :mod:`liftavatar.generator.train`). The fingerprint (the capture's and the source
prior's content identities and the settings that change the result) is recorded when a run starts: continuing
with other inputs or settings is refused naming what differs, ``force`` starts over. A finished run returns at
once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

import liftavatar
from liftavatar.capture import PROVENANCE_LIFTED, Capture
from liftavatar.errors import ConfigError
from liftavatar.generator.checkpoint import (
    complete_checkpoints,
    gather_optimizer_state,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
)
from liftavatar.generator.inputs import (
    image_tensor,
    kinematic_controls,
    num_controls,
    reference_indices,
    reference_inputs,
    resize_images,
    square_side,
)
from liftavatar.generator.prior import PriorConfig
from liftavatar.generator.train import (
    StopFlag,
    draw_flow_noise,
    encode_clips,
    lr_factor,
    plot_history,
    sample_sigmas,
    step_seed,
    velocity_loss,
)
from liftavatar.generator.transformer import load_state_exactly, read_config
from liftavatar.io import differences, json_safe, to_uint8, write_json

logger = logging.getLogger(__name__)

ADAPT_FILE = "adapt.json"
"""The record of a finished adaptation in its prior directory (settings, fingerprint, split, history)."""
RUN_FILE = "adapt_run.json"
"""The marker of a run in progress in ``<out>.partial/``: its fingerprint."""
CLIPS_PER_BLOCK = 3
"""Validation clips per held-out block of consecutive frames."""
VAL_CLIPS = 6
"""Validation clips of a capture long enough (``AdaptConfig.val_clips`` None): fixed draws on 6 clips cost a CPU
about 11 s an evaluation at 128² (8 frames + 5 references)."""
DEVICE_DEFAULTS: dict[str, dict[str, int | str]] = {
    "cpu": {"steps": 16, "batch_size": 2, "val_every": 4, "mixed_precision": "no", "save_every": 8},
    "cuda": {"steps": 400, "batch_size": 8, "val_every": 20, "mixed_precision": "bf16", "save_every": 100},
}
"""The budget-bound settings :class:`AdaptConfig` leaves at None, by device type: on the 2-core CPU a 300-frame
128² capture adapts in about 5 minutes with them (benchmarks/results/adapt_speed.json). On one H100 the CUDA ones
took 45–53 s (full, two runs, early-stopped at 380 steps, validation loss −12.3 %) and 49 s (LoRA, −9.7 %); with
fp32 and a checkpoint every 8 steps full took 122 s in the same session (−12.4 %), bf16 alone 68 s: fp32 matmuls
and a 354 MB checkpoint (weights, AdamW moments, best weights) 47 times were what kept it over a minute
(``adapt_speed.json``, ``cuda`` and ``cuda_ablation``)."""
MODE_LR = {"lora": 1e-4, "full": 1e-5}
"""Default peak learning rates by mode, chosen on the benchmark's synthetic capture (a development subject) within
the CPU budget: full at 1e-5 lowered the validation loss by 2.7 % in 16 steps and LoRA at 1e-4 by 1.0 %, while full
at 3e-5 and 1e-4 and LoRA at 3e-4 and 1e-3 raised it (benchmarks/results/adapt_speed.json, ``selection_cpu``)."""
_VAL_STREAM = 0x7A1
_NOT_IN_FINGERPRINT = ("device", "save_every", "log_every", "stop_after")


@dataclass
class AdaptConfig:
    """How `liftavatar adapt` fine-tunes a prior on one capture (see :mod:`liftavatar.generator.adapt`)."""

    mode: Literal["lora", "full"] | None = None
    """Train every weight (full), or a LoRA adapter on the attention and FFN projections plus the
    control and reference modules (lora), merged into the weights when saved. Default: full for a
    full prior such as the embedded one (it lowered the validation loss more than LoRA at the same
    cost), lora for a LoRA prior of a Wan base (its adapter continues, its base stays frozen)."""
    lora_rank: int = 16
    """Rank of the adapter (mode lora, a full source prior; a LoRA source prior continues its own adapter)."""
    steps: int | None = None
    """Most optimizer steps; early stopping may end sooner. Default: 16 on a CPU, 400 on CUDA (sized to about 5
    minutes on a 2-core CPU and about 1 minute on one H100 for a 300-frame 128² capture)."""
    batch_size: int | None = None
    """Clips a step (default: 2 on a CPU, 8 on CUDA)."""
    lr: float | None = None
    """Peak learning rate, AdamW (default: 1e-4 for lora, 1e-5 for full)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup: int = 2
    """Steps of linear warmup."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: constant, or cosine decay to a tenth of --lr at --steps."""
    frames: int | None = None
    """Frames per clip (default: the prior's window, as `lift` generates them)."""
    refs: int = 5
    """Reference frames K (as `lift --refs`)."""
    ref_method: Literal["kmeans", "random", "uniform", "farthest"] = "kmeans"
    """How the references are chosen when the capture does not store K of them (as `lift --ref-selection`)."""
    val_clips: int | None = None
    """Held-out validation clips, in blocks of up to 3 clips of consecutive frames spread over the capture (default:
    6, fewer for a short capture: at most a quarter of its valid frames, at least 1)."""
    val_every: int | None = None
    """Evaluate the validation loss every this many steps, and before the first (default: 4 on a CPU, 20 on CUDA)."""
    patience: int = 3
    """Stop after this many evaluations in a row without a new best validation loss."""
    control_dropout: float = 0.1
    """Share of clips whose controls are dropped (as in the prior's training, so guidance keeps working)."""
    logit_mean: float = 0.0
    """σ sampling: logit-normal mean (as `train`; the σ shift is the prior's)."""
    logit_std: float = 1.0
    """σ sampling: logit-normal standard deviation (as `train`)."""
    mixed_precision: Literal["no", "bf16"] | None = None
    """bf16 autocast (weights stay fp32): faster on GPUs and on CPUs with bf16 instructions (default: bf16 on CUDA,
    no on a CPU)."""
    seed: int = 0
    """Seeds the references' choice (as `lift --seed`), the adapter's initialisation, batches, noise and σ."""
    device: str = "cpu"
    """Torch device to train on (cpu, cuda, cuda:1)."""
    save_every: int | None = None
    """Checkpoint every this many steps, and when interrupted (default: 8 on a CPU, where a step takes seconds; 100
    on CUDA, where a checkpoint costs more than a dozen steps)."""
    log_every: int = 1
    """Record the mean training loss every this many steps."""
    stop_after: int | None = None
    """End this run after this many steps (checkpointed; running the command again continues): time slices."""

    def resolved(self, lora_prior: bool = False) -> AdaptConfig:
        """This config with the settings left at None set: the mode by the prior (``lora_prior``: a LoRA prior of a
        Wan base), the learning rate by the mode (:data:`MODE_LR`), the budget by the device
        (:data:`DEVICE_DEFAULTS`)."""
        mode = self.mode or ("lora" if lora_prior else "full")
        defaults = {**DEVICE_DEFAULTS["cuda" if str(self.device).startswith("cuda") else "cpu"], "lr": MODE_LR[mode]}
        return replace(self, mode=mode, **{k: v for k, v in defaults.items() if getattr(self, k) is None})


@dataclass
class AdaptSplit:
    """Which clips train and which validate (frame indices into the capture; see the module docstring)."""

    train_starts: np.ndarray
    """First frames of the training windows (every valid start outside the held-out blocks and guard bands)."""
    val_starts: np.ndarray
    """First frames of the validation clips."""
    blocks: list[tuple[int, int]] = field(default_factory=list)
    """Held-out blocks as [start, end) frame ranges."""
    guard: int = 0
    """Frames on each side of a block that belong to neither split."""
    train_frames: int = 0
    """Distinct frames the training windows cover."""

    def summary(self) -> dict[str, Any]:
        return {"train_windows": len(self.train_starts), "train_frames": self.train_frames,
                "val_clips": self.val_starts.tolist(), "val_blocks": [list(b) for b in self.blocks],
                "guard": self.guard}


def split_frames(usable: np.ndarray, frames: int, val_clips: int, avoid: np.ndarray | list[int] = ()) -> AdaptSplit:
    """Hold out ``val_clips`` clips of ``frames`` frames in blocks with guard bands (the module docstring's rule).

    ``usable``: (N,) bool, the frames that may be used (valid, not lifted); ``avoid``: frames a held-out block
    should not contain when it can be placed elsewhere (the references). A block is placed only where all its frames
    are usable and it does not overlap an earlier block or its guard band; fewer blocks than asked, or fewer
    training frames than validation frames, are the caller's to refuse (:func:`check_split`)."""
    usable = np.asarray(usable, bool)
    n = len(usable)
    guard = max(1, frames // 2)
    run = np.concatenate([[0], np.cumsum(usable)])  # run[b] - run[a]: usable frames in [a, b)
    reserved = np.zeros(n, bool)  # held-out blocks and their guard bands
    avoid_mask = np.zeros(n, bool)
    avoid_mask[np.asarray(avoid, dtype=np.intp)] = True
    blocks, val_starts = [], []
    sizes = [min(CLIPS_PER_BLOCK, val_clips - i) for i in range(0, val_clips, CLIPS_PER_BLOCK)]
    for j, clips in enumerate(sizes):
        length = clips * frames
        if length > n:
            break
        starts = np.arange(n - length + 1)
        taken = np.concatenate([[0], np.cumsum(reserved)])
        refs = np.concatenate([[0], np.cumsum(avoid_mask)])
        ok = (run[starts + length] - run[starts] == length) & (taken[starts + length] == taken[starts])
        if not ok.any():
            break
        target = (j + 0.5) * n / len(sizes) - length / 2
        has_ref = refs[starts + length] > refs[starts]
        order = np.lexsort((np.abs(starts - target), has_ref))  # no reference first, then nearest the target
        s = int(next(i for i in order if ok[i]))
        blocks.append((s, s + length))
        val_starts += [s + c * frames for c in range(clips)]
        reserved[max(0, s - guard):s + length + guard] = True
    taken = np.concatenate([[0], np.cumsum(reserved)])
    starts = np.arange(max(0, n - frames + 1))
    ok = (run[starts + frames] - run[starts] == frames) & (taken[starts + frames] == taken[starts])
    train = starts[ok]
    covered = np.zeros(n, bool)
    for s in train:
        covered[s:s + frames] = True
    return AdaptSplit(train, np.asarray(val_starts, np.int64), blocks, guard, int(covered.sum()))


def check_split(split: AdaptSplit, capture: Capture, usable: np.ndarray, frames: int, val_clips: int) -> None:
    """A :class:`ConfigError` naming the capture and the counts when the split lacks validation clips or training
    frames (fewer training frames than validation frames)."""
    held = val_clips * frames
    blocks = math.ceil(val_clips / CLIPS_PER_BLOCK)
    need = held + 2 * split.guard * blocks + held
    if len(split.val_starts) == val_clips and split.train_frames >= held:
        return
    raise ConfigError(
        f"{capture.path}: {int(usable.sum())} valid frames, too few to adapt on: adaptation needs at least {need} "
        f"consecutive-enough valid frames ({val_clips} validation clips of {frames} frames, a guard band of "
        f"{split.guard} frames around each of their {blocks} block(s), and at least as many training frames as "
        f"validation frames; this capture gives {len(split.val_starts)} validation clip(s) and {split.train_frames} "
        "training frames); adapt on a longer capture, or pass fewer --val-clips or --frames.")


@dataclass(frozen=True)
class _Flow:
    """The loss's σ and dropout settings (:class:`liftavatar.generator.train.FlowSettings`)."""

    logit_mean: float
    logit_std: float
    shift: float
    control_dropout: float


def _check_config(config: AdaptConfig) -> None:
    for name in ("lora_rank", "refs", "patience", "log_every"):
        if getattr(config, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(config, name)}: use 1 or more.")
    for name in ("steps", "batch_size", "val_every", "val_clips", "frames", "stop_after", "save_every"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value}: use 1 or more.")
    if config.warmup < 0:
        raise ConfigError(f"--warmup {config.warmup}: use 0 or more.")
    if config.lr is not None and not (config.lr > 0 and math.isfinite(config.lr)):
        raise ConfigError(f"--lr {config.lr}: use a positive learning rate.")
    if not 0 <= config.control_dropout < 1:
        raise ConfigError(f"--control-dropout {config.control_dropout}: use a share in [0, 1).")
    if config.mode not in (None, "lora", "full"):
        raise ConfigError(f"--mode {config.mode}: use lora or full.")
    if config.mixed_precision not in (None, "no", "bf16"):
        raise ConfigError(f"--mixed-precision {config.mixed_precision}: use no or bf16.")


def _check_out(out: Path, staging: Path) -> None:
    """Refuse an output that holds something other than an adapted prior (never replaced), and a staging
    directory that is not an adaptation run's."""
    if out.exists() or out.is_symlink():
        mine = out.is_dir() and not out.is_symlink() and (out / ADAPT_FILE).is_file()
        empty = out.is_dir() and not out.is_symlink() and not any(out.iterdir())
        if not (mine or empty):
            raise ConfigError(f"{out}: exists and is not a prior written by `liftavatar adapt`, so it will not be "
                              "replaced; choose another output directory (-o).")
    if staging.exists() and not (staging / RUN_FILE).is_file():
        raise ConfigError(f"{staging}: exists but was not made by `liftavatar adapt`, so it is left alone; move it "
                          "away or choose another output directory (-o).")


def _recorded_fingerprint(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _prior_for_training(prior: PriorConfig | str | Path | None, device: str) -> PriorConfig:
    prior = prior if isinstance(prior, PriorConfig) else PriorConfig(prior=prior)
    # Trained in fp32 whatever the prior is sampled in; the device is the adaptation's.
    return replace(prior, device=device, dtype="float32")


def adapt(capture_path: str | Path, out: str | Path, config: AdaptConfig | None = None,
          prior: PriorConfig | str | Path | None = None, force: bool = False, progress: bool = True) -> Path | None:
    """Adapt ``prior`` (a :class:`PriorConfig` or a prior directory; None: the embedded prior) to the capture at
    ``capture_path`` and write the adapted prior to ``out`` (see the module docstring). Returns ``out``, or None
    when the run paused at ``config.stop_after`` (checkpointed; calling again continues).

    Every refusal (settings, capture, prior, output) comes before anything is written. ``force`` starts over: an
    interrupted run of other inputs is discarded and a finished prior at ``out`` is replaced when done."""
    from liftavatar.fingerprint import capture_identity
    from liftavatar.generator.pipeline import LiftAvatarPipeline

    config = config or AdaptConfig()
    _check_config(config)
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    _check_out(out, staging)
    prior = _prior_for_training(prior, config.device)
    capture = Capture.load(capture_path)
    side = square_side(capture, "adapt")
    recorded = read_config(prior.path)  # cheap: the weights load only when there is work to do
    config = config.resolved(lora_prior=recorded.lora is not None)
    extra = recorded.extra
    names = list(capture.meta.expression_names)
    if num_controls(len(names)) != recorded.num_controls:
        controls = num_controls(len(names))
        raise ConfigError(f"{capture.path}: {len(names)} expression coefficients ({controls} controls a frame), the "
                          f"prior {prior.path} takes {recorded.num_controls}; adapt a prior trained on this capture's "
                          "rig, or track the capture with this prior's rig.")
    if extra.get("expression_names") is not None and list(extra["expression_names"]) != names:
        raise ConfigError(f"{capture.path}: its expression coefficients are not the ones the prior {prior.path} was "
                          "trained on (same count, other names or order); adapt a prior of this capture's rig.")
    frames = config.frames or int(extra.get("frames", 8))
    size = int(extra.get("size") or side)
    shift = float(extra.get("shift", 1.0))
    steps = config.steps
    kin = capture.kinematics
    usable = kin.valid & (kin.provenance != PROVENANCE_LIFTED)
    if config.val_clips is None:
        config = replace(config, val_clips=max(1, min(VAL_CLIPS, int(usable.sum()) // (4 * frames))))
    ref_idx, note = reference_indices(capture, config.refs, config.ref_method, config.seed)
    split = split_frames(usable, frames, config.val_clips, ref_idx)
    check_split(split, capture, usable, frames, config.val_clips)

    settings = {**asdict(config), "frames": frames, "size": size, "shift": shift}
    fingerprint = json.loads(json.dumps(json_safe({
        "capture": capture_identity(capture.path), "prior": prior.identity(),
        "settings": {k: v for k, v in settings.items() if k not in _NOT_IN_FINGERPRINT}})))
    if (out / ADAPT_FILE).is_file() and not force:
        done = _recorded_fingerprint(out / ADAPT_FILE)
        if done == fingerprint:
            if progress:
                logger.info(f"{out}: already adapted from this capture, prior and settings")
            return out
        raise ConfigError(f"{out}: holds a prior adapted from other inputs ({differences(done or {}, fingerprint)}); "
                          "pass --force to adapt again, or choose another output directory (-o).")
    if staging.exists() and not force:
        started = _recorded_fingerprint(staging / RUN_FILE)
        if started != fingerprint:
            raise ConfigError(f"{staging}: an interrupted adaptation of other inputs "
                              f"({differences(started or {}, fingerprint)}); run it with the capture, prior and "
                              "settings it was started with to continue it, or pass --force to start over.")

    pipe = LiftAvatarPipeline.from_pretrained(prior)
    model, codec, device = pipe.model, pipe.codec, pipe.device
    check_codec(pipe, prior.path, size, frames)
    if note and progress:
        logger.info(note)

    # ---- everything refused that can be: from here on, the run writes ----------------------------------------------
    if force and staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    if not (staging / RUN_FILE).is_file():
        write_json(staging / RUN_FILE, {"fingerprint": fingerprint})
    ckpt_dir = staging / "checkpoints"

    data = _CaptureTensors(capture, split, frames, size, device)
    refs = encode_clips({k: v.unsqueeze(0) for k, v in reference_inputs(capture, ref_idx, size).items()}, codec,
                        device)
    flow = _Flow(config.logit_mean, config.logit_std, shift, config.control_dropout)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")
    val = _validation_inputs(data, split.val_starts, codec, refs, flow, config.seed, device)

    source_lora = model.uses_lora
    if config.mode == "lora":
        if not source_lora:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(config.seed)
                model.add_lora(config.lora_rank)
    else:
        model.merge_lora()
        model.requires_grad_(True)
    if prior.base is not None and model.uses_lora:
        model.config.base_path = str(Path(prior.base).resolve())
    trainable_keys = list(model.trainable_state_dict())
    trainable = [p for p in model.parameters() if p.requires_grad]
    schedule = _Schedule(config.warmup, config.lr_schedule, steps)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule))

    def evaluate() -> float:
        model.eval()
        total = 0.0
        with torch.no_grad(), autocast:
            for chunk in range(0, len(val["x0"]), config.batch_size):
                rows = slice(chunk, chunk + config.batch_size)
                b = len(val["x0"][rows])
                inputs = {k: (v[rows] if k in ("x0", "shading", "controls") else v.expand(b, *v.shape[1:]))
                          for k, v in val.items() if k not in ("noise", "sigma")}
                loss = velocity_loss(model, inputs, val["noise"][rows], val["sigma"][rows],
                                     torch.zeros(b, dtype=torch.bool, device=device))
                total += float(loss) * b
        model.train()
        return total / len(val["x0"])

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in model.trainable_state_dict().items()}

    state: dict[str, Any] = {"history": [], "best_val": None, "best_step": 0, "bad_evals": 0, "val_before": None,
                             "window": [], "seconds": 0.0}
    existing = complete_checkpoints(ckpt_dir)
    step, best = 0, None
    if existing:
        ckpt = load_checkpoint(existing[-1])
        fix = "run with --force to start over"
        load_state_exactly(model, ckpt["model"], existing[-1], required=trainable_keys, fix=fix)
        load_optimizer_state(model, optimizer, ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, state, best = ckpt["step"], ckpt["adapt"], ckpt["tensors"].get("best")
        if best is None:
            raise ConfigError(f"{existing[-1]}: a checkpoint without its best weights; {fix}.")
        if progress:
            logger.info(f"resuming {staging} from step {step}")
    model.train()
    if progress:
        logger.info(f"adapting {capture.meta.subject}: {len(split.train_starts)} training windows "
                    f"({split.train_frames} frames), {len(split.val_starts)} validation clips of {frames} frames at "
                    f"{size}², references {ref_idx.tolist()}, mode {config.mode}, on {device}")
    if best is None:
        state["val_before"] = state["best_val"] = evaluate()
        state["history"].append({"step": 0, "train_loss": None, "val_loss": state["val_before"]})
        best = snapshot()

    def checkpoint_now() -> None:
        save_checkpoint(ckpt_dir, model.trainable_state_dict(), gather_optimizer_state(model, optimizer),
                        scheduler.state_dict(), step, {"adapt": state}, tensors={"best": best})

    stopped = lambda: state["bad_evals"] >= config.patience  # noqa: E731
    last = min(steps, step + config.stop_after) if config.stop_after else steps
    bar = tqdm(total=steps, initial=step, desc="adapt", unit="step", disable=not progress)
    bar.set_postfix(val=f"{state['best_val']:.4f}", best=f"{state['best_val']:.4f}")
    tic = time.perf_counter()
    signalled = saved = False
    with StopFlag() as flag:
        while step < last and not stopped():
            if flag.stop:
                signalled = True
                break
            g = torch.Generator().manual_seed(step_seed(config.seed, step, 1000))
            pick = torch.randint(len(split.train_starts), (config.batch_size,), generator=g)
            batch = data.clips(split.train_starts[pick.numpy()])
            inputs = {**encode_clips(batch, codec, device),
                      **{k: v.expand(config.batch_size, *v.shape[1:]) for k, v in refs.items()}}
            noise_gen = torch.Generator(device).manual_seed(step_seed(config.seed, step, 0))
            with autocast:
                loss = velocity_loss(model, inputs, *draw_flow_noise(noise_gen, tuple(inputs["x0"].shape), flow))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["window"].append(float(loss.detach()))
            entry = {"step": step, "train_loss": None, "val_loss": None}
            if step % config.log_every == 0 or step == steps:
                entry["train_loss"] = float(np.mean(state["window"]))
                state["window"] = []
            if step % config.val_every == 0 or step == steps:
                entry["val_loss"] = evaluate()
                if entry["val_loss"] < state["best_val"]:
                    state.update(best_val=entry["val_loss"], best_step=step, bad_evals=0)
                    best = snapshot()
                else:
                    state["bad_evals"] += 1
            if entry["train_loss"] is not None or entry["val_loss"] is not None:
                state["history"].append(entry)
                last_val = next(h["val_loss"] for h in reversed(state["history"]) if h["val_loss"] is not None)
                last_loss = next((h["train_loss"] for h in reversed(state["history"]) if h["train_loss"] is not None),
                                 float("nan"))
                bar.set_postfix(loss=f"{last_loss:.4f}", val=f"{last_val:.4f}", best=f"{state['best_val']:.4f}")
            bar.update(1)
            saved = step % config.save_every == 0
            if saved:
                state["seconds"] += time.perf_counter() - tic
                tic = time.perf_counter()
                checkpoint_now()
    bar.close()
    state["seconds"] += time.perf_counter() - tic
    if step < steps and not stopped():
        if not saved:
            checkpoint_now()
        if signalled:
            raise KeyboardInterrupt(f"adaptation stopped at step {step}; checkpoint saved in {ckpt_dir}, run the same "
                                    "command again to continue")
        if progress:
            logger.info(f"paused at step {step} of {steps} (checkpointed); run the same command again to continue")
        return None

    # ---- the best weights as a prior ----------------------------------------------------------------------------
    model.load_state_dict({k: v.to(device) for k, v in best.items()}, strict=False)
    saved_as = "lora" if source_lora and config.mode == "lora" else "full"
    if saved_as == "full":
        model.merge_lora()  # a full source's adapter folded into its weights (see the module docstring)
    summary = {
        "capture": str(capture.path), "capture_identity": fingerprint["capture"], "subject": capture.meta.subject,
        "source_prior": str(prior.path), "source_identity": fingerprint["prior"]["prior"], "mode": config.mode,
        "saved_as": saved_as, "steps": step, "max_steps": steps, "best_step": state["best_step"],
        "val_before": state["val_before"], "best_val": state["best_val"],
        "stopped": "early stopping" if stopped() else "max steps", "frames": frames, "refs": len(ref_idx),
        "reference_indices": ref_idx.tolist(), "training_seconds": state["seconds"],
    }
    model.save_pretrained(staging, extra={**extra, "adaptation": summary})
    versions = {"liftavatar": liftavatar.__version__, "torch": torch.__version__, "device": str(device)}
    write_json(staging / ADAPT_FILE, {"fingerprint": fingerprint, **summary, "config": settings, **versions,
                                      "split": split.summary(), "history": state["history"]})
    plot_history([[h["step"], h["train_loss"]] for h in state["history"] if h["train_loss"] is not None],
                 staging / "loss.png",
                 validation=[[h["step"], h["val_loss"]] for h in state["history"] if h["val_loss"] is not None])
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # (interrupted from here on, the run starts over: same result)
    _install(staging, out)
    (out / RUN_FILE).unlink()
    if progress:
        logger.info(f"validation loss {state['val_before']:.4f} → {state['best_val']:.4f} (best at step "
                    f"{state['best_step']} of {step}); prior: {out}")
    return out


@dataclass(frozen=True)
class _Schedule:
    """The learning-rate schedule's settings (:class:`liftavatar.generator.train.ScheduleSettings`)."""

    warmup: int
    lr_schedule: str
    steps: int


def check_codec(pipe, prior: Path, size: int, frames: int) -> None:
    """A :class:`ConfigError` naming the prior when its codec does not fit its transformer (latent channels) or
    cannot encode clips of ``frames`` frames at ``size``² into whole patches."""
    codec, base = pipe.codec, pipe.model.config.base
    if codec.latent_channels != base["in_channels"]:
        raise ConfigError(f"{prior}: its codec gives {codec.latent_channels} latent channels, its transformer takes "
                          f"{base['in_channels']}; the prior's config.json names another codec than it was trained "
                          "with: train or copy the prior again.")
    codec.check_frames(frames)
    with torch.no_grad():  # one frame's latent: the codec refuses a size it cannot encode
        probe = codec.encode_frames(torch.zeros(1, 3, 1, size, size, device=pipe.device))
    patch = base["patch_size"]
    if probe.shape[-2] % patch[1] or probe.shape[-1] % patch[2]:
        raise ConfigError(f"{prior}: at its size {size}² the codec gives {probe.shape[-2]}x{probe.shape[-1]} latents, "
                          f"not whole {patch[1]}x{patch[2]} patches; the prior records a size it cannot have been "
                          "trained at: train or copy it again.")


class _CaptureTensors:
    """The capture's frames and shading maps used by the split, decoded once into uint8 tensors at the prior's
    size on the training device, with their kinematic controls; :meth:`clips` indexes windows out of them."""

    def __init__(self, capture: Capture, split: AdaptSplit, frames: int, size: int, device: torch.device,
                 chunk: int = 64):
        starts = np.concatenate([split.train_starts, split.val_starts]).astype(np.int64)
        needed = np.unique((starts[:, None] + np.arange(frames)).ravel())
        self.row = np.full(capture.num_frames, -1, np.int64)
        self.row[needed] = np.arange(len(needed))
        self.frames = frames
        self.device = device
        images = {"frames": [], "shading": []}
        for i in range(0, len(needed), chunk):
            idx = needed[i:i + chunk].tolist()
            for key, read in (("frames", capture.frames), ("shading", capture.shadings)):
                array = read(idx)
                if capture.size != (size, size):
                    array = to_uint8(resize_images(image_tensor(array), size).permute(0, 2, 3, 1))
                images[key].append(torch.from_numpy(array).permute(0, 3, 1, 2).to(device))
        self.images = {k: torch.cat(v) for k, v in images.items()}
        k = capture.kinematics
        self.controls = torch.from_numpy(kinematic_controls(k.expression[needed], k.rotation[needed],
                                                            k.translation[needed])).to(device)

    def clips(self, starts: np.ndarray) -> dict[str, torch.Tensor]:
        """Clips starting at these capture frames: ``frames``, ``shading`` (B, F, 3, H, W) uint8, ``controls``."""
        rows = torch.from_numpy(self.row[np.asarray(starts)][:, None] + np.arange(self.frames)).to(self.device)
        return {"frames": self.images["frames"][rows], "shading": self.images["shading"][rows],
                "controls": self.controls[rows]}


def _validation_inputs(data: _CaptureTensors, starts: np.ndarray, codec, refs: dict[str, torch.Tensor], flow: _Flow,
                       seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The validation clips encoded once, with their fixed draws: clip i's noise and σ from a generator seeded by
    ``(seed, i)`` (the references' encodings with a batch axis of 1)."""
    encoded = [encode_clips(data.clips(starts[i:i + 1]), codec, device) for i in range(len(starts))]
    out = {k: torch.cat([e[k] for e in encoded]) for k in ("x0", "shading", "controls")}
    noise, sigma = [], []
    for i, e in enumerate(encoded):
        g = torch.Generator(device).manual_seed(step_seed(seed, i, _VAL_STREAM))
        noise.append(torch.randn(e["x0"].shape, generator=g, device=device))
        sigma.append(sample_sigmas(g, 1, flow.logit_mean, flow.logit_std, flow.shift))
    return {**out, **refs, "noise": torch.cat(noise), "sigma": torch.cat(sigma)}


def _install(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` directory to ``out``; an empty directory or an earlier adapted prior there
    (``force``) is replaced, and deleted only once the new one is in place."""
    old = None
    if out.is_dir():
        if any(out.iterdir()):
            old = out.with_name(f"{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        else:
            out.rmdir()
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old)
