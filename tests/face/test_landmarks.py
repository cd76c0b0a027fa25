"""MediaPipe FaceMesh through :mod:`liftavatar.face.landmarks`: the library's own log lines stay out of the user's
terminal, and a crash inside MediaPipe keeps its explanation."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# What MediaPipe 0.10.21 and TFLite print on the C++ side's stderr when a graph starts and runs.
NATIVE_CHATTER = ("XNNPACK delegate", "absl::InitializeLog", "inference_feedback_manager", "W0000", "I0000",
                  "landmark_projection_calculator", "gl_context")


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    from liftavatar.synth.world import SynthSpec, synthesize
    from liftavatar.video import write_video

    root = tmp_path_factory.mktemp("quiet")
    capture = synthesize(SynthSpec(seed=3, preset="sparse", frames=8, size=128), root / "synth", progress=False)
    path = root / "clip.mp4"
    write_video(path, capture.frames(), capture.meta.fps)
    return path


def test_track_shows_our_messages_and_none_of_mediapipes(video, tmp_path):
    result = subprocess.run([sys.executable, "-m", "liftavatar.cli", "track", str(video), "-o", str(tmp_path / "cap"),
                             "--size", "64"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote" in result.stdout and "8 with a face" in result.stdout
    chatter = [line for line in result.stderr.splitlines() if any(word in line for word in NATIVE_CHATTER)
               or line.startswith(("INFO:", "WARNING:"))]
    assert not chatter, "\n".join(chatter)


def test_what_mediapipe_printed_comes_back_when_its_call_fails(capfd):
    from liftavatar.face.landmarks import quiet_native_logs

    with pytest.raises(RuntimeError, match="graph failed"):
        with quiet_native_logs():
            os.write(2, b"E0000 calculator_graph.cc: the reason it failed\n")
            raise RuntimeError("graph failed")
    assert "the reason it failed" in capfd.readouterr().err
    with quiet_native_logs():
        os.write(2, b"I0000 chatter\n")
    assert "chatter" not in capfd.readouterr().err
