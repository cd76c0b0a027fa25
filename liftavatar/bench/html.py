"""The benchmark's HTML report: one self-contained folder (``index.html`` and the images, plot and videos
next to it, linked relatively; no scripts, no network fetches), readable in any browser.

:func:`write_report` makes the pictures from a run folder (grids of ground truth | baseline | lifted on
test frames, side-by-side H.264 videos, samples of lifted frames, the curve plot) and then
:func:`render_html` writes the page from the results and those files.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from liftavatar.bench.layout import LIFT_SAMPLES, avatar_dir, gt_frames, oracle_dir, subject_dir
from liftavatar.bench.plots import curve_plot
from liftavatar.bench.summary import (METRICS, ORACLE_LABEL, fmt, has_oracle, is_real, machine_stages,
                                      machines_sentence, subject_label, timing_machines)
from liftavatar.capture import Capture
from liftavatar.io import save_png, write_text

__all__ = ["write_report", "render_html", "build_assets"]

SCALE = 2
"""Pictures show the 128² frames at twice their size (nearest neighbour), so the pixels stay honest."""


def _up(image: np.ndarray, scale: int = SCALE) -> np.ndarray:
    return np.kron(image, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else image


def _font(size: int = 13):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def labelled_row(images: list[np.ndarray], labels: list[str], header: int = 22, pad: int = 2) -> np.ndarray:
    """Images side by side (same size), each under a caption; even width and height (for H.264)."""
    h, w = images[0].shape[:2]
    width = len(images) * w + (len(images) - 1) * pad
    height = header + h
    width += width % 2
    height += height % 2
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for i, (image, label) in enumerate(zip(images, labels)):
        x = i * (w + pad)
        canvas.paste(Image.fromarray(np.ascontiguousarray(image)), (x, header))
        draw.text((x + 4, 4), label, fill=(235, 235, 235), font=font)
    return np.asarray(canvas)


def labelled_grid(rows: list[list[np.ndarray]], row_labels: list[str], captions: list[list[str]],
                  pad: int = 2, left: int = 150, caption: int = 18) -> np.ndarray:
    """Rows of images with a label on the left of each row and a caption under each image."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    cell_h = h + caption
    canvas = Image.new("RGB", (left + cols * (w + pad), len(rows) * (cell_h + pad)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    font, small = _font(14), _font(12)
    for r, (row, name) in enumerate(zip(rows, row_labels)):
        y = r * (cell_h + pad)
        draw.text((6, y + h // 2 - 8), name, fill=(235, 235, 235), font=font)
        for c, image in enumerate(row):
            x = left + c * (w + pad)
            canvas.paste(Image.fromarray(np.ascontiguousarray(image)), (x, y))
            draw.text((x + 3, y + h + 2), captions[r][c], fill=(210, 210, 210), font=small)
    return np.asarray(canvas)


def _save_png(image: np.ndarray, path: Path) -> str:
    save_png(image, path)
    return path.name


def _result_dir(run: Path, name: str, k: int | None) -> Path:
    """The folder of the avatar with ``k`` lifted expressions, or of the oracle appearance (``k`` None)."""
    return oracle_dir(run, name) if k is None else avatar_dir(run, name, k)


def _renders(run: Path, name: str, k: int | None, split: str) -> np.ndarray | None:
    """An avatar's renders of a test capture (``k`` lifted expressions), or the oracle appearance's (``k`` None)."""
    path = _result_dir(run, name, k) / f"renders_{split}.npz"
    if not path.is_file():
        return None
    with np.load(path) as data:
        return data["renders"]


def _per_frame_psnr(run: Path, name: str, k: int | None, split: str) -> list[float | None]:
    path = _result_dir(run, name, k) / f"eval_{split}.json"
    if not path.is_file():
        return []
    return json.loads(path.read_text())["metrics"].get("psnr", {}).get("per_frame", [])


def build_assets(results: dict[str, Any], run: Path, out: Path) -> dict[str, Any]:
    """Write the report's pictures and videos into ``out``; returns their file names (relative to ``out``)."""
    from liftavatar.video import write_video

    cfg = results["config"]
    lifted_k = int(cfg["lifted"])
    out.mkdir(parents=True, exist_ok=True)
    assets: dict[str, Any] = {"curve": curve_plot(results, out / "curve.png").name, "subjects": []}
    for subject in results["subjects"]:
        name = subject.get("name") or f"s{subject['seed']}"  # results written before real clips name the seed
        sdir = subject_dir(run, name)
        entry: dict[str, Any] = {"name": name, "label": subject_label(subject), "grids": {}, "videos": {},
                                 "lifted": None}
        for split in ("extreme", "seen"):
            test_path = sdir / f"test_{split}"
            base, lifted = _renders(run, name, 0, split), _renders(run, name, lifted_k, split)
            if base is None or lifted is None or not (test_path / "capture.json").is_file():
                continue
            test = Capture.load(test_path)
            gt, _ = gt_frames(test)
            psnr_b, psnr_l = _per_frame_psnr(run, name, 0, split), _per_frame_psnr(run, name, lifted_k, split)
            n = len(gt)
            pick = np.unique(np.linspace(0, n - 1, min(int(cfg["grid_frames"]), n)).round().astype(int))
            db = lambda values, i: f"{values[i]:.1f} dB" if i < len(values) and values[i] is not None else ""  # noqa: E731
            rows = [[_up(gt[i]) for i in pick], [_up(base[i]) for i in pick], [_up(lifted[i]) for i in pick]]
            captions = [[f"frame {i}" for i in pick], [db(psnr_b, i) for i in pick], [db(psnr_l, i) for i in pick]]
            row_labels = ["ground truth", "baseline", f"lifted ({lifted_k})"]
            oracle = _renders(run, name, None, split)
            if oracle is not None and len(oracle) == n:
                psnr_o = _per_frame_psnr(run, name, None, split)
                rows.append([_up(oracle[i]) for i in pick])
                captions.append([db(psnr_o, i) for i in pick])
                row_labels.append("oracle appearance")
            sheet = labelled_grid(rows, row_labels, captions)
            entry["grids"][split] = _save_png(sheet, out / f"grid_{name}_{split}.png")
            video = out / f"video_{name}_{split}.mp4"
            labels = ["ground truth", "baseline (capture only)", f"lifted ({lifted_k} expressions)"]
            write_video(video, (labelled_row([_up(gt[i]), _up(base[i]), _up(lifted[i])], labels) for i in range(n)),
                        test.meta.fps)
            entry["videos"][split] = video.name
        entry["lifted"] = _lifted_samples(sdir, out, name)
        assets["subjects"].append(entry)
    return assets


def _lifted_samples(sdir: Path, out: Path, name: str) -> str | None:
    """References, then target shading maps and generated frames at the end of evenly spaced lifted clips
    (the arrays the lift stage saved)."""
    path = sdir / LIFT_SAMPLES
    if not path.is_file():
        return None
    with np.load(path) as data:
        refs, ref_idx = data["references"], data["reference_indices"].tolist()
        shading, generated, clips = data["shading"], data["generated"], data["clips"].tolist()
    if not clips:
        return None
    rows = [[_up(f) for f in refs], [_up(f) for f in shading], [_up(f) for f in generated]]
    captions = [[f"frame {i}" for i in ref_idx], [f"clip {c}" for c in clips], ["generated"] * len(clips)]
    labels = ["references (K-means)", "target shading", "lifted frame"]
    if not ref_idx:
        rows, captions, labels = rows[1:], captions[1:], labels[1:]
    return _save_png(labelled_grid(rows, labels, captions), out / f"lifted_{name}.png")


# ---------------------------------------------------------------------------------------------- the page


CSS = """
body { font-family: -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1.5em 2em 4em; color: #1d1d1f; background: #fbfbfd; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; } h2 { margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
h3 { margin-top: 1.5em; }
.meta { color: #666; font-size: 0.92em; }
.headline { font-size: 1.12em; background: #eef4ff; border-left: 4px solid #3a6df0; padding: 0.8em 1em; }
.pass { color: #137333; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; } .na { color: #888; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.92em; }
th, td { border: 1px solid #d8d8dc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f0f0f4; }
tr.mean td { font-weight: 600; background: #f7f7fa; }
td.better { color: #137333; } td.worse { color: #b3261e; }
img { max-width: 100%; height: auto; border: 1px solid #ddd; background: #222; }
video { max-width: 100%; background: #111; display: block; margin: 0.4em 0 1em; }
pre { background: #f4f4f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
details { margin: 0.3em 0; } summary { cursor: pointer; color: #3a3a9f; }
nav a { margin-right: 1em; }
figure { margin: 0.8em 0 1.4em; } figcaption { color: #555; font-size: 0.9em; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(x: float | None, decimals: int, signed: bool = False) -> str:
    return "n/a" if x is None else f"{x:{'+' if signed else ''}.{decimals}f}"


def _delta_class(delta: float | None, better: str) -> str:
    if delta is None or delta == 0:
        return ""
    good = delta > 0 if better == "higher" else delta < 0
    return "better" if good else "worse"


def _summary_table(results: dict[str, Any], split: str) -> str:
    k = results["methods"]["lifted"]["lifted_expressions"]
    oracle = has_oracle(results)
    rows = ["<table><tr><th>metric</th><th>better</th><th>baseline (capture only)</th>"
            f"<th>lifted ({k} expressions)</th><th>Δ lifted − baseline</th>"
            + (f"<th>{ORACLE_LABEL}</th>" if oracle else "") + "</tr>"]
    for key, row in results["tables"][split].items():
        unit = f" ({_e(row['unit'])})" if row["unit"] else ""
        if not row["available"]:
            reason = row.get("reason") or "n/a"
            short = reason.split(":")[0] if reason.startswith("not available") else reason
            rows.append(f"<tr><td>{_e(row['label'])}{unit}</td><td>{_e(row['better'])}</td>"
                        f"<td class='na' colspan='{4 if oracle else 3}' title='{_e(reason)}'>{_e(short)}</td></tr>")
            continue
        d = METRICS[key][3]
        cls = _delta_class(row["delta"]["mean"], row["better"])
        rows.append(f"<tr><td>{_e(row['label'])}{unit}</td><td>{_e(row['better'])}</td>"
                    f"<td>{fmt(row['baseline'], d)}</td><td>{fmt(row['lifted'], d)}</td>"
                    f"<td class='{cls}'>{fmt(row['delta'], d, True)}</td>"
                    + (f"<td>{fmt(row.get('oracle'), d)}</td>" if oracle else "") + "</tr>")
    rows.append("</table>")
    if oracle:
        rows.append(f"<p class='meta'>{_e(ORACLE_LABEL.capitalize())}: {_e(results['methods']['oracle']['description'])}</p>")
    return "\n".join(rows)


def _per_subject_tables(results: dict[str, Any], split: str) -> str:
    parts = []
    oracle = has_oracle(results)
    who = "clip" if is_real(results) else "subject (seed)"
    for key, row in results["tables"][split].items():
        if not row["available"]:
            continue
        d = METRICS[key][3]
        lines = [f"<details><summary>{_e(row['label'])} per {who.split()[0]}</summary><table>"
                 f"<tr><th>{who}</th><th>baseline</th><th>lifted</th><th>Δ</th>"
                 + (f"<th>{ORACLE_LABEL}</th>" if oracle else "") + "</tr>"]
        per_oracle = (row.get("oracle") or {}).get("per_subject") or [None] * len(results["subjects"])
        for s, b, v, dd, o in zip(results["subjects"], row["baseline"]["per_subject"], row["lifted"]["per_subject"],
                                  row["delta"]["per_subject"], per_oracle):
            lines.append(f"<tr><td>{_e(subject_label(s))}</td><td>{_num(b, d)}</td><td>{_num(v, d)}</td>"
                         f"<td class='{_delta_class(dd, row['better'])}'>{_num(dd, d, True)}</td>"
                         + (f"<td>{_num(o, d)}</td>" if oracle else "") + "</tr>")
        lines.append(f"<tr class='mean'><td>mean ± std</td><td>{fmt(row['baseline'], d)}</td>"
                     f"<td>{fmt(row['lifted'], d)}</td><td>{fmt(row['delta'], d, True)}</td>"
                     + (f"<td>{fmt(row.get('oracle'), d)}</td>" if oracle else "") + "</tr></table></details>")
        parts.append("\n".join(lines))
    return "\n".join(parts)


def _curve_table(results: dict[str, Any]) -> str:
    curve = results["curve"]
    head = ("<table><tr><th>lifted expressions</th><th>coverage of the extreme test (expression and pose)</th>"
            "<th>PSNR extreme (dB)</th><th>SSIM extreme</th><th>AED extreme</th><th>CSIM extreme</th>"
            "<th>PSNR seen (dB)</th></tr>")
    rows = [head]
    for i, k in enumerate(curve["points"]):
        def cell(split: str, key: str, d: int) -> str:
            data = curve.get(split, {}).get(key)
            if not data or data["mean"][i] is None:
                return "n/a"
            return f"{data['mean'][i]:.{d}f} ± {data['std'][i]:.{d}f}"
        cov = curve["coverage"]["mean"][i]
        rows.append(f"<tr><td>{k}</td><td>{'n/a' if cov is None else f'{cov:.1%}'}</td>"
                    f"<td>{cell('extreme', 'psnr', 2)}</td><td>{cell('extreme', 'ssim', 4)}</td>"
                    f"<td>{cell('extreme', 'aed', 4)}</td><td>{cell('extreme', 'csim', 4)}</td>"
                    f"<td>{cell('seen', 'psnr', 2)}</td></tr>")
    rows.append("</table>")
    return "\n".join(rows)


def _criteria(results: dict[str, Any]) -> str:
    h = results["headline"]
    c = h["criteria"]
    real = is_real(results)
    seen = "seen split" if real else "seen range"
    rows = [("extreme: PSNR gain", f"≥ +{c['extreme_psnr_gain_db']:.1f} dB", _num(h["extreme_psnr_gain_db"], 2, True) + " dB",
             h["checks"]["extreme_psnr_gain_db"]),
            ("extreme: AED reduction", f"≥ {c['extreme_aed_reduction']:.0%}",
             "n/a" if h["extreme_aed_reduction"] is None else f"{h['extreme_aed_reduction']:.1%}",
             h["checks"]["extreme_aed_reduction"]),
            (f"{seen}: PSNR change", f"≥ {c['seen_psnr_change_db']:.1f} dB", _num(h["seen_psnr_change_db"], 2, True) + " dB",
             h["checks"]["seen_psnr_change_db"])]
    target, met = ("bound (next issue)", "within") if real else ("target", "met")
    lines = [f"<table><tr><th>criterion</th><th>{target}</th><th>measured</th><th>{met}</th></tr>"]
    for name, bound, value, ok in rows:
        lines.append(f"<tr><td>{name}</td><td>{bound}</td><td>{value}</td>"
                     f"<td class='{'pass' if ok else 'fail'}'>{'yes' if ok else 'no'}</td></tr>")
    lines.append("</table>")
    if real:
        lines.append("<p class='meta'>The bounds the next issue sets on real clips, shown beside this run's numbers as "
                     "criteria; this benchmark does not claim them.</p>")
    elif not h["assessed"]:
        lines.append(f"<p class='meta'>Acceptance is judged over at least {c['min_subjects']} subjects at "
                     f"{c['size']}² with tracked kinematics; this run ({h['subjects']} subject(s), "
                     f"{results['config']['size']}², kinematics {_e(results['config'].get('kinematics', 'tracked'))}) "
                     "only reports the numbers.</p>")
    return "\n".join(lines)


def _protocol(results: dict[str, Any]) -> str:
    c = results["config"]
    if is_real(results):
        names = ", ".join(_e(subject_label(s)) for s in results["subjects"])
        items = [
            f"Real clips ({names}). No ground truth exists for expressions a clip lacks, so the test is "
            "self-reenactment on held-out frames of the same clip.",
            f"Tracking: each clip through the tracker (MediaPipe FaceMesh + rig fit) into a {c['size']}² capture.",
            f"Split by kinematics: the extreme test is the {c['extreme_share']:.0%} of the valid frames farthest "
            "from the clip's median expression and pose (Euclidean distance, expression and rotation standardised); "
            f"the seen test is every {c['seen_every']}th block of {c['seen_block']} consecutive frames (by frame "
            f"number) of the rest; training gets the remainder. A guard band of ±{c['split_guard']} frames around "
            "every test frame is dropped from the splits after it. Every 5th <em>block</em>, not every 5th frame: "
            "single frames every 5 with ±3 guards would leave no training frame. Test frames never reach reference "
            "selection, lifting or avatar training.",
        ]
    else:
        seeds = ", ".join(subject_label(s) for s in results["subjects"])
        items = [
            f"Held-out synthetic subjects (seeds {seeds}); the embedded prior never saw them.",
            f"Recording: a <em>sparse</em> take of {c['train_frames'] + c['seen_frames']} frames (talking-range "
            f"expressions, yaw within ±15°) and an <em>extreme</em> take of {c['extreme_frames']} frames (strong "
            f"expressions absent from it, yaw to ±45°), rendered at {c['render_size']}², encoded as one H.264 video "
            f"and run through the tracker (MediaPipe FaceMesh + rig fit) into {c['size']}² captures."
            + (" <strong>This run bypasses the tracker</strong> (<code>--kinematics truth</code>, an ablation): its "
               f"captures are the frames re-rendered in the tracker's crop at {c['size']}² with the synthetic world's "
               "true identity, expressions and pose." if c.get("kinematics", "tracked") == "truth" else ""),
            f"Training capture: the first {c['train_frames']} frames. Seen-range test: the remaining "
            f"{c['seen_frames']} frames of the sparse take. Extreme test: the extreme take. Test frames never reach "
            f"reference selection, lifting or avatar training; test frames without a tracked face are left out.",
        ]
    items += [
        f"Lifting: K = {c['refs']} K-means references, farthest-point targets from "
        + ("the kinematic library tracked from real people (independent of the extreme test)"
           if c.get("lift_library", "rig") == "tracked" else "the rig's extreme expression presets (the synthetic "
           "extreme test's own generator)") + ", "
        f"head poses '{_e(c['lift_poses'])}', {c['lift_steps']} {_e(c['lift_solver'])} steps; the curve's captures are "
        "prefixes of one lifting run.",
        f"Avatars: {c['avatar_iters']} iterations each, same seed and settings; with lifting, observed frames are "
        f"repeated to make about {c['observed_share']:.0%} of the training draws, lifted frames weigh "
        f"{c['lifted_weight']:g} in the loss, and the last {c.get('observed_finish', 0.0):.0%} of the iterations "
        "draw observed frames only.",
        "Evaluation: each avatar is driven by the test frames' tracked kinematics and camera; its renders over black "
        "are compared with the test frames times their masks, PSNR and SSIM over the mask's pixels. AED/APD: the "
        "tracker on both sides. CSIM: dlib face embeddings. LPIPS/FID: only with their standard weights on disk.",
        "Oracle appearance: the synthetic world's renderer with the subject's true texture, on the rig driven exactly "
        "as the avatars are (the test kinematics, identity and camera), measured the same way: what the test "
        "kinematics alone cost a perfectly textured rig (a reference, not a floor)." if has_oracle(results) else
        "No oracle appearance: no true texture of a real person exists.",
        f"Machines: {_e(machines_sentence(results))}.",
    ]
    return "<ul>" + "".join(f"<li>{i}</li>" for i in items) + "</ul>"


def _timings(results: dict[str, Any]) -> str:
    t = results["timings"]
    lines = ["<table><tr><th>stage</th><th>seconds</th><th>machine</th></tr>"]
    for name, v in t["stages"].items():
        note = " (earlier run, resumed)" if v.get("resumed") else ""
        lines.append(f"<tr><td>{_e(name)}{note}</td><td>{v['seconds']:.1f}</td>"
                     f"<td>{_e(timing_machines(results, name))}</td></tr>")
    here = _e(timing_machines(results, "report"))
    for name, v in t.get("wall_seconds_this_invocation", {}).items():
        lines.append(f"<tr><td>wall clock: {_e(name)}</td><td>{v:.1f}</td><td>{here}</td></tr>")
    total = t.get("wall_seconds_total_this_invocation")
    if total is not None:
        lines.append(f"<tr class='mean'><td>wall clock: this invocation</td><td>{total:.1f}</td><td>{here}</td></tr>")
    lines.append("</table>")
    lines.append("<p class='meta'>Stage seconds are summed over subjects (and over avatars for training and "
                 "evaluation); with several workers they overlap, so the wall clock is shorter.</p>")
    return "\n".join(lines)


def _machine(results: dict[str, Any]) -> str:
    """Where each stage ran, then the details of the machine that evaluated and wrote this report."""
    rows = {f"{stage} ran on": timing_machines(results, stage) for stage in machine_stages(results)}
    rows.update({f"report machine: {k}": v for k, v in results.get("report_machine", results.get("machine", {})).items()})
    rows["workers"] = results.get("workers", 1)
    return "<table>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows.items()) + "</table>"


def _hero(results: dict[str, Any], assets: dict[str, Any]) -> str:
    """The first subject's extreme-test grid, next to the headline."""
    entry = next((e for e in assets["subjects"] if "extreme" in e["grids"]), None)
    if entry is None:
        return ""
    k = results["methods"]["lifted"]["lifted_expressions"]
    if is_real(results):
        what, oracle = f"Clip {_e(_label(entry))}, its held-out extreme frames", ""
    else:
        what = f"Subject {_e(_label(entry))}, unseen extreme test"
        oracle = " and, where measured, the oracle appearance"
    return (f"<figure><img src='{_e(entry['grids']['extreme'])}' alt='extreme test frames'><figcaption>{what} "
            f"(evenly spaced frames): ground truth, the baseline avatar, the avatar trained with {k} lifted "
            f"expressions{oracle}, with each frame's PSNR.</figcaption></figure>")


def _label(entry: dict[str, Any]) -> str:
    """What the page calls the subject of an assets entry of :func:`build_assets`."""
    return str(entry.get("label", entry.get("seed")))


def render_html(results: dict[str, Any], assets: dict[str, Any]) -> str:
    """The report page (a string) from the results and the asset file names of :func:`build_assets`."""
    n = len(results["subjects"])
    k = results["methods"]["lifted"]["lifted_expressions"]
    real = is_real(results)
    who = (f"{n} real clip{'s' if n != 1 else ''}" if real else f"{n} held-out subject{'s' if n != 1 else ''}")
    trained = "each clip's training frames" if real else "the sparse capture"
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>LiftAvatar benchmark: {_e(results['name'])}</title>", f"<style>{CSS}</style></head><body>",
        f"<h1>LiftAvatar benchmark: {_e(results['name'])}</h1>",
        f"<p class='meta'>{who} · {results['config']['size']}² · "
        f"{_e(machines_sentence(results))} · liftavatar {_e(results['liftavatar_version'])} · "
        f"{_e(results['created'])}</p>",
        "<nav><a href='#headline'>Headline</a><a href='#tables'>Tables</a><a href='#curve'>Curve</a>"
        "<a href='#frames'>Frames and videos</a><a href='#protocol'>Protocol</a><a href='#timings'>Timings</a>"
        "<a href='#config'>Config</a><a href='#machine'>Machine</a></nav>",
        "<h2 id='headline'>Headline</h2>", f"<p class='headline'>{_e(results['headline']['sentence'])}</p>",
        _criteria(results),
        _hero(results, assets),
        "<h2 id='tables'>Tables</h2>",
        f"<p>Baseline: the avatar trained on {trained} alone. Lifted: trained on the same capture "
        f"lifted with {k} expressions. Mean ± std over {'clips' if real else 'subjects'}; Δ in green where lifting "
        "is better.</p>",
    ]
    for split, title in results["splits"].items():
        parts += [f"<h3>Test: {_e(title)}</h3>", _summary_table(results, split), _per_subject_tables(results, split)]
    parts += ["<h2 id='curve'>Curve over the number of lifted expressions</h2>",
              f"<figure><img src='{_e(assets['curve'])}' alt='metrics against the number of lifted expressions'>"
              "<figcaption>Means over subjects with ± std bars; thin lines are single subjects. Coverage: share of the "
              "extreme test's frames that some training frame (observed or lifted) comes near in expression (within "
              "0.5, L2 in coefficients) and head pose (within 10°, relative to the training frames' typical pose) at "
              "once.</figcaption></figure>",
              f"<p><strong>Plateau.</strong> {_e(results['plateau'])}</p>", _curve_table(results),
              "<h2 id='frames'>Frames and videos</h2>",
              "<p>Test frames evenly spaced over each test capture (not picked), with their PSNR. Columns of the videos: "
              "ground truth | baseline | lifted.</p>"]
    for entry in assets["subjects"]:
        parts.append(f"<h3>{'Clip' if real else 'Subject'} {_e(_label(entry))}</h3>")
        for split in ("extreme", "seen"):
            title = results["splits"].get(split, split)
            if split in entry["grids"]:
                parts.append(f"<figure><img src='{_e(entry['grids'][split])}' alt='ground truth, baseline and lifted "
                             f"renders on {_e(split)} test frames'><figcaption>{_e(title)}</figcaption></figure>")
            if split in entry["videos"]:
                parts.append(f"<video controls muted loop playsinline preload='metadata' "
                             f"src='{_e(entry['videos'][split])}'></video>")
        if entry.get("lifted"):
            parts.append(f"<figure><img src='{_e(entry['lifted'])}' alt='lifted frames'><figcaption>What lifting adds: the "
                         "reference frames the generator sees, and the last frame of evenly spaced lifted clips with "
                         "its target shading map.</figcaption></figure>")
    parts += ["<h2 id='protocol'>Protocol</h2>", _protocol(results),
              "<h2 id='timings'>Timings</h2>", _timings(results),
              "<h2 id='config'>Config</h2>", f"<pre>{_e(json.dumps(results['config'], indent=2))}</pre>",
              "<h2 id='machine'>Machine</h2>", _machine(results),
              "<p class='meta'>Data: <a href='results.json'>results.json</a> · <a href='results.md'>results.md</a></p>",
              "</body></html>"]
    return "\n".join(parts) + "\n"


def write_report(results: dict[str, Any], run: Path, out: Path) -> Path:
    """Pictures, videos and ``index.html`` of a run into ``out``; returns the page's path."""
    out = Path(out)
    assets = build_assets(results, Path(run), out)
    page = out / "index.html"
    return write_text(page, render_html(results, assets))
