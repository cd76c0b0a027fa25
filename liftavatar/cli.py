"""The `liftavatar` command: one verb per pipeline stage (DESIGN.md §2).

Thin by design: parse a typed config, call one function, print where the results went. A bad
input raises a :class:`~liftavatar.errors.LiftAvatarError`; it is printed as one line and the
command exits with code 2.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import tyro

from liftavatar.errors import LiftAvatarError

Out = Annotated[Path, tyro.conf.arg(aliases=("-o",))]


def _synth_spec():
    from liftavatar.synth.world import SynthSpec

    return SynthSpec


@dataclass
class Synth:
    """Render a synthetic subject into a Capture with ground-truth kinematics (provenance 2)."""

    out: Out
    """Capture directory to write."""
    spec: Annotated[_synth_spec(), tyro.conf.arg(name="")] = field(default_factory=lambda: _synth_spec()())
    """What to render (options without a prefix)."""
    video: bool = False
    """Also write OUT/video.mp4 of the frames."""
    preview: bool = False
    """Also write OUT/preview.png: frames, masks and shading maps."""
    force: bool = False
    """Replace an existing capture at OUT."""
    resume: bool = False
    """Keep frames an interrupted run already wrote (refused when it was started with other settings)."""
    device: str = "cpu"
    """Torch device for rendering (cpu, cuda)."""


def _track_config():
    from liftavatar.face.track import TrackConfig

    return TrackConfig


@dataclass
class Track:
    """Track a monocular head video (or a folder of photos of one person) into a Capture."""

    input: tyro.conf.Positional[Path]
    """Video file (mp4, mov, webm, avi, mkv, m4v) or folder of images."""
    out: Out
    """Capture directory to write."""
    config: Annotated[_track_config(), tyro.conf.arg(name="")] = field(default_factory=lambda: _track_config()())
    """How to track (options without a prefix)."""
    preview: bool = False
    """Also write OUT/preview.png: frames with the fitted mesh overlaid, and the shading maps."""
    force: bool = False
    """Replace an existing capture at OUT."""
    resume: bool = False
    """Continue an interrupted run: keep its landmarks and written frames (refused when it was started on another
    input or with other settings)."""


@dataclass
class Validate:
    """Check a Capture directory, every image decoded: exit 0, or exit 2 naming the first problem and its file."""

    capture: tyro.conf.Positional[Path]


@dataclass
class Demo:
    """The whole pipeline on the embedded defaults: synthesise a held-out subject's phone-style video (or take your
    own clip, --video), track it, choose references, lift it, train avatars with and without lifting, evaluate them
    on extreme frames, and write the HTML report (about 10 minutes on 2 CPU cores)."""

    out: Annotated[Path | None, tyro.conf.arg(aliases=("-o",))] = None
    """Where the run goes (default runs/demo, or runs/demo_STEM with --video; its report: OUT/report/index.html)."""
    video: Path | None = None
    """Your own clip of your face (a phone video, a few seconds or more): tracked, split by kinematics (its rarest
    expressions and poses held out as the extreme test), lifted; avatars trained, then evaluated on held-out frames."""
    seed: int = 900001
    """The held-out synthetic subject's seed (without --video)."""
    device: str = "cpu"
    """Torch device (cpu, cuda)."""
    force: bool = False
    """Start over instead of resuming the stages an earlier demo run finished."""


def _avatar_defaults():
    from liftavatar.avatar.train import TrainConfig

    return TrainConfig()


AVATAR_DEFAULTS = _avatar_defaults()
"""The avatar training recipe's defaults (one home: :class:`liftavatar.avatar.train.TrainConfig`), shown by
`avatar train` and `bench`."""


@dataclass
class Bench:
    """The paper's protocol on held-out synthetic subjects (or real clips, --videos): avatars trained on a tracked
    sparse capture alone vs lifted, tested on unseen extreme expressions and on the seen range; tables, curve,
    plots, HTML report."""

    out: Out = Path("runs/bench")
    """Run folder (resumable: finished stages are skipped). Report: OUT/report/index.html."""
    videos: tuple[Path, ...] | None = None
    """Real clips (one person each) instead of synthetic subjects: each is tracked and split by kinematics (its 15 %
    rarest expressions and poses the extreme test, every 5th block of 8 frames of the rest the seen test, ±3-frame
    guard bands), self-reenactment on its held-out frames; subjects are named by the files' stems."""
    subjects: int | None = None
    """Held-out subjects, seeds 5400, 5401, … (default 3; --quick: 1)."""
    quick: bool = False
    """A tiny run for CI (1 subject, few frames, 2 lifted expressions, few iterations); its numbers mean nothing."""
    device: str = "cpu"
    """Torch device (cpu, cuda)."""
    workers: int | None = None
    """Processes for subjects and avatars (default: 1 on the CPU, up to 4 on CUDA)."""
    curve: tuple[int, ...] | None = None
    """Numbers of lifted expressions (default 0 25 50 100 200)."""
    lifted: int | None = None
    """Lifted expressions of the "lifted" method (default 100)."""
    iters: int | None = None
    """Avatar training iterations (default 2000)."""
    steps: int | None = None
    """Sampler steps of lifting (default 10)."""
    train_frames: int | None = None
    """Frames of the sparse training capture (default 300)."""
    extreme_frames: int | None = None
    """Frames of the extreme test capture (default 60)."""
    seen_frames: int | None = None
    """Frames of the seen-range test capture (default 60)."""
    seed_base: int | None = None
    """First subject seed (default 5400; the bench's held-out range is 5400–5499)."""
    lifted_weight: float = AVATAR_DEFAULTS.lifted_weight
    """Loss weight of lifted frames in avatar training (as `avatar train --lifted-weight`)."""
    observed_finish: float = AVATAR_DEFAULTS.observed_finish
    """The last share of avatar iterations draws observed frames only (as `avatar train --observed-finish`)."""
    observed_share: float = AVATAR_DEFAULTS.observed_share
    """Observed frames are repeated to make about this share of the training draws (0: plain union; as
    `avatar train --observed-share`)."""
    deform_width: int = AVATAR_DEFAULTS.avatar.deform_width
    """Width of the avatars' expression-deformation MLP, 0: none (as `avatar train --avatar.deform-width`)."""
    lift_library: Literal["tracked", "rig"] | None = None
    """Lift's kinematic library: tracked real people (default) or the rig's extreme presets (an ablation)."""
    lift_poses: Literal["library", "observed", "wide"] | None = None
    """Lifted clips take their targets' poses (default), keep the capture's, or turn toward random wider ones."""
    track_appearance: bool = True
    """Track with the appearance network as well as the landmarks (as `track` does by default)."""
    kinematics: Literal["tracked", "truth"] = "tracked"
    """Captures' kinematics from the tracker (the protocol), or the synthetic truth (an ablation without the
    tracker: what lifting does when tracking is perfect)."""
    prior: Path | None = None
    """Prior directory (default: the embedded prior)."""
    until: Literal["synth", "video", "track", "split", "refs", "lift", "avatars", "eval"] | None = None
    """Stop after this stage, to go on elsewhere with the run folder copied there (for example: data stages up
    to refs where the tracker is installed, lift and avatars on a GPU, then evaluation and report back here)."""
    only: tuple[str, ...] | None = None
    """Run only these subjects (seeds, or clip names with --videos), with --until avatars or earlier (to carry one
    subject at a time to a GPU machine whose calls carry little); the last run, without --only, evaluates and
    reports them all."""
    force: bool = False
    """Start the run over instead of resuming it."""


def run_synth(cfg: Synth) -> None:
    from liftavatar.synth.world import synthesize

    start = time.perf_counter()
    capture = synthesize(cfg.spec, cfg.out, overwrite=cfg.force, resume=cfg.resume, device=cfg.device)
    print(f"wrote {capture.num_frames} frames of {capture.meta.subject} to {capture.path} "
          f"({time.perf_counter() - start:.1f} s)")
    _extras(capture, video=cfg.video, preview=cfg.preview)


def _extras(capture, video: bool, preview: bool) -> None:
    if video:
        from liftavatar.video import write_video

        path = capture.path / "video.mp4"
        write_video(path, (capture.frame(i) for i in range(capture.num_frames)), capture.meta.fps)
        print(f"video: {path}")
    if preview:
        from liftavatar.report import capture_contact_sheet

        print(f"preview: {capture_contact_sheet(capture, capture.path / 'preview.png')}")


def run_track(cfg: Track) -> None:
    from liftavatar.face.track import track

    capture, report = track(cfg.input, cfg.out, cfg.config, overwrite=cfg.force, resume=cfg.resume)
    print(report.summary())
    print(f"wrote {capture.path}")
    if cfg.preview:
        from liftavatar.report import tracking_contact_sheet

        print(f"preview: {tracking_contact_sheet(capture, capture.path / 'preview.png')}")


def run_validate(cfg: Validate) -> None:
    from liftavatar.capture import KINEMATICS_FILE, Capture
    from liftavatar.face.rig import FaceRig

    # Every stage's load checks each PNG's chunk checksums; validate vouches for the pixels, so it decodes them.
    capture = Capture.load(cfg.capture, decode=True)
    meta = capture.meta
    rig = FaceRig.load()
    if meta.rig.get("name") == rig.name:  # our rig: its coefficient bounds apply too
        capture.kinematics.validate(rig.num_expressions, rig.expression_bounds,
                                    source=cfg.capture / KINEMATICS_FILE)
    print(f"{cfg.capture}: valid capture of {meta.subject}, {meta.num_frames} frames, {meta.size[0]}x{meta.size[1]}")


def _workers(workers: int | None, device: str) -> int:
    import os

    if workers is not None:
        return max(1, workers)
    return 1 if not device.startswith("cuda") else max(1, min(4, (os.cpu_count() or 1) // 4))


def _finish(results: dict, started: float) -> None:
    print(results["headline"]["sentence"])
    print(results["plateau"])
    print(f"finished in {time.perf_counter() - started:.0f} s; results: {Path(results['run']) / 'results.json'}")
    print(f"report: {Path(results['report']).resolve()}")


# Bench options named differently from the BenchConfig fields they set (the rest share their names).
_BENCH_FIELDS = {"iters": "avatar_iters", "steps": "lift_steps"}
# Bench options that steer the command, not the run's configuration.
_BENCH_COMMAND_ONLY = ("out", "quick", "workers", "until", "only", "force", "videos")
# Bench options of synthetic subjects only (a real clip is its own recording and is split by kinematics).
_BENCH_SYNTHETIC_ONLY = ("subjects", "seed_base", "train_frames", "seen_frames", "extreme_frames")


def run_bench(cfg: Bench) -> None:
    from dataclasses import asdict

    from liftavatar.bench import full_config, quick_config, run_bench as bench
    from liftavatar.errors import ConfigError

    overrides = {_BENCH_FIELDS.get(name, name): value for name, value in asdict(cfg).items()
                 if name not in _BENCH_COMMAND_ONLY and value is not None}
    if "prior" in overrides:
        overrides["prior"] = str(overrides["prior"])
    make = quick_config if cfg.quick else full_config
    config = make(**overrides, workers=_workers(cfg.workers, cfg.device))
    if cfg.videos is not None:
        from liftavatar.bench.real import clip_entries

        synthetic = [f"--{name.replace('_', '-')}" for name in _BENCH_SYNTHETIC_ONLY if getattr(cfg, name) is not None]
        if synthetic:
            raise ConfigError(f"{' '.join(synthetic)}: set{'s' if len(synthetic) == 1 else ''} synthetic subjects; "
                              f"a run on --videos takes its subjects and frames from the clips.")
        if not cfg.videos:
            raise ConfigError("--videos: name at least one clip.")
        config = make(**overrides, workers=config.workers, clips=clip_entries(cfg.videos, config, cfg.out))
    started = time.perf_counter()
    results = bench(config, cfg.out, force=cfg.force, until=cfg.until, only=cfg.only)
    if "stopped_after" in results:
        print(f"finished in {time.perf_counter() - started:.0f} s; run folder: {Path(cfg.out).resolve()}")
        return
    _finish(results, started)


def run_demo(cfg: Demo) -> None:
    from liftavatar.bench import demo_config, run_bench as bench

    config = demo_config(seeds=(cfg.seed,), device=cfg.device, workers=1)
    if cfg.video is None:
        out = cfg.out or Path("runs/demo")
        print(f"demo: held-out subject {cfg.seed}: synthesise a phone-style video, track, choose references, lift, "
              f"train avatars with and without lifting, evaluate on extreme ground truth, write the report "
              f"(resumable; --force starts over)")
    else:
        from liftavatar.bench.real import clip_entries

        out = cfg.out or Path("runs") / f"demo_{cfg.video.stem}"
        config = demo_config(device=cfg.device, workers=1, clips=clip_entries([cfg.video], config, out))
        print(f"demo: your clip {cfg.video}: track, split by kinematics (its rarest expressions and poses held out), "
              f"choose references, lift, train avatars with and without lifting, evaluate on the held-out frames, "
              f"write the report into {out} (resumable; --force starts over)")
    started = time.perf_counter()
    _finish(bench(config, out, force=cfg.force), started)


@dataclass
class Refs:
    """Choose the K reference frames of a Capture and store them in its capture.json."""

    capture: tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="CAPTURE")]]
    """Capture directory."""
    k: Annotated[int, tyro.conf.arg(aliases=("-k",))] = 5
    """Number of reference frames."""
    method: Literal["kmeans", "random", "uniform", "farthest"] = "kmeans"
    """kmeans over standardised expression + rotation (default); random, uniform, farthest for ablations."""
    seed: int = 0
    """Seed of K-means' starts (and of random)."""


def run_refs(cfg: Refs) -> None:
    from liftavatar.refs import choose_references

    indices = choose_references(cfg.capture, cfg.k, cfg.method, cfg.seed)
    print(f"{cfg.method} references: {' '.join(str(int(i)) for i in indices)}")
    print(f"stored in {cfg.capture / 'capture.json'} (reference_indices)")


def _prior_config():
    from liftavatar.generator.prior import PriorConfig

    return PriorConfig


def _sampler_config():
    from liftavatar.generator.pipeline import SamplerConfig

    return SamplerConfig


@dataclass
class Generate:
    """Generate a person (from reference frames) performing target kinematics, with a trained prior."""

    out: Out
    """An .mp4 (.mov, .mkv, .webm, .avi) file, or a folder for PNG frames; frames at the target capture's size."""
    refs: Path
    """Capture whose reference frames show the person (its stored references, or chosen now)."""
    kinematics: Path
    """Capture whose shading maps and kinematics are the targets (any square size: the prior sees its own)."""
    prior: Annotated[_prior_config(), tyro.conf.arg(name="")] = field(default_factory=lambda: _prior_config()())
    """Which prior, and where it runs (options without a prefix)."""
    sampler: Annotated[_sampler_config(), tyro.conf.arg(name="")] = field(
        default_factory=lambda: _sampler_config()(steps=25, solver="euler", batch_size=8))
    """How it samples (options without a prefix)."""
    num_refs: int = 5
    """Number of reference frames K."""
    ref_method: Literal["kmeans", "random", "uniform", "farthest"] = "kmeans"
    """How references are chosen when the capture does not store K of them: kmeans over expression + rotation;
    random, uniform, farthest for ablations."""
    max_frames: int | None = None
    """Only the first N target frames."""
    force: bool = False
    """Replace OUT when it is a video file or a frames folder an earlier `generate` wrote (never anything else)."""


def _lift_config():
    from liftavatar.lift import LiftConfig

    return LiftConfig


@dataclass
class Lift:
    """Complete a capture in kinematic space: generate the expressions (and poses) it lacks, append them."""

    capture: tyro.conf.Positional[Path]
    """Capture to lift (from `track` or `synth`; any square size, the lifted frames get its size)."""
    out: Out
    """Capture directory to write: the original frames plus the lifted ones (provenance 1)."""
    prior: Annotated[_prior_config(), tyro.conf.arg(name="")] = field(default_factory=lambda: _prior_config()())
    """Which prior, and where it runs (options without a prefix)."""
    config: Annotated[_lift_config(), tyro.conf.arg(name="")] = field(default_factory=lambda: _lift_config()())
    """What to lift and how it samples (options without a prefix)."""
    expressions_from: Path | None = None
    """Use another capture's expressions and head poses as the kinematic library instead of --library's."""
    force: bool = False
    """Replace an existing capture at OUT."""
    resume: bool = False
    """Keep the clips an interrupted run already wrote (refused when it was started from other settings or inputs)."""


def run_lift(cfg: Lift) -> None:
    from liftavatar.lift import lift

    start = time.perf_counter()
    capture, report = lift(cfg.capture, cfg.out, cfg.prior, cfg.config, cfg.expressions_from,
                           overwrite=cfg.force, resume=cfg.resume)
    before, after = report["coverage"]["before"], report["coverage"]["after"]
    print(f"coverage of {report['held_out_entries']} held-out library entries ({report['library']}; expression within "
          f"{report['coverage_radius']}, pose within {report['pose_radius_deg']:g}°): expression "
          f"{before['expression']:.1%} → {after['expression']:.1%}, pose {before['pose']:.1%} → {after['pose']:.1%}, "
          f"both {before['joint']:.1%} → {after['joint']:.1%}")
    print(f"wrote {capture.path}: {report['lifted_frames']} lifted frames added "
          f"({time.perf_counter() - start:.1f} s)")


def _adapt_config():
    from liftavatar.generator.adapt import AdaptConfig

    return AdaptConfig


@dataclass
class Adapt:
    """Fine-tune a prior on one person's capture so that it generates that person (per-subject adaptation): LoRA or
    full fine-tuning on the capture's clips with the references `lift` uses, early stopping on held-out clips, the
    best weights written as a prior for `lift --prior` / `generate --prior`. Running the same command again continues
    an interrupted run; a finished one returns at once."""

    capture: tyro.conf.Positional[Path]
    """Capture of the person (from `track` or `synth`; any square size: the prior trains at its own)."""
    out: Out
    """Prior directory to write (the adapted prior, adapt.json with the history, loss.png); the run works in
    OUT.partial until it is complete."""
    config: Annotated[_adapt_config(), tyro.conf.arg(name="")] = field(default_factory=lambda: _adapt_config()())
    """How to adapt (options without a prefix)."""
    prior: Path | None = None
    """Prior to adapt (default: the embedded prior)."""
    base: Path | None = None
    """Local Wan2.1 weights of a LoRA prior (default: the path the prior records)."""
    vae: Path | None = None
    """Local Wan VAE directory of a prior trained with it (default: the path the prior records)."""
    force: bool = False
    """Start over: discard an interrupted run and replace an adapted prior at OUT (never anything else)."""


def run_adapt(cfg: Adapt) -> None:
    import json

    from liftavatar.generator.adapt import ADAPT_FILE, adapt
    from liftavatar.generator.prior import PriorConfig

    start = time.perf_counter()
    prior = PriorConfig(prior=cfg.prior, base=cfg.base, vae=cfg.vae, device=cfg.config.device)
    out = adapt(cfg.capture, cfg.out, cfg.config, prior, force=cfg.force)
    if out is None:
        print(f"paused (checkpointed in {cfg.out}.partial); run the same command again to continue")
        return
    record = json.loads((out / ADAPT_FILE).read_text())
    print(f"adapted to {record['subject']}: validation loss {record['val_before']:.4f} → {record['best_val']:.4f} "
          f"(best at step {record['best_step']} of {record['steps']}, {record['stopped']}; "
          f"{time.perf_counter() - start:.0f} s)")
    print(f"prior: {out} (use it with `liftavatar lift --prior {out}`)")


def run_train(cfg) -> None:
    from liftavatar.generator.train import train

    prior = train(cfg)
    print(f"prior: {prior}" if prior else f"checkpoint: {cfg.out / 'checkpoints'} (continue with --resume)")


def run_generate(cfg: Generate) -> None:
    from liftavatar.capture import Capture
    from liftavatar.generator.inputs import generation_inputs, resize_images
    from liftavatar.generator.pipeline import LiftAvatarPipeline, video_to_uint8
    from liftavatar.video import check_frames_output, write_frames

    check_frames_output(cfg.out, cfg.force)  # before minutes of generation, not after
    target, references = Capture.load(cfg.kinematics), Capture.load(cfg.refs)
    pipe = LiftAvatarPipeline.from_pretrained(cfg.prior)
    frames = range(min(target.num_frames, cfg.max_frames or target.num_frames))
    inputs = generation_inputs(references, target, cfg.num_refs, cfg.ref_method, cfg.sampler.seed, frames,
                               size=pipe.size)
    start = time.perf_counter()
    video = pipe(inputs, **cfg.sampler.sampling(), progress=True)
    path = write_frames(video_to_uint8(resize_images(video, target.size)), cfg.out, target.meta.fps, cfg.force)
    print(f"generated {len(video)} frames in {time.perf_counter() - start:.1f} s: {path}")


def _train_config():
    from liftavatar.generator.train import TrainConfig

    return TrainConfig


def _eval_config():
    from liftavatar.metrics.evaluate import EvalConfig

    return EvalConfig


@dataclass
class Eval:
    """Compare predicted frames with ground truth: PSNR, SSIM, LPIPS, FID, AED, APD, CSIM."""

    pred: tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="PRED")]]
    """Predicted frames: a Capture, a folder of images or a video."""
    gt: tyro.conf.Positional[Annotated[Path, tyro.conf.arg(metavar="GT")]]
    """Ground-truth frames, in the same order: a Capture (adds masks and kinematics), a folder or a video."""
    config: Annotated[_eval_config(), tyro.conf.arg(name="")] = field(default_factory=lambda: _eval_config()())
    """What to compute (options without a prefix)."""
    json: Path | None = None
    """Write the full report (per-frame values included) to this JSON file."""
    max_frames: int | None = None
    """Compare only the first this many frames."""


def run_eval(cfg: Eval) -> None:
    from liftavatar.metrics.evaluate import check_report_path, evaluate_paths, format_report, write_report

    if cfg.json is not None:
        check_report_path(cfg.json)  # before minutes of metrics, not after
    report = evaluate_paths(cfg.pred, cfg.gt, cfg.config, max_frames=cfg.max_frames)
    print(format_report(report))
    if cfg.json is not None:
        print(f"wrote {write_report(report, cfg.json)}")


# --- avatar (issue 6): liftavatar avatar train | render | export --------------------------------
from typing import Union as _Union  # noqa: E402


def _avatar_train_config():
    from liftavatar.avatar.train import TrainConfig

    return TrainConfig


@dataclass
class AvatarTrain:
    """Train a mesh-rigged 3D Gaussian avatar on one subject's captures (the defaults are the benchmarked recipe)."""

    captures: tyro.conf.Positional[tuple[Path, ...]]
    """Capture directories of one subject (observed and lifted frames)."""
    out: Out
    """Avatar directory to write (checkpoints, validation renders)."""
    config: Annotated[_avatar_train_config(), tyro.conf.arg(name="")] = field(
        default_factory=lambda: _avatar_train_config()())
    """How to train (options without a prefix; --avatar.* build the avatar)."""
    resume: bool = False
    """Continue the training state in OUT."""
    force: bool = False
    """Replace an avatar already in OUT."""
    threads: int | None = 1
    """Torch CPU threads (the CPU rasterizer's many small ops measured 18 it/s on 1 thread, 0.4 on 2 of a busy
    2-core machine); None keeps torch's default."""


@dataclass
class AvatarRender:
    """Render an avatar performing another capture's kinematics (frames folder or video)."""

    avatar: tyro.conf.Positional[Path]
    """Avatar directory from `liftavatar avatar train`."""
    kinematics: Path
    """Capture whose expression, pose and camera drive the avatar."""
    out: Out
    """A folder for PNG frames, or an .mp4/.mov/.mkv file."""
    size: int | None = None
    """Image height in pixels (default: the kinematics capture's)."""
    background: tuple[float, float, float] = (0.0, 0.0, 0.0)
    """RGB in [0, 1] behind the avatar."""
    force: bool = False
    """Replace OUT when it is a video file or a frames folder an earlier render wrote (never anything else)."""
    allow_unfinished: bool = False
    """Render an avatar whose training stopped before its iterations were done (interrupted or time-boxed)."""
    device: str = "cpu"
    threads: int | None = 1
    """Torch CPU threads (None: torch's default)."""


@dataclass
class AvatarExport:
    """Export an avatar as a standard 3DGS .ply (neutral expression, world space: metres, right-handed, y up, the
    face toward +z, SH colour in the world frame) plus its binding; with --kinematics, one .ply per frame."""

    avatar: tyro.conf.Positional[Path]
    """Avatar directory from `liftavatar avatar train`."""
    out: Out
    """The .ply file to write; with --kinematics, a folder for 000000.ply ... and frames.json."""
    kinematics: Path | None = None
    """Capture whose kinematics pose the avatar, one .ply per frame (for offline splat players)."""
    force: bool = False
    """With --kinematics: replace a sequence an earlier export wrote in OUT."""
    allow_unfinished: bool = False
    """Export an avatar whose training stopped before its iterations were done (interrupted or time-boxed)."""


@dataclass
class AvatarView:
    """Look at an avatar in the browser: a local web page (viser) with a slider per blendshape and for the head
    pose; play a capture's kinematics or a tracked clip; compare two avatars. CPU only; stops when the browser
    is closed (or Ctrl+C)."""

    runs: tyro.conf.Positional[tuple[Path, ...]]
    """One avatar directory from `liftavatar avatar train`, or two (for example baseline and lifted) to compare
    side by side, driven by the same kinematics."""
    kinematics: Path | None = None
    """Capture whose kinematics the avatars play (play / pause / scrub; observed and lifted frames marked)."""
    drive: Path | None = None
    """Video to track and drive the avatars with (cross-reenactment), shown beside its frames."""
    port: int = 8080
    """Port of the page (0: any free port)."""
    host: str = "127.0.0.1"
    """Address to serve on (0.0.0.0 lets other machines of the network connect)."""
    linger: float = 5.0
    """Seconds to wait after the last browser tab closed before stopping (a reload comes back sooner)."""
    drive_size: int = 256
    """Side of the tracked clip's frames, pixels (--drive)."""
    drive_max_frames: int | None = None
    """Track only this many frames of the clip (--drive)."""
    allow_unfinished: bool = False
    """Show avatars whose training stopped before their iterations were done."""
    threads: int | None = None
    """Torch CPU threads for deforming the avatar (None: torch's default, all cores; benchmarks/viewer.py
    measured 35 updates/s on 2 threads, 28 on 1, for 40k Gaussians on a 2-core CPU)."""


@dataclass
class AvatarCommand:
    """The 3D Gaussian avatar: train on captures, render kinematics, export a .ply, view in the browser."""

    command: Annotated[
        _Union[
            Annotated[AvatarTrain, tyro.conf.subcommand("train")],
            Annotated[AvatarRender, tyro.conf.subcommand("render")],
            Annotated[AvatarExport, tyro.conf.subcommand("export")],
            Annotated[AvatarView, tyro.conf.subcommand("view")],
        ],
        tyro.conf.arg(name=""),
        tyro.conf.OmitSubcommandPrefixes,
    ]


def run_avatar(cfg: AvatarCommand) -> None:
    cmd = cfg.command
    device = cmd.config.device if isinstance(cmd, AvatarTrain) else getattr(cmd, "device", "cpu")
    if getattr(cmd, "threads", None) and not device.startswith("cuda"):
        import torch

        torch.set_num_threads(cmd.threads)
    if isinstance(cmd, AvatarTrain):
        from liftavatar.avatar.train import train_avatar

        result = train_avatar(cmd.captures, cmd.out, cmd.config, resume=cmd.resume, force=cmd.force)
        val = "no validation" if result.val_psnr is None else f"validation PSNR {result.val_psnr:.2f} dB"
        print(f"trained {result.step} iterations ({result.iters_per_second:.1f} it/s), {result.num_gaussians} "
              f"Gaussians, {val}; avatar: {result.out_dir}")
    elif isinstance(cmd, AvatarRender):
        from liftavatar.avatar.export import render_kinematics
        from liftavatar.avatar.model import load_avatar
        from liftavatar.video import check_frames_output

        check_frames_output(cmd.out, cmd.force)  # before loading and rendering, not after
        avatar = load_avatar(cmd.avatar, device=cmd.device, allow_unfinished=cmd.allow_unfinished)
        out, n = render_kinematics(avatar, cmd.kinematics, cmd.out, size=cmd.size, background=cmd.background,
                                   device=cmd.device, force=cmd.force)
        print(f"rendered {n} frames: {out}")
    elif isinstance(cmd, AvatarExport):
        from liftavatar.avatar.export import export_ply, export_ply_sequence
        from liftavatar.avatar.model import load_avatar

        avatar = load_avatar(cmd.avatar, allow_unfinished=cmd.allow_unfinished)
        if cmd.kinematics is None:
            print(f"wrote {avatar.num_gaussians} Gaussians: {export_ply(avatar, cmd.out)}")
        else:
            out, n = export_ply_sequence(avatar, cmd.kinematics, cmd.out, force=cmd.force)
            print(f"wrote {n} frames of {avatar.num_gaussians} Gaussians: {out}")
    else:
        from liftavatar.avatar.viewer import view_avatars

        def ready(viewer) -> None:
            print(f"viewer: {viewer.url} (open it in a browser; close the tab or press Ctrl+C to stop)", flush=True)

        how = view_avatars(list(cmd.runs), kinematics=cmd.kinematics, drive=cmd.drive, port=cmd.port, host=cmd.host,
                           linger=cmd.linger, drive_size=cmd.drive_size, drive_max_frames=cmd.drive_max_frames,
                           allow_unfinished=cmd.allow_unfinished, on_ready=ready)
        print(f"viewer stopped ({'browser closed' if how == 'closed' else how})")


COMMANDS = {
    "synth": (Synth, run_synth),
    "track": (Track, run_track),
    "validate": (Validate, run_validate),
    "refs": (Refs, run_refs),
    "eval": (Eval, run_eval),
    "train": (_train_config(), run_train),
    "adapt": (Adapt, run_adapt),
    "generate": (Generate, run_generate),
    "lift": (Lift, run_lift),
    "avatar": (AvatarCommand, run_avatar),
    "bench": (Bench, run_bench),
    "demo": (Demo, run_demo),
}


def _show_library_notes() -> None:
    """The package logs what a user should know (``logging``, never ``print``); the command shows its INFO
    and above as plain lines on stderr, where they do not mix with results printed on stdout."""
    import logging

    class ToStderr(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is when a record comes (a test's capture, a redirected stream)."""

        stream = property(lambda self: sys.stderr, lambda self, value: None)

    logger = logging.getLogger("liftavatar")
    if not any(type(h).__name__ == "ToStderr" for h in logger.handlers):
        handler = ToStderr()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    cfg = tyro.extras.subcommand_cli_from_dict(
        {name: config for name, (config, _) in COMMANDS.items()},
        prog="liftavatar",
        description="LiftAvatar: kinematic-space completion for expression-controlled 3D Gaussian head avatars.",
        args=argv,
    )
    runner = next(run for config, run in COMMANDS.values() if isinstance(cfg, config))
    _show_library_notes()
    try:
        runner(cfg)
    except LiftAvatarError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; run again with --resume where the verb has it.", file=sys.stderr)
        return 130
    return 0


def entry_point() -> None:
    code = main()
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        from liftavatar.generator.train import exit_process

        exit_process(code)  # one process of a launched run: skip the teardown that can abort it
    sys.exit(code)


if __name__ == "__main__":
    entry_point()
