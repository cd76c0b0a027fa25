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
  triangle frames → world Gaussians → gsplat), batch 1 and batched (``render_512``: the
  ``render_avatar`` path); training iterations/s at 512² and 128² (one frame per iteration).
- CUDA, ``render_512_single_frame``: one frame per call, in one run on one GPU, of (a) the eager
  ``avatar.vertices`` + ``render_avatar`` path and (b) :class:`liftavatar.avatar.fast_render.
  AvatarRenderer` (CUDA graph of the pre-raster part, gsplat's tile intersection and compositing
  eager after it), plus its variants (graph off; quaternions instead of covariances); frames/s,
  a breakdown in ms per frame (pre-raster part vs rasterization, timed with
  ``torch.cuda.synchronize`` over many frames), and the PSNR of each against (a) on the same
  frames (target: ≥ 1000 frames/s, ≥ 50 dB).
- CPU: training iterations/s at 128² with the PyTorch rasterizer (1 and 2 threads), render
  frames/s at 128², and the single-frame comparison at 128².

``--render-only`` measures only rendering (no training throughput) and, unless the quality part
ran, renders an *untrained* avatar (``init_avatar`` on the subject, ``--render-per-triangle``
Gaussians per rig triangle: 11 gives 39,996, close to the 38,722 of the 6000-iteration avatar;
random colours, SH and opacities), so that it needs no training: a few minutes at most.

    python benchmarks/avatar.py --device cpu      # writes benchmarks/results/avatar_cpu.json
    python benchmarks/avatar.py --device cuda     # writes benchmarks/results/avatar_cuda.json
    python benchmarks/avatar.py --device cuda --skip-quality --render-only --frames 60
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from liftavatar.avatar.model import (
    Avatar,
    gaussians_world,
    intrinsics_matrix,
    load_avatar,
    render_avatar,
)
from liftavatar.avatar.train import TrainConfig, load_frames, train_avatar
from liftavatar.io import save_png
from liftavatar.report import grid, machine_info
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


def _speed_avatar(capture: Path, per_triangle: int, seed: int = 6099) -> Avatar:
    """An untrained avatar of the capture's subject: ``per_triangle`` Gaussians on every rig
    triangle (initial sizes: they tile the surface), random colours, view-dependent SH and
    opacities (deterministic), so that rendering speed can be measured without training."""
    from liftavatar.avatar.model import AvatarConfig, AvatarMeta, init_avatar
    from liftavatar.capture import Capture
    from liftavatar.face.rig import FaceRig

    cap = Capture.load(capture)
    rig = FaceRig.load()
    meta = AvatarMeta(cap.meta.subject, {"name": rig.name, "version": rig.version}, list(rig.expression_names),
                      tuple(cap.size), tuple(cap.meta.intrinsics), config=AvatarConfig(gaussians_per_triangle=per_triangle,
                                                                                      deform_width=0))
    avatar = init_avatar(rig, cap.kinematics.identity, meta, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    n = avatar.num_gaussians
    avatar.params["sh0"] = torch.randn(n, 1, 3, generator=gen) * 0.6
    avatar.params["shN"] = torch.randn(n, avatar.params["shN"].shape[1], 3, generator=gen) * 0.2
    avatar.params["opacities"] = torch.randn(n, generator=gen) + 2.0
    return avatar


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR (dB, peak 1) of two images; 200 dB stands for identical (JSON has no infinity)."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return 200.0 if mse <= 1e-20 else min(200.0, -10 * float(np.log10(mse)))


def _loop(step, device: str, seconds: float, min_calls: int = 30) -> dict:
    """Calls ``step(i)`` for ``seconds`` (at least ``min_calls`` times) after 5 warm-up calls;
    frames/s and ms per frame, with the device synchronised before and after."""
    for i in range(5):
        step(i)
    _sync(device)
    count, start = 0, time.perf_counter()
    while count < min_calls or time.perf_counter() - start < seconds:
        step(count)
        count += 1
    _sync(device)
    elapsed = time.perf_counter() - start
    return {"frames": count, "seconds": elapsed, "fps": count / elapsed, "ms_per_frame": 1000 * elapsed / count}


def _ms(step, device: str, calls: int) -> float:
    """ms per call of ``step(i)`` over ``calls`` calls, timed with the device synchronised
    before and after (so it is the throughput of that part alone, host and device)."""
    step(0)
    _sync(device)
    start = time.perf_counter()
    for i in range(calls):
        step(i)
    _sync(device)
    return 1000 * (time.perf_counter() - start) / calls


@torch.no_grad()
def single_frame(avatar: Avatar, capture: Path, size: int, device: str, seconds: float = 3.0) -> dict:
    """One frame per call at ``size``², mesh deformation included: the eager ``render_avatar``
    path against :class:`AvatarRenderer` (graph on, and its variants), on the same GPU in one run.

    Frames cycle through the capture's kinematics, preloaded on the device (indexing them is a
    view: no host-to-device copy per frame). Each path's images of 8 frames spread over the
    capture (rendered out of order, earlier results kept) are compared with the eager path's.
    Failures of one variant are recorded (with the traceback) and the others still run.
    """
    from importlib.metadata import version

    import gsplat  # noqa: F401  (version below)

    from liftavatar.avatar.fast_render import AvatarRenderer
    from liftavatar.avatar.raster import rasterization
    from liftavatar.face.rig import FaceRig

    cuda = device.startswith("cuda")
    rig = FaceRig.load()
    frames = load_frames([capture])
    avatar = avatar.to(device)
    k = (frames.intrinsics[0] * (size / frames.size[0])).to(device)
    expr, rot, trans = (t.to(device).contiguous() for t in (frames.expression, frames.rotation, frames.translation))
    n = len(frames)
    hw = (size, size)
    out: dict = {
        "size": size, "gaussians": avatar.num_gaussians, "frames_in_cycle": n,
        "device_name": torch.cuda.get_device_name(torch.device(device)) if cuda else "cpu",
        "torch": torch.__version__, "gsplat": version("gsplat"), "variants": {},
    }

    def say(msg: str) -> None:
        print(f"[single-frame {size}²] {msg}", flush=True)

    say(f"device {out['device_name']}, torch {out['torch']}, gsplat {out['gsplat']}, {out['gaussians']} Gaussians")

    # (a) The eager path: avatar.vertices + render_avatar, one frame per call.
    def old(i: int):
        j = i % n
        return render_avatar(avatar, avatar.vertices(expr[j:j + 1], rot[j:j + 1], trans[j:j + 1], rig), k, hw)[:2]

    cfg = avatar.meta.config
    view, ks = torch.eye(4, device=device)[None], intrinsics_matrix(k.float())[None].to(device)

    def old_pre(i: int):
        j = i % n
        verts = avatar.vertices(expr[j:j + 1], rot[j:j + 1], trans[j:j + 1], rig)
        return gaussians_world(avatar.params, avatar.binding, verts, avatar.faces, cfg.sh_degree, cfg.sh_frame)

    world = old_pre(0)
    backend = "gsplat" if cuda else "torch"

    def old_raster(i: int):
        return rasterization(world.means[0], world.quats[0], world.scales[0], world.opacities, world.colors[0], view,
                             ks, size, size, backend=backend)

    calls = 300 if cuda else 5
    eager = _loop(old, device, seconds)
    eager["pre_raster_ms"] = _ms(old_pre, device, calls)
    eager["raster_ms"] = _ms(old_raster, device, calls)
    out["eager_render_avatar"] = eager
    say(f"(a) eager render_avatar: {eager['fps']:.0f} frames/s ({eager['ms_per_frame']:.3f} ms/frame; "
        f"rig+Gaussians {eager['pre_raster_ms']:.3f} ms, rasterization {eager['raster_ms']:.3f} ms)")

    check = sorted({int(i) for i in np.linspace(0, n - 1, 8)})
    order = check[::2] + check[1::2][::-1] + check[:1]  # out of order, one frame twice
    refs = {i: old(i) for i in check}

    variants = {"graph": {"graph": True}, "no_graph": {"graph": False},
                "graph_quaternions": {"graph": True, "covariances": False}}
    for name, kwargs in variants.items():
        res: dict = {"kwargs": kwargs}
        out["variants"][name] = res
        try:
            start = time.perf_counter()
            renderer = AvatarRenderer(avatar, k, hw, device, **kwargs)
            _sync(device)
            res.update(setup_seconds=time.perf_counter() - start, mode=renderer.mode, graph_error=renderer.graph_error)
            if renderer.graph_error:
                say(f"({name}) CUDA graph capture FAILED, running {renderer.mode}: {renderer.graph_error}")

            def step(i: int, renderer=renderer):
                j = i % n
                return renderer(expr[j], rot[j], trans[j])

            def pre(i: int, renderer=renderer):
                j = i % n
                return renderer.pre_raster(expr[j], rot[j], trans[j])

            res.update(_loop(step, device, seconds))
            res["pre_raster_ms"] = _ms(pre, device, calls)
            static = pre(1)
            res["raster_ms"] = _ms(lambda i, r=renderer, o=static: r.raster(o), device, calls)
            kept = {i: step(i) for i in order}
            res["psnr_rgb_db_min"] = min(_psnr(kept[i][0], refs[i][0]) for i in check)
            res["psnr_alpha_db_min"] = min(_psnr(kept[i][1], refs[i][1]) for i in check)
            res["max_abs_diff_rgb"] = max(float((kept[i][0] - refs[i][0]).abs().max()) for i in check)
            res["speedup_vs_eager"] = res["fps"] / eager["fps"]
            say(f"({name}) mode {renderer.mode}: {res['fps']:.0f} frames/s ({res['ms_per_frame']:.3f} ms/frame; "
                f"pre-raster {res['pre_raster_ms']:.3f} ms, gsplat/raster {res['raster_ms']:.3f} ms), "
                f"{res['speedup_vs_eager']:.1f}x eager; PSNR vs eager: rgb {res['psnr_rgb_db_min']:.1f} dB, "
                f"alpha {res['psnr_alpha_db_min']:.1f} dB (min over {len(check)} frames), "
                f"max |diff| {res['max_abs_diff_rgb']:.2e}")
        except Exception as exc:  # noqa: BLE001 — record, and measure the other variants
            res["error"] = f"{type(exc).__name__}: {exc}"
            res["traceback"] = traceback.format_exc()
            say(f"({name}) FAILED: {res['error']}\n{res['traceback']}")
    best = out["variants"]["graph"]
    if cuda and "fps" in best:
        out["target_fps"] = 1000
        out["target_met"] = bool(best["fps"] >= 1000 and best["psnr_rgb_db_min"] >= 50)
        say(f"graph renderer: {best['fps']:.0f} frames/s (target 1000), PSNR {best['psnr_rgb_db_min']:.1f} dB "
            f"(target 50): {'MET' if out['target_met'] else 'NOT MET'}")
    return out


def speed(work: Path, args, avatar: Avatar | None) -> dict:
    dev = args.device
    out: dict = {}
    cap128 = _synth(work, "full", args.seed, "full", args.frames, args.size, dev)
    if avatar is None and args.render_only:
        avatar = _speed_avatar(cap128, args.render_per_triangle)
        out["avatar"] = (f"untrained (init_avatar, {args.render_per_triangle} Gaussians per triangle, random "
                         f"colours/SH/opacities): {avatar.num_gaussians} Gaussians")
    elif avatar is None:
        _train([cap128], work / "avatar_speed", args.iters, dev, 0, args.size)
        avatar = load_avatar(work / "avatar_speed")
    print(f"speed: avatar of {avatar.num_gaussians} Gaussians", flush=True)
    seconds = args.render_seconds
    if dev.startswith("cuda"):
        out["render_512_single_frame"] = single_frame(avatar, cap128, 512, dev, seconds)
        out["render_512"] = [render_fps(avatar, cap128, 512, dev, b, seconds) for b in (1, 8, 32)]
        for r in out["render_512"]:
            print(f"render_avatar batch {r['batch']}: {r['fps']:.0f} frames/s", flush=True)
        if args.render_only:
            return out
        cap512 = _synth(work, "full512", args.seed, "full", 60, 512, dev)
        for size, cap in ((512, cap512), (128, cap128)):
            cfg = TrainConfig(iters=args.speed_iters, val_every=0, checkpoint_every=0, device=dev, progress=False)
            train_avatar([cap], work / f"speed{size}", cfg, force=True, max_steps=50)  # warm-up, JIT
            cfg.refine_start = 10**9  # steady state: a fixed number of Gaussians
            r = train_avatar([cap], work / f"speed{size}", cfg, force=True)
            out[f"train_{size}"] = {"iters": r.step, "iters_per_second": r.iters_per_second,
                                    "gaussians": r.num_gaussians}
    else:
        out["render_128"] = render_fps(avatar, cap128, 128, dev, 1, seconds)
        out["render_128_single_frame"] = single_frame(avatar, cap128, 128, dev, seconds)
        if args.render_only:
            return out
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
    parser.add_argument("--render-only", action="store_true",
                        help="speed: rendering only (no training throughput); untrained avatar unless quality ran")
    parser.add_argument("--render-seconds", type=float, default=3.0, help="seconds per rendering measurement")
    parser.add_argument("--render-per-triangle", type=int, default=11,
                        help="--render-only avatar: Gaussians per rig triangle (11: 39,996)")
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
    print(json.dumps(report["machine"]), flush=True)
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
