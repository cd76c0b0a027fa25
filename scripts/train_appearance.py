"""Train the tracker's appearance network: writes liftavatar/face/data/appearance.safetensors.

Two stages (``render`` then ``train``; ``all`` runs both):

``render``: synthetic subjects at 256², ``FRAMES`` frames a clip, encoded to H.264 and decoded
again (as the tracker meets a phone video), FaceMesh in video mode on every frame, and each
detected frame's pose-normalised face crop (:func:`liftavatar.face.appearance.face_crop`, with a
margin for random shifts) stored with the true expression, one ``.npz`` per clip in ``--cache``.
Training clips, subject seeds 100000–100000+``--clips``−1 (the seed picks the subject and the
kinematics): presets in turn ``independent`` (2 of every 5 clips: every blendshape on with
probability 0.15, independently, at the extreme pose range; see scripts/calibrate_landmarks.py),
``extreme`` (2 of 5) and ``full`` (1 of 5). Validation clips, seeds 7350–7361, alternate
``extreme`` and ``full``. None of these is in the benchmark ranges (5000–5999, 9000–9999) or the
tracker's development benchmark seeds (7300–7323).

``train``: AdamW, L1 loss on the coefficients, random crop shifts of ±``MARGIN`` px, brightness
and contrast jitter, and horizontal mirroring (with the Left/Right blendshapes swapped), one CPU
thread. Afterwards, on the validation clips, each blendshape's prior precision is set to
``PRIOR_SCALE / (mean squared error + PRIOR_FLOOR)``, so the tracker trusts the network per
blendshape as much as it is reliable on clips it never trained on.

Defaults (the packaged file): 400 training clips × 60 frames (24 000 crops, seeds 100000–100399),
12 validation clips (720 crops, seeds 7350–7361), 14 epochs of batch 64; on one CPU core rendering
took 25 minutes and training 15 (65 s an epoch). Validation MAE of the network alone: 0.079
(extreme and full clips); the prior precisions it gives range from 21 (noseSneer) to 755
(mouthRollUpper). A 128² crop trained on 220 clips did worse (0.088): more subjects helped more
than more pixels.

Usage: python scripts/train_appearance.py all [--cache DIR] [--clips N] [--epochs N] [--out PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from liftavatar.face.appearance import (APPEARANCE_FILE, CROP, MARGIN, AppearanceModel, AppearanceNet,
                                        alignment_frame, face_crop)
from liftavatar.face.fit import mirrored_expressions
from liftavatar.face.landmarks import FaceMeshDetector
from liftavatar.face.rig import DATA, FaceRig
from liftavatar.synth.kinematics import sample_kinematics
from liftavatar.synth.subject import make_subject
from liftavatar.synth.world import DEFAULT_FPS, render_sequence
from liftavatar.video import read_video, write_video

SIZE, FRAMES = 256, 60
TRAIN_BASE = 100000
VALIDATION = [("extreme" if i % 2 == 0 else "full", 7350 + i) for i in range(12)]
PRESET_CYCLE = ("independent", "extreme", "independent", "extreme", "full")
PRIOR_SCALE = 2.0  # reference px² per unit² of coefficient, times the inverse validation MSE
PRIOR_FLOOR = 0.002  # squared error floor (a near-perfect blendshape still gets a finite weight)


def _independent_kinematics(num_expressions: int, frames: int, seed: int):
    path = Path(__file__).resolve().parent / "calibrate_landmarks.py"
    spec = importlib.util.spec_from_file_location("calibrate_landmarks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.independent_kinematics(num_expressions, frames, seed)


def training_runs(clips: int) -> list[tuple[str, int]]:
    return [(PRESET_CYCLE[i % len(PRESET_CYCLE)], TRAIN_BASE + i) for i in range(clips)]


def render_clip(rig: FaceRig, preset: str, seed: int, out: Path, ids: np.ndarray, canonical: np.ndarray) -> None:
    subject = make_subject(seed, rig)
    if preset == "independent":
        kin = _independent_kinematics(rig.num_expressions, FRAMES, seed)
    else:
        kin = sample_kinematics(preset, FRAMES, rig.expression_names, seed=seed)
    rgb = np.concatenate([b.rgb for _, b in render_sequence(subject, kin, SIZE, rig=rig)])
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "clip.mp4"
        write_video(video, rgb, DEFAULT_FPS)
        frames = list(read_video(video))
    crops, keep = [], []
    with FaceMeshDetector(static_images=False) as detector:
        for i, frame in enumerate(frames):
            points = detector.detect(frame)
            if points is not None:
                crops.append(face_crop(frame, points, ids, canonical, margin=MARGIN))
                keep.append(i)
    keep = np.array(keep, np.int64)
    tmp_out = out.with_name(out.stem + ".tmp.npz")
    np.savez(tmp_out, crops=np.array(crops, np.uint8).reshape(-1, CROP + 2 * MARGIN, CROP + 2 * MARGIN, 3),
             expression=kin.expression[keep], rotation=kin.rotation[keep], frame=keep)
    tmp_out.replace(out)


def render(cache: Path, clips: int) -> None:
    rig = FaceRig.load()
    ids, canonical = alignment_frame(rig)
    cache.mkdir(parents=True, exist_ok=True)
    for split, runs in (("val", VALIDATION), ("train", training_runs(clips))):
        for preset, seed in runs:
            out = cache / f"{split}_{preset}_{seed}.npz"
            if out.exists():
                continue
            start = time.perf_counter()
            render_clip(rig, preset, seed, out, ids, canonical)
            print(f"{split} {preset} {seed}: {time.perf_counter() - start:.1f}s", flush=True)


def load_split(cache: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    crops, expr = [], []
    for path in sorted(cache.glob(f"{split}_*.npz")):
        if path.name.endswith(".tmp.npz"):
            continue
        with np.load(path) as z:
            crops.append(z["crops"])
            expr.append(z["expression"])
    return np.concatenate(crops), np.concatenate(expr).astype(np.float32)


def _batch(crops: np.ndarray, expr: np.ndarray, idx: np.ndarray, perm: np.ndarray, rng: np.random.Generator,
           augment: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not augment:
        x = crops[idx, MARGIN:MARGIN + CROP, MARGIN:MARGIN + CROP]
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float() / 255.0
        return x, torch.from_numpy(expr[idx])
    xs, ys = [], []
    for i in idx:
        dx, dy = rng.integers(0, 2 * MARGIN + 1, 2)
        x = crops[i, dy:dy + CROP, dx:dx + CROP]
        y = expr[i]
        if rng.random() < 0.5:
            x, y = x[:, ::-1], y[perm]
        xs.append(x)
        ys.append(y)
    x = torch.from_numpy(np.ascontiguousarray(np.stack(xs))).permute(0, 3, 1, 2).float() / 255.0
    gain = torch.from_numpy(rng.uniform(0.7, 1.3, (len(idx), 1, 1, 1)).astype(np.float32))
    bias = torch.from_numpy(rng.uniform(-0.1, 0.1, (len(idx), 3, 1, 1)).astype(np.float32))
    return (x * gain + bias).clamp(0, 1), torch.from_numpy(np.stack(ys))


def evaluate(net: AppearanceNet, crops: np.ndarray, expr: np.ndarray) -> np.ndarray:
    net.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(crops), 256):
            idx = np.arange(start, min(len(crops), start + 256))
            x, _ = _batch(crops, expr, idx, None, None, augment=False)
            preds.append(net(x).numpy())
    net.train()
    return np.concatenate(preds)


def train(cache: Path, epochs: int, out: Path, batch_size: int = 64, lr: float = 2e-3,
          minutes: float | None = None) -> None:
    rig = FaceRig.load()
    names = list(rig.expression_names)
    ids, canonical = alignment_frame(rig)
    crops, expr = load_split(cache, "train")
    vcrops, vexpr = load_split(cache, "val")
    print(f"train {len(crops)} crops, validation {len(vcrops)}", flush=True)
    perm = mirrored_expressions(names)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    net = AppearanceNet(len(names))
    steps = epochs * (len(crops) // batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    start, step = time.perf_counter(), 0
    for epoch in range(epochs):
        order = rng.permutation(len(crops))
        total = 0.0
        for b in range(len(crops) // batch_size):
            x, y = _batch(crops, expr, order[b * batch_size:(b + 1) * batch_size], perm, rng, augment=True)
            loss = (net(x) - y).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            total += loss.item()
        pred = evaluate(net, vcrops, vexpr)
        print(f"epoch {epoch + 1}: train L1 {total / max(1, len(crops) // batch_size):.4f}, validation MAE "
              f"{np.abs(pred - vexpr).mean():.4f} ({time.perf_counter() - start:.0f}s)", flush=True)
        if minutes is not None and time.perf_counter() - start > 60 * minutes:
            print("time limit reached")
            break
    net.eval()
    pred = evaluate(net, vcrops, vexpr)
    mse = ((pred - vexpr) ** 2).mean(0)
    mae = np.abs(pred - vexpr).mean(0)
    precision = PRIOR_SCALE / (mse + PRIOR_FLOOR)
    for name, a, p in zip(names, mae, precision):
        print(f"  {name:20s} validation MAE {a:.3f}  precision {p:.0f}")
    AppearanceModel(net, names, ids, canonical, precision).save(out)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("render", "train", "all"))
    parser.add_argument("--cache", type=Path, default=Path("appearance_cache"))
    parser.add_argument("--clips", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--minutes", type=float, default=None, help="stop training after this many minutes")
    parser.add_argument("--out", type=Path, default=Path(str(DATA / APPEARANCE_FILE)))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.stage in ("render", "all"):
        render(args.cache, args.clips)
    if args.stage in ("train", "all"):
        train(args.cache, args.epochs, args.out, minutes=args.minutes)


if __name__ == "__main__":
    sys.exit(main())
