"""A benchmark run's settings: :class:`BenchConfig` (what decides its numbers, stored in ``RUN/config.json``), its
subjects (:class:`Subject`: held-out synthetic seeds, or real clips), the presets of `bench`, `bench --quick` and
`demo`, and the stages' names.

The avatar training recipe (loss weight of lifted frames, observed share of the draws, observed-only finish) is
the avatar trainer's own: :class:`liftavatar.avatar.train.TrainConfig` holds the numbers and their measurements,
and the fields here default to them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from liftavatar.avatar.train import TrainConfig as AvatarTrainConfig
from liftavatar.errors import ConfigError, LiftAvatarError
from liftavatar.io import json_safe

__all__ = ["AVATAR_DEFAULTS", "BenchConfig", "BenchError", "DEFAULT_METRICS", "DEMO_SEED", "LEGACY_FIELDS",
           "REAL_STAGES", "SEED_BASE", "STAGES", "SUBJECT_STAGES", "Subject", "config_from_json", "demo_config",
           "full_config", "quick_config"]

SEED_BASE = 5400
"""Benchmark subjects are 5400, 5401, …: held out from the prior's training seeds (100000–101999)."""
DEMO_SEED = 900001
"""The demo's held-out subject."""
DEFAULT_METRICS = ("psnr", "ssim", "lpips", "fid", "aed", "apd", "csim")
"""What the evaluation computes (LPIPS and FID only where their weights are on disk)."""
SUBJECT_STAGES = ("synth", "video", "track", "split", "refs", "lift")
"""The data stages, run per subject."""
REAL_STAGES = SUBJECT_STAGES[2:]
"""The data stages of a real clip: it is its own recording (no synth, no video)."""
STAGES = (*SUBJECT_STAGES, "avatars", "eval")
"""Every stage in order; ``run_bench(until=...)`` stops after one of them (a run split across machines)."""
AVATAR_DEFAULTS = AvatarTrainConfig()
"""The avatar recipe's defaults: the benchmark trains with the library's own (one home for the numbers)."""


class BenchError(LiftAvatarError):
    """A benchmark run cannot go on as asked (a run folder made with other settings, no face tracked)."""


@dataclass(frozen=True)
class Subject:
    """One subject of a run: a held-out synthetic subject (``seed``) or a real clip (``clip``, a video's path).
    ``name`` is its folder under ``RUN/subjects/``, what ``--only`` and the report call it: ``s<seed>``, or the
    clip's file stem."""

    name: str
    seed: int | None = None
    clip: str | None = None

    @property
    def label(self) -> str:
        """What tables call the subject: its seed, or the clip's name."""
        return str(self.seed) if self.seed is not None else self.name

    def called(self, key: str | int) -> bool:
        """Whether ``key`` names this subject: its name, or a synthetic subject's seed (``--only 5400``)."""
        return str(key) in (self.name, self.label)


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
    clips: tuple[dict[str, str], ...] = ()
    """Real clips (`bench --videos`, `demo --video`), each ``{"name", "path", "sha256"}``
    (:func:`liftavatar.bench.real.clip_entries`): the run's subjects instead of synthetic seeds. A resumed run must
    have the same names and contents; the paths may differ (a clip moved, or a machine without it)."""
    extreme_share: float = 0.15
    """Real clips: share of the valid frames in the extreme test (:func:`liftavatar.bench.real.split_frames`)."""
    split_guard: int = 3
    """Real clips: frames dropped on each side of every test frame from the splits after it."""
    seen_every: int = 5
    """Real clips: the seen test is every seen_every-th block of seen_block consecutive frames."""
    seen_block: int = 8
    """Real clips: frames per block of the seen test."""
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
    lift_library: Literal["tracked", "rig"] = "tracked"
    """Where lift's targets come from (:attr:`liftavatar.lift.LiftConfig.library`): tracked real people,
    independent of how the synthetic extreme test is made, or the rig's extreme presets, the test's own generator
    (runs made before this field used those)."""
    lift_poses: Literal["library", "observed", "wide"] = "library"
    """Lifted clips take their targets' poses (picked jointly with the expressions), keep the capture's, or turn
    toward random wider ones."""
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
    deform_width: int = AVATAR_DEFAULTS.avatar.deform_width
    """Width of the avatars' expression-deformation MLP, 0: none
    (:attr:`liftavatar.avatar.model.AvatarConfig.deform_width`, where the measurements that chose it are)."""
    avatar_seed: int = 0
    metrics: tuple[str, ...] = DEFAULT_METRICS
    grid_frames: int = 6
    """Frames per image grid in the report (evenly spaced over the test capture, not picked)."""
    prior: str | None = None
    """Prior directory (None: the embedded default prior)."""
    device: str = "cpu"
    workers: int = 1
    """Processes for subjects' data stages and for avatar jobs (1: all in this process)."""

    # Settings that change where or how fast a run goes, not its numbers: a run may resume with others.
    RUNTIME_FIELDS = ("device", "workers", "subjects", "name")

    @property
    def real(self) -> bool:
        """Whether the subjects are real clips (no ground truth beyond the clip itself, no oracle appearance)."""
        return bool(self.clips)

    def subject_seeds(self) -> list[int]:
        """The synthetic subjects' seeds (none for a run on real clips)."""
        if self.real:
            return []
        return list(self.seeds) if self.seeds else [self.seed_base + i for i in range(self.subjects)]

    def subject_list(self) -> list[Subject]:
        """The run's subjects, in order."""
        if self.real:
            return [Subject(c["name"], clip=c["path"]) for c in self.clips]
        return [Subject(f"s{seed}", seed=seed) for seed in self.subject_seeds()]

    def subject(self, key: str | int) -> Subject:
        """The subject called ``key``: its name, or a synthetic subject's seed; :class:`ConfigError` otherwise."""
        for s in self.subject_list():
            if s.called(key):
                return s
        raise ConfigError(f"{key}: not a subject of this run (its subjects: "
                          f"{', '.join(s.label for s in self.subject_list())}).")

    def subject_stages(self) -> tuple[str, ...]:
        """The data stages each subject goes through."""
        return REAL_STAGES if self.real else SUBJECT_STAGES

    def points(self) -> list[int]:
        """The curve's points with the baseline (0) and the lifted method included, sorted."""
        return sorted({0, self.lifted, *self.curve})

    def check(self) -> None:
        """Raise :class:`ConfigError` on settings that cannot run."""
        if not self.subject_list():
            raise ConfigError("--subjects 0: benchmark at least one subject.")
        if self.real:
            self._check_real()
        if self.size % 2 or self.size < 16 or self.render_size % 2 or self.render_size < 16:
            raise ConfigError(f"--size {self.size} / render size {self.render_size}: use even sizes of at least 16.")
        if min(self.train_frames, self.seen_frames, self.extreme_frames) < 1:
            raise ConfigError("train, seen and extreme frame counts must each be at least 1.")
        if any(k < 0 for k in self.points()):
            raise ConfigError(f"--curve {self.curve}: numbers of lifted expressions must be 0 or more.")
        if self.lifted < 1:
            raise ConfigError(f"--lifted {self.lifted}: the lifted method needs at least one lifted expression.")
        if not 0 <= self.observed_share < 1:
            raise ConfigError(f"--observed-share {self.observed_share}: use a share of the draws in [0, 1).")
        if not 0 <= self.observed_finish < 1:
            raise ConfigError(f"--observed-finish {self.observed_finish}: use a share of the iterations in [0, 1).")
        if self.avatar_iters < 1:
            raise ConfigError(f"--iters {self.avatar_iters}: train avatars for at least one iteration.")
        if self.kinematics not in ("tracked", "truth"):
            raise ConfigError(f"--kinematics {self.kinematics}: use tracked or truth.")
        if self.refs > self.train_frames and not self.real:
            raise ConfigError(f"--refs {self.refs} is more than the {self.train_frames} training frames.")

    def _check_real(self) -> None:
        names = [c.get("name") for c in self.clips]
        if not all(names) or len(set(names)) != len(names):
            raise ConfigError(f"clips {names}: every clip needs a name of its own (its file's stem).")
        if self.kinematics != "tracked":
            raise ConfigError(f"--kinematics {self.kinematics}: a real clip has no true kinematics; use tracked.")
        if not 0 < self.extreme_share < 1:
            raise ConfigError(f"extreme share {self.extreme_share}: use a share of the valid frames in (0, 1).")
        if self.split_guard < 0 or self.seen_block < 1 or self.seen_every < 2:
            raise ConfigError(f"split guard {self.split_guard}, seen block {self.seen_block}, every {self.seen_every}: "
                              f"use a guard of 0 or more, blocks of at least 1 frame, every 2nd block or rarer.")

    def protocol(self) -> dict[str, Any]:
        """The fields that decide the numbers (what a resumed run must share with the first one): a clip counts by
        its name and content, not where it lies."""
        out = {k: v for k, v in json_safe(asdict(self)).items() if k not in self.RUNTIME_FIELDS}
        out["clips"] = [{"name": c.get("name"), "sha256": c.get("sha256")} for c in out["clips"]]
        return out


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


LEGACY_FIELDS: dict[str, Any] = {"observed_finish": 0.0, "deform_width": 0, "lift_library": "rig"}
"""What a run folder's config.json made before a field existed meant (runs made before observed_finish trained
without it, runs made before deform_width trained avatars without deformation, runs made before lift_library
lifted from the rig's extreme presets)."""


def config_from_json(data: dict[str, Any]) -> BenchConfig:
    """The :class:`BenchConfig` of a run folder's ``config.json`` (``["config"]``), of this version or an earlier
    one: unknown keys are dropped, missing ones take :data:`LEGACY_FIELDS` or the defaults."""
    names = {f.name for f in fields(BenchConfig)}
    kw = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    kw = {**LEGACY_FIELDS, **kw}
    return BenchConfig(**kw)

