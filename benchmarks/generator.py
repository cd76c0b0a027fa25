#!/usr/bin/env python
"""Generator quality on held-out synthetic subjects: K references from a `sparse` capture, targets
from an `extreme` capture of the same subject, generated frames against the ground truth.

    python benchmarks/generator.py [--prior DIR] [--subjects 4] [--frames 16] [--steps 25] [--device cuda]

Reported per subject and on average: PSNR and SSIM (128², whole frame) of the generated frames, and
the same for the best single reference copied to every frame (what a model that ignores the controls
could reach). Evaluation subjects: seeds 5200.. (never used in training, which uses 100000–101999).
Writes benchmarks/results/generator.json / .md and docs/generator_grid.png
(references | target shading | generated | ground truth).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from liftavatar.generator.data import generation_inputs
from liftavatar.generator.pipeline import LiftAvatarPipeline
from liftavatar.generator.prior import resolve_prior
from liftavatar.report import machine_info
from liftavatar.synth.world import SynthSpec, synthesize

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SEED_BASE = 5200


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-frame PSNR (dB) of (N, 3, H, W) images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).numpy()


def ssim(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.array([structural_similarity(x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(),
                                           channel_axis=2, data_range=1.0) for x, y in zip(a, b)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", type=Path, default=None)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--solver", choices=["euler", "unipc"], default="euler")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "generator.json")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "generator_grid.png")
    args = parser.parse_args()

    prior = resolve_prior(args.prior)
    pipe = LiftAvatarPipeline.from_pretrained(prior, device=args.device)
    size = pipe.size or 128
    rows, per_subject, seconds = [], [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.subjects):
            seed = SEED_BASE + i
            sparse = synthesize(SynthSpec(seed=seed, preset="sparse", frames=100, size=size), Path(tmp) / f"s{seed}",
                                progress=False, device=args.device)
            extreme = synthesize(SynthSpec(seed=seed, preset="extreme", frames=args.frames, size=size),
                                 Path(tmp) / f"e{seed}", progress=False, device=args.device)
            inputs = generation_inputs(sparse, extreme, k=args.refs)
            start = time.perf_counter()
            video = pipe(inputs, steps=args.steps, guidance=args.guidance, seed=0, solver=args.solver)
            seconds += time.perf_counter() - start
            truth = torch.from_numpy(extreme.frames()).permute(0, 3, 1, 2).float() / 255
            copy = max((psnr(r.expand_as(truth), truth).mean(), j) for j, r in enumerate(inputs.ref_frames))
            best_ref = inputs.ref_frames[copy[1]].expand_as(truth)
            per_subject.append({"seed": seed, "psnr": float(psnr(video, truth).mean()),
                                "ssim": float(ssim(video, truth).mean()),
                                "reference_copy_psnr": float(copy[0]),
                                "reference_copy_ssim": float(ssim(best_ref, truth).mean())})
            print(per_subject[-1])
            for f in range(0, args.frames, max(1, args.frames // 3))[:3]:
                refs = torch.cat(list(inputs.ref_frames[:3]), 1)  # a column of 3 references
                refs = torch.nn.functional.interpolate(refs[None], size=(size, size // 3 * 1), mode="area")[0]
                rows.append(torch.cat([refs, inputs.shading[f], video[f], truth[f]], 2))

    mean = {k: float(np.mean([s[k] for s in per_subject])) for k in per_subject[0] if k != "seed"}
    result = {"machine": machine_info(args.device), "prior": str(prior), "steps": args.steps, "solver": args.solver,
              "guidance": args.guidance, "refs": args.refs, "frames": args.frames, "size": size,
              "subjects": per_subject, "mean": mean,
              "seconds_per_frame": seconds / (args.subjects * args.frames)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    lines = ["# Generator quality (held-out subjects, sparse references → extreme targets)", "",
             f"Machine: {result['machine'].get('gpu', result['machine']['cpu'])}; prior `{prior.name}`; "
             f"{args.steps} Euler steps; K = {args.refs}; {size}².", "",
             "| seed | PSNR | SSIM | best reference copied: PSNR | SSIM |", "|---|---|---|---|---|"]
    for s in per_subject + [{"seed": "mean", **mean}]:
        lines.append(f"| {s['seed']} | {s['psnr']:.2f} | {s['ssim']:.3f} | {s['reference_copy_psnr']:.2f} | "
                     f"{s['reference_copy_ssim']:.3f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    grid = torch.cat(rows, 1).clamp(0, 1)
    from liftavatar.report import save_png

    args.grid.parent.mkdir(parents=True, exist_ok=True)
    save_png((grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), args.grid)
    print(json.dumps(mean, indent=2))


if __name__ == "__main__":
    main()
