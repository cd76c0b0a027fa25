"""benchmarks/scaling.py: refuses without a GPU; its --dry-run works end to end on CPU processes (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scaling.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_a_gpu(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x.json")], capture_output=True,
                          text=True, timeout=120, env=ENV, check=False)
    assert done.returncode == 2
    assert "no CUDA GPU" in done.stderr and "--dry-run" in done.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_dry_run_on_two_cpu_processes(tmp_path):
    out = tmp_path / "scaling.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env=ENV, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["device"].startswith("cpu")
    assert set(result["runs"]) == {"1", "2"}
    two = result["runs"]["2"]
    assert two["processes"] == 2 and two["distributed_type"] == "MULTI_CPU" and two["global_batch"] == 2
    assert two["tokens_per_s"] > 0 and 0 < result["scaling_efficiency_at_largest"]
