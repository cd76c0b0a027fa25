"""``liftavatar eval``: every metric on a predicted and a ground-truth frame sequence.

Frame pairs are compared in order (frame i of PRED with frame i of GT). The report is a
JSON-ready dict::

    {"pred": {...}, "gt": {...}, "config": {...},
     "metrics": {"psnr": {"value", "std", "unit", "frames", "per_frame"}, ...,
                 "lpips": {"skipped": "LPIPS skipped: its weights ... are not on this machine ..."}}}

Per-frame metrics (PSNR, SSIM, LPIPS, AED, APD, CSIM) give the mean over frames as ``value`` and
their standard deviation; FID is one number for the two sets. When the ground truth is a Capture
with masks, PSNR, SSIM and LPIPS are also given over the foreground (``*_masked``). A metric that
cannot run (weights absent, no face found) is reported as ``skipped`` with the reason, never
replaced by another.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

import liftavatar
from liftavatar.io import json_safe, write_json
from liftavatar.metrics.errors import MetricsError, MissingWeightsError
from liftavatar.metrics.sources import FrameSet, check_pair, load_frames

__all__ = ["ALL_METRICS", "EvalConfig", "check_report_path", "evaluate", "evaluate_paths", "format_report",
           "write_report"]

ALL_METRICS: tuple[str, ...] = ("psnr", "ssim", "lpips", "fid", "aed", "apd", "csim")
UNITS = {"psnr": "dB", "ssim": "unitless (1 = identical)", "lpips": "unitless (0 = identical)",
         "fid": "squared Inception-feature units (0 = same statistics)",
         "aed": "mean |expression coefficient difference| (coefficients in [0, 1])",
         "apd_rotation": "degrees", "apd_translation": "millimetres",
         "csim": "cosine similarity of dlib embeddings (1 = identical)", "csim_distance": "dlib descriptor distance"}


@dataclass
class EvalConfig:
    """What ``evaluate`` computes and where it finds what it needs."""

    metrics: tuple[str, ...] = ALL_METRICS
    """Metrics to compute (psnr, ssim, lpips, fid, aed, apd, csim)."""
    kinematics: Literal["tracked", "given"] = "tracked"
    """AED / APD from the tracker run on both sides' frames, or from the kinematics both sides carry."""
    masked: bool = True
    """Also compute PSNR / SSIM / LPIPS over the ground truth's foreground masks, when it has them."""
    lpips_weights: str | None = None
    """Folder with alexnet-owt-7be5be79.pth and LPIPS v0.1 alex.pth (else LIFTAVATAR_LPIPS_WEIGHTS, torch hub)."""
    fid_weights: str | None = None
    """pt_inception-2015-12-05-6726825d.pth or its folder (else LIFTAVATAR_FID_WEIGHTS, torch hub)."""
    fov: float = 60.0
    """Horizontal field of view in degrees assumed for tracking when neither side is a Capture."""
    device: str = "cpu"
    """Torch device for LPIPS, FID and rig fitting."""
    per_frame: bool = True
    """Keep per-frame values in the report."""


def _summary(values: np.ndarray, unit: str, keep: bool, **extra: Any) -> dict[str, Any]:
    values = np.asarray(values, np.float64)
    ok = np.isfinite(values)
    out: dict[str, Any] = {
        "value": float(values[ok].mean()) if ok.any() else float("nan"),
        "std": float(values[ok].std()) if ok.any() else float("nan"),
        "unit": unit,
        "frames": int(ok.sum()),
        **extra,
    }
    if keep:
        out["per_frame"] = values
    return out


def _intrinsics(pred: FrameSet, gt: FrameSet, fov: float) -> tuple[tuple[float, ...], str]:
    from liftavatar.metrics.kinematic import default_intrinsics

    for side in (gt, pred):
        if side.intrinsics is not None:
            return side.intrinsics, f"{side.path} capture.json"
    return default_intrinsics(gt.size, fov), f"{fov:g}° horizontal field of view"


def _kinematics(pred: FrameSet, gt: FrameSet, config: EvalConfig, notes: dict[str, Any]):
    """(pred, gt, valid) kinematics for AED / APD, tracked or given."""
    from liftavatar.metrics.kinematic import track_frames

    if config.kinematics == "given":
        missing = [str(s.path) for s in (pred, gt) if s.kinematics is None]
        if missing:
            raise MetricsError(f"{missing[0]} carries no kinematics (it is not a Capture); use --kinematics tracked.")
        kp, kg = pred.kinematics, gt.kinematics
        if kp.expression.shape[1] != kg.expression.shape[1]:
            raise MetricsError(f"{pred.path} has {kp.expression.shape[1]} expression coefficients and {gt.path} "
                               f"{kg.expression.shape[1]}; compare captures of the same rig.")
        notes["kinematics"] = "given (the kinematics stored in both captures)"
        return kp, kg, np.asarray(kp.valid, bool) & np.asarray(kg.valid, bool)
    intrinsics, source = _intrinsics(pred, gt, config.fov)
    start = time.perf_counter()
    kp = track_frames(pred.frames, intrinsics, config.device)
    kg = track_frames(gt.frames, intrinsics, config.device)
    valid = kp.valid & kg.valid
    if gt.kinematics is not None:
        valid &= np.asarray(gt.kinematics.valid, bool)
    notes["kinematics"] = (f"tracked on both sides (MediaPipe FaceMesh + rig fit, intrinsics from {source}); "
                           f"face found in {int(kp.valid.sum())} predicted and {int(kg.valid.sum())} ground-truth "
                           f"frames ({time.perf_counter() - start:.1f} s)")
    return kp, kg, valid


def evaluate(pred: FrameSet, gt: FrameSet, config: EvalConfig | None = None) -> dict[str, Any]:
    """All requested metrics of ``pred`` against ``gt`` (see the module docstring).

    Raises:
        MetricsError: different frame counts or sizes, an unknown metric, or ``given``
            kinematics that a side lacks.
    """
    config = config or EvalConfig()
    unknown = [m for m in config.metrics if m not in ALL_METRICS]
    if unknown:
        raise MetricsError(f"--metrics {unknown[0]!r} is not a metric; choose from {', '.join(ALL_METRICS)}.")
    check_pair(pred, gt)
    wanted = set(config.metrics)
    keep = config.per_frame
    metrics: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    masks = gt.masks if config.masked else None

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        try:
            fn()
        except MissingWeightsError as exc:
            metrics[name] = {"skipped": str(exc)}
        seconds[name] = round(time.perf_counter() - start, 3)

    if "psnr" in wanted or "ssim" in wanted:
        from liftavatar.metrics.image import psnr, ssim

        for name, fn in (("psnr", psnr), ("ssim", ssim)):
            if name not in wanted:
                continue

            def run(name=name, fn=fn) -> None:
                metrics[name] = _summary([fn(p, g) for p, g in zip(pred.frames, gt.frames)], UNITS[name], keep)
                if masks is not None:
                    metrics[f"{name}_masked"] = _summary(
                        [fn(p, g, m) for p, g, m in zip(pred.frames, gt.frames, masks)], UNITS[name], keep)
            timed(name, run)

    if "lpips" in wanted:
        def run_lpips() -> None:
            from liftavatar.metrics.lpips import LPIPS, lpips
            from liftavatar.metrics.weights import find_lpips_weights

            files = find_lpips_weights(config.lpips_weights)
            model = LPIPS.from_files(files)
            metrics["lpips"] = _summary(lpips(pred.frames, gt.frames, weights=model, device=config.device),
                                        UNITS["lpips"], keep, weights=[str(files.backbone), str(files.heads)])
            if masks is not None:
                metrics["lpips_masked"] = _summary(
                    lpips(pred.frames, gt.frames, masks, weights=model, device=config.device), UNITS["lpips"], keep)
        timed("lpips", run_lpips)

    if "fid" in wanted:
        def run_fid() -> None:
            from liftavatar.metrics.fid import FIDInception, fid
            from liftavatar.metrics.weights import find_fid_weights

            path = find_fid_weights(config.fid_weights)
            value = fid(pred.frames, gt.frames, weights=FIDInception.from_file(path), device=config.device)
            metrics["fid"] = {"value": value, "unit": UNITS["fid"], "frames": len(gt), "weights": str(path),
                              "note": "biased for small sets (the usual protocol uses >= 2048 frames a side); "
                                      "compare only at equal set sizes"}
        timed("fid", run_fid)

    if wanted & {"aed", "apd"}:
        def run_kinematic() -> None:
            from liftavatar.metrics.kinematic import aed_per_frame, rotation_angle_deg

            kp, kg, valid = _kinematics(pred, gt, config, notes)
            if not valid.any():
                reason = "AED/APD skipped: no frame pair has a face found (tracked) or valid kinematics on both sides."
                for name in ("aed", "apd_rotation", "apd_translation"):
                    if name.split("_")[0] in wanted:
                        metrics[name] = {"skipped": reason}
                return
            pick = lambda a: np.where(valid, a, np.nan)  # noqa: E731
            if "aed" in wanted:
                metrics["aed"] = _summary(pick(aed_per_frame(kp.expression, kg.expression)), UNITS["aed"], keep,
                                          source=config.kinematics)
            if "apd" in wanted:
                metrics["apd_rotation"] = _summary(pick(rotation_angle_deg(kp.rotation, kg.rotation)),
                                                   UNITS["apd_rotation"], keep, source=config.kinematics)
                dist = np.linalg.norm(np.asarray(kp.translation, np.float64) - kg.translation, axis=1) * 1000.0
                metrics["apd_translation"] = _summary(pick(dist), UNITS["apd_translation"], keep,
                                                      source=config.kinematics)
        timed("aed/apd", run_kinematic)

    if "csim" in wanted:
        def run_csim() -> None:
            from liftavatar.metrics.identity import csim

            result = csim(pred.frames, gt.frames)
            if not np.isfinite(result.similarity).any():
                metrics["csim"] = {"skipped": f"CSIM skipped: dlib found no face in any of the {len(gt)} frame pairs."}
                return
            metrics["csim"] = _summary(result.similarity, UNITS["csim"], keep, missed=len(result.missed))
            metrics["csim_distance"] = _summary(result.distance, UNITS["csim_distance"], keep)
        timed("csim", run_csim)

    order = ["psnr", "psnr_masked", "ssim", "ssim_masked", "lpips", "lpips_masked", "fid", "aed", "apd_rotation",
             "apd_translation", "csim", "csim_distance"]
    report = {
        "liftavatar_version": liftavatar.__version__,
        "pred": pred.describe(),
        "gt": gt.describe(),
        "config": asdict(config),
        "metrics": {k: metrics[k] for k in order if k in metrics},
        "notes": notes,
        "seconds": seconds,
    }
    return json_safe(report)


def evaluate_paths(pred: str | Path, gt: str | Path, config: EvalConfig | None = None,
                   max_frames: int | None = None) -> dict[str, Any]:
    """:func:`evaluate` on two paths (Capture, folder of frames or video; see :func:`load_frames`)."""
    return evaluate(load_frames(pred, max_frames), load_frames(gt, max_frames), config)


def format_report(report: dict[str, Any]) -> str:
    """A few lines for people: one per metric, value ± std and unit, or why it was skipped."""
    lines = [f"{report['pred']['path']} vs {report['gt']['path']}: {report['gt']['frames']} frames"]
    for name, entry in report["metrics"].items():
        if "skipped" in entry:
            lines.append(f"  {name:<16} {entry['skipped']}")
            continue
        value, std = entry.get("value"), entry.get("std")
        text = "n/a" if value is None else f"{value:.4f}"
        if std is not None:
            text += f" ± {std:.4f}"
        extra = f", {entry['missed']} pairs without a face" if entry.get("missed") else ""
        lines.append(f"  {name:<16} {text}  [{entry['unit']}; {entry.get('frames', '?')} frames{extra}]")
    for key, note in report.get("notes", {}).items():
        lines.append(f"  ({key}: {note})")
    return "\n".join(lines)


def check_report_path(path: str | Path, option: str = "--json") -> Path:
    """Raise :class:`MetricsError` unless a report can be written to ``path``: it is not a directory, and no
    folder above it is a file. Called before anything is computed, so a bad target costs nothing."""
    path = Path(path)
    if path.is_dir():
        raise MetricsError(f"{option} {path}: is a directory; pass the path of a .json file to write (for example "
                           f"{path / 'eval.json'}).")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise MetricsError(f"{option} {path}: {parent} is a file, not a folder; pass a path under a folder.")
            break
    return path


def write_report(report: dict[str, Any], path: str | Path) -> Path:
    """Write the report as JSON atomically (temporary name, then rename); see :func:`check_report_path`."""
    return write_json(check_report_path(path), report)
