#!/usr/bin/env python
"""Speed of `liftavatar lift` for one subject with the embedded prior, end to end.

    python benchmarks/lift.py --device cuda --num-expressions 100     # target: ≤ 60 s on one H100
    python benchmarks/lift.py --device cpu --num-expressions 20       # target: ≤ 10 min on a 2-core CPU

A held-out synthetic subject (seed 5300, `sparse` preset, 100 frames, 128²) is lifted with the
default settings (UniPC, 10 steps, K = 5 K-means references); the wall time covers the whole call:
loading the prior, choosing targets, rendering shading maps and masks, generating and writing the
new Capture. Writes benchmarks/results/lift_<device>.json with the machine named.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from liftavatar.lift import LiftConfig, lift
from liftavatar.report import machine_info
from liftavatar.synth.world import SynthSpec, synthesize

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 5300


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num-expressions", type=int, default=None, help="default: 100 on CUDA, 20 on CPU")
    parser.add_argument("--prior", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    count = args.num_expressions or (100 if args.device.startswith("cuda") else 20)
    config = LiftConfig(num_expressions=count)
    with tempfile.TemporaryDirectory() as tmp:
        capture = synthesize(SynthSpec(seed=SEED, preset="sparse", frames=100, size=128), Path(tmp) / "capture",
                             progress=False, device=args.device)
        start = time.perf_counter()
        lifted, report = lift(capture.path, Path(tmp) / "lifted", args.prior, config, device=args.device)
        seconds = time.perf_counter() - start
    result = {"machine": machine_info(args.device), "subject_seed": SEED, "config": asdict(config),
              "lifted_frames": report["lifted_frames"], "seconds": seconds,
              "seconds_per_expression": seconds / count,
              "coverage_before": report["coverage_before"], "coverage_after": report["coverage_after"]}
    out = args.out or RESULTS / f"lift_{'cuda' if args.device.startswith('cuda') else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "config"}, indent=2))


if __name__ == "__main__":
    main()
