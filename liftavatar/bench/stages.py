"""The data stages of one benchmark subject (1–6 of :mod:`liftavatar.bench`): synth, video, track, split, refs and
lift, each writing into the subject's folder (``RUN/subjects/NAME/``) and skipped when its record, or a later
stage's, is complete. A real clip is its own recording: its stages start at track, and its split is by kinematics
(:mod:`liftavatar.bench.real`)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

import liftavatar
from liftavatar.bench.config import BenchConfig, BenchError, Subject
from liftavatar.bench.layout import LIFT_SAMPLES, StageLog, is_capture, subject_dir, this_machine
from liftavatar.capture import IMAGE_DIRS, PROVENANCE_LIFTED, Capture, CaptureMeta, CaptureWriter
from liftavatar.io import json_safe, save_npz, write_json

__all__ = ["lift_config", "lift_stage", "prepare_subject", "refs_stage", "split_stage", "subject_stages_done",
           "subset_capture", "synth_stage", "track_stage", "truth_track_stage", "video_stage"]


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



def synth_stage(cfg: BenchConfig, sdir: Path, seed: int, progress: bool) -> tuple[Path, Path]:
    from liftavatar.synth.world import SynthSpec, synthesize

    paths = []
    for preset, frames in (("sparse", cfg.train_frames + cfg.seen_frames), ("extreme", cfg.extreme_frames)):
        out = sdir / "synth" / preset
        if not is_capture(out):
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


def track_stage(cfg: BenchConfig, sdir: Path, subject: Subject, progress: bool) -> dict[str, Any]:
    """The tracker on the subject's recording (a synthetic subject's, filmed with the synthetic world's camera) or
    on its clip (a real one, with `track`'s default camera) into the ``tracked`` capture; the report in track.json."""
    from liftavatar.face.track import TrackConfig, track
    from liftavatar.synth.world import DEFAULT_FOV_DEG

    if cfg.kinematics == "truth":
        return truth_track_stage(cfg, sdir)
    config = TrackConfig(size=cfg.size, device=cfg.device, appearance=cfg.track_appearance)
    if subject.clip is not None:
        video = Path(subject.clip)
    else:
        video = sdir / "recording" / json.loads((sdir / "recording" / "recording.json").read_text())["video"]
        config = replace(config, fov=DEFAULT_FOV_DEG)
    capture, report = track(video, sdir / "tracked", config, overwrite=True, resume=True, progress=progress)
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


def split_stage(cfg: BenchConfig, sdir: Path, subject: Subject) -> dict[str, Any]:
    """train / test_seen / test_extreme captures from the tracked recording (by its takes) or clip (by kinematics);
    their sizes and frames in split.json."""
    tracked = Capture.load(sdir / "tracked")
    split = (_kinematic_split(cfg, tracked, subject) if subject.clip is not None else _take_split(sdir, tracked))
    counts: dict[str, Any] = {}
    valid = tracked.kinematics.valid
    for name, (indices, note) in split.items():
        subset_capture(tracked, sdir / name, indices, {**note, "recording_frames": indices})
        counts[name] = {"frames": len(indices), "valid": int(valid[indices].sum()), **note}
    write_json(sdir / "split.json", counts)
    return counts


def _take_split(sdir: Path, tracked: Capture) -> dict[str, tuple[list[int], dict[str, Any]]]:
    """A synthetic recording's frames by take: the sparse take's first frames (train, invalid ones kept), its last
    (seen) and the extreme take, the test captures with valid frames only."""
    segments = json.loads((sdir / "recording" / "recording.json").read_text())["segments"]
    valid = tracked.kinematics.valid
    split = {}
    for name, segment, keep_invalid in (("train", "train", True), ("test_seen", "seen", False),
                                        ("test_extreme", "extreme", False)):
        lo, hi = segments[segment]
        indices = [i for i in range(lo, hi) if keep_invalid or valid[i]]
        if not any(valid[i] for i in indices):
            raise BenchError(f"{sdir / 'tracked'}: the tracker found no face in the {segment} frames {lo}–{hi - 1}; "
                             f"this subject cannot be benchmarked (try another seed or a larger render size).")
        split[name] = (indices, {"segment": segment, "of": hi - lo})
    return split


def _kinematic_split(cfg: BenchConfig, tracked: Capture, subject: Subject) -> dict[str, tuple[list[int], dict]]:
    """A real clip's valid frames by kinematics (:func:`liftavatar.bench.real.split_frames`), refused when the
    clip has too few for the protocol."""
    from liftavatar.bench.real import check_split, split_frames

    kin = tracked.kinematics
    split = split_frames(kin, cfg.extreme_share, cfg.split_guard, cfg.seen_every, cfg.seen_block)
    check_split(subject.clip, split, int(kin.valid.sum()), len(kin), cfg)
    note = {"of": len(kin), "valid_frames": int(kin.valid.sum()), "extreme_distance_threshold": split.threshold}
    return {"train": (split.train.tolist(), {"segment": "train", **note}),
            "test_seen": (split.seen.tolist(), {"segment": "seen", **note}),
            "test_extreme": (split.extreme.tolist(), {"segment": "extreme", **note})}


def refs_stage(cfg: BenchConfig, sdir: Path) -> list[int]:
    from liftavatar.refs import choose_references

    return [int(i) for i in choose_references(sdir / "train", cfg.refs, "kmeans", seed=0)]


def _refs_done(cfg: BenchConfig, sdir: Path) -> bool:
    if not is_capture(sdir / "train"):
        return False
    refs = json.loads((sdir / "train" / "capture.json").read_text()).get("reference_indices")
    return refs is not None and len(refs) == cfg.refs


def lift_config(cfg: BenchConfig, count: int):
    """The run's lifting in the configs `liftavatar lift` takes: the prior (:class:`PriorConfig`) and what to lift
    (:class:`LiftConfig`, whose sampling fields are :class:`SamplerConfig`'s)."""
    from liftavatar.generator.prior import PriorConfig
    from liftavatar.lift import LiftConfig

    prior = PriorConfig(prior=cfg.prior, device=cfg.device)
    return prior, LiftConfig(num_expressions=count, library=cfg.lift_library, poses=cfg.lift_poses, refs=cfg.refs,
                             steps=cfg.lift_steps, solver=cfg.lift_solver, seed=cfg.lift_seed)


def lift_stage(cfg: BenchConfig, sdir: Path, progress: bool) -> dict[str, Any]:
    """Lift ``train`` with the curve's largest count, then write the smaller counts as prefixes. Each count's
    coverage is of the extreme test's own kinematics (expression, pose relative to the training frames' typical
    one, and jointly): how much of what the avatars are tested on some training frame comes near."""
    from liftavatar.lift import lift
    from liftavatar.targets import coverage_report, relative_rotations, typical_rotation

    top = max(cfg.points())
    out = sdir / "lifted"
    prior, config = lift_config(cfg, top)
    if not is_capture(out):
        lift(sdir / "train", out, prior, config, overwrite=False, resume=True, progress=progress)
    lifted = Capture.load(out)
    report = json.loads((out / "lift_report.json").read_text())
    window = int(report["frames_per_expression"])
    train = Capture.load(sdir / "train")
    n0 = train.num_frames
    kin = train.kinematics
    own = kin.valid & (kin.provenance != PROVENANCE_LIFTED)
    observed = kin.expression[own]
    typical = typical_rotation(kin.rotation[own])
    test = Capture.load(sdir / "test_extreme").kinematics
    query = (test.expression[test.valid], relative_rotations(test.rotation[test.valid], typical))
    curve = []
    for k in cfg.points():
        if 0 < k < top:
            path = sdir / f"lifted_k{k:03d}"
            if not is_capture(path):
                subset_capture(lifted, path, range(n0 + k * window), {"lifted_expressions": k, "prefix_of": str(out)},
                               reference_indices=lifted.meta.reference_indices)
        rows = slice(n0, n0 + k * window)
        cover = coverage_report(*query, np.concatenate([observed, lifted.kinematics.expression[rows]]),
                                relative_rotations(np.concatenate([kin.rotation[own], lifted.kinematics.rotation[rows]]),
                                                   typical), config.coverage_radius, config.pose_radius_deg)
        curve.append({"k": k, "lifted_frames": k * window, "coverage": cover["joint"],
                      "coverage_expression": cover["expression"], "coverage_pose": cover["pose"]})
    _save_lift_samples(lifted, n0, window, sdir / LIFT_SAMPLES)
    summary = {**report, "window": window, "observed_frames": int(len(observed)), "curve": curve,
               "machine": this_machine(cfg.device)}
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
    stages = cfg.subject_stages()
    own = {
        "synth": is_capture(sdir / "synth" / "sparse") and is_capture(sdir / "synth" / "extreme"),
        "video": (sdir / "recording" / "recording.json").is_file(),
        "track": is_capture(sdir / "tracked") and (sdir / "track.json").is_file(),
        "split": (sdir / "split.json").is_file() and all(is_capture(sdir / n)
                                                          for n in ("train", "test_seen", "test_extreme")),
        "refs": _refs_done(cfg, sdir),
        # lift.json is written last, after the lifted captures and samples: it is the stage's record.
        "lift": (sdir / "lift.json").is_file() and (sdir / LIFT_SAMPLES).is_file(),
    }
    done, later = {}, False
    for name in reversed(stages):
        later = later or own[name]
        done[name] = later
    return {name: done[name] for name in stages}


def prepare_subject(cfg: BenchConfig, run: Path, subject: Subject, progress: bool = True,
                    until: str = "lift") -> dict[str, Any]:
    """The data stages of one subject (:meth:`BenchConfig.subject_stages`), up to and including ``until`` (each
    skipped when complete); returns its timings."""
    sdir = subject_dir(run, subject.name)
    sdir.mkdir(parents=True, exist_ok=True)
    log = StageLog(sdir, subject.name, this_machine(cfg.device))
    done = subject_stages_done(cfg, sdir)
    steps = {"synth": lambda: synth_stage(cfg, sdir, subject.seed, progress),
             "video": lambda: video_stage(cfg, sdir, subject.seed),
             "track": lambda: track_stage(cfg, sdir, subject, progress),
             "split": lambda: split_stage(cfg, sdir, subject),
             "refs": lambda: refs_stage(cfg, sdir), "lift": lambda: lift_stage(cfg, sdir, progress)}
    stages = cfg.subject_stages()
    for name in stages[:stages.index(until) + 1]:
        with log.stage(name, done[name]) as go:
            if go:
                steps[name]()
    return log.timings

