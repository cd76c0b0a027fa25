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

CAPTURE_CASES: list[Case] = [
    Case("validate a folder that is not a capture", lambda i: ["validate", str(i.tmp)], ("capture.json", "missing")),
]

GENERATOR_CASES: list[Case] = []

AVATAR_CASES: list[Case] = [
    Case("avatar render from a folder that holds no avatar",
         lambda i: ["avatar", "render", str(i.tmp), "--kinematics", str(i.capture), "-o", str(i.tmp / "r")],
         ("no finished avatar",)),
]

EVAL_CASES: list[Case] = []

CASES = CAPTURE_CASES + GENERATOR_CASES + AVATAR_CASES + EVAL_CASES


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
