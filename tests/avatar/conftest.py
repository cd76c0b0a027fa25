"""Fixtures of the avatar tests: small synthetic captures (subject seeds 6000-6099)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The torch rasterizer runs many small ops: one intra-op thread is faster than two on a
    shared 2-core machine (threads spin while they wait for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _synth(out: Path, seed: int, frames: int, size: int = 64, preset: str = "full") -> Path:
    from liftavatar.synth.world import SynthSpec, synthesize

    synthesize(SynthSpec(seed=seed, preset=preset, frames=frames, size=size), out, progress=False)
    return out


@pytest.fixture(scope="session")
def rig():
    from liftavatar.face.rig import FaceRig

    return FaceRig.load()


@pytest.fixture(scope="session")
def capture(tmp_path_factory) -> Path:
    """Subject 6001, 12 frames of the `full` preset at 64²."""
    return _synth(tmp_path_factory.mktemp("avatar") / "cap6001", 6001, 12)


@pytest.fixture(scope="session")
def other_subject(tmp_path_factory) -> Path:
    """Subject 6002, 3 frames at 64²."""
    return _synth(tmp_path_factory.mktemp("avatar") / "cap6002", 6002, 3)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, capture) -> Path:
    """An avatar trained 60 iterations on ``capture``, every 4th frame held out."""
    from liftavatar.avatar.train import TrainConfig, train_avatar

    out = tmp_path_factory.mktemp("avatar") / "trained"
    cfg = TrainConfig(iters=60, holdout_every=4, val_every=60, checkpoint_every=0, progress=False,
                      refine_start=20, refine_every=20)
    train_avatar([capture], out, cfg)
    return out


def with_one_expression_fewer(source: Path, out: Path) -> Path:
    """A copy of the capture ``source`` whose expression set lacks its last coefficient (a capture of another rig)."""
    import json
    import shutil

    import numpy as np

    shutil.copytree(source, out)
    meta = json.loads((out / "capture.json").read_text())
    meta["expression_names"] = meta["expression_names"][:-1]
    (out / "capture.json").write_text(json.dumps(meta))
    with np.load(out / "kinematics.npz") as z:
        arrays = dict(z)
    arrays["expression"] = np.ascontiguousarray(arrays["expression"][:, :-1])
    np.savez(out / "kinematics.npz", **arrays)
    return out
