"""The benchmark protocol (`liftavatar bench`, and `liftavatar demo` at demo size).

The paper's protocol on held-out synthetic subjects (seeds 5400–5499 by default; the embedded prior
was trained on 100000–101999). Per subject, each stage writes into its own folder under
``RUN/subjects/s<seed>/`` and is skipped when its output is complete, so an interrupted run resumes:

1. **synth** — the subject performs a ``sparse`` trajectory (what a phone video holds: talking-range
   expressions, small head turns; ``train_frames + seen_frames`` frames) and an ``extreme`` one
   (strong expressions absent from it and wider poses; ``extreme_frames``), rendered at
   ``render_size``² with the synthetic world's camera (30° field of view). These are the ground truth.
2. **video** — one recording: the sparse take, a few black frames, the extreme take, as an H.264
   ``.mp4`` (what a person would upload).
3. **track** — the real tracker on that video (MediaPipe FaceMesh + rig fit) into a ``size``² Capture.
   Like the monocular-avatar benchmarks the paper follows, the recording is tracked once and split
   afterwards, so the train and test frames share one crop, camera and identity. The black frames
   carry no face, so the tracker's temporal smoothing barely couples the two takes.
4. **split** — three captures: ``train`` (the first ``train_frames`` frames), ``test_seen`` (the
   rest of the sparse take: unseen frames of the seen range) and ``test_extreme`` (the extreme
   take). Test captures keep only frames where the tracker found a face. Test frames never reach
   reference selection, lifting or avatar training.
5. **refs** — K-means reference frames of ``train`` (stored in its capture.json).
6. **lift** — ``train`` lifted with ``max(curve)`` expressions by the prior. Lifting is greedy
   (farthest-point targets, one clip and one seed per target, in order), so the first ``k`` clips of
   that run are exactly what lifting with ``k`` expressions gives; the captures for the other points
   of the curve (``lifted_kNNN``) are prefixes of it, written with hard links.
7. **avatars** — per point ``k`` of the curve, a Gaussian avatar trained for ``avatar_iters``
   iterations on ``train`` (k = 0: the baseline) or on ``lifted_kNNN``, with the avatar trainer's recipe
   (:class:`liftavatar.avatar.train.TrainConfig`, whose defaults are the benchmark's): one frame is drawn per
   iteration; with ``observed_share`` > 0 the observed frames are repeated so that they make about
   that share of the draws (lifted frames would otherwise outnumber them up to 5 to 1), and lifted
   frames weigh ``lifted_weight`` in the loss (generated frames are less exact than filmed ones).
   The last ``observed_finish`` share of the iterations draws observed frames only. Every avatar gets the
   same iterations, initial seed and settings.
   Each avatar then drives through the test captures' tracked kinematics and camera, rendering over
   black (``renders_{split}.npz``).
8. **eval** — the renders are compared with the test frames times their masks: PSNR, SSIM, AED, APD,
   CSIM (LPIPS and FID when their weights are on disk), with :func:`liftavatar.metrics.evaluate.evaluate`.
   It reads only the files of stage 7, so renders made on a GPU machine evaluate on another. The same
   metrics are taken of the **oracle appearance** (``oracle/``): the synthetic world's own renderer, with
   the subject's true texture, on the rig driven exactly as the avatars are (the test captures' tracked
   kinematics, tracked identity and camera). It is what an avatar that had learned the subject's appearance
   perfectly would show, so its AED is what the tracked test kinematics alone cost a perfectly textured rig
   (a reference, not a floor: an avatar trained on frames tracked with the same biases can land below it,
   the biases cancelling).

A stage is skipped when its record is complete or a later stage's is, so a run folder may travel between
machines without the earlier stages' bulky outputs (``run_bench(until=...)``, ``bench --until``).

Then the run's results are aggregated (:mod:`liftavatar.bench.summary`) into ``results.json``,
``results.md``, plots, and the HTML report (:mod:`liftavatar.bench.html`) in ``RUN/report/``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

import liftavatar
from liftavatar.avatar.train import TrainConfig as AvatarTrainConfig
from liftavatar.avatar.train import observed_repeats
from liftavatar.capture import IMAGE_DIRS, PROVENANCE_LIFTED, Capture, CaptureMeta, CaptureWriter
from liftavatar.errors import ConfigError, LiftAvatarError
from liftavatar.io import json_safe, save_npz, write_json
from liftavatar.report import machine_info, machine_name

__all__ = ["BenchConfig", "DEMO_SEED", "SEED_BASE", "quick_config", "demo_config", "full_config", "run_bench",
           "subject_dir", "prepare_subject", "avatar_job", "eval_job", "oracle_job", "oracle_renders", "subset_capture",
           "STAGES"]

SEED_BASE = 5400
"""Benchmark subjects are 5400, 5401, …: held out from the prior's training seeds (100000–101999)."""
DEMO_SEED = 900001
"""The demo's held-out subject."""
METRICS = ("psnr", "ssim", "lpips", "fid", "aed", "apd", "csim")
SPLITS = ("extreme", "seen")
LIFT_SAMPLES = "lift_samples.npz"
SUBJECT_STAGES = ("synth", "video", "track", "split", "refs", "lift")
STAGES = (*SUBJECT_STAGES, "avatars", "eval")
"""Every stage in order; ``run_bench(until=...)`` stops after one of them (a run split across machines)."""
AVATAR_DEFAULTS = AvatarTrainConfig()
"""The avatar recipe's defaults: the benchmark trains with the library's own (one home for the numbers)."""


class BenchError(LiftAvatarError):
    """A benchmark run cannot go on as asked (a run folder made with other settings, no face tracked)."""


@dataclass
class BenchConfig:
    """Everything that decides a benchmark run's numbers (stored in ``RUN/config.json``)."""

    name: str = "bench"
    """What the report calls this run (bench, bench --quick, demo)."""
    subjects: int = 3
    """Held-out subjects: seeds seed_base, seed_base + 1, … (ignored when seeds is given)."""
    seed_base: int = SEED_BASE
    seeds: tuple[int, ...] | None = None
    """Explicit subject seeds (the demo's 900001)."""
    render_size: int = 256
    """Side of the synthetic recording's frames, pixels (the "phone video")."""
    size: int = 128
    """Side of the tracked captures, the avatars and the evaluation, pixels (the prior's resolution)."""
    fps: float = 25.0
    train_frames: int = 300
    """Frames of the sparse training capture."""
    seen_frames: int = 60
    """Held-out frames at the end of the sparse take (the seen-range test)."""
    extreme_frames: int = 60
    """Frames of the extreme take (the unseen-expression test)."""
    separator_frames: int = 10
    """Black frames between the two takes in the recording."""
    curve: tuple[int, ...] = (0, 25, 50, 100, 200)
    """Numbers of lifted expressions to train an avatar with (0 is the baseline)."""
    lifted: int = 100
    """The number of lifted expressions of the "lifted" method in the tables and headline."""
    refs: int = 5
    """Reference frames K (K-means over the training capture)."""
    lift_steps: int = 10
    lift_solver: Literal["euler", "unipc"] = "unipc"
    lift_poses: Literal["observed", "wide"] = "wide"
    """Lifted clips keep the capture's head poses, or also turn toward wider ones (the extreme test has them)."""
    lift_seed: int = 0
    observed_share: float = AVATAR_DEFAULTS.observed_share
    """Repeat observed frames so they make about this share of an avatar's training draws (0: plain union);
    :attr:`liftavatar.avatar.train.TrainConfig.observed_share`."""
    track_appearance: bool = True
    """The tracker reads expressions from the face's pixels too (its appearance network, the default of
    `liftavatar track`); False tracks from the landmarks alone, as before that network existed."""
    kinematics: Literal["tracked", "truth"] = "tracked"
    """Where the captures' kinematics come from: the tracker on the recording (the protocol), or, as an ablation
    that takes the tracker out, the synthetic world's truth: every frame re-rendered in the crop and camera the
    tracker takes, with the subject's true identity, expressions and pose (no video coding, masks from the
    renderer). What lifting does when tracking is perfect."""
    avatar_iters: int = 2000
    lifted_weight: float = AVATAR_DEFAULTS.lifted_weight
    """Loss weight of lifted frames in avatar training (:attr:`liftavatar.avatar.train.TrainConfig.lifted_weight`,
    where the measurements that chose it are)."""
    observed_finish: float = AVATAR_DEFAULTS.observed_finish
    """The last share of an avatar's iterations draws observed frames only
    (:attr:`liftavatar.avatar.train.TrainConfig.observed_finish`)."""
    avatar_seed: int = 0
    metrics: tuple[str, ...] = METRICS
    grid_frames: int = 6
    """Frames per image grid in the report (evenly spaced over the test capture, not picked)."""
    prior: str | None = None
    """Prior directory (None: the embedded default prior)."""
    device: str = "cpu"
    workers: int = 1
    """Processes for subjects' data stages and for avatar jobs (1: all in this process)."""

    # Settings that change where or how fast a run goes, not its numbers: a run may resume with others.
    RUNTIME_FIELDS = ("device", "workers", "subjects", "name")

    def subject_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds else [self.seed_base + i for i in range(self.subjects)]

    def points(self) -> list[int]:
        """The curve's points with the baseline (0) and the lifted method included, sorted."""
        return sorted({0, self.lifted, *self.curve})

    def check(self) -> None:
        """Raise :class:`ConfigError` on settings that cannot run."""
        if not self.subject_seeds():
            raise ConfigError("--subjects 0: benchmark at least one subject.")
        if self.size % 2 or self.size < 16 or self.render_size % 2 or self.render_size < 16:
            raise ConfigError(f"--size {self.size} / render size {self.render_size}: use even sizes of at least 16.")
        if min(self.train_frames, self.seen_frames, self.extreme_frames) < 1:
            raise ConfigError("train, seen and extreme frame counts must each be at least 1.")
        if any(k < 0 for k in self.points()):
            raise ConfigError(f"--curve {self.curve}: numbers of lifted expressions must be 0 or more.")
        if self.lifted < 1:
            raise ConfigError(f"--lifted {self.lifted}: the lifted method needs at least one lifted expression.")
        if not 0 <= self.observed_share < 1:
            raise ConfigError(f"observed_share {self.observed_share}: use a value in [0, 1).")
        if not 0 <= self.observed_finish < 1:
            raise ConfigError(f"--observed-finish {self.observed_finish}: use a share of the iterations in [0, 1).")
        if self.avatar_iters < 1:
            raise ConfigError(f"--iters {self.avatar_iters}: train avatars for at least one iteration.")
        if self.kinematics not in ("tracked", "truth"):
            raise ConfigError(f"--kinematics {self.kinematics}: use tracked or truth.")
        if self.refs > self.train_frames:
            raise ConfigError(f"--refs {self.refs} is more than the {self.train_frames} training frames.")

    def protocol(self) -> dict[str, Any]:
        """The fields that decide the numbers (what a resumed run must share with the first one)."""
        return {k: v for k, v in json_safe(asdict(self)).items() if k not in self.RUNTIME_FIELDS}


def full_config(**overrides: Any) -> BenchConfig:
    """The paper's protocol at 128²: 3 subjects, 300 training frames, the curve {0, 25, 50, 100, 200}."""
    return replace(BenchConfig(), **overrides)


def quick_config(**overrides: Any) -> BenchConfig:
    """A tiny run for CI (a few minutes on a 2-core CPU): 1 subject, few frames, 2 lifted expressions,
    few avatar iterations and sampler steps. Its numbers say nothing about the method."""
    base = BenchConfig(name="bench --quick", subjects=1, render_size=128, train_frames=24, seen_frames=8,
                       extreme_frames=8, separator_frames=4, curve=(0, 1, 2), lifted=2, lift_steps=2,
                       lift_solver="euler", avatar_iters=60, grid_frames=4)
    return replace(base, **overrides)


def demo_config(**overrides: Any) -> BenchConfig:
    """`liftavatar demo`: one held-out subject, avatars with and without lifting, in about 10 minutes on 2 CPU cores."""
    base = BenchConfig(name="demo", seeds=(DEMO_SEED,), subjects=1, train_frames=150, seen_frames=30,
                       extreme_frames=40, curve=(0, 10), lifted=10, avatar_iters=1200, grid_frames=6)
    return replace(base, **overrides)


LEGACY_FIELDS: dict[str, Any] = {"observed_finish": 0.0}
"""What a run folder's config.json made before a field existed meant (runs made before observed_finish trained
without it)."""


def config_from_json(data: dict[str, Any]) -> BenchConfig:
    """The :class:`BenchConfig` of a run folder's ``config.json`` (``["config"]``), of this version or an earlier
    one: unknown keys are dropped, missing ones take :data:`LEGACY_FIELDS` or the defaults."""
    names = {f.name for f in fields(BenchConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    kw = {**LEGACY_FIELDS, **kw}
    return BenchConfig(**kw)


# ---------------------------------------------------------------------------------------------- layout


def subject_dir(run: Path, seed: int) -> Path:
    return Path(run) / "subjects" / f"s{seed}"


def avatar_dir(run: Path, seed: int, k: int) -> Path:
    return subject_dir(run, seed) / "avatars" / f"k{k:03d}"


def oracle_dir(run: Path, seed: int) -> Path:
    return subject_dir(run, seed) / "oracle"


def lifted_capture_dir(run: Path, seed: int, k: int, cfg: BenchConfig) -> Path:
    sdir = subject_dir(run, seed)
    if k == 0:
        return sdir / "train"
    return sdir / "lifted" if k == max(cfg.points()) else sdir / f"lifted_k{k:03d}"


def _is_capture(path: Path) -> bool:
    return (path / "capture.json").is_file()


class _Log:
    """Prints a stage's start and end and records its seconds in ``timings.json`` of its folder."""

    def __init__(self, folder: Path, label: str, verbose: bool = True):
        self.path = folder / "timings.json"
        self.label = label
        self.verbose = verbose
        self.timings: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @contextmanager
    def stage(self, name: str, done: bool) -> Iterator[bool]:
        """Yield whether the stage must run; time it when it does."""
        if done:
            if self.verbose:
                print(f"[{self.label}] {name}: complete, skipped", flush=True)
            self.timings.setdefault(name, {"seconds": 0.0})["resumed"] = True
            yield False
            return
        if self.verbose:
            print(f"[{self.label}] {name} …", flush=True)
        start = time.perf_counter()
        yield True
        seconds = time.perf_counter() - start
        self.timings[name] = {"seconds": round(seconds, 2), "resumed": False}
        write_json(self.path, self.timings)
        if self.verbose:
            print(f"[{self.label}] {name}: {seconds:.1f} s", flush=True)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _cpu(device: str) -> bool:
    return not str(device).startswith("cuda")


# ---------------------------------------------------------------------------------------------- captures


def subset_capture(source: Capture, out: Path, indices: Sequence[int], note: dict[str, Any],
                   reference_indices: Sequence[int] | None = None) -> Capture:
    """A new capture at ``out`` of the frames ``indices`` of ``source`` (in that order), written atomically.

    Image files are hard-linked where the file system allows (copied otherwise): a subset costs no
    PNG encoding and almost no disk.
    """
    indices = [int(i) for i in indices]
    meta = CaptureMeta(**{**asdict(source.meta), "num_frames": len(indices), "reference_indices": None,
                          "creator": {"verb": "bench", "version": liftavatar.__version__,
                                      "config": {"source": str(source.path), **json_safe(note)}}})
    writer = CaptureWriter(out, meta, overwrite=True)
    for new, old in enumerate(indices):
        for folder in IMAGE_DIRS:
            src = source.path / folder / f"{old:06d}.png"
            dst = writer.staging / folder / f"{new:06d}.png"
            try:
                os.link(src, dst)
            except OSError:
                shutil.copyfile(src, dst)
    return writer.finalize(source.kinematics.select(indices), reference_indices=reference_indices)


# ---------------------------------------------------------------------------------------------- data stages


def synth_stage(cfg: BenchConfig, sdir: Path, seed: int, progress: bool) -> tuple[Path, Path]:
    from liftavatar.synth.world import SynthSpec, synthesize

    paths = []
    for preset, frames in (("sparse", cfg.train_frames + cfg.seen_frames), ("extreme", cfg.extreme_frames)):
        out = sdir / "synth" / preset
        if not _is_capture(out):
            synthesize(SynthSpec(seed=seed, preset=preset, frames=frames, size=cfg.render_size, fps=cfg.fps), out,
                       overwrite=True, resume=True, device=cfg.device, progress=progress)
        paths.append(out)
    return paths[0], paths[1]


def video_stage(cfg: BenchConfig, sdir: Path, seed: int) -> Path:
    """The recording: sparse take, black frames, extreme take (H.264 .mp4); segments in recording.json."""
    from liftavatar.video import write_video

    sparse, extreme = Capture.load(sdir / "synth" / "sparse"), Capture.load(sdir / "synth" / "extreme")
    folder = sdir / "recording"
    folder.mkdir(parents=True, exist_ok=True)
    video = folder / f"subject_{seed}.mp4"
    blank = np.zeros((cfg.render_size, cfg.render_size, 3), np.uint8)

    def frames() -> Iterator[np.ndarray]:
        for i in range(sparse.num_frames):
            yield sparse.frame(i)
        for _ in range(cfg.separator_frames):
            yield blank
        for i in range(extreme.num_frames):
            yield extreme.frame(i)

    write_video(video, frames(), cfg.fps)
    t, s, g = cfg.train_frames, cfg.seen_frames, cfg.separator_frames
    segments = {"train": [0, t], "seen": [t, t + s], "separator": [t + s, t + s + g],
                "extreme": [t + s + g, t + s + g + cfg.extreme_frames]}
    write_json(folder / "recording.json", {"video": video.name, "fps": cfg.fps, "size": cfg.render_size,
                                            "segments": segments})
    return video


def track_stage(cfg: BenchConfig, sdir: Path, progress: bool) -> dict[str, Any]:
    from liftavatar.face.track import TrackConfig, track
    from liftavatar.synth.world import DEFAULT_FOV_DEG

    if cfg.kinematics == "truth":
        return truth_track_stage(cfg, sdir)
    info = json.loads((sdir / "recording" / "recording.json").read_text())
    config = TrackConfig(size=cfg.size, fov=DEFAULT_FOV_DEG, device=cfg.device, appearance=cfg.track_appearance)
    capture, report = track(sdir / "recording" / info["video"], sdir / "tracked", config, overwrite=True,
                            resume=True, progress=progress)
    summary = {"frames": report.frames, "valid": report.valid, "median_reprojection_px": report.median_reprojection_px,
               "frames_per_second": report.frames_per_second, "seconds": dict(report.seconds),
               "crop": list(report.crop), "summary": report.summary()}
    write_json(sdir / "track.json", summary)
    return summary


def truth_track_stage(cfg: BenchConfig, sdir: Path) -> dict[str, Any]:
    """The ``tracked`` capture with the synthetic world's true kinematics (``BenchConfig.kinematics="truth"``):
    the recording's frames in the recording's order (separator frames black and invalid), re-rendered at
    ``size``² in the square crop the tracker would take (:func:`liftavatar.face.track.stable_crop` on the true
    landmarks) with that crop's camera, so captures line up with those of a tracked run."""
    from liftavatar.capture import PROVENANCE_SYNTHETIC, Kinematics
    from liftavatar.face.rig import FaceRig
    from liftavatar.face.track import TrackConfig, crop_intrinsics, stable_crop
    from liftavatar.synth.kinematics import KinematicsSequence
    from liftavatar.synth.subject import make_subject
    from liftavatar.synth.world import DEFAULT_FOV_DEG, render_sequence

    info = json.loads((sdir / "recording" / "recording.json").read_text())
    takes = [Capture.load(sdir / "synth" / name) for name in ("sparse", "extreme")]
    seg = info["segments"]
    n = seg["extreme"][1]
    kin = [t.kinematics for t in takes]
    rig = FaceRig.load()
    e = rig.num_expressions
    expression, rotation, translation = (np.zeros((n, e), np.float32), np.zeros((n, 3), np.float32),
                                         np.zeros((n, 3), np.float32))
    landmarks, valid = np.zeros((n, rig.num_landmarks, 2), np.float32), np.zeros(n, bool)
    spans = ((seg["train"][0], seg["seen"][1]), tuple(seg["extreme"]))  # the sparse take, then the extreme one
    for k, (lo, hi) in zip(kin, spans):
        expression[lo:hi], rotation[lo:hi], translation[lo:hi] = k.expression, k.rotation, k.translation
        landmarks[lo:hi], valid[lo:hi] = k.landmarks2d, True
    crop = stable_crop(landmarks, valid, TrackConfig().head_fraction)
    intrinsics = crop_intrinsics((cfg.render_size, cfg.render_size), DEFAULT_FOV_DEG, crop, cfg.size)
    identity = kin[0].identity
    subject = replace(make_subject(int(takes[0].meta.creator["config"]["seed"]), rig), identity=identity)
    meta = CaptureMeta(**{**asdict(takes[0].meta), "num_frames": n, "size": (cfg.size, cfg.size),
                          "intrinsics": tuple(float(v) for v in intrinsics), "reference_indices": None,
                          "creator": {"verb": "bench", "version": liftavatar.__version__,
                                      "config": {"kinematics": "truth", "crop": list(crop),
                                                 "source": [str(t.path) for t in takes]}}})
    blank = np.zeros((cfg.size, cfg.size, 3), np.uint8)
    with CaptureWriter(sdir / "tracked", meta, overwrite=True) as writer:
        order = np.flatnonzero(valid)
        motion = KinematicsSequence(expression[order], rotation[order], translation[order])
        for start, out in render_sequence(subject, motion, cfg.size, intrinsics, rig, batch_size=16, device=cfg.device):
            for j in range(len(out.rgb)):
                writer.add_frame(int(order[start + j]), out.rgb[j], out.mask[j], out.shading[j])
        for i in np.flatnonzero(~valid):
            writer.add_frame(int(i), blank, blank[..., 0], blank)
        writer.finalize(Kinematics(expression=expression, rotation=rotation, translation=translation, valid=valid,
                                   provenance=np.full(n, PROVENANCE_SYNTHETIC, np.uint8), identity=identity))
    summary = {"frames": n, "valid": int(valid.sum()), "kinematics": "truth", "crop": list(crop),
               "median_reprojection_px": 0.0, "frames_per_second": None}
    write_json(sdir / "track.json", summary)
    return summary


def split_stage(cfg: BenchConfig, sdir: Path) -> dict[str, Any]:
    """train / test_seen / test_extreme captures from the tracked recording."""
    tracked = Capture.load(sdir / "tracked")
    segments = json.loads((sdir / "recording" / "recording.json").read_text())["segments"]
    valid = tracked.kinematics.valid
    counts: dict[str, Any] = {}
    for name, segment, keep_invalid in (("train", "train", True), ("test_seen", "seen", False),
                                        ("test_extreme", "extreme", False)):
        lo, hi = segments[segment]
        indices = [i for i in range(lo, hi) if keep_invalid or valid[i]]
        if not any(valid[i] for i in indices):
            raise BenchError(f"{sdir / 'tracked'}: the tracker found no face in the {segment} frames {lo}–{hi - 1}; "
                             f"this subject cannot be benchmarked (try another seed or a larger render size).")
        subset_capture(tracked, sdir / name, indices, {"segment": segment, "recording_frames": indices})
        counts[name] = {"frames": len(indices), "valid": int(valid[indices].sum()), "of": hi - lo}
    write_json(sdir / "split.json", counts)
    return counts


def refs_stage(cfg: BenchConfig, sdir: Path) -> list[int]:
    from liftavatar.refs import choose_references

    return [int(i) for i in choose_references(sdir / "train", cfg.refs, "kmeans", seed=0)]


def _refs_done(cfg: BenchConfig, sdir: Path) -> bool:
    if not _is_capture(sdir / "train"):
        return False
    refs = json.loads((sdir / "train" / "capture.json").read_text()).get("reference_indices")
    return refs is not None and len(refs) == cfg.refs


def lift_config(cfg: BenchConfig, count: int):
    from liftavatar.lift import LiftConfig

    return LiftConfig(num_expressions=count, poses=cfg.lift_poses, refs=cfg.refs, steps=cfg.lift_steps,
                      solver=cfg.lift_solver, seed=cfg.lift_seed)


def lift_stage(cfg: BenchConfig, sdir: Path, progress: bool) -> dict[str, Any]:
    """Lift ``train`` with the curve's largest count, then write the smaller counts as prefixes."""
    from liftavatar.lift import coverage, lift
    from liftavatar.synth.kinematics import expression_keyframes

    top = max(cfg.points())
    out = sdir / "lifted"
    config = lift_config(cfg, top)
    if not _is_capture(out):
        lift(sdir / "train", out, cfg.prior, config, device=cfg.device, overwrite=False, resume=True,
             progress=progress)
    lifted = Capture.load(out)
    report = json.loads((out / "lift_report.json").read_text())
    window = int(report["frames_per_expression"])
    train = Capture.load(sdir / "train")
    n0 = train.num_frames
    kin = train.kinematics
    observed = kin.expression[kin.valid & (kin.provenance != PROVENANCE_LIFTED)]
    held_out = expression_keyframes("extreme", 500, list(train.meta.expression_names), seed=config.seed + 1)
    curve = []
    for k in cfg.points():
        if 0 < k < top:
            path = sdir / f"lifted_k{k:03d}"
            if not _is_capture(path):
                subset_capture(lifted, path, range(n0 + k * window), {"lifted_expressions": k, "prefix_of": str(out)},
                               reference_indices=lifted.meta.reference_indices)
        new = lifted.kinematics.expression[n0:n0 + k * window]
        curve.append({"k": k, "lifted_frames": k * window,
                      "coverage": coverage(held_out, np.concatenate([observed, new]), config.coverage_radius)})
    _save_lift_samples(lifted, n0, window, sdir / LIFT_SAMPLES)
    summary = {**report, "window": window, "observed_frames": int(len(observed)), "curve": curve,
               "machine": machine_name(machine_info(cfg.device))}
    write_json(sdir / "lift.json", summary)
    return summary


def _save_lift_samples(lifted: Capture, n0: int, window: int, path: Path, count: int = 8) -> None:
    """The references, and the target shading and generated frame at the end of ``count`` evenly spaced lifted
    clips, for the report (a few hundred kB, so the report needs no lifted capture on disk)."""
    clips = (lifted.num_frames - n0) // window
    chosen = np.unique(np.linspace(0, max(clips - 1, 0), min(count, clips)).round().astype(int)) if clips else []
    ends = [n0 + (int(c) + 1) * window - 1 for c in chosen]
    refs = [int(i) for i in lifted.meta.reference_indices or []]
    empty = np.zeros((0, *lifted.size, 3), np.uint8)
    save_npz(path, references=lifted.frames(refs) if refs else empty, reference_indices=np.array(refs, int),
             shading=lifted.shadings(ends) if ends else empty, generated=lifted.frames(ends) if ends else empty,
             clips=np.asarray(chosen, int))


def subject_stages_done(cfg: BenchConfig, sdir: Path) -> dict[str, bool]:
    """Per data stage, whether it need not run: its own output is complete, or a later stage's is (an earlier
    stage's outputs are only inputs to later ones, so a run folder copied to another machine without them —
    the recording, the synthetic takes — resumes where it stopped)."""
    own = {
        "synth": _is_capture(sdir / "synth" / "sparse") and _is_capture(sdir / "synth" / "extreme"),
        "video": (sdir / "recording" / "recording.json").is_file(),
        "track": _is_capture(sdir / "tracked") and (sdir / "track.json").is_file(),
        "split": (sdir / "split.json").is_file() and all(_is_capture(sdir / n)
                                                          for n in ("train", "test_seen", "test_extreme")),
        "refs": _refs_done(cfg, sdir),
        # lift.json is written last, after the lifted captures and samples: it is the stage's record.
        "lift": (sdir / "lift.json").is_file() and (sdir / LIFT_SAMPLES).is_file(),
    }
    done, later = {}, False
    for name in reversed(SUBJECT_STAGES):
        later = later or own[name]
        done[name] = later
    return {name: done[name] for name in SUBJECT_STAGES}


def prepare_subject(cfg: BenchConfig, run: Path, seed: int, progress: bool = True,
                    until: str = "lift") -> dict[str, Any]:
    """Stages 1–6 for one subject, up to and including ``until`` (each skipped when complete); returns its timings."""
    sdir = subject_dir(run, seed)
    sdir.mkdir(parents=True, exist_ok=True)
    log = _Log(sdir, f"s{seed}")
    done = subject_stages_done(cfg, sdir)
    steps = {"synth": lambda: synth_stage(cfg, sdir, seed, progress), "video": lambda: video_stage(cfg, sdir, seed),
             "track": lambda: track_stage(cfg, sdir, progress), "split": lambda: split_stage(cfg, sdir),
             "refs": lambda: refs_stage(cfg, sdir), "lift": lambda: lift_stage(cfg, sdir, progress)}
    for name in SUBJECT_STAGES[:SUBJECT_STAGES.index(until) + 1]:
        with log.stage(name, done[name]) as go:
            if go:
                steps[name]()
    return log.timings


# ---------------------------------------------------------------------------------------------- avatars


def avatar_capture(cfg: BenchConfig, run: Path, seed: int, k: int) -> Path:
    """The capture an avatar with ``k`` lifted expressions trains on (``train`` for the baseline)."""
    return lifted_capture_dir(run, seed, k, cfg)


def avatar_config(cfg: BenchConfig, progress: bool = True) -> AvatarTrainConfig:
    """The avatar trainer's config of every avatar of the run: the library's recipe with the run's settings."""
    return replace(AvatarTrainConfig(), iters=cfg.avatar_iters, size=cfg.size, lifted_weight=cfg.lifted_weight,
                   observed_share=cfg.observed_share, observed_finish=cfg.observed_finish, val_every=0,
                   checkpoint_every=max(cfg.avatar_iters // 4, 100), seed=cfg.avatar_seed, device=cfg.device,
                   progress=progress)


def _legacy_captures(cfg: BenchConfig, run: Path, seed: int, k: int) -> list[Path]:
    """The captures an avatar whose training started before ``observed_share`` lived in the trainer resumes on:
    the lifted capture and ``train`` again, so that it draws what it drew before (the trainer then keeps the
    stored recipe, observed_share 0)."""
    sdir = subject_dir(run, seed)
    lift = json.loads((sdir / "lift.json").read_text())
    repeats = observed_repeats(int(lift["observed_frames"]), k * int(lift["window"]), cfg.observed_share)
    return [avatar_capture(cfg, run, seed, k)] + [sdir / "train"] * (repeats - 1)


def _over_black(rgb: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 images times their (N, H, W) uint8 masks: over black, as the avatars render."""
    return (rgb.astype(np.float32) * (masks[..., None].astype(np.float32) / 255.0) + 0.5).astype(np.uint8)


def _gt_frames(capture: Capture) -> tuple[np.ndarray, np.ndarray]:
    """The test capture's frames times their masks (black background, as the avatar renders) and masks."""
    masks = capture.masks()
    return _over_black(capture.frames(), masks), masks


def render_capture(avatar, capture: Capture, device: str, batch: int = 8) -> np.ndarray:
    """(N, H, W, 3) uint8 renders (over black) of ``avatar`` driven by ``capture``'s kinematics and camera."""
    from liftavatar.avatar.export import render_frames

    frames = render_frames(avatar.to(device), capture.kinematics, tuple(capture.meta.intrinsics),
                           tuple(capture.size), batch=batch)
    return np.stack(list(frames))


def evaluate_renders(renders: np.ndarray, test_path: Path, cfg: BenchConfig) -> dict[str, Any]:
    """The metrics report of an avatar's ``renders`` of one test capture."""
    from liftavatar.metrics.evaluate import EvalConfig, evaluate
    from liftavatar.metrics.sources import FrameSet

    test = Capture.load(test_path)
    gt, masks = _gt_frames(test)
    intrinsics = tuple(float(v) for v in test.meta.intrinsics)
    pred = FrameSet(None, "array", renders, intrinsics=intrinsics)
    truth = FrameSet(test.path, "capture", gt, masks, test.kinematics, intrinsics)
    config = EvalConfig(metrics=tuple(cfg.metrics), kinematics="tracked", masked=True, device=cfg.device)
    return evaluate(pred, truth, config)


def avatar_job(cfg: BenchConfig, run: Path, seed: int, k: int, progress: bool = True) -> dict[str, Any]:
    """Train the avatar with ``k`` lifted expressions (resuming its checkpoint) and render it through both test
    captures' kinematics (``renders_{split}.npz``). Skipped when its ``job.json`` exists. Returns the job record."""
    from liftavatar.avatar.model import load_avatar
    from liftavatar.avatar.train import train_avatar

    out = avatar_dir(run, seed, k)
    done = out / "job.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "resumed": True}
    sdir = subject_dir(run, seed)
    captures = [avatar_capture(cfg, run, seed, k)]
    threads = 1 if _cpu(cfg.device) else None  # the CPU rasterizer's many small ops run best on one thread
    with _torch_threads(threads):
        state = out / "train_state.json"
        saved = json.loads(state.read_text()) if state.is_file() else {"step": 0, "config": {}}
        step = saved["step"]
        if step and "observed_share" not in saved["config"]:
            captures = _legacy_captures(cfg, run, seed, k)
        record: dict[str, Any] = {"seed": seed, "k": k, "captures": [str(p) for p in captures]}
        start = time.perf_counter()
        if step < cfg.avatar_iters:
            result = train_avatar(captures, out, avatar_config(cfg, progress), resume=step > 0, force=step == 0)
            record.update(iters_per_second=result.iters_per_second, gaussians=result.num_gaussians)
        record["train_seconds"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        avatar = load_avatar(out, device=cfg.device)
        record["gaussians"] = avatar.num_gaussians
        for split in SPLITS:
            renders = render_capture(avatar, Capture.load(sdir / f"test_{split}"), cfg.device)
            save_npz(out / f"renders_{split}.npz", renders=renders)
        record["render_seconds"] = round(time.perf_counter() - start, 2)
    record["machine"] = machine_name(machine_info(cfg.device))
    write_json(done, record)
    return {**record, "resumed": False}


def eval_job(cfg: BenchConfig, run: Path, seed: int, k: int, progress: bool = True) -> dict[str, Any]:
    """Metrics of the avatar's renders on both test captures (``eval_{split}.json``), from the files
    :func:`avatar_job` wrote: no avatar is loaded, so renders made on another machine evaluate here.
    Skipped when both reports exist. Returns ``{"eval_seconds", "resumed"}``."""
    out = avatar_dir(run, seed, k)
    if all((out / f"eval_{split}.json").is_file() for split in SPLITS):
        return {"eval_seconds": json.loads((out / "job.json").read_text()).get("eval_seconds", 0.0), "resumed": True}
    start = time.perf_counter()
    for split in SPLITS:
        path = out / f"renders_{split}.npz"
        if not path.is_file():
            raise BenchError(f"{path}: missing; the avatar stage writes it (run the bench without --until, or copy "
                             f"the avatars folder back from the machine that trained them).")
        with np.load(path) as data:
            renders = data["renders"]
        write_json(out / f"eval_{split}.json", evaluate_renders(renders, subject_dir(run, seed) / f"test_{split}", cfg))
    seconds = round(time.perf_counter() - start, 2)
    record = json.loads((out / "job.json").read_text())
    write_json(out / "job.json", {**record, "eval_seconds": seconds})
    return {"eval_seconds": seconds, "resumed": False}


def oracle_renders(seed: int, capture: Capture, batch: int = 16) -> np.ndarray:
    """(N, H, W, 3) uint8 renders over black of synthetic subject ``seed``'s true texture on the rig, driven by
    ``capture``'s kinematics with its identity and camera (the synthetic world's renderer, as
    :func:`liftavatar.synth.world.synthesize` uses it): the oracle appearance of the module docstring."""
    from liftavatar.synth.kinematics import KinematicsSequence
    from liftavatar.synth.subject import make_subject
    from liftavatar.synth.world import render_sequence

    h, w = capture.size
    if h != w:
        raise BenchError(f"{capture.path}: the oracle appearance renders square frames; this capture is {w}×{h}.")
    kin = capture.kinematics
    subject = replace(make_subject(seed), identity=np.asarray(kin.identity, np.float32))
    intrinsics = tuple(float(v) for v in capture.meta.intrinsics)
    motion = KinematicsSequence(kin.expression, kin.rotation, kin.translation)
    out = [_over_black(b.rgb, b.mask) for _, b in render_sequence(subject, motion, h, intrinsics, batch_size=batch)]
    return np.concatenate(out) if out else np.zeros((0, h, w, 3), np.uint8)


def oracle_job(cfg: BenchConfig, run: Path, seed: int, progress: bool = True) -> dict[str, Any]:
    """Render and evaluate the oracle appearance on both test captures (``oracle/renders_{split}.npz`` and
    ``oracle/eval_{split}.json``); skipped when both reports exist. Needs only the seed and the test captures'
    kinematics and camera, so it runs wherever the evaluation does. Returns ``{"oracle_seconds", "resumed"}``."""
    out = oracle_dir(run, seed)
    if all((out / f"eval_{split}.json").is_file() for split in SPLITS):
        return {"oracle_seconds": 0.0, "resumed": True}
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        test_path = subject_dir(run, seed) / f"test_{split}"
        renders = oracle_renders(seed, Capture.load(test_path))
        save_npz(out / f"renders_{split}.npz", renders=renders)
        write_json(out / f"eval_{split}.json", evaluate_renders(renders, test_path, cfg))
    return {"oracle_seconds": round(time.perf_counter() - start, 2), "resumed": False}


# ---------------------------------------------------------------------------------------------- running


def _worker_init(threads: int) -> None:
    """A worker's share of the CPU cores (MediaPipe, rig fits and CPU-side work of every job)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _run_many(fn: Callable[..., Any], jobs: list[tuple], workers: int, desc: str) -> list[Any]:
    """``fn(*job)`` for every job: in this process (workers 1) or a spawn pool; results in job order."""
    from tqdm import tqdm

    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job, progress=True) for job in jobs]
    import multiprocessing

    results: list[Any] = [None] * len(jobs)
    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(fn, *job, progress=False): i for i, job in enumerate(jobs)}
        bar = tqdm(total=len(jobs), desc=desc, unit="job")
        from concurrent.futures import as_completed

        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
        bar.close()
    return results


def _warm_up_cuda(device: str) -> None:
    """Build gsplat's CUDA kernels once here (JIT on first use) rather than in every worker at once."""
    import torch

    from liftavatar.avatar.raster import rasterization

    dev = torch.device(device)
    means = torch.tensor([[0.0, 0.0, 1.0]], device=dev)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], device=dev)
    scales = torch.full((1, 3), 0.01, device=dev)
    viewmat = torch.eye(4, device=dev)[None]
    k = torch.tensor([[[16.0, 0, 8], [0, 16.0, 8], [0, 0, 1]]], device=dev)
    rasterization(means, quats, scales, torch.ones(1, device=dev), torch.ones(1, 3, device=dev), viewmat, k, 16, 16)


def _resolve_workers(cfg: BenchConfig) -> int:
    return max(1, int(cfg.workers))


def _check_run_dir(run: Path, cfg: BenchConfig, force: bool) -> None:
    path = run / "config.json"
    if force and run.exists():
        if not (path.is_file() or not any(run.iterdir())):
            raise BenchError(f"{run}: exists and is not a benchmark run folder (no config.json); "
                             f"choose another --out rather than have --force delete it.")
        shutil.rmtree(run)
    if path.is_file():
        stored = json.loads(path.read_text())
        old = config_from_json(stored.get("config", {})).protocol()
        if old != cfg.protocol():
            changed = sorted(k for k in set(old) | set(cfg.protocol()) if old.get(k) != cfg.protocol().get(k))
            raise BenchError(f"{run}: holds a run made with other settings ({', '.join(changed)} differ); pass "
                             f"--force to start it over, or choose another --out.")
    elif run.exists() and any(p.name != "report" for p in run.iterdir()):
        raise BenchError(f"{run}: exists and is not a benchmark run folder (no config.json); choose another --out.")
    run.mkdir(parents=True, exist_ok=True)
    write_json(path, {"liftavatar_version": liftavatar.__version__, "config": asdict(cfg)})


def run_bench(cfg: BenchConfig, out: str | Path, force: bool = False, progress: bool = True,
              until: str | None = None, only: Sequence[int] | None = None) -> dict[str, Any]:
    """Run (or resume) the benchmark into ``out``: stages per subject, avatars, evaluation, aggregation, report.

    ``until`` (one of :data:`STAGES`) stops after that stage for every subject, without results: a run split
    across machines makes its data stages on one (say ``until="refs"`` where the tracker is installed), lifts
    and trains avatars on a GPU (``until="avatars"``), and evaluates and reports back on the first; each part
    resumes from the files the other left. ``only`` (subject seeds of the run, with ``until`` at most
    ``"avatars"``) runs those subjects alone, so a run can travel one subject at a time where a machine call
    carries little. Returns the results (also in ``out/results.json``;
    ``results["report"]`` is the HTML report's path), or ``{"stopped_after": until}``.
    """
    from functools import partial

    from liftavatar.bench.html import write_report
    from liftavatar.bench.summary import summarise, write_markdown

    cfg.check()
    if until is not None and until not in STAGES:
        raise ConfigError(f"--until {until}: use one of {', '.join(STAGES)}.")
    seeds = cfg.subject_seeds()
    if only is not None:
        if until is None or STAGES.index(until) > STAGES.index("avatars"):
            raise ConfigError("--only runs part of the subjects, so it needs --until avatars or an earlier stage "
                              "(the evaluation and report need every subject).")
        unknown = sorted(set(only) - set(seeds))
        if unknown:
            raise ConfigError(f"--only {' '.join(map(str, unknown))}: not a subject of this run "
                              f"(its seeds: {', '.join(map(str, seeds))}).")
        seeds = [s for s in seeds if s in only]
    run = Path(out)
    _check_run_dir(run, cfg, force)
    if cfg.prior is None and until not in SUBJECT_STAGES[:-1]:  # the stages before lift need no prior
        from liftavatar.generator.prior import resolve_prior

        resolve_prior(None)  # fail now, not after synthesis, when no prior is installed
    workers = _resolve_workers(cfg)
    wall = time.perf_counter()
    clock: dict[str, float] = {}

    start = time.perf_counter()
    last = until if until in SUBJECT_STAGES else SUBJECT_STAGES[-1]
    subject_timings = _run_many(partial(prepare_subject, until=last), [(cfg, run, s) for s in seeds], workers,
                                "subjects")
    clock["subjects (synth → lift)"] = time.perf_counter() - start
    if until in SUBJECT_STAGES:
        return _stopped(run, until)

    jobs = [(cfg, run, s, k) for s in seeds for k in cfg.points()]
    pending = [job for job in jobs if not (avatar_dir(run, job[2], job[3]) / "job.json").is_file()]
    if pending and not _cpu(cfg.device):
        start = time.perf_counter()
        _warm_up_cuda(cfg.device)
        clock["gsplat warm-up"] = time.perf_counter() - start
    print(f"[bench] {len(jobs)} avatars ({len(seeds)} subjects × curve {cfg.points()}), "
          f"{cfg.avatar_iters} iterations each, on {cfg.device} with {workers} worker(s)", flush=True)
    start = time.perf_counter()
    records = _run_many(avatar_job, jobs, workers, "avatars")
    clock["avatars (train + render)"] = time.perf_counter() - start
    if until == "avatars":
        return _stopped(run, until)

    start = time.perf_counter()
    # Metrics run the tracker (AED) and dlib (CSIM) on the CPU: one process unless asked for more.
    evals = _run_many(eval_job, jobs, workers if _cpu(cfg.device) else 1, "evaluation")
    records = [{**r, **e, "resumed": r["resumed"] and e["resumed"]} for r, e in zip(records, evals)]
    oracles = _run_many(oracle_job, [(cfg, run, s) for s in seeds], workers if _cpu(cfg.device) else 1, "oracle")
    clock["evaluation"] = time.perf_counter() - start
    if until == "eval":
        return _stopped(run, until)

    start = time.perf_counter()
    results = summarise(cfg, run, subject_timings, records, oracles)
    results["machine"] = machine_info(cfg.device)
    results["workers"] = workers
    results["timings"]["wall_seconds_this_invocation"] = {k: round(v, 2) for k, v in clock.items()}
    write_json(run / "results.json", results)
    write_markdown(results, run / "results.md")
    report = write_report(results, run, run / "report")
    clock["report"] = time.perf_counter() - start
    results["timings"]["wall_seconds_this_invocation"] = {k: round(v, 2) for k, v in clock.items()}
    results["timings"]["wall_seconds_total_this_invocation"] = round(time.perf_counter() - wall, 2)
    results["report"] = str(report)
    write_json(run / "results.json", results)
    write_markdown(results, run / "results.md")
    shutil.copyfile(run / "results.json", run / "report" / "results.json")
    shutil.copyfile(run / "results.md", run / "report" / "results.md")
    _print_timings(results)
    return results


def _stopped(run: Path, until: str) -> dict[str, Any]:
    print(f"[bench] stopped after the {until} stage, as asked; run the same command without --until (on any "
          f"machine, with {run} copied there) to go on.", flush=True)
    return {"stopped_after": until, "run": str(run)}


def _print_timings(results: dict[str, Any]) -> None:
    t = results["timings"]
    parts = [f"{name} {v['seconds']:.1f}s" + (" (earlier run)" if v.get("resumed") else "")
             for name, v in t["stages"].items()]
    print("stage timings (summed over subjects): " + ", ".join(parts), flush=True)
    wall = t.get("wall_seconds_this_invocation", {})
    print("wall time of this invocation: " + ", ".join(f"{k} {v:.1f}s" for k, v in wall.items())
          + f"; total {t.get('wall_seconds_total_this_invocation', float('nan')):.1f}s", flush=True)
