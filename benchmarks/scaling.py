#!/usr/bin/env python
"""Multi-GPU scaling of generator training: tokens/s on 1, 2, 4, 8 GPUs, same per-GPU batch.

    python benchmarks/scaling.py [--gpus 1,2,4,8] [--preset wan2.1-14b] [--config configs/accelerate/fsdp_14b.yaml]
    python benchmarks/scaling.py --dry-run      # no GPU: tiny preset, 1 and 2 CPU processes over gloo

One `accelerate launch` per GPU count N (``--num_processes N``, the given accelerate config: FSDP2 full
shard per WanTransformerBlock, activation checkpointing, bf16 by default), each running this script as
a worker. The worker builds the model as `liftavatar train` does (:func:`build_distributed_model`: the
preset with random weights on rank 0, an empty replica filled by broadcast elsewhere), adds LoRA, and
times LoRA training steps (forward, flow-matching MSE, backward, gradient clipping, AdamW) on random
latents of the Wan VAE's shape — 17 frames + 5 references at 512² by default: 10 latent frames of 32 × 32
tokens, 10,240 tokens per clip. The data pipeline (rendering, VAE encoding) is left out: this measures
the distributed model step.

tokens/s = N × per-GPU batch × tokens per clip / median step time; scaling efficiency at N =
tokens/s(N) / (N × tokens/s(1)). Writes ``benchmarks/results/scaling_<device>.json`` with the device
named (the GPU model, e.g. ``scaling_nvidia-h100-80gb-hbm3.json``), per-N step times, tokens/s,
efficiency and peak memory (max over ranks). Without CUDA it refuses, unless ``--dry-run``, which
checks the script end to end on CPU processes over gloo (DDP: accelerate enables FSDP only on GPUs) and
writes to a temporary file unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET_EFFICIENCY = 0.85


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2,4,8", help="GPU counts to measure (those above the GPUs here are skipped)")
    p.add_argument("--preset", default="wan2.1-14b")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "accelerate" / "fsdp_14b.yaml")
    p.add_argument("--batch-size", type=int, default=1, help="clips per GPU and step (the same for every N)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--refs", type=int, default=5)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--dry-run", action="store_true", help="no GPU: tiny preset, 1 and 2 CPU processes (gloo)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--timeout", type=int, default=1800, help="seconds allowed per launch")
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: write this run's JSON
    return p


# ---- one launch: N processes -------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch
    from accelerate import Accelerator

    from liftavatar.face.rig import FaceRig
    from liftavatar.generator.inputs import num_controls
    from liftavatar.generator.train import TrainConfig, build_distributed_model

    started = time.perf_counter()
    config = TrainConfig(out=Path(tempfile.gettempdir()) / "scaling-unused", preset=args.preset, codec="wan-vae",
                         train_mode="lora", lora_rank=args.lora_rank, batch_size=args.batch_size,
                         frames=args.frames, refs=args.refs, size=args.size, gradient_checkpointing=True,
                         device="cpu" if args.dry_run else None)
    accelerator = Accelerator(cpu=args.dry_run)
    d = num_controls(FaceRig.load().num_expressions)
    model = build_distributed_model(accelerator, config, d)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    model, optimizer = accelerator.prepare(model, optimizer)
    trainable = [p for p in model.parameters() if p.requires_grad]
    ready = time.perf_counter() - started

    device = accelerator.device
    channels = accelerator.unwrap_model(model).config.base["in_channels"]
    b, k, g = args.batch_size, args.refs, 4  # Wan VAE: 4 video frames per latent frame (the first alone)
    t, h = 1 + (args.frames - 1) // 4, args.size // 8
    tokens_per_clip = (t + k) * (h // 2) * (h // 2)
    gen = torch.Generator(device if device.type == "cuda" else "cpu").manual_seed(accelerator.process_index)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    x0, noise, shading = rand(b, channels, t, h, h), rand(b, channels, t, h, h), rand(b, channels, t, h, h)
    ref_latents, ref_shading = rand(b, channels, k, h, h), rand(b, channels, k, h, h)
    controls, ref_controls = rand(b, t, g, d), rand(b, k, g, d)
    sigma = torch.rand(b, generator=gen, device=device)
    keep = torch.zeros(b, dtype=torch.bool, device=device)  # no control dropout (train passes the mask too)
    xt = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
    model.train()

    def step() -> float:
        with accelerator.accumulate(model), accelerator.autocast():
            pred = model(xt, sigma * 1000, shading, controls, ref_latents, ref_shading, ref_controls,
                         drop_controls=keep)
            loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()  # synchronises the device

    cuda = device.type == "cuda"
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - start)
    # Every rank's step times → the slowest rank's per step (a step ends when the last rank is done).
    per_step = accelerator.reduce(torch.tensor(times, device=device), "max").tolist()
    peak = torch.tensor([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0], device=device)
    peak = accelerator.reduce(peak, "max").item() if cuda else None
    if accelerator.is_main_process:
        n = accelerator.num_processes
        median = statistics.median(per_step)
        result = {
            "processes": n, "distributed_type": accelerator.distributed_type.value,
            "mixed_precision": accelerator.mixed_precision, "per_gpu_batch": b, "global_batch": n * b,
            "tokens_per_clip": tokens_per_clip, "step_s": per_step, "median_step_s": median,
            "tokens_per_s": n * b * tokens_per_clip / median, "clips_per_s": n * b / median,
            "peak_memory_gib_max_over_ranks": peak, "setup_s": ready, "parameters": n_params,
            "trainable_parameters": n_trainable, "final_loss": loss,
        }
        args.worker.write_text(json.dumps(result, indent=2))
    accelerator.wait_for_everyone()
    from liftavatar.generator.train import exit_process

    exit_process(0)  # not the interpreter's teardown, which can abort a gloo rank after the work is done


# ---- the driver: one launch per GPU count ----------------------------------------------------------------


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _launch(args: argparse.Namespace, n: int, config: Path, result: Path) -> dict:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", str(config), "--num_processes", str(n),
           "--main_process_port", _free_port(), str(Path(__file__).resolve()), "--worker", str(result),
           "--preset", args.preset, "--batch-size", str(args.batch_size), "--frames", str(args.frames),
           "--refs", str(args.refs), "--size", str(args.size), "--lora-rank", str(args.lora_rank),
           "--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--dry-run"] if args.dry_run else [])
    print(f"[{n} process(es)] {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout, capture_output=True, text=True, check=False)
    if done.returncode != 0 or not result.is_file():
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
        raise SystemExit(f"scaling.py: the {n}-process launch failed (exit {done.returncode}); its output is above.")
    return json.loads(result.read_text())


def main() -> None:
    args = _parser().parse_args()
    if args.worker is not None:
        worker(args)
        return
    import torch

    from liftavatar.report import machine_info

    if args.dry_run:
        counts = [1, 2]
        args.preset, args.size, args.frames, args.refs = "tiny", 64, 5, 2
        args.warmup, args.steps = 1, 2
        config = ROOT / "configs" / "accelerate" / "cpu_gloo.yaml"
        device, gpus = "cpu (dry run: 2 processes over gloo, DDP)", 0
        out = args.out or Path(tempfile.gettempdir()) / "scaling_dry-run.json"
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    else:
        if not torch.cuda.is_available():
            print("scaling.py measures multi-GPU training and this machine has no CUDA GPU; run it on a machine "
                  "with GPUs, or pass --dry-run to check the script on CPU processes.", file=sys.stderr)
            sys.exit(2)
        gpus = torch.cuda.device_count()
        wanted = sorted({int(c) for c in args.gpus.split(",")})
        counts = [c for c in wanted if c <= gpus]
        if 1 not in counts:
            print("scaling.py: --gpus must include 1 (the baseline the efficiency is measured against).",
                  file=sys.stderr)
            sys.exit(2)
        if len(counts) < len(wanted):
            print(f"only {gpus} GPU(s) here: measuring {counts}, skipping {[c for c in wanted if c > gpus]}")
        config = args.config
        device = torch.cuda.get_device_name(0)
        out = args.out or RESULTS / f"scaling_{_slug(device)}.json"

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in counts:
            runs[n] = _launch(args, n, config, Path(tmp) / f"{n}.json")
            r = runs[n]
            eff = r["tokens_per_s"] / (n * runs[1]["tokens_per_s"])
            r["scaling_efficiency"] = eff
            peak = r["peak_memory_gib_max_over_ranks"]
            print(f"  {n} process(es): {r['median_step_s']:.3f} s/step, {r['tokens_per_s']:.0f} tokens/s, "
                  f"efficiency {eff:.1%}" + (f", peak {peak:.1f} GiB" if peak is not None else ""), flush=True)
    largest = max(counts)
    efficiency = runs[largest]["scaling_efficiency"]
    result = {
        "device": device, "gpus_on_machine": gpus, "machine": machine_info("cuda" if gpus else "cpu"),
        "accelerate_config": os.path.relpath(Path(config).resolve(), ROOT), "preset": args.preset,
        "weights": "random", "train_mode": "lora", "lora_rank": args.lora_rank, "per_gpu_batch": args.batch_size,
        "frames": args.frames, "refs": args.refs, "size": args.size, "warmup_steps": args.warmup,
        "timed_steps": args.steps, "dry_run": args.dry_run, "runs": {str(n): r for n, r in runs.items()},
        "largest_gpu_count": largest, "scaling_efficiency_at_largest": efficiency,
        "target_efficiency": TARGET_EFFICIENCY, "meets_target": efficiency >= TARGET_EFFICIENCY,
    }
    for name in ("accelerate", "diffusers", "peft"):
        result["machine"][name] = __import__(name).__version__
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"scaling efficiency at {largest} process(es): {efficiency:.1%} (target {TARGET_EFFICIENCY:.0%}); wrote {out}")


if __name__ == "__main__":
    main()
