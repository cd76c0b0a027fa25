"""The `liftavatar` command: one verb per pipeline stage (DESIGN.md §2).

Thin by design: parse a typed config, call one function, print where the results went. A bad
input raises a :class:`~liftavatar.errors.LiftAvatarError`; it is printed as one line and the
command exits with code 2.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro

from liftavatar.errors import LiftAvatarError

Out = Annotated[Path, tyro.conf.arg(aliases=("-o",))]


@dataclass
class Synth:
    """Render a synthetic subject into a Capture with ground-truth kinematics (provenance 2)."""

    out: Out
    """Capture directory to write."""
    seed: int = 0
    """Subject seed: identity, appearance, lighting and background (also seeds the kinematics)."""
    preset: Literal["sparse", "extreme", "full"] = "sparse"
    """Kinematics preset: sparse (phone video), extreme (unseen expressions, wide poses), full."""
    frames: int = 100
    """Number of frames (ignored with --kinematics-from)."""
    size: int = 256
    """Square image size in pixels."""
    fps: float = 25.0
    """Frame rate of the trajectory."""
    kinematics_from: Path | None = None
    """Render this subject performing another capture's kinematics (the ground-truth oracle)."""
    video: bool = False
    """Also write OUT/video.mp4 of the frames."""
    preview: bool = False
    """Also write OUT/preview.png: frames, masks and shading maps."""
    force: bool = False
    """Replace an existing capture at OUT."""
    resume: bool = False
    """Keep frames an interrupted run already wrote."""
    device: str = "cpu"
    """Torch device for rendering (cpu, cuda)."""


@dataclass
class Track:
    """Track a monocular head video (or a folder of same-sized images) into a Capture."""

    input: tyro.conf.Positional[Path]
    """Video file (mp4, mov, webm, avi, mkv) or folder of images."""
    out: Out
    """Capture directory to write."""
    size: int = 512
    """Side of the square output frames, pixels."""
    fps: float | None = None
    """Resample the video to at most this frame rate."""
    max_frames: int | None = None
    """Stop after this many frames."""
    fov: float = 60.0
    """Horizontal field of view of the input camera, degrees (phone front camera ~60°)."""
    preview: bool = False
    """Also write OUT/preview.png: frames with the fitted mesh overlaid, and the shading maps."""
    force: bool = False
    """Replace an existing capture at OUT."""
    resume: bool = False
    """Continue an interrupted run: keep its landmarks and written frames."""
    device: str = "cpu"
    """Torch device for fitting and rendering."""


@dataclass
class Validate:
    """Check a Capture directory: exit 0, or exit 2 naming the first problem and its file."""

    capture: tyro.conf.Positional[Path]


@dataclass
class Demo:
    """Run the pipeline on the embedded defaults (this stage: synthesise a subject, preview it)."""

    out: Out = Path("runs/demo")
    """Where the demo's outputs go."""
    seed: int = 900001
    """A held-out subject seed."""
    frames: int = 75
    size: int = 256
    force: bool = True
    """Replace the outputs of an earlier demo run."""


def run_synth(cfg: Synth) -> None:
    from liftavatar.synth.world import SynthSpec, synthesize

    spec = SynthSpec(seed=cfg.seed, preset=cfg.preset, frames=cfg.frames, size=cfg.size, fps=cfg.fps,
                     kinematics_from=str(cfg.kinematics_from) if cfg.kinematics_from else None)
    start = time.perf_counter()
    capture = synthesize(spec, cfg.out, overwrite=cfg.force, resume=cfg.resume, device=cfg.device)
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
    from liftavatar.face.track import TrackConfig, track

    config = TrackConfig(size=cfg.size, fps=cfg.fps, max_frames=cfg.max_frames, fov=cfg.fov, device=cfg.device)
    capture, report = track(cfg.input, cfg.out, config, overwrite=cfg.force, resume=cfg.resume)
    print(report.summary())
    print(f"wrote {capture.path}")
    if cfg.preview:
        from liftavatar.report import tracking_contact_sheet

        print(f"preview: {tracking_contact_sheet(capture, capture.path / 'preview.png')}")


def run_validate(cfg: Validate) -> None:
    from liftavatar.capture import KINEMATICS_FILE, Capture
    from liftavatar.face.rig import FaceRig

    capture = Capture.load(cfg.capture)
    meta = capture.meta
    rig = FaceRig.load()
    if meta.rig.get("name") == rig.name:  # our rig: its coefficient bounds apply too
        capture.kinematics.validate(rig.num_expressions, rig.expression_bounds,
                                    source=cfg.capture / KINEMATICS_FILE)
    print(f"{cfg.capture}: valid capture of {meta.subject}, {meta.num_frames} frames, {meta.size[0]}x{meta.size[1]}")


def run_demo(cfg: Demo) -> None:
    from liftavatar.synth.world import SynthSpec, synthesize

    cfg.out.mkdir(parents=True, exist_ok=True)
    print(f"[1/1] synth: held-out subject {cfg.seed}, sparse phone-style capture, {cfg.frames} frames at {cfg.size}²")
    spec = SynthSpec(seed=cfg.seed, preset="sparse", frames=cfg.frames, size=cfg.size)
    capture = synthesize(spec, cfg.out / "capture", overwrite=cfg.force)
    _extras(capture, video=True, preview=True)
    print(f"demo finished: {cfg.out.resolve()}")


COMMANDS = {
    "synth": (Synth, run_synth),
    "track": (Track, run_track),
    "validate": (Validate, run_validate),
    "demo": (Demo, run_demo),
}


def main(argv: list[str] | None = None) -> int:
    cfg = tyro.extras.subcommand_cli_from_dict(
        {name: config for name, (config, _) in COMMANDS.items()},
        prog="liftavatar",
        description="LiftAvatar: kinematic-space completion for expression-controlled 3D Gaussian head avatars.",
        args=argv,
    )
    runner = next(run for config, run in COMMANDS.values() if isinstance(cfg, config))
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
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
