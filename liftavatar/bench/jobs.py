"""The benchmark's jobs per avatar and per subject (7–8 of :mod:`liftavatar.bench`): train and render an avatar
(:func:`avatar_job`), evaluate its renders (:func:`eval_job`), and render and evaluate the oracle appearance
(:func:`oracle_job`). Each records what it did, how long it took and on which machine, and is skipped when its
record is complete."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from liftavatar.avatar.train import TrainConfig as AvatarTrainConfig
from liftavatar.avatar.train import observed_repeats
from liftavatar.bench.config import BenchConfig, BenchError
from liftavatar.bench.layout import (SPLITS, avatar_dir, gt_frames, lifted_capture_dir, oracle_dir, over_black,
                                     subject_dir, this_machine)
from liftavatar.capture import Capture
from liftavatar.io import save_npz, write_json

__all__ = ["avatar_capture", "avatar_config", "avatar_job", "eval_job", "evaluate_renders", "legacy_captures",
           "on_cpu", "oracle_job", "oracle_renders", "render_capture"]


def on_cpu(device: str) -> bool:
    return not str(device).startswith("cuda")


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


def avatar_capture(cfg: BenchConfig, run: Path, name: str, k: int) -> Path:
    """The capture subject ``name``'s avatar with ``k`` lifted expressions trains on (``train`` for the baseline)."""
    return lifted_capture_dir(run, name, k, cfg)


def avatar_config(cfg: BenchConfig, progress: bool = True) -> AvatarTrainConfig:
    """The avatar trainer's config of every avatar of the run: the library's recipe with the run's settings."""
    defaults = AvatarTrainConfig()
    return replace(defaults, avatar=replace(defaults.avatar, deform_width=cfg.deform_width), iters=cfg.avatar_iters, size=cfg.size, lifted_weight=cfg.lifted_weight,
                   observed_share=cfg.observed_share, observed_finish=cfg.observed_finish, val_every=0,
                   checkpoint_every=max(cfg.avatar_iters // 4, 100), seed=cfg.avatar_seed, device=cfg.device,
                   progress=progress)


def legacy_captures(cfg: BenchConfig, run: Path, name: str, k: int) -> list[Path]:
    """The captures an avatar whose training started before ``observed_share`` lived in the trainer resumes on:
    the lifted capture and ``train`` again, so that it draws what it drew before (the trainer then keeps the
    stored recipe, observed_share 0)."""
    sdir = subject_dir(run, name)
    lift = json.loads((sdir / "lift.json").read_text())
    repeats = observed_repeats(int(lift["observed_frames"]), k * int(lift["window"]), cfg.observed_share)
    return [avatar_capture(cfg, run, name, k)] + [sdir / "train"] * (repeats - 1)


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
    gt, masks = gt_frames(test)
    intrinsics = tuple(float(v) for v in test.meta.intrinsics)
    pred = FrameSet(None, "array", renders, intrinsics=intrinsics)
    truth = FrameSet(test.path, "capture", gt, masks, test.kinematics, intrinsics)
    config = EvalConfig(metrics=tuple(cfg.metrics), kinematics="tracked", masked=True, device=cfg.device)
    return evaluate(pred, truth, config)


def avatar_job(cfg: BenchConfig, run: Path, name: str, k: int, progress: bool = True) -> dict[str, Any]:
    """Train the avatar with ``k`` lifted expressions (resuming its checkpoint) and render it through both test
    captures' kinematics (``renders_{split}.npz``). Skipped when its ``job.json`` exists. Returns the job record."""
    from liftavatar.avatar.model import load_avatar
    from liftavatar.avatar.train import train_avatar

    out = avatar_dir(run, name, k)
    done = out / "job.json"
    if done.is_file():
        return {**json.loads(done.read_text()), "resumed": True}
    sdir = subject_dir(run, name)
    captures = [avatar_capture(cfg, run, name, k)]
    threads = 1 if on_cpu(cfg.device) else None  # the CPU rasterizer's many small ops run best on one thread
    with _torch_threads(threads):
        state = out / "train_state.json"
        saved = json.loads(state.read_text()) if state.is_file() else {"step": 0, "config": {}}
        step = saved["step"]
        if step and "observed_share" not in saved["config"]:
            captures = legacy_captures(cfg, run, name, k)
        record: dict[str, Any] = {"subject": name, "k": k, "captures": [str(p) for p in captures]}
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
    record["machine"] = this_machine(cfg.device)
    write_json(done, record)
    return {**record, "resumed": False}


def eval_job(cfg: BenchConfig, run: Path, name: str, k: int, progress: bool = True) -> dict[str, Any]:
    """Metrics of the avatar's renders on both test captures (``eval_{split}.json``), from the files
    :func:`avatar_job` wrote: no avatar is loaded, so renders made on another machine evaluate here.
    Skipped when both reports exist. Returns ``{"eval_seconds", "eval_machine", "resumed"}`` (also in ``job.json``;
    runs made before the machine was recorded have none)."""
    out = avatar_dir(run, name, k)
    if all((out / f"eval_{split}.json").is_file() for split in SPLITS):
        record = json.loads((out / "job.json").read_text())
        return {"eval_seconds": record.get("eval_seconds", 0.0), "eval_machine": record.get("eval_machine"),
                "resumed": True}
    start = time.perf_counter()
    for split in SPLITS:
        path = out / f"renders_{split}.npz"
        if not path.is_file():
            raise BenchError(f"{path}: missing; the avatar stage writes it (run the bench without --until, or copy "
                             f"the avatars folder back from the machine that trained them).")
        with np.load(path) as data:
            renders = data["renders"]
        write_json(out / f"eval_{split}.json", evaluate_renders(renders, subject_dir(run, name) / f"test_{split}", cfg))
    done = {"eval_seconds": round(time.perf_counter() - start, 2), "eval_machine": this_machine(cfg.device)}
    write_json(out / "job.json", {**json.loads((out / "job.json").read_text()), **done})
    return {**done, "resumed": False}


def oracle_renders(seed: int, capture: Capture, batch: int = 16) -> np.ndarray:
    """(N, H, W, 3) uint8 renders over black of synthetic subject ``seed``'s true texture on the rig, driven by
    ``capture``'s kinematics with its identity and camera (the synthetic world's renderer, as
    :func:`liftavatar.synth.world.synthesize` uses it): the oracle appearance of :mod:`liftavatar.bench`.

    Masked by the rule the capture's own masks follow, as ``lift`` masks its frames: the renderer's silhouette for
    rendered ground truth; for tracked frames (the bench's protocol) that silhouette within the head region of the
    same kinematics (:func:`liftavatar.face.masks.head_region`), which cuts it at the collar line as the tracked
    masks are cut; uncut, the oracle showed neck and collar where the ground truth is black."""
    from liftavatar.capture import PROVENANCE_OBSERVED
    from liftavatar.face.masks import head_region
    from liftavatar.synth.kinematics import KinematicsSequence
    from liftavatar.synth.subject import make_subject
    from liftavatar.synth.world import render_sequence

    h, w = capture.size
    if h != w:
        raise BenchError(f"{capture.path}: the oracle appearance renders square frames; this capture is {w}×{h}.")
    kin = capture.kinematics
    if not len(kin):
        return np.zeros((0, h, w, 3), np.uint8)
    subject = replace(make_subject(seed), identity=np.asarray(kin.identity, np.float32))
    intrinsics = tuple(float(v) for v in capture.meta.intrinsics)
    motion = KinematicsSequence(kin.expression, kin.rotation, kin.translation)
    batches = [b for _, b in render_sequence(subject, motion, h, intrinsics, batch_size=batch)]
    rgb, masks = np.concatenate([b.rgb for b in batches]), np.concatenate([b.mask for b in batches])
    tracked = kin.provenance == PROVENANCE_OBSERVED
    if tracked.any():
        region = head_region(kin.identity, kin.expression, kin.rotation, kin.translation, intrinsics, (h, w))
        masks = np.where(region | ~tracked[:, None, None], masks, 0).astype(np.uint8)
    return over_black(rgb, masks)


def oracle_job(cfg: BenchConfig, run: Path, name: str, progress: bool = True) -> dict[str, Any]:
    """Render and evaluate synthetic subject ``name``'s oracle appearance on both test captures
    (``oracle/renders_{split}.npz`` and ``oracle/eval_{split}.json``); skipped when both reports exist. Needs only
    the seed and the test captures' kinematics and camera, so it runs wherever the evaluation does. Returns its
    record ``{"oracle_seconds", "machine", "resumed"}`` (also in ``oracle/job.json``; runs made before it was written
    have none). A real clip has no true texture, so it has no oracle."""
    seed = cfg.subject(name).seed
    if seed is None:
        raise BenchError(f"{name}: a real clip has no oracle appearance (no true texture of the person exists).")
    out = oracle_dir(run, name)
    if all((out / f"eval_{split}.json").is_file() for split in SPLITS):
        record = json.loads((out / "job.json").read_text()) if (out / "job.json").is_file() else {}
        return {"oracle_seconds": 0.0, **record, "resumed": True}
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        test_path = subject_dir(run, name) / f"test_{split}"
        renders = oracle_renders(seed, Capture.load(test_path))
        save_npz(out / f"renders_{split}.npz", renders=renders)
        write_json(out / f"eval_{split}.json", evaluate_renders(renders, test_path, cfg))
    record = {"oracle_seconds": round(time.perf_counter() - start, 2), "machine": this_machine(cfg.device)}
    write_json(out / "job.json", record)
    return {**record, "resumed": False}

