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
