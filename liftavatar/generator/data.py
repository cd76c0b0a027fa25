"""Training clips for the generator: from Captures on disk and from the synthetic world on the fly.

A clip is a dict of tensors (images float in [0, 1], channels first):

    frames       (F, 3, H, W)   target frames
    shading      (F, 3, H, W)   their shading maps
    controls     (F, D)         their kinematic controls (:func:`liftavatar.generator.inputs.kinematic_controls`)
    masks        (F, 1, H, W)   foreground masks
    ref_frames   (K, 3, H, W)   reference frames of the same subject
    ref_shading  (K, 3, H, W)
    ref_controls (K, D)

References come from a *pool* that may differ from the targets' kinematic range, as at lift time:
a sparse phone capture gives the references, the targets are what it lacks. In the synthetic
stream the pool is a `sparse`-preset trajectory of the same subject and the targets `full`-preset
clips; references are picked from the pool by :func:`liftavatar.refs.select_references`.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from liftavatar.capture import PROVENANCE_SYNTHETIC, Capture, Kinematics
from liftavatar.errors import ConfigError
from liftavatar.face.rig import FaceRig
from liftavatar.generator.inputs import image_tensor, kinematic_controls, reference_indices, reference_inputs
from liftavatar.synth.kinematics import sample_kinematics
from liftavatar.synth.subject import Subject, make_subject
from liftavatar.synth.world import render_subject_tensors

def _quantised(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W[, C]) float in [0, 1] → (B, C, H, W), rounded to 8 bits as a Capture's PNGs are."""
    if images.ndim == 3:
        images = images.unsqueeze(-1)
    return (images.clamp(0, 1) * 255).round().div(255).permute(0, 3, 1, 2).contiguous()


@dataclass
class SyntheticDataConfig:
    """The synthetic stream: which subjects, how clips and references are made."""

    seed_range: tuple[int, int] = (100_000, 200_000)
    """Training subjects' seeds, [low, high). Keep disjoint from every evaluation seed."""
    frames: int = 8
    """Target frames per clip (the Wan VAE needs 4n + 1)."""
    refs: int = 5
    size: int = 128
    ref_method: str = "kmeans"
    pool_frames: int = 60
    """Length of the sparse-preset trajectory the references are picked from."""
    pool_preset: str = "sparse"
    target_preset: str = "full"
    target_fps: float = 12.5
    """Frame rate of target clips (below the capture rate, so 8 frames span more motion)."""
    clips_per_subject: int = 4
    """Clips rendered per subject draw (one render call; subjects are the expensive part)."""
    kmeans_restarts: int = 1
    """K-means restarts per reference choice (the stream picks references for every draw)."""
    subject_cache: int = 256
    identity_shards: int = 1
    """Split the training identities into this many shards; the draws of batch b use shard b mod shards.
    With as many DataLoader workers as shards, each worker meets only its shard and its subject cache hits
    (building a subject takes ~0.4 s). Part of the data's definition: keep it fixed across a resume."""
    draws_per_batch: int = 1
    """Set by :class:`SyntheticBatches`: consecutive draws that form one batch (for the shard of a draw)."""
    supersample: int = 2
    stream_seed: int = 0


class SubjectCache:
    """LRU cache of synthetic subjects: building one (its texture atlas) takes ~0.4 s on a CPU core."""

    def __init__(self, capacity: int, rig: FaceRig):
        self.capacity = capacity
        self.rig = rig
        self._items: OrderedDict[int, Subject] = OrderedDict()

    def get(self, seed: int) -> Subject:
        if seed in self._items:
            self._items.move_to_end(seed)
            return self._items[seed]
        subject = self._items[seed] = make_subject(seed, self.rig)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return subject


class SyntheticClipStream(IterableDataset):
    """An infinite, seeded stream of clips rendered on the fly from the synthetic world.

    Deterministic: the n-th subject draw depends only on ``(stream_seed, n)``, so a resumed run can
    skip ahead with :meth:`skip`. Render on CUDA with ``device="cuda"``.
    """

    def __init__(self, config: SyntheticDataConfig, device: str = "cpu"):
        super().__init__()
        lo, hi = config.seed_range
        if hi <= lo:
            raise ConfigError(f"seed range {config.seed_range}: the upper bound must exceed the lower.")
        self.config = config
        self.device = device
        self.rig = FaceRig.load()
        self.cache = SubjectCache(config.subject_cache, self.rig)
        self.draw = 0
        self._buffer: list[dict[str, torch.Tensor]] = []

    def skip(self, clips: int) -> None:
        """Advance as if ``clips`` clips had been consumed (for exact resume)."""
        per = self.config.clips_per_subject
        self.draw += clips // per
        self._buffer = []
        if clips % per:
            self._buffer = self._render_draw(self.draw)[clips % per:]
            self.draw += 1

    def _subject_seed(self, draw: int) -> int:
        lo, hi = self.config.seed_range
        shards = max(1, min(self.config.identity_shards, hi - lo))
        shard = (draw // self.config.draws_per_batch) % shards
        pick = np.random.default_rng([self.config.stream_seed, draw, 0x5B]).integers(0, -(-(hi - lo - shard) // shards))
        return int(lo + shard + shards * pick)

    def _render_draw(self, draw: int) -> list[dict[str, torch.Tensor]]:
        from liftavatar.refs import select_references

        cfg = self.config
        rng = np.random.default_rng([cfg.stream_seed, draw])
        seed = self._subject_seed(draw)
        subject = self.cache.get(seed)
        names = self.rig.expression_names
        pool = sample_kinematics(cfg.pool_preset, cfg.pool_frames, names, seed=int(rng.integers(2**31)))
        n = len(pool.expression)
        pool_kin = Kinematics(pool.expression, pool.rotation, pool.translation, np.ones(n, bool),
                              np.full(n, PROVENANCE_SYNTHETIC, np.uint8), subject.identity)
        refs = select_references(pool_kin, cfg.refs, cfg.ref_method, seed=int(rng.integers(2**31)),
                                 n_init=cfg.kmeans_restarts)
        targets = [sample_kinematics(cfg.target_preset, cfg.frames, names, fps=cfg.target_fps,
                                     seed=int(rng.integers(2**31))) for _ in range(cfg.clips_per_subject)]
        expression = np.concatenate([pool.expression[refs]] + [t.expression for t in targets])
        rotation = np.concatenate([pool.rotation[refs]] + [t.rotation for t in targets])
        translation = np.concatenate([pool.translation[refs]] + [t.translation for t in targets])
        # Rendered and kept on the stream's device (no 8-bit round trip through host memory).
        rgb, mask, shading, _ = render_subject_tensors(subject, expression, rotation, translation, cfg.size,
                                                       rig=self.rig, supersample=cfg.supersample, device=self.device)
        rgb, shading, mask = _quantised(rgb), _quantised(shading), _quantised(mask)
        controls = torch.from_numpy(kinematic_controls(expression, rotation, translation)).to(self.device)
        k = len(refs)
        clips = []
        for c in range(cfg.clips_per_subject):
            sl = slice(k + c * cfg.frames, k + (c + 1) * cfg.frames)
            clips.append(dict(frames=rgb[sl], shading=shading[sl], controls=controls[sl], masks=mask[sl],
                              ref_frames=rgb[:k], ref_shading=shading[:k], ref_controls=controls[:k]))
        return clips

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            if not self._buffer:
                self._buffer = self._render_draw(self.draw)
                self.draw += 1
            yield self._buffer.pop(0)


class SyntheticBatches(IterableDataset):
    """Whole training batches from the synthetic world, for a DataLoader with worker processes.

    Batch ``b`` is made of the clips of subject draws ``b·D … b·D + D − 1`` (D = batch_size /
    clips_per_subject, rounded up), so every batch is a pure function of its index: workers take
    indices round-robin (``first + (k·W + w)·stride + offset``), which the DataLoader returns in order,
    and a resumed run starts at the right index. Images travel as 8-bit CPU tensors (they are
    8-bit-quantised anyway) and become floats on the training device.
    """

    def __init__(self, config: SyntheticDataConfig, batch_size: int, device: str = "cpu", first: int = 0,
                 stride: int = 1, offset: int = 0):
        super().__init__()
        self.draws = -(-batch_size // config.clips_per_subject)
        self.config = replace(config, draws_per_batch=self.draws)
        self.batch_size, self.device = batch_size, device
        self.first, self.stride, self.offset = first, stride, offset
        self._stream: SyntheticClipStream | None = None

    def batch_at(self, index: int) -> dict[str, torch.Tensor]:
        if self._stream is None:
            self._stream = SyntheticClipStream(self.config, self.device)
        clips = [c for d in range(self.draws) for c in self._stream._render_draw(index * self.draws + d)]
        batch = collate(clips[:self.batch_size])
        return {k: (v * 255).round().to(torch.uint8).cpu() if k not in ("controls", "ref_controls") else v.cpu()
                for k, v in batch.items()}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from torch.utils.data import get_worker_info

        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        k = worker
        while True:
            yield self.batch_at(self.first + k * self.stride + self.offset)
            k += workers


def as_float_images(x: torch.Tensor) -> torch.Tensor:
    """8-bit images from :class:`SyntheticBatches` → float in [0, 1]; float images pass through."""
    return x.float() / 255 if x.dtype == torch.uint8 else x


def collate(clips: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([c[key] for c in clips]) for key in clips[0]}


class CaptureClips(Dataset):
    """Clips of ``frames`` consecutive valid frames from Captures, with K references per capture.

    ``pools`` (optional, one per capture) are captures of the same subject whose frames serve as the
    reference pool; by default a capture is its own pool. References are the pool's stored
    ``reference_indices`` when there are K of them, otherwise chosen now by ``ref_method``; their images are
    read once. ``in_memory``: every capture's frames, shading maps and masks are decoded once, here, and kept
    (uint8: 112 KiB a frame at 128²) instead of read from their PNGs for every clip drawn. 16 clips of 8 frames
    and 5 references from 11 tracked 128² clips, one core of a 2-core Intel Xeon: 0.29 s reading everything per
    clip, 0.20 s with the references read once, 0.04 s in memory (2.5 s to decode 1,733 frames first); a training
    step of the embedded prior's preset takes about 0.27 s on an H100.

    ``references``: ``whole`` takes a capture's K references from all of it (its stored ones when it has K), so
    a quarter of the 8-frame clips of a 150-frame capture hold one of their own references and the model can
    learn to copy it instead of following the controls (fine-tuning on a person's own frames smeared mouths
    and let the references' expressions leak into the targets: issue 20). ``other-half`` splits the capture
    in two halves in time, chooses K references in each (``ref_method``, half a clip away from the middle so no
    clip reaches them), and gives a clip the references of the half its middle frame is not in — as `lift` and
    the benchmarks use a prior: references from frames other than the ones generated. A capture too short for
    K in each half is used whole (with a note). Explicit ``pools`` are other captures, used whole either way.
    """

    def __init__(self, captures: Sequence[str | Path], frames: int = 8, refs: int = 5, ref_method: str = "kmeans",
                 pools: Sequence[str | Path] | None = None, seed: int = 0, stride: int | None = None,
                 in_memory: bool = False, references: Literal["whole", "other-half"] = "whole"):
        if not captures:
            raise ConfigError("no captures given; pass at least one capture directory.")
        pools = list(pools) if pools else list(captures)
        if len(pools) != len(captures):
            raise ConfigError(f"{len(pools)} reference pools for {len(captures)} captures; give one per capture.")
        if references not in ("whole", "other-half"):
            raise ConfigError(f"references={references!r}: use 'whole' or 'other-half'.")
        self.frames = frames
        self.items: list[tuple[int, int]] = []
        self.captures: list[Capture] = []
        # Per capture: the references of its first and of its second half (one read, twice, when used whole).
        self.ref_inputs: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
        self.reference_frames: list[tuple[list[int], list[int]]] = []
        self.decoded: list[dict[str, np.ndarray]] = []
        self.notes: list[str] = []
        for ci, (path, pool_path) in enumerate(zip(captures, pools)):
            capture = Capture.load(path)
            own_pool = Path(pool_path) == Path(path)
            pool = capture if own_pool else Capture.load(pool_path)
            if pool.meta.subject != capture.meta.subject:
                raise ConfigError(f"{pool_path}: its subject {pool.meta.subject} is not {capture.meta.subject} of "
                                  f"{path}; references must show the same person.")
            self.captures.append(capture)
            halves = None
            if references == "other-half" and own_pool:
                halves = _half_references(capture, refs, ref_method, seed, frames // 2)
                if halves is None:
                    self.notes.append(f"{path}: fewer than {refs} valid frames in one of its halves away from the "
                                      "middle; its clips take references from the whole capture")
            if halves is None:
                ref_idx, note = reference_indices(pool, refs, ref_method, seed)
                if note:
                    self.notes.append(note)
                halves = (ref_idx, ref_idx)
            self.reference_frames.append(tuple(np.asarray(h).tolist() for h in halves))
            first = reference_inputs(pool, halves[0])
            same = np.array_equal(halves[0], halves[1])
            self.ref_inputs.append((first, first if same else reference_inputs(pool, halves[1])))
            if in_memory:
                self.decoded.append(dict(frames=capture.frames(), shading=capture.shadings(), masks=capture.masks()))
            valid = capture.kinematics.valid
            step = stride or max(1, frames // 2)
            for start in range(0, capture.num_frames - frames + 1, step):
                if valid[start:start + frames].all():
                    self.items.append((ci, start))
        if not self.items:
            raise ConfigError(f"no run of {frames} consecutive valid frames in the captures; "
                              "use --frames smaller or captures with more valid frames.")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ci, start = self.items[index]
        capture = self.captures[ci]
        idx = list(range(start, start + self.frames))
        k = capture.kinematics
        if self.decoded:
            images = {key: array[start:start + self.frames] for key, array in self.decoded[ci].items()}
        else:
            images = dict(frames=capture.frames(idx), shading=capture.shadings(idx), masks=capture.masks(idx))
        return dict(
            frames=image_tensor(images["frames"]), shading=image_tensor(images["shading"]),
            controls=torch.from_numpy(kinematic_controls(k.expression[idx], k.rotation[idx], k.translation[idx])),
            masks=image_tensor(images["masks"]),
            # The other half's references: a clip whose middle is in the first half takes the second's.
            **self.ref_inputs[ci][1 if start + self.frames // 2 < capture.num_frames // 2 else 0],
        )


def _half_references(capture: Capture, k: int, method: str, seed: int,
                     margin: int) -> tuple[np.ndarray, np.ndarray] | None:
    """K references chosen among the first half's and among the second half's valid frames, the first half's
    before ``middle - margin`` and the second's from ``middle + margin`` on (``margin`` = half a clip: then no
    clip reaches the references it is given); None when a half has fewer than K such frames."""
    from liftavatar.refs import select_references

    n, middle = capture.num_frames, capture.num_frames // 2
    t = np.arange(n)
    halves = []
    for inside in (t < middle - margin, t >= middle + margin):
        kin = replace(capture.kinematics, valid=np.asarray(capture.kinematics.valid, bool) & inside)
        if int(kin.valid.sum()) < k:
            return None
        halves.append(select_references(kin, k, method, seed=seed, source=str(capture.path)))
    return halves[0], halves[1]

