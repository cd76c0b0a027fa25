"""Shared fixtures: one tiny synthetic capture the generator tests train and sample on."""

from __future__ import annotations

import pytest

from liftavatar.synth.world import SynthSpec, synthesize

SIZE = 32


@pytest.fixture(scope="session")
def tiny_capture(tmp_path_factory):
    """6 frames of subject 7401 (a test seed) at 32², references 4 and 5 stored."""
    capture = synthesize(SynthSpec(seed=7401, preset="full", frames=6, size=SIZE),
                         tmp_path_factory.mktemp("gen") / "capture", progress=False)
    capture.set_reference_indices([4, 5])
    return capture
