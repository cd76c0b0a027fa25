"""Bad input and interruption, case by case, across the verbs: one row per case.

Every row runs one command through ``liftavatar.cli.main`` (in this process) on an input its ``setup``
builds under a fresh folder, and checks the exit code (2 for bad input), that the one-line message
contains the given words (case-insensitive), and, where given, a ``check`` that nothing was lost or
half-written. A traceback instead of a sentence fails the row. The next case is one more row.

Shared inputs (built once per session, never modified by a row; rows that damage an input copy it):
``capture`` (a 6-frame synthetic capture at 32², references stored), ``prior`` (a tiny untrained prior
for 32² frames), ``avatar`` (an avatar trained a few iterations on ``capture``).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from liftavatar.cli import main

SIZE = 32


@dataclass(frozen=True)
class Inputs:
    capture: Path
    prior: Path
    avatar: Path
    tmp: Path

    def copy(self, what: str, name: str | None = None) -> Path:
        """A private copy of a shared input under ``tmp`` (for rows that damage it)."""
        src = getattr(self, what)
        dst = self.tmp / (name or src.name)
        shutil.copytree(src, dst)
        return dst


@dataclass(frozen=True)
class Case:
    """One bad input: ``argv(inputs)`` builds it and returns the command line."""

    name: str
    argv: Callable[[Inputs], list[str]]
    words: tuple[str, ...] = ()
    """Words the error message must contain (case-insensitive)."""
    code: int = 2
    check: Callable[[Inputs], None] | None = None
    """Runs after the command: what must still be there, what must not have been written."""


@pytest.fixture(scope="session")
def shared(tmp_path_factory) -> tuple[Path, Path, Path]:
    from liftavatar.avatar.train import TrainConfig, train_avatar
    from liftavatar.generator.transformer import LiftAvatarTransformer
    from liftavatar.synth.world import SynthSpec, synthesize

    root = tmp_path_factory.mktemp("bad_input")
    capture = synthesize(SynthSpec(seed=7405, preset="sparse", frames=6, size=SIZE), root / "capture",
                         progress=False)
    capture.set_reference_indices([0, 3])
    LiftAvatarTransformer.from_preset("tiny", 43, in_channels=12, out_channels=12).save_pretrained(
        root / "prior", extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None}, "frames": 3, "size": SIZE})
    train_avatar([capture.path], root / "avatar", TrainConfig(iters=4, val_every=0, checkpoint_every=0,
                                                              progress=False))
    return capture.path, root / "prior", root / "avatar"


# ---- rows: each area keeps its own list, so additions do not collide -----------------------------------

def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by its relative path, with its bytes (to check that nothing changed)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _same_as_shared(what: str) -> Callable[[Inputs], None]:
    """A check: the row's private copy of a shared input (``Inputs.copy``) is byte for byte the original."""

    def check(i: Inputs) -> None:
        original = getattr(i, what)
        assert _files(i.tmp / original.name) == _files(original), f"the {what} was modified"

    return check


def _damaged_capture(i: Inputs, how: str, rel: str = "frames/000002.png") -> Path:
    """A copy of the shared capture with one PNG cut in half (``truncate``) or with compressed pixels that do
    not inflate under valid chunk checksums (``pixels``: only a full decode finds it)."""
    from tests.test_capture import corrupt_pixels

    cap = i.copy("capture")
    path = cap / rel
    if how == "truncate":
        path.write_bytes(path.read_bytes()[:120])
    else:
        corrupt_pixels(path)
    return cap


def _capture_json(i: Inputs, how: str) -> Path:
    cap = i.copy("capture")
    path = cap / "capture.json"
    if how == "utf16":
        path.write_text(path.read_text(encoding="utf-8"), encoding="utf-16")
    else:
        path.unlink()
        path.mkdir()
    return cap


def _all_invalid(i: Inputs) -> Path:
    import json

    import numpy as np

    cap = i.copy("capture")
    with np.load(cap / "kinematics.npz") as z:
        arrays = dict(z)
    arrays["valid"][:] = False
    np.savez(cap / "kinematics.npz", **arrays)
    meta = json.loads((cap / "capture.json").read_text())
    meta["reference_indices"] = None  # references must be valid frames
    (cap / "capture.json").write_text(json.dumps(meta))
    (i.tmp / "capture.json.before").write_bytes((cap / "capture.json").read_bytes())
    return cap


def _capture_json_unchanged(i: Inputs) -> None:
    assert (i.tmp / "capture" / "capture.json").read_bytes() == (i.tmp / "capture.json.before").read_bytes()


CAPTURE_CASES: list[Case] = [
    Case("validate a folder that is not a capture", lambda i: ["validate", str(i.tmp)], ("capture.json", "missing")),
    Case("validate a capture with a truncated PNG (header intact)",
         lambda i: ["validate", str(_damaged_capture(i, "truncate"))], ("000002.png", "damaged")),
    Case("validate a capture with a PNG whose pixels do not decode",
         lambda i: ["validate", str(_damaged_capture(i, "pixels", "masks/000004.png"))], ("000004.png", "damaged")),
    Case("validate a capture.json in UTF-16", lambda i: ["validate", str(_capture_json(i, "utf16"))],
         ("capture.json", "UTF-8")),
    Case("validate a capture.json that is a directory", lambda i: ["validate", str(_capture_json(i, "dir"))],
         ("capture.json", "directory")),
    Case("refs on a capture whose frames are all invalid", lambda i: ["refs", str(_all_invalid(i))],
         ("capture", "re-track", "valid frames"), check=_capture_json_unchanged),
]

def _generate(i: Inputs, out: Path, *extra: str, prior: Path | None = None) -> list[str]:
    return ["generate", "-o", str(out), "--prior", str(prior or i.prior), "--refs", str(i.capture), "--kinematics",
            str(i.capture), "--num-refs", "2", "--steps", "1", *extra]


def _lift(i: Inputs, *extra: str, capture: Path | None = None, prior: Path | None = None) -> list[str]:
    return ["lift", str(capture or i.capture), "-o", str(i.tmp / "lifted"), "--prior", str(prior or i.prior),
            "--refs", "2", "--steps", "1", *extra]


def _file(i: Inputs, name: str) -> Path:
    path = i.tmp / name
    path.write_text("precious\n")
    return path


def _intact_capture(path: Path) -> Callable[[Inputs], None]:
    def check(i: Inputs) -> None:
        import numpy as np

        from liftavatar.capture import Capture

        copy, original = Capture.load(i.tmp / path), Capture.load(i.capture)
        assert copy.num_frames == original.num_frames and np.array_equal(copy.frames(), original.frames())
    return check


def _intact_file(name: str) -> Callable[[Inputs], None]:
    def check(i: Inputs) -> None:
        assert (i.tmp / name).read_text() == "precious\n"
    return check


def _truncated_prior(i: Inputs) -> Path:
    prior = i.copy("prior", "truncated")
    weights = prior / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return prior


def _prior_of_another_rig(i: Inputs) -> Path:
    from liftavatar.generator.transformer import LiftAvatarTransformer

    LiftAvatarTransformer.from_preset("tiny", 40, in_channels=12, out_channels=12).save_pretrained(
        i.tmp / "prior40", extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None}, "frames": 3, "size": SIZE})
    return i.tmp / "prior40"


def _not_square(i: Inputs) -> Path:
    from dataclasses import replace

    from liftavatar.capture import Capture, write_capture

    src = Capture.load(i.capture)
    meta = replace(src.meta, size=(SIZE, SIZE - 8), reference_indices=None)
    crop = lambda images: images[:, :, : SIZE - 8]  # noqa: E731
    write_capture(i.tmp / "wide", meta, src.kinematics, crop(src.frames()), crop(src.masks()), crop(src.shadings()))
    return i.tmp / "wide"


def _nothing_written(i: Inputs) -> None:
    assert not (i.tmp / "lifted").exists() and not (i.tmp / "lifted.partial").exists()


GENERATOR_CASES: list[Case] = [
    Case("generate -o an existing capture (it was deleted)", lambda i: _generate(i, i.copy("capture", "victim")),
         ("capture", "never replaced"), check=_intact_capture(Path("victim"))),
    Case("generate --force -o an existing capture", lambda i: _generate(i, i.copy("capture", "victim"), "--force"),
         ("capture", "never replaced"), check=_intact_capture(Path("victim"))),
    Case("generate -o an existing video without --force (it was overwritten)",
         lambda i: _generate(i, _file(i, "old.mp4")), ("exists", "--force"), check=_intact_file("old.mp4")),
    Case("generate -o an existing file that is not a video", lambda i: _generate(i, _file(i, "notes.txt")),
         ("notes.txt", "not a video"), check=_intact_file("notes.txt")),
    Case("generate -o a path under a file", lambda i: _generate(i, _file(i, "notes.txt") / "frames"),
         ("notes.txt", "is a file"), check=_intact_file("notes.txt")),
    Case("generate with a truncated safetensors file in --prior",
         lambda i: _generate(i, i.tmp / "out.mp4", prior=_truncated_prior(i)), ("model.safetensors", "truncated")),
    Case("lift --num-expressions 0", lambda i: _lift(i, "--num-expressions", "0"), ("--num-expressions 0",),
         check=_nothing_written),
    Case("lift a capture that is not square", lambda i: _lift(i, "--num-expressions", "1", capture=_not_square(i)),
         ("wide", "not square"), check=_nothing_written),
    Case("lift with a prior of another rig leaves no OUT.partial",
         lambda i: _lift(i, "--num-expressions", "1", prior=_prior_of_another_rig(i)), ("controls", "prior40"),
         check=_nothing_written),
]

def _unfinished_avatar(i: Inputs) -> Path:
    """An avatar whose training stopped after 2 of its 4 iterations (as a Ctrl-C or a kill leaves it)."""
    from liftavatar.avatar.train import TrainConfig, train_avatar

    out = i.tmp / "unfinished"
    config = TrainConfig(iters=4, val_every=0, checkpoint_every=0, progress=False)
    train_avatar([i.capture], out, config, max_steps=2)
    return out


def _avatar_without(i: Inputs, tensor: str) -> Path:
    """A copy of the shared avatar whose checkpoint lacks ``tensor`` (everything else, the header included, kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = i.copy("avatar")
    path = out / "avatar.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != tensor}
    save_file(tensors, str(path), metadata=metadata)
    return out


def _nothing_at(name: str) -> Callable[[Inputs], None]:
    def check(i: Inputs) -> None:
        assert not (i.tmp / name).exists(), f"{name} was written"

    return check


def _foreign_folder(i: Inputs) -> Path:
    out = i.tmp / "notes"
    out.mkdir()
    (out / "notes.txt").write_text("the user's notes")
    return out


def _foreign_folder_untouched(i: Inputs) -> None:
    assert _files(i.tmp / "notes") == {"notes.txt": b"the user's notes"}


def _a_file(i: Inputs) -> Path:
    (i.tmp / "avatar.bin").write_bytes(b"the user's file")
    return i.tmp / "avatar.bin"


def _file_untouched(i: Inputs) -> None:
    assert (i.tmp / "avatar.bin").read_bytes() == b"the user's file"


def _trained_without_validation(i: Inputs) -> None:
    from liftavatar.avatar.model import load_avatar

    avatar = load_avatar(i.tmp / "a")  # finished, so it loads
    assert avatar.meta.step == 2 and not list((i.tmp / "a").glob("val/*.png"))


def _render_twice(i: Inputs, force: bool) -> list[str]:
    """Render once (a folder of frames), mark its first frame, and return the command that renders there again."""
    argv = ["avatar", "render", str(i.avatar), "--kinematics", str(i.capture), "-o", str(i.tmp / "r")]
    assert main(argv) == 0
    (i.tmp / "r" / "000000.png").write_bytes(b"marked")
    return argv + (["--force"] if force else [])


def _first_render_kept(i: Inputs) -> None:
    assert (i.tmp / "r" / "000000.png").read_bytes() == b"marked"


def _second_render_written(i: Inputs) -> None:
    assert (i.tmp / "r" / "000000.png").read_bytes() != b"marked" and len(list((i.tmp / "r").glob("*.png"))) == 6


AVATAR_CASES: list[Case] = [
    Case("avatar render from a folder that holds no avatar",
         lambda i: ["avatar", "render", str(i.tmp), "--kinematics", str(i.capture), "-o", str(i.tmp / "r")],
         ("no finished avatar",)),
    Case("avatar train on a capture with a PNG whose pixels do not decode",
         lambda i: ["avatar", "train", str(_damaged_capture(i, "pixels")), "-o", str(i.tmp / "a"), "--iters", "2"],
         ("000002.png", "damaged"), check=_nothing_at("a")),
    Case("avatar export of an avatar whose training was interrupted",
         lambda i: ["avatar", "export", str(_unfinished_avatar(i)), "-o", str(i.tmp / "a.ply")],
         ("unfinished", "2 of 4", "--resume", "--allow-unfinished"), check=_nothing_at("a.ply")),
    Case("avatar render of an avatar whose training was interrupted",
         lambda i: ["avatar", "render", str(_unfinished_avatar(i)), "--kinematics", str(i.capture), "-o",
                    str(i.tmp / "r")],
         ("unfinished", "2 of 4", "--resume"), check=_nothing_at("r")),
    Case("avatar train -o an existing capture",
         lambda i: ["avatar", "train", str(i.capture), "-o", str(i.copy("capture")), "--iters", "2"],
         ("capture",), check=_same_as_shared("capture")),
    Case("avatar train -o an existing capture, with --force",
         lambda i: ["avatar", "train", str(i.capture), "-o", str(i.copy("capture")), "--iters", "2", "--force"],
         ("capture", "--force"), check=_same_as_shared("capture")),
    Case("avatar train -o a folder of someone else's files, with --force",
         lambda i: ["avatar", "train", str(i.capture), "-o", str(_foreign_folder(i)), "--iters", "2", "--force"],
         ("notes.txt",), check=_foreign_folder_untouched),
    Case("avatar train -o an existing file",
         lambda i: ["avatar", "train", str(i.capture), "-o", str(_a_file(i)), "--iters", "2"],
         ("avatar.bin", "file"), check=_file_untouched),
    Case("avatar train --val-every 0 means no validation",
         lambda i: ["avatar", "train", str(i.capture), "-o", str(i.tmp / "a"), "--iters", "2", "--val-every", "0"],
         code=0, check=_trained_without_validation),
    Case("avatar render of an avatar file missing a tensor",
         lambda i: ["avatar", "render", str(_avatar_without(i, "binding")), "--kinematics", str(i.capture), "-o",
                    str(i.tmp / "r")],
         ("avatar.safetensors", "binding"), check=_nothing_at("r")),
    Case("avatar render -o an existing file",
         lambda i: ["avatar", "render", str(i.avatar), "--kinematics", str(i.capture), "-o", str(_a_file(i))],
         ("avatar.bin", "file"), check=_file_untouched),
    Case("avatar export -o an existing directory",
         lambda i: ["avatar", "export", str(i.avatar), "-o", str(_foreign_folder(i))],
         ("notes", "directory"), check=_foreign_folder_untouched),
    Case("avatar render -o an existing capture, even with --force",
         lambda i: ["avatar", "render", str(i.avatar), "--kinematics", str(i.capture), "-o", str(i.copy("capture")),
                    "--force"],
         ("capture", "never replaced"), check=_same_as_shared("capture")),
    Case("avatar render -o frames it rendered before, without --force",
         lambda i: _render_twice(i, force=False), ("--force",), check=_first_render_kept),
    Case("avatar render -o frames it rendered before, with --force",
         lambda i: _render_twice(i, force=True), code=0, check=_second_render_written),
]


def _json_dir(i: Inputs) -> Path:
    target = i.tmp / "report"
    target.mkdir()
    (target / "keep.txt").write_text("the user's file")
    return target


def _json_dir_untouched(i: Inputs) -> None:
    assert sorted(p.name for p in i.tmp.iterdir()) == ["report"], "something was left beside --json"
    assert [p.name for p in (i.tmp / "report").iterdir()] == ["keep.txt"]
    assert (i.tmp / "report" / "keep.txt").read_text() == "the user's file"


EVAL_CASES: list[Case] = [
    Case("eval against a capture with a PNG whose pixels do not decode",
         lambda i: ["eval", str(i.capture), str(_damaged_capture(i, "pixels")), "--metrics", "psnr"],
         ("000002.png", "damaged")),
    Case("eval --json an existing directory",
         lambda i: ["eval", str(i.capture), str(i.capture), "--metrics", "psnr", "--json", str(_json_dir(i))],
         ("--json", "directory"), check=_json_dir_untouched),
]


def _clip(i: Inputs, name: str, frames: int) -> Path:
    """A clip of ``frames`` frames of grey noise at 64² (no face in it): what a user could pass as their video."""
    import numpy as np

    from liftavatar.video import write_video

    rng = np.random.default_rng(0)
    path = i.tmp / name
    write_video(path, (rng.integers(100, 140, (64, 64, 3), dtype=np.uint8) for _ in range(frames)), 25.0)
    return path


def _no_report(i: Inputs) -> None:
    assert not (i.tmp / "demo" / "results.json").exists() and not (i.tmp / "demo" / "report").exists()


BENCH_CASES: list[Case] = [
    Case("demo --video a file that does not exist",
         lambda i: ["demo", "--video", str(i.tmp / "my_clip.mp4"), "-o", str(i.tmp / "demo")],
         ("my_clip.mp4", "no such file"), check=_nothing_at("demo")),
    Case("demo --video a file that is not a video",
         lambda i: ["demo", "--video", str(_file(i, "notes.mp4")), "-o", str(i.tmp / "demo")],
         ("notes.mp4", "not a video"), check=_nothing_at("demo")),
    Case("demo --video a clip too short for the real split",
         lambda i: ["demo", "--video", str(_clip(i, "short.mp4", 30)), "-o", str(i.tmp / "demo")],
         ("short.mp4", "30 frames", "at least 80", "longer clip"), check=_nothing_at("demo")),
    Case("demo --video a clip with no face in it",
         lambda i: ["demo", "--video", str(_clip(i, "noface.mp4", 84)), "-o", str(i.tmp / "demo")],
         ("noface.mp4", "face"), check=_no_report),
    Case("bench --videos with a synthetic-subject option",
         lambda i: ["bench", "--quick", "--videos", str(_clip(i, "clip.mp4", 84)), "--train-frames", "50", "-o",
                    str(i.tmp / "bench")],
         ("--train-frames", "--videos"), check=_nothing_at("bench")),
    Case("bench --videos a folder",
         lambda i: ["bench", "--quick", "--videos", str(_foreign_folder(i)), "-o", str(i.tmp / "bench")],
         ("notes", "folder", "video files"), check=_foreign_folder_untouched),
]

CASES = CAPTURE_CASES + GENERATOR_CASES + AVATAR_CASES + EVAL_CASES + BENCH_CASES


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_one_sentence_and_exit_2(case: Case, shared, tmp_path, capsys):
    inputs = Inputs(*shared, tmp=tmp_path)
    argv = case.argv(inputs)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == case.code, f"exit {code}, expected {case.code}; stderr: {err}"
    if case.code == 2:
        lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
        assert len(lines) == 1, f"one error line expected, got: {err}"
        for word in case.words:
            assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"
    if case.check is not None:
        case.check(inputs)
