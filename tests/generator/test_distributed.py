"""Multi-process training through accelerate (DDP over gloo on the CPU, launched by torchrun)."""

import os
import subprocess
import sys
from pathlib import Path

from .conftest import SIZE


def test_two_process_training_runs_under_torchrun(tmp_path, tiny_capture):
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "ddp"
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "liftavatar.cli", "train", "--out", str(out),
         "--preset", "tiny", "--captures", str(tiny_capture.path), "--frames", "4", "--refs", "2", "--size", str(SIZE),
         "--pixel-factor", "2", "--steps", "3", "--batch-size", "1", "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "on 2 process(es), MULTI_CPU" in result.stdout
    assert (out / "prior" / "model.safetensors").is_file()


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, tiny_capture):
    import json
    import signal
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "liftavatar.cli", "train", "--out", str(out), "--preset", "tiny", "--captures",
            str(tiny_capture.path), "--frames", "4", "--refs", "2", "--size", str(SIZE), "--pixel-factor", "2",
            "--batch-size", "1", "--device", "cpu", "--save-every", "100000", "--log-every", "1"]
    proc = subprocess.Popen(args + ["--steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (out / "train_config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(2.0)  # some steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "--resume" in err
    checkpoints = sorted((out / "checkpoints").glob("step_*"))
    assert checkpoints and (checkpoints[-1] / "state.json").is_file()
    step = json.loads((checkpoints[-1] / "state.json").read_text())["step"]
    assert 0 < step < 100000
    done = subprocess.run(args + ["--steps", str(step + 2), "--resume"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"from step {step}" in done.stdout and (out / "prior" / "model.safetensors").is_file()
