#!/usr/bin/env python
"""Speed of `liftavatar adapt` on a demo-size capture with the embedded prior, end to end.

    python benchmarks/adapt_speed.py --device cpu      # target: ≤ 5 min a mode on a 2-core CPU
    python benchmarks/adapt_speed.py --device cuda     # target: ≤ 60 s a mode on one H100 / H200

The capture is of the kind `liftavatar demo` tracks and lifts, made with the project's synthetic world: a held-out
synthetic subject (seed 6310, a development seed outside the prior's training range and every benchmark's test
range) performing the `sparse` preset, 300 frames at the embedded prior's size (128²). Each mode (full, the default
for the embedded prior, and lora) adapts the embedded prior with the library's defaults for that mode and device
(:class:`liftavatar.generator.adapt.AdaptConfig`; ``--steps`` etc. override them); the wall time covers the whole call: loading the capture and the prior, decoding the frames, the
initial validation, training with early stopping and writing the adapted prior. Writes the device's entry ("cpu"
or "cuda") of benchmarks/results/adapt_speed.json (``--out`` for another file), keeping the other's, with the
machine named.

``--capture DIR`` adapts on another capture instead (a tracked train/ clip, say: `liftavatar track CLIP -o DIR
--size 128`); the JSON names it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from liftavatar.generator.adapt import ADAPT_FILE, AdaptConfig, adapt
from liftavatar.report import machine_info
from liftavatar.synth.world import SynthSpec, synthesize

RESULTS = Path(__file__).resolve().parent / "results"
SEED, FRAMES, SIZE = 6310, 300, 128


def _lscpu() -> str | None:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modes", nargs="+", default=["full", "lora"], choices=["lora", "full"])
    parser.add_argument("--capture", type=Path, default=None, help="adapt on this capture instead of the synthetic one")
    parser.add_argument("--prior", type=Path, default=None, help="default: the embedded prior")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--val-every", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default=None)
    parser.add_argument("--save-every", type=int, default=None, help="checkpoint every this many steps")
    parser.add_argument("--note", default=None, help="a sentence kept in the JSON (what the run was for)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    overrides = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                       val_every=args.val_every, patience=args.patience,
                                       mixed_precision=args.mixed_precision,
                                       save_every=args.save_every).items() if v is not None}
    kind = "cuda" if args.device.startswith("cuda") else "cpu"
    results = {"machine": {**machine_info(args.device), "lscpu": _lscpu()}, "note": args.note, "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        if args.capture is None:
            capture = synthesize(SynthSpec(seed=SEED, preset="sparse", frames=FRAMES, size=SIZE), Path(tmp) / "capture",
                                 progress=False)
            results["capture"] = {"kind": "synthetic", "seed": SEED, "preset": "sparse", "frames": FRAMES,
                                  "size": SIZE, "made_by": "liftavatar.synth.world.synthesize (`liftavatar synth`)"}
        else:
            from liftavatar.capture import Capture

            capture = Capture.load(args.capture)
            results["capture"] = {"kind": "given", "path": str(args.capture), "subject": capture.meta.subject,
                                  "frames": capture.num_frames, "size": list(capture.size)}
        for mode in args.modes:
            config = replace(AdaptConfig(mode=mode, device=args.device), **overrides)
            if kind == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            prior = adapt(capture.path, Path(tmp) / f"prior_{mode}", config, prior=args.prior)
            seconds = time.perf_counter() - start
            record = json.loads((prior / ADAPT_FILE).read_text())
            history = record["history"]
            steps = record["steps"]
            results["modes"][mode] = {
                "seconds_total": seconds, "steps": steps, "max_steps": record["max_steps"],
                "steps_per_second_training": steps / record["training_seconds"] if record["training_seconds"] else None,
                "seconds_per_step_overall": seconds / steps if steps else None,
                "seconds_in_training_loop": record["training_seconds"],
                "val_loss_before": record["val_before"], "val_loss_best": record["best_val"],
                "val_change_percent": 100 * (record["best_val"] / record["val_before"] - 1),
                "best_step": record["best_step"], "stopped": record["stopped"],
                "val_history": [[h["step"], h["val_loss"]] for h in history if h["val_loss"] is not None],
                "config": record["config"], "split": record["split"],
            }
            print(f"{mode}: {seconds:.1f} s, {steps} steps, validation loss {record['val_before']:.5f} → "
                  f"{record['best_val']:.5f} (best at step {record['best_step']}, {record['stopped']})", flush=True)
    results["defaults_for_a_full_prior"] = asdict(AdaptConfig(device=args.device).resolved())
    out = args.out or RESULTS / "adapt_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    everything = json.loads(out.read_text()) if out.is_file() else {}
    everything[kind] = results
    out.write_text(json.dumps(everything, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
