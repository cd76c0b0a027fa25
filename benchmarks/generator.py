#!/usr/bin/env python
"""Generator quality on held-out synthetic subjects: K references from a `sparse` capture, targets
from an `extreme` capture of the same subject, generated frames against the ground truth.

    python benchmarks/generator.py [--prior DIR] [--subjects 4] [--frames 16] [--ablations] [--device cuda]

Reported per subject and on average: PSNR and SSIM (whole frame), AED (the project's tracker run on
the generated and on the ground-truth frames alike, mean |coefficient difference|), CSIM (dlib
face embeddings, generated vs ground truth), and, as floors, the best single reference copied to
every frame (what a model that ignores the controls could reach) and the tracker's own AED on the
ground truth against the true coefficients. ``--ablations`` adds the paper's studies: K ∈ {1, 3, 5, 7}
K-means references, random vs K-means at K = 5, and shading-only / coefficients-only controls (by
dropping one control at inference: the prior was trained with both, dropped together).
Evaluation subjects: seeds 5200.. (never used in training, which uses 100000–101999).
Writes benchmarks/results/generator.json / .md and docs/generator_grid.png
(references | target shading | generated | ground truth).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from liftavatar.generator.inputs import generation_inputs
from liftavatar.generator.pipeline import LiftAvatarPipeline, video_to_uint8
from liftavatar.generator.prior import resolve_prior
from liftavatar.metrics.identity import csim
from liftavatar.metrics.kinematic import aed, track_frames
from liftavatar.report import machine_info
from liftavatar.synth.world import SynthSpec, synthesize

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SEED_BASE = 5200


@dataclass(frozen=True)
class Setting:
    """One row of the study: how many references, how they are chosen, which controls are used."""

    name: str
    refs: int = 5
    method: str = "kmeans"
    controls: str = "both"


MAIN = Setting("K=5 k-means, both controls")
ABLATIONS = (Setting("K=1 k-means", refs=1), Setting("K=3 k-means", refs=3), Setting("K=7 k-means", refs=7),
             Setting("K=5 random", method="random"), Setting("shading only", controls="shading"),
             Setting("coefficients only", controls="coefficients"))


def psnr(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """Per-frame PSNR (dB) of (N, 3, H, W) images in [0, 1]."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).numpy()


def ssim(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return np.array([structural_similarity(x.permute(1, 2, 0).numpy(), y.permute(1, 2, 0).numpy(), channel_axis=2,
                                           data_range=1.0) for x, y in zip(a, b)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", type=Path, default=None)
    parser.add_argument("--subjects", type=int, default=4)
    parser.add_argument("--seed-base", type=int, default=SEED_BASE,
                        help=f"first subject's seed: {SEED_BASE} is the benchmark; choose between priors or training "
                             "stages on development seeds (6000–7999, e.g. 6100) and report the benchmark once")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--solver", choices=["euler", "unipc"], default="unipc")
    parser.add_argument("--ablations", action="store_true", help="also run the reference and control studies")
    parser.add_argument("--no-face-metrics", action="store_true", help="skip AED and CSIM (no MediaPipe/dlib)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS / "generator.json",
                        help="results JSON (the markdown table is written next to it)")
    parser.add_argument("--grid", type=Path, default=ROOT / "docs" / "generator_grid.png", help="image grid PNG")
    args = parser.parse_args()
    for flag, path in (("--out", args.out), ("--grid", args.grid)):
        if path.is_dir():  # found after 10 minutes of generation otherwise
            parser.error(f"{flag} {path}: is a folder; pass a file path ({flag} names the file to write).")

    prior = resolve_prior(args.prior)
    pipe = LiftAvatarPipeline.from_pretrained(prior, device=args.device)
    size = pipe.size or 128
    settings = (MAIN, *ABLATIONS) if args.ablations else (MAIN,)
    face_metrics = not args.no_face_metrics
    per_setting: dict[str, list[dict]] = {s.name: [] for s in settings}
    floors, rows, seconds, generated = [], [], 0.0, 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.subjects):
            seed = args.seed_base + i
            sparse = synthesize(SynthSpec(seed=seed, preset="sparse", frames=100, size=size), Path(tmp) / f"s{seed}",
                                progress=False, device=args.device)
            extreme = synthesize(SynthSpec(seed=seed, preset="extreme", frames=args.frames, size=size),
                                 Path(tmp) / f"e{seed}", progress=False, device=args.device)
            truth = torch.from_numpy(extreme.frames()).permute(0, 3, 1, 2).float() / 255
            truth8 = extreme.frames()
            floor = {"seed": seed}
            if face_metrics:
                tracked_truth = track_frames(truth8, tuple(extreme.meta.intrinsics))
                floor["tracker_aed_on_truth"] = aed(tracked_truth.expression, extreme.kinematics.expression,
                                                    tracked_truth.valid)
            for setting in settings:
                inputs = generation_inputs(sparse, extreme, k=setting.refs, method=setting.method, seed=seed)
                start = time.perf_counter()
                video = pipe(inputs, steps=args.steps, guidance=args.guidance, seed=0, solver=args.solver,
                             controls=setting.controls)
                seconds += time.perf_counter() - start
                generated += len(video)
                row = {"seed": seed, "psnr": float(psnr(video, truth).mean()), "ssim": float(ssim(video, truth).mean())}
                if face_metrics:
                    video8 = video_to_uint8(video)
                    tracked = track_frames(video8, tuple(extreme.meta.intrinsics))
                    both = tracked.valid & tracked_truth.valid
                    row["aed"] = aed(tracked.expression, tracked_truth.expression, both)
                    row["aed_frames"] = int(both.sum())
                    similarity = csim(video8, truth8)
                    row["csim"] = similarity.mean
                    row["csim_missed"] = len(similarity.missed)
                per_setting[setting.name].append(row)
                print(setting.name, row, flush=True)
                if setting == MAIN:
                    copy = max((psnr(r.expand_as(truth), truth).mean(), j) for j, r in enumerate(inputs.ref_frames))
                    best_ref = inputs.ref_frames[copy[1]].expand_as(truth)
                    floor.update(reference_copy_psnr=float(copy[0]),
                                 reference_copy_ssim=float(ssim(best_ref, truth).mean()))
                    if face_metrics:
                        floor["reference_copy_csim"] = csim(video_to_uint8(best_ref), truth8).mean
                    for f in range(0, args.frames, max(1, args.frames // 3))[:3]:
                        refs = torch.cat(list(inputs.ref_frames[:3]), 1)  # a column of 3 references
                        refs = torch.nn.functional.interpolate(refs[None], size=(size, size // 3), mode="area")[0]
                        rows.append(torch.cat([refs, inputs.shading[f], video[f], truth[f]], 2))
            floors.append(floor)

    def mean_of(items: list[dict]) -> dict[str, float]:
        keys = [k for k in items[0] if k != "seed"]
        return {k: float(np.nanmean([s[k] for s in items])) for k in keys} | \
               {f"{k}_std": float(np.nanstd([s[k] for s in items])) for k in keys if not k.endswith(("frames", "missed"))}

    result = {"machine": machine_info(args.device), "prior": str(prior), "steps": args.steps, "solver": args.solver,
              "guidance": args.guidance, "frames": args.frames, "size": size,
              "settings": {s.name: {**asdict(s), "subjects": per_setting[s.name], "mean": mean_of(per_setting[s.name])}
                           for s in settings},
              "floors": {"subjects": floors, "mean": mean_of(floors)},
              "seconds_per_frame": seconds / max(1, generated)}
    result["mean"] = result["settings"][MAIN.name]["mean"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    args.out.with_suffix(".md").write_text(markdown(result, prior, args))
    grid = torch.cat(rows, 1).clamp(0, 1)
    from liftavatar.io import save_png

    args.grid.parent.mkdir(parents=True, exist_ok=True)
    save_png((grid.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8), args.grid)
    print(json.dumps(result["mean"], indent=2))


def markdown(result: dict, prior: Path, args) -> str:
    m = result["machine"]
    fl = result["floors"]["mean"]
    lines = ["# Generator quality (held-out subjects, sparse references → extreme targets)", "",
             f"Machine: {m.get('gpu', m['cpu'])}; prior `{prior.name}`; {args.steps} {args.solver} steps; "
             f"{args.subjects} subjects (seeds {args.seed_base}–{args.seed_base + args.subjects - 1}) × {args.frames} frames; "
             f"{result['size']}². Mean ± std over subjects.", "",
             "| setting | PSNR (dB) | SSIM | AED ↓ | CSIM ↑ |", "|---|---|---|---|---|"]

    def cell(mean: dict, key: str, fmt: str) -> str:
        if key not in mean:
            return "–"
        if not np.isfinite(mean[key]):
            return "no face found"
        return f"{mean[key]:{fmt}} ± {mean.get(key + '_std', 0):{fmt}}"

    for name, entry in result["settings"].items():
        mean = entry["mean"]
        lines.append(f"| {name} | {cell(mean, 'psnr', '.2f')} | {cell(mean, 'ssim', '.3f')} | "
                     f"{cell(mean, 'aed', '.3f')} | {cell(mean, 'csim', '.3f')} |")
    lines.append(f"| *best reference copied to every frame* | {cell(fl, 'reference_copy_psnr', '.2f')} | "
                 f"{cell(fl, 'reference_copy_ssim', '.3f')} | – | {cell(fl, 'reference_copy_csim', '.3f')} |")
    if "tracker_aed_on_truth" in fl:
        lines += ["", f"AED floor: the tracker on the ground-truth frames against the true coefficients gives "
                      f"{fl['tracker_aed_on_truth']:.3f}."]
    lines += ["", "Per subject (main setting):", "", "| seed | PSNR | SSIM | AED | CSIM |", "|---|---|---|---|---|"]
    for row in result["settings"][MAIN.name]["subjects"]:
        lines.append(f"| {row['seed']} | {row['psnr']:.2f} | {row['ssim']:.3f} | {row.get('aed', float('nan')):.3f} | "
                     f"{row.get('csim', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
