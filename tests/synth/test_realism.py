"""Realism check on a small sample: MediaPipe finds our subjects and agrees with our camera.

The full figures come from benchmarks/realism.py (results in benchmarks/results/realism.json).
"""

from __future__ import annotations

import pytest

from liftavatar.synth.realism import measure_realism


@pytest.mark.parametrize("preset", ["sparse", "full"])
def test_mediapipe_finds_synthetic_faces_where_the_rig_puts_them(preset):
    result = measure_realism(seeds=[31, 32], preset=preset, frames_per_subject=6, size=256)
    summary = result.summary()
    assert summary["detection_rate"] >= 0.95, summary
    assert summary["median_landmark_error_px"] < 4.0, summary
