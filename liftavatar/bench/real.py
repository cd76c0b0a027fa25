"""The benchmark on real clips (`liftavatar bench --videos`, `liftavatar demo --video`): what a clip is to a run, and
its split by kinematics.

A real clip has no ground truth for expressions it lacks, so the paper's protocol becomes self-reenactment on
held-out frames of the same clip, the rarest expressions and poses held out (DESIGN.md §8). The clip is tracked
once into the subject's ``tracked`` capture, and its valid frames are split by :func:`split_frames`:

- **extreme test**: the valid frames farthest from the clip's typical expression and pose: the top
  ``extreme_share`` (15 %) by Euclidean distance from the median in standardised expression + rotation space
  (:func:`liftavatar.refs.reference_features`: each column in standard deviations over the valid frames);
- **seen test**: of the remaining valid frames, those of every ``seen_every``-th block (5th) of ``block`` (8)
  consecutive frames, blocks counted by frame number from the clip's first frame (block ``b`` holds frames
  ``8b … 8b + 7``; blocks 4, 9, 14, … are the seen test), so about 20 % of them;
- **train**: the rest.

A guard band of ``guard`` (±3) frames around every extreme frame is dropped from the other two splits, and one
around every seen-test frame from train, so no test frame has a training frame within 3 frames of it (neighbouring
frames of a video are near copies). Our reading of the protocol's "every 5th frame with a guard band of ±3": single
frames every 5 with ±3 guards would leave no training frame, so the seen test takes every 5th *block*.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from liftavatar.bench.config import BenchConfig, BenchError
from liftavatar.capture import Kinematics

__all__ = ["KinematicSplit", "check_split", "clip_entries", "dilate", "min_valid_frames", "split_frames"]


@dataclass(frozen=True)
class KinematicSplit:
    """A clip's frames split by :func:`split_frames`: sorted frame indices of each split, disjoint."""

    extreme: np.ndarray
    seen: np.ndarray
    train: np.ndarray
    distance: np.ndarray
    """(N,) float64 distance of each frame from the clip's median, in standard deviations (NaN: invalid frame)."""
    threshold: float | None
    """The smallest distance of an extreme frame (None when there is none)."""

    def counts(self) -> dict[str, int]:
        return {"extreme": len(self.extreme), "seen": len(self.seen), "train": len(self.train)}


def dilate(frames: np.ndarray, n: int, guard: int) -> np.ndarray:
    """(n,) bool: True at ``frames`` and within ``guard`` frames of any of them."""
    out = np.zeros(n, bool)
    for f in np.asarray(frames, int):
        out[max(0, f - guard):f + guard + 1] = True
    return out


def split_frames(kinematics: Kinematics, extreme_share: float = 0.15, guard: int = 3, seen_every: int = 5,
                    block: int = 8) -> KinematicSplit:
    """Split a clip's frames into the extreme test, the seen test and train (see the module docstring).

    Args:
        kinematics: the tracked clip's kinematics: its expression coefficients (unitless) and head rotations
            (axis-angle, radians) place each frame; frames not ``valid`` (no face tracked) go to no split.
        extreme_share: share of the valid frames in the extreme test (at least one frame when any is valid).
        guard: frames dropped on each side of every test frame, from the splits after it.
        seen_every, block: the seen test is every ``seen_every``-th block of ``block`` frames, by frame number.
    """
    from liftavatar.refs import reference_features

    valid = np.asarray(kinematics.valid, bool)
    n = len(valid)
    idx = np.flatnonzero(valid)
    distance = np.full(n, np.nan)
    if len(idx) == 0:
        empty = np.zeros(0, int)
        return KinematicSplit(empty, empty, empty, distance, None)
    features = reference_features(kinematics, idx)
    distance[idx] = np.linalg.norm(features - np.median(features, axis=0), axis=1)
    count = min(len(idx), max(1, int(round(extreme_share * len(idx)))))
    # Farthest first; a stable sort breaks ties by frame number, so the split is deterministic.
    extreme = np.sort(idx[np.argsort(-distance[idx], kind="stable")[:count]])
    rest = valid & ~dilate(extreme, n, guard)
    in_seen_block = (np.arange(n) // block) % seen_every == seen_every - 1
    seen = np.flatnonzero(rest & in_seen_block)
    train = np.flatnonzero(rest & ~dilate(seen, n, guard))
    return KinematicSplit(extreme, seen, train, distance, float(distance[extreme].min()))


def min_valid_frames(cfg: BenchConfig) -> int:
    """Valid frames a clip needs for the split: two periods of seen-test blocks (80 with the defaults), so that
    the seen test has at least one block whatever the extreme test takes."""
    return 2 * cfg.seen_every * cfg.seen_block


def check_split(clip: str, split: KinematicSplit, valid: int, frames: int, cfg: BenchConfig) -> None:
    """Raise :class:`BenchError` when the clip has too few valid frames for the protocol, or its split leaves a
    test empty or fewer training frames than references."""
    need = min_valid_frames(cfg)
    if valid < need:
        raise BenchError(f"{clip}: a face was tracked in only {valid} of its {frames} frames and the real benchmark's "
                         f"split needs at least {need}; film a longer clip (about {need / 25:.1f} s at 25 frames/s) "
                         f"with the face in view throughout.")
    counts = split.counts()
    if not counts["extreme"] or not counts["seen"] or counts["train"] < max(cfg.refs, 1):
        raise BenchError(f"{clip}: its split by kinematics leaves {counts['train']} training, {counts['seen']} "
                         f"seen-test and {counts['extreme']} extreme-test frames (at least {max(cfg.refs, 1)}, 1 and 1 "
                         f"needed); film a longer clip with the face in view throughout.")


def clip_entries(videos: Sequence[str | Path], cfg: BenchConfig, run: str | Path | None = None) -> tuple[dict, ...]:
    """The ``clips`` of a run on ``videos``: per clip its name (the file's stem: the subject's folder), path and
    content hash (:func:`liftavatar.fingerprint.file_digest`), each clip checked to be a video long enough for the
    split before any stage runs (:class:`BenchError` or :class:`~liftavatar.errors.VideoError` otherwise).

    A clip that is not on this machine but that the run folder ``run`` already holds under its name (a run carried
    to another machine for its lift and avatars, which do not read the clip) keeps the hash stored there.
    """
    from liftavatar.fingerprint import file_digest
    from liftavatar.video import probe_video

    stored = {}
    config = Path(run) / "config.json" if run is not None else None
    if config is not None and config.is_file():
        stored = {c["name"]: c for c in json.loads(config.read_text()).get("config", {}).get("clips") or []}
    entries: list[dict[str, Any]] = []
    need = min_valid_frames(cfg)
    for video in videos:
        path = Path(video)
        name = path.stem
        if not path.exists() and name in stored:
            entries.append({"name": name, "path": str(path), "sha256": stored[name]["sha256"]})
            continue
        if path.is_dir():
            raise BenchError(f"{path}: is a folder; pass video files to --videos (one clip of one person each).")
        info = probe_video(path)  # VideoError: no such file, not a video
        if info.num_frames < need:
            raise BenchError(f"{path}: has {info.num_frames} frames and the real benchmark's split needs at least "
                             f"{need} with a face; film a longer clip (about {need / 25:.1f} s at 25 frames/s).")
        entries.append({"name": name, "path": str(path.resolve()), "sha256": file_digest(path)})
    names = [e["name"] for e in entries]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise BenchError(f"--videos: several clips are named {', '.join(twice)} (a clip's name is its file's stem and "
                         f"names its subject); rename one of them.")
    return tuple(entries)
