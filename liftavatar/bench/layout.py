"""A benchmark run folder: where each stage's files are, the stages' records, and which files a run split
across machines carries each way.

```
RUN/config.json                      the BenchConfig of the run (what a resumed run must share)
RUN/subjects/NAME/timings.json       per data stage: seconds, whether it was resumed, the machine it ran on
                                     (NAME: s<seed> for a synthetic subject, the file stem of a real clip)
                    synth/ recording/ tracked/ track.json split.json    stages 1–4 (a real clip: tracked/ on)
                    train/ test_seen/ test_extreme/                    captures (train holds the references)
                    lifted/ lifted_kNNN/ lift.json lift_samples.npz    stage 6 (lift.json last: its record)
                    avatars/kNNN/job.json renders_{split}.npz eval_{split}.json    stages 7–8
                    oracle/job.json renders_{split}.npz eval_{split}.json      the oracle appearance
RUN/results.json results.md report/                                     the aggregation and the report
```
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from liftavatar.bench.config import BenchConfig
from liftavatar.capture import Capture
from liftavatar.io import write_json
from liftavatar.report import machine_info, machine_name

__all__ = ["LIFT_SAMPLES", "REAL_SPLITS", "SPLITS", "StageLog", "avatar_dir", "avatar_stage_inputs",
           "avatar_stage_outputs", "gt_frames", "is_capture", "lifted_capture_dir", "oracle_dir", "over_black",
           "split_titles", "subject_dir", "this_machine"]

logger = logging.getLogger(__name__)

LIFT_SAMPLES = "lift_samples.npz"
"""The lift stage's samples for the report (references, target shading, generated frames), in the subject's folder."""
SPLITS: dict[str, str] = {
    "extreme": "unseen extreme expressions and wider poses",
    "seen": "seen range (held-out frames of the sparse take)",
}
"""The test captures (``test_{split}``) and what each tests."""
REAL_SPLITS: dict[str, str] = {
    "extreme": "the clip's rarest expressions and poses (held-out frames farthest from its median)",
    "seen": "seen range (held-out blocks of the clip's other frames)",
}
"""What each test capture of a real clip tests (:mod:`liftavatar.bench.real`)."""


def split_titles(cfg: BenchConfig) -> dict[str, str]:
    """The test splits of the run and what each tests."""
    return REAL_SPLITS if cfg.real else SPLITS


def subject_dir(run: Path, name: str) -> Path:
    """The folder of the subject called ``name`` (:attr:`liftavatar.bench.config.Subject.name`)."""
    return Path(run) / "subjects" / name


def avatar_dir(run: Path, name: str, k: int) -> Path:
    return subject_dir(run, name) / "avatars" / f"k{k:03d}"


def oracle_dir(run: Path, name: str) -> Path:
    return subject_dir(run, name) / "oracle"


def lifted_capture_dir(run: Path, name: str, k: int, cfg: BenchConfig) -> Path:
    """The capture with ``k`` lifted expressions (``train`` for 0; the lifting run itself for the largest)."""
    sdir = subject_dir(run, name)
    if k == 0:
        return sdir / "train"
    return sdir / "lifted" if k == max(cfg.points()) else sdir / f"lifted_k{k:03d}"


def is_capture(path: Path) -> bool:
    return (path / "capture.json").is_file()


def _files(run: Path, folder: Path) -> list[Path]:
    return sorted(p.relative_to(run) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


def avatar_stage_inputs(run: Path, name: str) -> list[Path]:
    """The files, relative to ``run``, that subject ``name``'s lift and avatar stages read once its data stages
    (up to refs) are done: ``config.json``, the subject's records and its three captures. A run folder holding only
    these runs ``bench --until avatars --only NAME`` on a machine without the tracker or the earlier stages'
    outputs (the synthetic takes, the recording or the real clip, the tracked capture)."""
    run = Path(run)
    sdir = subject_dir(run, name)
    files = [Path("config.json"), (sdir / "timings.json").relative_to(run)]
    for name in ("train", "test_seen", "test_extreme"):
        files += _files(run, sdir / name)
    return [f for f in files if (run / f).is_file()]


def avatar_stage_outputs(run: Path, name: str) -> list[Path]:
    """The files, relative to ``run``, that the evaluation and the report read of what subject ``name``'s lift and
    avatar stages wrote: the lift's record and samples, the subject's stage records, and each avatar's record and
    renders (not its weights, nor the lifted captures)."""
    run = Path(run)
    sdir = subject_dir(run, name)
    files = [sdir / "lift.json", sdir / LIFT_SAMPLES, sdir / "timings.json"]
    for folder in sorted((sdir / "avatars").glob("k*")):
        files += [folder / "job.json", *(folder / f"renders_{split}.npz" for split in SPLITS)]
    return [f.relative_to(run) for f in files if f.is_file()]


def this_machine(device: str) -> str:
    """The machine that runs this process, in words (its GPU when ``device`` is one), as stage records name it."""
    return machine_name(machine_info(device))


class StageLog:
    """Logs a data stage's start and end and records its seconds and machine in ``timings.json`` of its folder."""

    def __init__(self, folder: Path, label: str, machine: str):
        self.path = folder / "timings.json"
        self.label = label
        self.machine = machine
        self.timings: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    @contextmanager
    def stage(self, name: str, done: bool) -> Iterator[bool]:
        """Yield whether the stage must run; time it when it does."""
        if done:
            logger.info("[%s] %s: complete, skipped", self.label, name)
            self.timings.setdefault(name, {"seconds": 0.0})["resumed"] = True
            yield False
            return
        logger.info("[%s] %s …", self.label, name)
        start = time.perf_counter()
        yield True
        seconds = time.perf_counter() - start
        self.timings[name] = {"seconds": round(seconds, 2), "resumed": False, "machine": self.machine}
        write_json(self.path, self.timings)
        logger.info("[%s] %s: %.1f s", self.label, name, seconds)


def over_black(rgb: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 images times their (N, H, W) uint8 masks: over black, as the avatars render."""
    return (rgb.astype(np.float32) * (masks[..., None].astype(np.float32) / 255.0) + 0.5).astype(np.uint8)


def gt_frames(capture: Capture) -> tuple[np.ndarray, np.ndarray]:
    """A test capture's frames times their masks (black background, as the avatars render) and its masks: the
    ground truth the evaluation and the report compare with."""
    masks = capture.masks()
    return over_black(capture.frames(), masks), masks
