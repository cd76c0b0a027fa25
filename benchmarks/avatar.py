"""Benchmark the mesh-rigged Gaussian avatar (issue 6): quality on the synthetic world, and speed.

Quality, at 128² (subject seed 6100 by default; avatar seeds 6000-6999 are this benchmark's):

- ``full``: train on a `full` capture with every 5th frame held out; test PSNR / SSIM on the
  held-out frames (target: PSNR >= 28 dB).
- ``sparse -> extreme``: train on a `sparse` capture (phone-like: talking range, small poses),
  test on an `extreme` capture of the same subject (unseen expressions, wide poses); the drop
  from the sparse model's own held-out frames is the gap lifting must close. The full-trained
  avatar on the same extreme frames is the oracle (what complete kinematic coverage gives).
  Picture: docs/avatar_sparse_vs_extreme.png (ground truth | sparse-trained | full-trained).

Metrics are over the whole image with the background black on both sides (the capture's frame
times its mask against the render over black); ``psnr_fg`` is over the mask's pixels only. SSIM
is scikit-image's (Gaussian window, σ 1.5).

Speed:

- CUDA: render frames/s at 512² *including* the mesh deformation (rig blendshapes + pose →
  triangle frames → world Gaussians → gsplat), batch 1 and batched; training iterations/s at 512²
  and 128² (one frame per iteration).
- CPU: training iterations/s at 128² with the PyTorch rasterizer (1 and 2 threads), render
  frames/s at 128².

    python benchmarks/avatar.py --device cpu      # writes benchmarks/results/avatar_cpu.json
    python benchmarks/avatar.py --device cuda     # writes benchmarks/results/avatar_cuda.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from liftavatar.avatar.model import Avatar, load_avatar, render_avatar
from liftavatar.avatar.train import TrainConfig, load_frames, train_avatar
from liftavatar.report import grid, machine_info, save_png
from liftavatar.synth.world import SynthSpec, synthesize

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def _synth(work: Path, name: str, seed: int, preset: str, frames: int, size: int, device: str) -> Path:
    out = work / name
    if not (out / "capture.json").exists():
        synthesize(SynthSpec(seed=seed, preset=preset, frames=frames, size=size), out, overwrite=True,
                   progress=False, device=device)
    return out


@torch.no_grad()
def evaluate(avatar: Avatar, capture: Path, indices: list[int] | None, device: str, size: int) -> dict:
    """PSNR (whole image, black background), PSNR over the mask, SSIM (scikit-image) per frame."""
    from skimage.metrics import structural_similarity

    frames = load_frames([capture], size)
    idx = list(range(len(frames))) if indices is None else indices
    avatar = avatar.to(device)
    psnr, psnr_fg, ssim, renders = [], [], [], []
    for i in idx:
        verts = avatar.vertices(frames.expression[i:i + 1], frames.rotation[i:i + 1], frames.translation[i:i + 1])
        rgb, _, _ = render_avatar(avatar, verts, frames.intrinsics[i].to(device), frames.size)
        gt, mask = frames.targets(i, device)
        r = rgb[0].clamp(0, 1).cpu().numpy().astype(np.float64)
        g = gt[0].cpu().numpy().astype(np.float64)
        m = mask[0, ..., 0].cpu().numpy() > 0.5
        psnr.append(float(-10 * np.log10(max(((r - g) ** 2).mean(), 1e-10))))
        psnr_fg.append(float(-10 * np.log10(max(((r - g) ** 2)[m].mean(), 1e-10))))
        ssim.append(float(structural_similarity(r, g, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                data_range=1.0, channel_axis=-1)))
        renders.append(((g * 255 + 0.5).astype(np.uint8), (r * 255 + 0.5).astype(np.uint8)))
    return {"frames": len(idx), "psnr": float(np.mean(psnr)), "psnr_fg": float(np.mean(psnr_fg)),
            "ssim": float(np.mean(ssim)), "per_frame_psnr": psnr, "_renders": renders}


def _train(captures: list[Path], out: Path, iters: int, device: str, holdout_every: int, size: int) -> dict:
    cfg = TrainConfig(iters=iters, size=size, holdout_every=holdout_every, val_every=max(iters // 4, 1),
                      checkpoint_every=0, device=device, progress=True)
    result = train_avatar(captures, out, cfg, force=True)
    return {"iters": result.step, "seconds": result.seconds, "iters_per_second": result.iters_per_second,
            "gaussians": result.num_gaussians, "val_psnr": result.val_psnr}


def quality(work: Path, args) -> dict:
    size, seed, dev = args.size, args.seed, args.device
    full = _synth(work, "full", seed, "full", args.frames, size, dev)
    sparse = _synth(work, "sparse", seed, "sparse", args.frames, size, dev)
    extreme = _synth(work, "extreme", seed, "extreme", args.test_frames, size, dev)
    out: dict = {"subject_seed": seed, "size": size, "iters": args.iters}

    held = [i for i in range(args.frames) if i % 5 == 4]
    out["full_train"] = _train([full], work / "avatar_full", args.iters, dev, 5, size)
    avatar_full = load_avatar(work / "avatar_full")
    out["full_heldout"] = evaluate(avatar_full, full, held, dev, size)

    out["sparse_train"] = _train([sparse], work / "avatar_sparse", args.iters, dev, 5, size)
    avatar_sparse = load_avatar(work / "avatar_sparse")
    out["sparse_heldout"] = evaluate(avatar_sparse, sparse, held, dev, size)
    out["sparse_on_extreme"] = evaluate(avatar_sparse, extreme, None, dev, size)
    out["full_on_extreme"] = evaluate(avatar_full, extreme, None, dev, size)
    out["drop_sparse_heldout_to_extreme_db"] = out["sparse_heldout"]["psnr"] - out["sparse_on_extreme"]["psnr"]
    out["gap_to_full_on_extreme_db"] = out["full_on_extreme"]["psnr"] - out["sparse_on_extreme"]["psnr"]

    # Picture: the extreme frames where the sparse avatar does worst.
    se, fe = out["sparse_on_extreme"], out["full_on_extreme"]
    worst = np.argsort(se["per_frame_psnr"])[:4]
    worst = sorted(worst.tolist())
    rows = [[se["_renders"][i][0], se["_renders"][i][1], fe["_renders"][i][1]] for i in worst]
    labels = [[f"extreme frame {i}: ground truth", f"sparse-trained {se['per_frame_psnr'][i]:.1f} dB",
               f"full-trained {fe['per_frame_psnr'][i]:.1f} dB"] for i in worst]
    big = [[np.kron(img, np.ones((2, 2, 1), np.uint8)) for img in row] for row in rows]
    docs = ROOT / "docs" / "avatar_sparse_vs_extreme.png"
    save_png(grid(big, labels), docs)
    out["picture"] = str(docs.relative_to(ROOT))
    full_pic = ROOT / "docs" / "avatar_full_heldout.png"
    fh = out["full_heldout"]
    rows = [[np.kron(img, np.ones((2, 2, 1), np.uint8)) for img in fh["_renders"][i]] for i in range(0, len(held), max(len(held) // 4, 1))][:4]
    save_png(grid(rows, [["held-out ground truth", "render"]] * len(rows)), full_pic)
    out["picture_full"] = str(full_pic.relative_to(ROOT))
    for key in ("full_heldout", "sparse_heldout", "sparse_on_extreme", "full_on_extreme"):
        out[key].pop("_renders")
    return out, avatar_full


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def render_fps(avatar: Avatar, capture: Path, size: int, device: str, batch: int, seconds: float = 5.0) -> dict:
    """Frames/s of deformation + rendering at ``size``² (kinematics of ``capture``, looped)."""
    from liftavatar.face.rig import FaceRig

    rig = FaceRig.load()
    frames = load_frames([capture])
    avatar = avatar.to(device)
    scale = size / frames.size[0]
    k = (frames.intrinsics[0] * scale).to(device)
    expr, rot, trans = (t.to(device) for t in (frames.expression, frames.rotation, frames.translation))
    n = len(frames)

    def one(start: int) -> None:
        idx = torch.arange(start, start + batch, device=device) % n
        verts = avatar.vertices(expr[idx], rot[idx], trans[idx], rig)
        render_avatar(avatar, verts, k, (size, size))

    for i in range(3):  # warm-up (gsplat JIT, allocator)
        one(i)
    _sync(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one(count)
        count += batch
        if count % (16 * batch) == 0:
            _sync(device)
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"size": size, "batch": batch, "frames": count, "seconds": elapsed, "fps": count / elapsed,
            "gaussians": avatar.num_gaussians}


def speed(work: Path, args, avatar: Avatar | None) -> dict:
    dev = args.device
    out: dict = {}
    cap128 = _synth(work, "full", args.seed, "full", args.frames, args.size, dev)
    if avatar is None:
        _train([cap128], work / "avatar_speed", args.iters, dev, 0, args.size)
        avatar = load_avatar(work / "avatar_speed")
    if dev.startswith("cuda"):
        out["render_512"] = [render_fps(avatar, cap128, 512, dev, b) for b in (1, 8, 32)]
        cap512 = _synth(work, "full512", args.seed, "full", 60, 512, dev)
        for size, cap in ((512, cap512), (128, cap128)):
            cfg = TrainConfig(iters=args.speed_iters, val_every=0, checkpoint_every=0, device=dev, progress=False)
            train_avatar([cap], work / f"speed{size}", cfg, force=True, max_steps=50)  # warm-up, JIT
            cfg.refine_start = 10**9  # steady state: a fixed number of Gaussians
            r = train_avatar([cap], work / f"speed{size}", cfg, force=True)
            out[f"train_{size}"] = {"iters": r.step, "iters_per_second": r.iters_per_second,
                                    "gaussians": r.num_gaussians}
    else:
        out["render_128"] = render_fps(avatar, cap128, 128, dev, 1)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            cfg = TrainConfig(iters=args.speed_iters, val_every=0, checkpoint_every=0, device=dev, progress=False,
                              refine_start=10**9)
            r = train_avatar([cap128], work / "speed128", cfg, force=True)
            out[f"train_128_threads{threads}"] = {"iters": r.step, "iters_per_second": r.iters_per_second,
                                                  "gaussians": r.num_gaussians}
        torch.set_num_threads(args.threads)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--iters", type=int, default=None, help="training iterations (default: 6000 cuda, 2000 cpu)")
    parser.add_argument("--frames", type=int, default=150, help="frames of the full and sparse training captures")
    parser.add_argument("--test-frames", type=int, default=40, help="frames of the extreme test capture")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=6100, help="synthetic subject (avatar range 6000-6999)")
    parser.add_argument("--speed-iters", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1 is fastest on a busy box)")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--work", type=Path, default=None, help="keep captures and avatars here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.iters = args.iters or (6000 if cuda else 2000)
    args.speed_iters = args.speed_iters or (500 if cuda else 100)
    if not cuda:
        torch.set_num_threads(args.threads)
    out_path = args.out or RESULTS / f"avatar_{'cuda' if cuda else 'cpu'}.json"
    work = args.work or Path(tempfile.mkdtemp(prefix="avatar_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": machine_info(args.device), "args": {k: str(v) for k, v in vars(args).items()}}
    started = time.perf_counter()
    try:
        avatar = None
        if not args.skip_quality:
            report["quality"], avatar = quality(work, args)
            print(json.dumps({k: v for k, v in report["quality"].items() if not isinstance(v, dict)}, indent=1))
        if not args.skip_speed:
            report["speed"] = speed(work, args, avatar)
            print(json.dumps(report["speed"], indent=1))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = time.perf_counter() - started
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
