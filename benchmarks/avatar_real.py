"""How well an avatar fits real heads: training-frame fit and held-out seen-range frames, inside the mask.

For every capture (a tracked real clip) and every variant of the avatar's training settings, the capture is split
as the real benchmark splits it (:func:`liftavatar.bench.real.split_frames`: the extreme frames and their guard
bands out, every 5th block of the rest held out as the seen test with guard bands, the remainder trained on); an
avatar is trained on the training frames and scored on a sample of them (the fit) and on the held-out seen frames:
PSNR over the mask's pixels, ground truth = frame × mask over black, render = the avatar over black (the
benchmark's convention). Choose settings on ``train/`` clips of ``../shared/real_videos``; measure ``eval/`` clips
with the chosen ones only.

    python benchmarks/avatar_real.py --captures runs/track/d19 runs/track/d12 --variants base='{}' \\
        long='{"iters": 6000}' --device cuda --jobs 4 --out benchmarks/results/avatar_real.json

Each (capture, variant) runs in its own process (``--jobs`` at a time); results are merged into ``--out`` as they
finish (a rerun skips what is there, ``--force`` redoes it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def capture_name(capture: str) -> str:
    """What the results call a capture: its folder's name, or its clip's for a bench run's ``…/NAME/tracked``."""
    path = Path(capture)
    return path.parent.name if path.name == "tracked" else path.name


def _job(capture: str, variant: str, overrides: dict, device: str, work: str, fit_frames: int) -> dict:
    import numpy as np
    import torch

    from liftavatar.avatar.export import render_frames
    from liftavatar.avatar.model import load_avatar
    from liftavatar.avatar.train import TrainConfig, train_avatar
    from liftavatar.bench.real import split_frames
    from liftavatar.bench.stages import subset_capture
    from liftavatar.capture import Capture
    from liftavatar.metrics.image import psnr
    from liftavatar.report import machine_info, machine_name

    if device == "cpu":
        torch.set_num_threads(1)
    source = Capture.load(capture)
    split = split_frames(source.kinematics)
    name = capture_name(capture)
    folder = Path(work) / name
    if not (folder / "train" / "capture.json").is_file():
        subset_capture(source, folder / "train", split.train.tolist(), {"split": "train"})
        subset_capture(source, folder / "seen", split.seen.tolist(), {"split": "seen"})
    from liftavatar.avatar.model import AvatarConfig

    fields = {**overrides}
    if "avatar" in fields:
        fields["avatar"] = AvatarConfig(**fields["avatar"])
    config = TrainConfig(**{"val_every": 0, "checkpoint_every": 0, "progress": False, "device": device, **fields})
    out = folder / f"avatar_{variant}"
    start = time.perf_counter()
    result = train_avatar([folder / "train"], out, config, force=True)
    seconds = time.perf_counter() - start
    avatar = load_avatar(out, device=device)

    def score(path: Path, every: int = 1) -> float:
        capture = Capture.load(path)
        idx = np.arange(0, capture.num_frames, every)
        kin = capture.kinematics.select(idx)
        renders = np.stack(list(render_frames(avatar, kin, tuple(capture.meta.intrinsics), tuple(capture.size))))
        frames, masks = capture.frames(idx), capture.masks(idx)
        truth = (frames * (masks[..., None] / 255.0) + 0.5).astype(np.uint8)
        return float(np.mean([psnr(r, t, m) for r, t, m in zip(renders, truth, masks)]))

    train_count = len(split.train)
    return {"capture": name, "variant": variant, "overrides": overrides, "device": device,
            "machine": machine_name(machine_info(device)), "train_frames": train_count, "seen_frames": len(split.seen),
            "fit_psnr": round(score(folder / "train", max(1, train_count // fit_frames)), 3),
            "seen_psnr": round(score(folder / "seen"), 3), "train_seconds": round(seconds, 1),
            "iters_per_second": round(result.iters_per_second, 1), "gaussians": result.num_gaussians}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captures", nargs="+", required=True, help="tracked captures of real clips")
    parser.add_argument("--variants", nargs="+", default=["base={}"],
                        help="NAME=JSON of TrainConfig overrides; avatar options as {\"avatar\": {...}}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--fit-frames", type=int, default=40, help="training frames scored for the fit")
    parser.add_argument("--work", default="/tmp/avatar_real", help="splits and avatars go here")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "avatar_real.json"))
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)

    variants = {}
    for item in args.variants:
        name, _, text = item.partition("=")
        variants[name] = json.loads(text or "{}")
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() and not args.force else {"runs": []}
    done = {(r["capture"], r["variant"]) for r in results["runs"]}
    jobs = [(c, v, o) for c in args.captures for v, o in variants.items() if (capture_name(c), v) not in done]

    def record(run: dict) -> None:
        results["runs"].append(run)
        from liftavatar.io import write_json

        write_json(out, results)
        print(json.dumps(run), flush=True)

    if args.jobs <= 1:
        for c, v, o in jobs:
            record(_job(c, v, o, args.device, args.work, args.fit_frames))
        return 0
    import multiprocessing

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_job, c, v, o, args.device, args.work, args.fit_frames) for c, v, o in jobs]
        for future in as_completed(futures):
            record(future.result())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
