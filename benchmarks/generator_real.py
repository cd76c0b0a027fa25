#!/usr/bin/env python
"""Expression fidelity on real people (issue 20 item 3): the prior, as shipped and adapted to the person, asked
to regenerate a real clip's extreme frames from K = 5 references of its training frames and the frames' tracked
shading maps and coefficients; scored against the real frames inside the mask.

Three phases, so that the generation can run on a GPU and the face metrics (MediaPipe, dlib) here:

    python benchmarks/generator_real.py split CAPTURE... --work DIR [--role eval|validation]
    python benchmarks/generator_real.py generate --work DIR [--device cuda] [--variants base full lora] [--only NAME]
    python benchmarks/generator_real.py score --work DIR [--out benchmarks/results/generator_real.json]

- **split** (CPU): each tracked clip (`liftavatar track CLIP --size 128`, or a real bench run's
  ``subjects/NAME/tracked``) is split as the real benchmark splits it (:func:`liftavatar.bench.real.split_frames`
  with :class:`~liftavatar.bench.config.BenchConfig`'s defaults: the 15 % of valid frames farthest from the clip's
  typical expression and pose are the extreme test, guard bands of ±3 frames) into ``DIR/NAME/train`` and
  ``DIR/NAME/test_extreme``; the train capture's K = 5 references are chosen by K-means and stored, as the bench's
  refs stage does. ``--role validation`` marks clips that choose between variants (``train/`` clips only), ``eval``
  the benchmark's (``eval/`` clips: reported, never chosen on).
- **generate** (GPU or CPU): per clip and variant, ``base`` is the prior as given (the embedded one by default);
  ``full`` and ``lora`` first adapt it on the clip's train capture with `liftavatar adapt`'s library defaults for
  that mode and device (:class:`liftavatar.generator.adapt.AdaptConfig`: validation on held-out blocks of the
  train capture, early stopping), never seeing a test frame. The extreme frames are generated in windows of the
  prior's clip length with `lift`'s sampler defaults (10 UniPC steps, guidance 1, clip c seeded c) and written as
  ``DIR/NAME/gen_VARIANT.npz``; ``timings.json`` records seconds per phase. Finished pieces are skipped (resume).
- **score** (CPU): ground truth and every prediction are composited over black by the real frame's mask (the
  real benchmark's rule: :func:`liftavatar.bench.layout.gt_frames`); PSNR over the whole composited frame (as the
  real benchmark reports it) and over the mask's foreground only, SSIM, AED (the project's tracker on both sides),
  CSIM (dlib). The floor is the best single reference (highest mean PSNR over the clip's extreme frames) copied to
  every frame. The variant reported as "adapted" is the one with the best mean PSNR on the ``validation`` clips.
  Writes the JSON, a markdown table beside it and a grid (references | target shading | generated, base |
  generated, adapted | real frame).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
VARIANTS = ("base", "full", "lora")
"""What `generate` makes: the prior as given, and adapted in each of `liftavatar adapt`'s modes."""
METRICS = ("psnr", "ssim", "aed", "csim")
TARGETS = {"psnr_gain_db": 3.0, "aed_ratio": 0.7, "csim": 0.90}


def _clips(work: Path, only: list[str] | None = None) -> list[Path]:
    clips = sorted(p for p in work.iterdir() if (p / "role.json").is_file())
    if only:
        clips = [c for c in clips if c.name in only]
    if not clips:
        raise SystemExit(f"{work}: no split clips in it; run `generator_real.py split CAPTURE... --work {work}` first.")
    return clips


def split(captures: list[Path], work: Path, role: str) -> None:
    from liftavatar.bench.config import BenchConfig
    from liftavatar.bench.real import split_frames
    from liftavatar.bench.stages import subset_capture
    from liftavatar.capture import Capture
    from liftavatar.refs import choose_references

    cfg = BenchConfig()
    for path in captures:
        tracked = Capture.load(path)
        name = tracked.meta.subject or path.name
        parts = split_frames(tracked.kinematics, cfg.extreme_share, cfg.split_guard, cfg.seen_every, cfg.seen_block)
        out = work / name
        note = {"of": tracked.num_frames, "split": "liftavatar.bench.real.split_frames, BenchConfig defaults"}
        subset_capture(tracked, out / "train", parts.train, {**note, "segment": "train"})
        subset_capture(tracked, out / "test_extreme", parts.extreme, {**note, "segment": "extreme"})
        refs = [int(i) for i in choose_references(out / "train", cfg.refs, "kmeans", seed=0)]
        record = {"role": role, "source": str(path), "counts": parts.counts(), "references": refs,
                  "extreme_frames": parts.extreme.tolist()}
        (out / "role.json").write_text(json.dumps(record, indent=1))
        print(name, role, parts.counts(), "references", refs, flush=True)


def _generate_frames(pipe, train, test, steps: int, solver: str) -> np.ndarray:
    """(N, H, W, 3) uint8: ``test``'s frames regenerated from ``train``'s stored references, in clips of the
    prior's window (the last one padded by repeating its final frame), clip c seeded c as `lift` seeds them."""
    from liftavatar.generator.inputs import generation_inputs, resize_images
    from liftavatar.generator.pipeline import video_to_uint8

    n, window = test.num_frames, pipe.window
    count = -(-n // window)
    order = [min(i, n - 1) for i in range(count * window)]
    inputs = generation_inputs(train, test, k=5, frames=order, size=pipe.size)
    video = pipe.generate_clips(inputs, window, list(range(count)), steps, 1.0, solver, batch_size=8)
    return video_to_uint8(resize_images(video[:n], tuple(test.size)))


def generate(work: Path, variants: list[str], device: str, prior: Path | None, only: list[str] | None,
             steps: int, solver: str, adapt_steps: int | None = None, prior_name: str | None = None) -> None:
    from liftavatar.capture import Capture
    from liftavatar.generator.adapt import AdaptConfig, adapt
    from liftavatar.generator.pipeline import LiftAvatarPipeline
    from liftavatar.generator.prior import PriorConfig
    from liftavatar.report import machine_info

    source = PriorConfig(prior=prior, device=device)
    for clip in _clips(work, only):
        train, test = Capture.load(clip / "train"), Capture.load(clip / "test_extreme")
        timings_path = clip / "timings.json"
        timings = json.loads(timings_path.read_text()) if timings_path.is_file() else {}
        for mode in variants:
            # An adapted variant is named by its mode and the device whose budget-bound defaults it ran with
            # (AdaptConfig: 16 steps on a CPU, 400 on CUDA): both may sit in one work folder.
            variant = mode if mode == "base" else f"{mode}_{'cuda' if device.startswith('cuda') else 'cpu'}"
            if mode != "base" and adapt_steps is not None:
                variant += f"_s{adapt_steps}"
            if prior_name:  # another prior than the embedded one, side by side with it in one work folder
                variant += f"@{prior_name}"
            out = clip / f"gen_{variant}.npz"
            if out.is_file():
                continue
            entry: dict = {"machine": machine_info(device)}
            config_of_variant = source
            if mode != "base":
                config = AdaptConfig(mode=mode, device=device, steps=adapt_steps)
                start = time.perf_counter()
                adapted = adapt(clip / "train", clip / f"prior_{variant}", config, source, progress=False)
                entry["adapt_seconds"] = time.perf_counter() - start
                config_of_variant = replace(source, prior=adapted)
                record = json.loads((adapted / "adapt.json").read_text())
                entry["adapt"] = {k: record.get(k) for k in ("val_before", "best_val", "steps", "best_step", "stopped",
                                                             "training_seconds", "config")}
            start = time.perf_counter()
            pipe = LiftAvatarPipeline.from_pretrained(config_of_variant)
            frames = _generate_frames(pipe, train, test, steps, solver)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            entry["generate_seconds"] = time.perf_counter() - start
            entry["frames"] = len(frames)
            np.savez_compressed(out, frames=frames)
            timings[variant] = entry
            timings_path.write_text(json.dumps(timings, indent=1, default=str))
            print(clip.name, variant, {k: v for k, v in entry.items() if k.endswith("seconds")}, flush=True)
            del pipe
            if device.startswith("cuda"):
                torch.cuda.empty_cache()


def _score_one(pred: np.ndarray, gt: np.ndarray, masks: np.ndarray, test) -> dict[str, float]:
    from liftavatar.bench.layout import over_black
    from liftavatar.metrics.evaluate import EvalConfig, evaluate
    from liftavatar.metrics.sources import FrameSet

    intrinsics = tuple(float(v) for v in test.meta.intrinsics)
    report = evaluate(FrameSet(None, "array", over_black(pred, masks), intrinsics=intrinsics),
                      FrameSet(test.path, "capture", gt, masks, test.kinematics, intrinsics),
                      EvalConfig(metrics=METRICS, kinematics="tracked", masked=True, per_frame=False))
    out = {}
    for key, value in report["metrics"].items():
        if isinstance(value, dict) and "value" in value:
            out[key] = value["value"]
            if key in ("aed", "csim"):
                out[f"{key}_frames"] = value["frames"]
    return out


def _mean(rows: list[dict]) -> dict[str, float]:
    keys = sorted({k for r in rows for k in r if isinstance(r[k], (int, float)) and not k.endswith("_frames")})
    out = {}
    for k in keys:
        values = np.array([r.get(k, np.nan) for r in rows], np.float64)
        out[k], out[f"{k}_std"] = float(np.nanmean(values)), float(np.nanstd(values))
    return out


def _machines(clips: list[Path], variant: str) -> list[str]:
    """Where ``variant`` was generated, over all clips (a resumed or split run may have used several machines)."""
    names = set()
    for clip in clips:
        timings = json.loads((clip / "timings.json").read_text()) if (clip / "timings.json").is_file() else {}
        machine = (timings.get(variant) or {}).get("machine") or {}
        names.add(machine.get("gpu") or machine.get("cpu"))
    return sorted(names - {None})


def score(work: Path, out: Path, grid: Path) -> None:
    from liftavatar.bench.layout import gt_frames, over_black
    from liftavatar.capture import Capture
    from liftavatar.io import save_png, write_json
    from liftavatar.metrics.image import psnr as masked_psnr
    from liftavatar.report import machine_info

    clips = _clips(work)
    per_clip, grid_rows = [], []
    for clip in clips:
        role = json.loads((clip / "role.json").read_text())
        train, test = Capture.load(clip / "train"), Capture.load(clip / "test_extreme")
        gt, masks = gt_frames(test)
        refs = np.asarray(role["references"])
        ref_frames = train.frames(refs.tolist())
        copies = [np.repeat(r[None], len(gt), 0) for r in ref_frames]
        copy_psnr = [np.mean([masked_psnr(over_black(c, masks)[i], gt[i]) for i in range(len(gt))]) for c in copies]
        best = int(np.argmax(copy_psnr))
        rows = {"reference_copy": _score_one(copies[best], gt, masks, test)}
        rows["reference_copy"]["reference"] = int(refs[best])
        generated = {}
        timings = json.loads((clip / "timings.json").read_text()) if (clip / "timings.json").is_file() else {}
        for path in sorted(clip.glob("gen_*.npz")):
            variant = path.stem.removeprefix("gen_")
            generated[variant] = np.load(path)["frames"]
            rows[variant] = _score_one(generated[variant], gt, masks, test)
            rows[variant].update({k: v for k, v in timings.get(variant, {}).items() if k.endswith("seconds")})
            record = timings.get(variant, {}).get("adapt")
            if record:
                rows[variant]["adapt_steps"] = record["steps"]
                rows[variant]["adapt_val_change_percent"] = 100 * (record["best_val"] / record["val_before"] - 1)
        per_clip.append({"clip": clip.name, "role": role["role"], "counts": role["counts"],
                         "extreme_frames": len(gt), "results": rows})
        print(clip.name, role["role"], json.dumps({k: {m: round(v, 4) for m, v in r.items() if m in
                                                           ("psnr", "psnr_masked", "aed", "csim")}
                                                   for k, r in rows.items()}), flush=True)
        if role["role"] == "eval":
            grid_rows.append((ref_frames, test, generated))

    present = sorted({v for c in per_clip for v in c["results"] if v != "reference_copy"},
                     key=lambda v: (v != "base", v))
    # Means compare like with like: over the clips that have every variant (a run cut short leaves some without).
    complete = {c["clip"] for c in per_clip if all(v in c["results"] for v in present)}

    def variant_mean(role: str, variant: str) -> dict[str, float]:
        return _mean([c["results"][variant] for c in per_clip if c["role"] == role and c["clip"] in complete])
    adapted = [v for v in present if not _is_base(v)]
    validation = [c["clip"] for c in per_clip if c["role"] == "validation" and c["clip"] in complete]
    chosen = max(adapted, key=lambda v: variant_mean("validation", v).get("psnr", -np.inf)) if adapted else None
    summary = {role: {v: variant_mean(role, v) for v in ["reference_copy", *present]}
               for role in ("validation", "eval") if any(c["role"] == role for c in per_clip)}
    checks = {}
    if chosen and "eval" in summary:
        for c in per_clip:
            if c["role"] != "eval" or chosen not in c["results"]:
                continue
            r, floor = c["results"][chosen], c["results"]["reference_copy"]
            checks[c["clip"]] = {"psnr_gain_db": r["psnr"] - floor["psnr"], "aed_ratio": r["aed"] / floor["aed"],
                                 "csim": r["csim"]}
            checks[c["clip"]]["holds"] = {"psnr_gain_db": checks[c["clip"]]["psnr_gain_db"] >= TARGETS["psnr_gain_db"],
                                          "aed_ratio": checks[c["clip"]]["aed_ratio"] <= TARGETS["aed_ratio"],
                                          "csim": checks[c["clip"]]["csim"] >= TARGETS["csim"]}
    timings = {v: _machines(clips, v) for v in present}
    result = {"scored_on": machine_info("cpu"), "generated_on": timings, "targets": TARGETS, "variants": present,
              "chosen_variant": chosen, "chosen_on": validation, "summary": summary,
              "summary_clips": sorted(complete), "checks": checks, "clips": per_clip}
    write_json(out, result)
    out.with_suffix(".md").write_text(markdown(result))
    if grid_rows:
        save_png(_grid(grid_rows, chosen), grid)
    print(out.with_suffix(".md").read_text())


def _grid(clips: list[tuple], chosen: str | None) -> np.ndarray:
    """Two extreme frames a clip, a row each: 3 of the references (a column) | target shading | generated by the
    embedded prior | generated by the adapted one (without adapted variants: by the other prior as given) | the
    real frame."""
    rows = []
    if chosen is None:
        chosen = next((v for v in sorted({v for _, _, g in clips for v in g}) if v != "base"), None)
    for ref_frames, test, generated in clips:
        shading = test.shadings()
        side = shading.shape[1]
        column = torch.from_numpy(np.concatenate(list(ref_frames[:3]), 0)).permute(2, 0, 1)[None].float()
        column = torch.nn.functional.interpolate(column, size=(side, side // 3), mode="area")
        column = column[0].permute(1, 2, 0).round().to(torch.uint8).numpy()
        for f in np.linspace(0, test.num_frames - 1, 2).round().astype(int):
            blank = np.zeros_like(shading[f])
            row = [column, shading[f], generated.get("base", {f: blank})[f],
                   generated[chosen][f] if chosen in generated else blank, test.frame(int(f))]
            rows.append(np.concatenate(row, 1))
    return np.concatenate(rows, 0)


def _is_base(variant: str) -> bool:
    """``base`` or ``base@NAME``: a prior as given, not adapted."""
    return variant.split("@")[0] == "base"


def _label(variant: str) -> str:
    """``base`` → "prior as given"; ``full_cpu`` → "adapted (full, cpu defaults)"; ``full_cpu_s48`` → "adapted
    (full, cpu defaults, 48 steps)"; ``…@generic``: made from the prior named generic instead of the embedded one."""
    variant, _, prior = variant.partition("@")
    if variant == "base":
        label = "prior as given"
    else:
        mode, device, *steps = variant.split("_")
        label = f"adapted ({mode}, {device} defaults{f', {steps[0][1:]} steps' if steps else ''})"
    return f"{label}, {prior} prior" if prior else label


def markdown(result: dict) -> str:
    chosen = result["chosen_variant"]
    made = "; ".join(f"{v} on {' and '.join(m)}" for v, m in result["generated_on"].items() if m)
    lines = ["# Expression fidelity on real people (the prior regenerating a clip's extreme frames)", "",
             f"Generated: {made}; scored on {result['scored_on']['cpu']}. Each clip split as the real "
             "benchmark splits it; K = 5 K-means references from its train split; targets: the extreme split's "
             "tracked shading maps and coefficients; 10 UniPC steps. Metrics inside the real frame's mask (both "
             "sides composited over black): PSNR over the composited frame (as `bench_real` reports it) and over "
             "the foreground only, AED (tracker on both sides), CSIM (dlib). Floor: the best single reference "
             "copied to every frame.", "",
             f"Adapted variant reported: **{chosen}**, chosen by mean PSNR on the validation clips "
             f"({', '.join(result['chosen_on']) or 'none'}: `train/` clips); eval clips were not used to choose.", ""]
    for role, table in result["summary"].items():
        over = [c["clip"] for c in result["clips"] if c["role"] == role and c["clip"] in result["summary_clips"]]
        left = [c["clip"] for c in result["clips"] if c["role"] == role and c["clip"] not in result["summary_clips"]]
        lines += [f"## {role} clips (mean ± std over the {len(over)} with every variant"
                  + (f"; without: {', '.join(left)}" if left else "") + ")", "",
                  "| prediction | PSNR (dB) | PSNR fg (dB) | SSIM | AED ↓ | CSIM ↑ | adapt: steps, val loss Δ % | "
                  "adapt s | generate s |", "|---|---|---|---|---|---|---|---|---|"]
        for variant, m in table.items():
            def cell(key: str, fmt: str) -> str:
                return "–" if key not in m or not np.isfinite(m[key]) else f"{m[key]:{fmt}} ± {m[key + '_std']:{fmt}}"
            name = "best reference copied" if variant == "reference_copy" else _label(variant)
            lines.append(f"| {name} | {cell('psnr', '.2f')} | {cell('psnr_masked', '.2f')} | {cell('ssim', '.3f')} | "
                         f"{cell('aed', '.4f')} | {cell('csim', '.3f')} | "
                         f"{cell('adapt_steps', '.0f')}, {cell('adapt_val_change_percent', '+.1f')} | "
                         f"{cell('adapt_seconds', '.0f')} | "
                         f"{cell('generate_seconds', '.1f')} |")
        lines.append("")
    variants = [v for v in result["variants"]]
    lines += ["## Per clip", "", "| clip | role | extreme frames | " + " | ".join(
              [f"{v} PSNR" for v in ("copy", *variants)] + [f"{v} AED" for v in ("copy", *variants)] +
              [f"{v} CSIM" for v in variants]) + " |", "|" + "---|" * (3 + 3 * len(variants) + 2)]
    for c in result["clips"]:
        r = c["results"]

        def get(v: str, k: str, fmt: str) -> str:
            return f"{r[v][k]:{fmt}}" if v in r and k in r[v] and np.isfinite(r[v][k]) else "–"
        lines.append(f"| {c['clip']} | {c['role']} | {c['extreme_frames']} | " + " | ".join(
            [get(v, "psnr", ".2f") for v in ("reference_copy", *variants)] +
            [get(v, "aed", ".4f") for v in ("reference_copy", *variants)] +
            [get(v, "csim", ".3f") for v in variants]) + " |")
    if result["checks"]:
        lines += ["", f"## Issue 20 item 3 bounds on the eval clips ({chosen})", "",
                  f"| clip | PSNR − copy (≥ {TARGETS['psnr_gain_db']} dB) | AED / copy's (≤ {TARGETS['aed_ratio']}) | "
                  f"CSIM (≥ {TARGETS['csim']}) |", "|---|---|---|---|"]
        for clip, c in result["checks"].items():
            mark = lambda k: "✓" if c["holds"][k] else "✗"  # noqa: E731
            lines.append(f"| {clip} | {c['psnr_gain_db']:+.2f} {mark('psnr_gain_db')} | {c['aed_ratio']:.2f} "
                         f"{mark('aed_ratio')} | {c['csim']:.3f} {mark('csim')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="phase", required=True)
    p = sub.add_parser("split", help="split tracked clips into train / extreme test, store references")
    p.add_argument("captures", type=Path, nargs="+")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--role", choices=["eval", "validation"], required=True)
    p = sub.add_parser("generate", help="adapt and generate the extreme frames (GPU or CPU)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prior", type=Path, default=None, help="default: the embedded prior")
    p.add_argument("--prior-name", default=None,
                   help="with --prior: its variants are named VARIANT@NAME, beside the embedded prior's")
    p.add_argument("--only", nargs="+", default=None, help="these clips (folder names) only")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--solver", default="unipc", choices=["unipc", "euler"])
    p.add_argument("--adapt-steps", type=int, default=None,
                   help="adaptation steps instead of the device's default (the variant is named MODE_DEVICE_sSTEPS)")
    p = sub.add_parser("score", help="metrics, table and grid (CPU: MediaPipe and dlib)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--out", type=Path, default=RESULTS / "generator_real.json")
    p.add_argument("--grid", type=Path, default=ROOT / "docs" / "generator_real_grid.png")
    args = parser.parse_args()
    if args.phase == "split":
        args.work.mkdir(parents=True, exist_ok=True)
        split(args.captures, args.work, args.role)
    elif args.phase == "generate":
        generate(args.work, args.variants, args.device, args.prior, args.only, args.steps, args.solver,
                 args.adapt_steps, args.prior_name)
    else:
        score(args.work, args.out, args.grid)


if __name__ == "__main__":
    main()
