"""Aggregating a benchmark run: per-metric tables (per subject, mean ± std), the curve over the number of
lifted expressions, the headline against the acceptance criteria, the plateau sentence, the machine of each
stage, markdown.

Everything here is computed from the files the stages wrote (``eval_*.json``, ``lift.json``, …), so a
finished run can be re-summarised without re-running anything.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import liftavatar
from liftavatar.bench.config import REAL_STAGES, SUBJECT_STAGES
from liftavatar.bench.layout import SPLITS, avatar_dir, oracle_dir, split_titles, subject_dir
from liftavatar.io import write_text
from liftavatar.report import machine_name

__all__ = ["MACHINE_STAGES", "METRICS", "REAL_CRITERIA", "REAL_MACHINE_STAGES", "SPLITS", "fmt", "has_oracle",
           "headline", "is_real", "machine_stages", "machines_sentence", "plateau_sentence", "stats", "subject_label",
           "summarise", "timing_machines", "write_markdown"]

SCHEMA = "liftavatar-bench/1"

# key in the eval report -> (label, better, unit, decimals)
METRICS: dict[str, tuple[str, str, str, int]] = {
    "psnr": ("PSNR", "higher", "dB", 2),
    "psnr_masked": ("PSNR (foreground)", "higher", "dB", 2),
    "ssim": ("SSIM", "higher", "", 4),
    "lpips": ("LPIPS", "lower", "", 4),
    "fid": ("FID", "lower", "", 2),
    "aed": ("AED", "lower", "", 4),
    "apd_rotation": ("APD rotation", "lower", "°", 2),
    "apd_translation": ("APD translation", "lower", "mm", 2),
    "csim": ("CSIM", "higher", "", 4),
}
NOT_AVAILABLE = "not available (weights not present locally)"
ORACLE_LABEL = "oracle appearance"
ORACLE_DESCRIPTION = ("the subject's true texture on the rig, rendered by the synthetic world's renderer and driven "
                      "exactly as the avatars are (the test captures' kinematics, identity and camera, tracked in the protocol): what an "
                      "avatar that had learned the appearance perfectly would show. Its AED is what the test kinematics "
                      "alone cost a perfectly textured rig; it is a reference, not a floor (an avatar trained on frames "
                      "tracked with the same biases can land below it, the biases cancelling).")

# The acceptance criteria of issue 7 (headline): on the extreme test, lifting raises mean PSNR by at least
# 1 dB and lowers AED by at least 20 %, losing at most 0.2 dB on the seen-range test, over >= 3 subjects at 128².
CRITERIA = {"extreme_psnr_gain_db": 1.0, "extreme_aed_reduction": 0.20, "seen_psnr_change_db": -0.2,
            "min_subjects": 3, "size": 128}
# The bounds the next issue sets on real clips (self-reenactment on the clips' held-out frames): shown beside the
# measured numbers as criteria, never claimed by this benchmark.
REAL_CRITERIA = {"extreme_psnr_gain_db": 0.5, "extreme_aed_reduction": 0.10, "seen_psnr_change_db": -0.2,
                 "size": 128}


MACHINE_STAGES = (*SUBJECT_STAGES, "avatars", "eval", "oracle", "report")
"""The parts of a run whose machine the results name (``results["machines"]``), in order."""
REAL_MACHINE_STAGES = (*REAL_STAGES, "avatars", "eval", "report")
"""The same for a run on real clips (no synthesis, no recording, no oracle)."""
TIMING_STAGES = {"avatar training": "avatars", "evaluation": "eval", "oracle appearance": "oracle"}
"""The rows of the timings table that are not named as their stage is."""
NOT_RECORDED = "not recorded"


def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and standard deviation over subjects (sample std, n − 1; 0 for one subject)."""
    ok = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not ok:
        return {"per_subject": list(values), "mean": None, "std": None, "n": 0}
    std = float(np.std(ok, ddof=1)) if len(ok) > 1 else 0.0
    return {"per_subject": list(values), "mean": float(np.mean(ok)), "std": std, "n": len(ok)}


def _metric_value(report: dict[str, Any], key: str) -> tuple[float | None, str | None]:
    entry = report.get("metrics", {}).get(key)
    if entry is None:
        base = key.split("_")[0]
        skipped = report.get("metrics", {}).get(base, {}).get("skipped")
        return None, skipped or "not computed"
    if "skipped" in entry:
        return None, entry["skipped"]
    return entry.get("value"), None


def _load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def is_real(results: dict[str, Any]) -> bool:
    """Whether ``results`` are of a run on real clips."""
    return bool(results.get("config", {}).get("clips"))


def has_oracle(results: dict[str, Any]) -> bool:
    """Whether the run measured the oracle appearance (synthetic subjects only)."""
    return "oracle" in results.get("methods", {})


def subject_label(entry: dict[str, Any]) -> str:
    """What tables call a subject of ``results["subjects"]``: its seed, or a real clip's name (results written
    before real clips name only the seed)."""
    return str(entry["seed"]) if entry.get("seed") is not None else str(entry.get("name"))


def summarise(cfg, run: Path, subject_timings: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]],
              oracles: Sequence[dict[str, Any]] = (), machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's results (see the module docstring) from its files; ``machine`` is the
    :func:`~liftavatar.report.machine_info` of the machine that evaluates and reports now."""
    real = cfg.real
    points = cfg.points()
    subjects: list[dict[str, Any]] = []
    reasons: dict[str, str] = {}

    def values_of(report: dict[str, Any]) -> dict[str, Any]:
        """The metric values of one eval report, noting why any is missing."""
        values = {}
        for key in METRICS:
            values[key], why = _metric_value(report, key)
            if why:
                reasons.setdefault(key, why)
        values["frames"] = report.get("gt", {}).get("frames")
        return values

    for subject in cfg.subject_list():
        sdir = subject_dir(run, subject.name)
        track = _load(sdir / "track.json") or {}
        entry: dict[str, Any] = {
            "name": subject.name, "seed": subject.seed, "clip": subject.clip, "folder": str(sdir),
            "tracking": {k: track.get(k) for k in ("frames", "valid", "median_reprojection_px", "frames_per_second")},
            "split": _load(sdir / "split.json"),
            "lift": {k: v for k, v in (_load(sdir / "lift.json") or {}).items() if k != "source"},
            "avatars": {}, "metrics": {split: {} for split in SPLITS},
        }
        for k in points:
            adir = avatar_dir(run, subject.name, k)
            entry["avatars"][str(k)] = _load(adir / "job.json")
            for split in SPLITS:
                entry["metrics"][split][str(k)] = values_of(_load(adir / f"eval_{split}.json") or {})
        if not real:
            entry["oracle"] = {split: values_of(_load(oracle_dir(run, subject.name) / f"eval_{split}.json") or {})
                               for split in SPLITS}
        subjects.append(entry)

    def per_subject(split: str, k: int, key: str) -> list[float | None]:
        return [s["metrics"][split][str(k)][key] for s in subjects]

    tables: dict[str, Any] = {}
    for split in SPLITS:
        tables[split] = {}
        for key, (label, better, unit, _) in METRICS.items():
            base, lifted = per_subject(split, 0, key), per_subject(split, cfg.lifted, key)
            available = any(v is not None for v in base + lifted)
            delta = [None if b is None or v is None else v - b for b, v in zip(base, lifted)]
            tables[split][key] = {"label": label, "better": better, "unit": unit, "available": available,
                                  "baseline": stats(base), "lifted": stats(lifted), "delta": stats(delta)}
            if not real:
                tables[split][key]["oracle"] = stats([s["oracle"][split][key] for s in subjects])
            if not available:
                why = reasons.get(key, "")
                tables[split][key]["reason"] = (NOT_AVAILABLE + f": {why}") if key in ("lpips", "fid") else why

    curve: dict[str, Any] = {"points": points}
    cov = [[next((c["coverage"] for c in s["lift"].get("curve", []) if c["k"] == k), None) for s in subjects]
           for k in points]
    curve["coverage"] = {"mean": [stats(c)["mean"] for c in cov], "std": [stats(c)["std"] for c in cov],
                         "per_subject": cov}
    for split in SPLITS:
        curve[split] = {}
        for key in METRICS:
            rows = [per_subject(split, k, key) for k in points]
            if not any(v is not None for row in rows for v in row):
                continue
            st = [stats(r) for r in rows]
            curve[split][key] = {"mean": [s["mean"] for s in st], "std": [s["std"] for s in st], "per_subject": rows}

    stages: dict[str, dict[str, Any]] = {}
    for timing in subject_timings:
        for name, v in timing.items():
            s = stages.setdefault(name, {"seconds": 0.0, "resumed": False})
            s["seconds"] = round(s["seconds"] + float(v.get("seconds", 0.0)), 2)
            s["resumed"] = s["resumed"] or bool(v.get("resumed"))
    train_s = sum(float(r.get("train_seconds", 0.0)) for r in records if r)
    eval_s = sum(float(r.get("eval_seconds", 0.0)) for r in records if r)
    stages["avatar training"] = {"seconds": round(train_s, 2), "resumed": any(r.get("resumed") for r in records)}
    stages["evaluation"] = {"seconds": round(eval_s, 2), "resumed": any(r.get("resumed") for r in records)}
    if not real:
        stages["oracle appearance"] = {"seconds": round(sum(float(o.get("oracle_seconds", 0.0)) for o in oracles), 2),
                                       "resumed": any(o.get("resumed") for o in oracles)}
    methods: dict[str, Any] = {"baseline": {"lifted_expressions": 0, "label": "capture only"},
                               "lifted": {"lifted_expressions": cfg.lifted,
                                          "label": f"capture + {cfg.lifted} lifted expressions"}}
    if not real:  # no true texture of a real person exists
        methods["oracle"] = {"label": ORACLE_LABEL, "description": ORACLE_DESCRIPTION}

    results: dict[str, Any] = {
        "schema": SCHEMA,
        "name": cfg.name,
        "liftavatar_version": liftavatar.__version__,
        "created": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "run": str(run),
        "config": asdict(cfg),
        "methods": methods,
        "splits": split_titles(cfg),
        "subjects": subjects,
        "tables": tables,
        "curve": curve,
        "timings": {"stages": stages, "per_subject": {s["name"]: t for s, t in zip(subjects, subject_timings)},
                    "avatars": [r for r in records]},
    }
    # A run split across machines (bench --until) makes its data stages on one, lifts and trains on another and
    # evaluates on the first: every stage names its own machine, from the record it wrote when it ran.
    def names(values) -> list[str]:
        return sorted({str(v) for v in values if v})

    machines = {stage: names(t.get(stage, {}).get("machine") for t in subject_timings) for stage in SUBJECT_STAGES}
    machines["lift"] = names(s["lift"].get("machine") for s in subjects)
    machines["avatars"] = names(r.get("machine") for r in records if r)
    machines["eval"] = names(r.get("eval_machine") for r in records if r)
    machines["oracle"] = names(o.get("machine") for o in oracles if o)
    machines["report"] = names([machine_name(machine)] if machine else [])
    results["machines"] = {stage: machines[stage] for stage in (REAL_MACHINE_STAGES if real else MACHINE_STAGES)}
    results["report_machine"] = machine or {}
    results["headline"] = headline(results, cfg)
    results["plateau"] = plateau_sentence(curve, "extreme", "psnr")
    return results


def headline(results: dict[str, Any], cfg) -> dict[str, Any]:
    """The lifted method against the baseline, on the acceptance criteria (synthetic subjects), or beside the bounds
    the next issue sets (real clips: shown, not claimed)."""
    t = results["tables"]
    n = len(results["subjects"])
    real = bool(getattr(cfg, "clips", ()))
    criteria = REAL_CRITERIA if real else CRITERIA
    gain = t["extreme"]["psnr"]["delta"]["mean"]
    seen = t["seen"]["psnr"]["delta"]["mean"]
    aed_b, aed_l = t["extreme"]["aed"]["baseline"]["mean"], t["extreme"]["aed"]["lifted"]["mean"]
    reduction = None if aed_b in (None, 0) or aed_l is None else 1 - aed_l / aed_b
    checks = {
        "extreme_psnr_gain_db": gain is not None and gain >= criteria["extreme_psnr_gain_db"],
        "extreme_aed_reduction": reduction is not None and reduction >= criteria["extreme_aed_reduction"],
        "seen_psnr_change_db": seen is not None and seen >= criteria["seen_psnr_change_db"],
    }
    # The criteria are about the protocol with the real tracker; a run on the synthetic truth is an ablation. The
    # bounds on real clips belong to the next issue: this benchmark reports against them and claims nothing.
    assessed = (not real and n >= CRITERIA["min_subjects"] and cfg.size == CRITERIA["size"]
                and getattr(cfg, "kinematics", "tracked") == "tracked")
    out = {"lifted_expressions": cfg.lifted, "subjects": n,
           "extreme_psnr_baseline_db": t["extreme"]["psnr"]["baseline"]["mean"],
           "extreme_psnr_lifted_db": t["extreme"]["psnr"]["lifted"]["mean"],
           "extreme_psnr_gain_db": gain, "extreme_aed_baseline": aed_b, "extreme_aed_lifted": aed_l,
           "extreme_aed_reduction": reduction, "seen_psnr_change_db": seen, "criteria": criteria, "checks": checks,
           "assessed": assessed, "passed": bool(assessed and all(checks.values()))}
    words = []
    if gain is not None:
        where = ("on each clip's rarest expressions and poses (its held-out extreme frames)" if real
                 else "on unseen extreme expressions")
        words.append(f"{where}, lifting with {cfg.lifted} expression{'s' if cfg.lifted != 1 else ''} changes mean "
                     f"PSNR by {gain:+.2f} dB ({out['extreme_psnr_baseline_db']:.2f} → "
                     f"{out['extreme_psnr_lifted_db']:.2f} dB)")
    if reduction is not None:
        words.append(f"AED by {-reduction:+.1%} ({aed_b:.4f} → {aed_l:.4f})")
    if seen is not None:
        words.append(f"and seen-{'split' if real else 'range'} PSNR by {seen:+.2f} dB")
    who = f"real clip{'s' if n != 1 else ''}" if real else f"held-out subject{'s' if n != 1 else ''}"
    sentence = ", ".join(words) + f", over {n} {who} at {cfg.size}²."
    sentence = sentence[0].upper() + sentence[1:]
    if real:
        held = [k for k, ok in checks.items() if ok]
        sentence += (f" The next issue's bounds on real clips (extreme PSNR ≥ +{criteria['extreme_psnr_gain_db']:.1f} "
                     f"dB, AED ≥ {criteria['extreme_aed_reduction']:.0%} lower, seen PSNR ≥ "
                     f"{criteria['seen_psnr_change_db']:.1f} dB) are shown as criteria, not claimed: {len(held)} of "
                     f"{len(checks)} hold in this run.")
    elif assessed:
        sentence += (" The acceptance criteria (≥ +1.0 dB, ≥ 20 % lower AED, ≤ 0.2 dB lost on the seen range) are "
                     + ("met." if out["passed"] else "not met: " + ", ".join(k for k, ok in checks.items() if not ok) + "."))
    else:
        sentence += (f" Acceptance is judged on at least {CRITERIA['min_subjects']} subjects at "
                     f"{CRITERIA['size']}² with tracked kinematics; this run is not such a run.")
    aed_o = t["extreme"]["aed"].get("oracle", {}).get("mean")
    out["extreme_aed_oracle"] = aed_o
    out["extreme_aed_excess_removed"] = (None if None in (aed_o, aed_b, aed_l) or aed_b <= aed_o
                                         else (aed_b - aed_l) / (aed_b - aed_o))
    if aed_o is not None and aed_b is not None:
        needed = (1 - CRITERIA["extreme_aed_reduction"]) * aed_b
        sentence += (f" The {ORACLE_LABEL} (the subject's true texture on the rig, driven by the avatars' kinematics) "
                     f"scores AED {aed_o:.4f} on the extreme test")
        if needed < aed_o:
            sentence += (f"; a {CRITERIA['extreme_aed_reduction']:.0%} reduction needs {needed:.4f}, below what perfect "
                         f"appearance scores under these kinematics")
        removed = out["extreme_aed_excess_removed"]
        if removed is not None and removed >= 1:
            sentence += "; the lifted avatar lands at or below it"
        elif removed is not None:
            sentence += f"; lifting removes {removed:.0%} of the baseline's AED above it"
        sentence += "."
    out["sentence"] = sentence
    return out


def plateau_sentence(curve: dict[str, Any], split: str = "extreme", key: str = "psnr") -> str:
    """Where the curve of ``key`` on ``split`` plateaus, in words, from the measured means."""
    points = curve["points"]
    data = curve.get(split, {}).get(key)
    label, better, unit, decimals = METRICS[key]
    if data is None or len(points) < 2 or any(m is None for m in data["mean"]):
        return f"No {label} curve was measured on the {split} test."
    means = np.array(data["mean"], dtype=float)
    sign = 1.0 if better == "higher" else -1.0
    gains = sign * (means - means[0])
    best = int(np.argmax(gains))
    u = f" {unit}" if unit else ""

    def v(x: float) -> str:
        return f"{x:.{decimals}f}{u}"

    if len(points) == 2:
        return (f"{label} on the {split} test goes from {v(means[0])} with no lifted expressions to {v(means[1])} "
                f"with {points[1]}; two points cannot show where the curve plateaus.")
    if gains[best] <= 0:
        return (f"Lifting did not improve {label} on the {split} test in this run (it goes from {v(means[0])} with no "
                f"lifted expressions to {v(means[-1])} with {points[-1]}), so there is no plateau to locate.")
    k90 = int(np.flatnonzero(gains >= 0.9 * gains[best])[0])
    text = (f"{label} on the {split} test rises from {v(means[0])} with no lifted expressions to {v(means[best])} "
            f"with {points[best]} (best point); 90% of that gain is reached at {points[k90]} lifted expressions")
    if k90 == len(points) - 1:
        text += f", the largest count measured, so the curve has not plateaued by {points[-1]}."
    else:
        later = means[k90 + 1:] - means[k90]
        spread = float(np.max(np.abs(later)))
        text += (f", and beyond it the curve moves by at most {spread:.{decimals}f}{u} "
                 f"(up to {points[-1]}): it plateaus at about {points[k90]} lifted expressions.")
    return text


def fmt(summary: dict[str, Any] | None, decimals: int, signed: bool = False) -> str:
    if not summary or summary.get("mean") is None:
        return "n/a"
    sign = "+" if signed else ""
    return f"{summary['mean']:{sign}.{decimals}f} ± {summary['std']:.{decimals}f}"


def timing_machines(results: dict[str, Any], timing: str) -> str:
    """The machine(s) of a row of the timings table (a data stage, avatar training, evaluation, …), in words."""
    names = results.get("machines", {}).get(TIMING_STAGES.get(timing, timing))
    return ", ".join(names) if names else NOT_RECORDED


def machine_stages(results: dict[str, Any]) -> tuple[str, ...]:
    """The parts of the run whose machine its results name, in order."""
    return tuple(results.get("machines") or MACHINE_STAGES)


def machines_sentence(results: dict[str, Any]) -> str:
    """Where each stage ran, consecutive stages on the same machine(s) together: "synth, video, track, split,
    refs on A; lift, avatars on B; eval, oracle, report on A"."""
    groups: list[tuple[str, list[str]]] = []
    for stage in machine_stages(results):
        where = ", ".join(results.get("machines", {}).get(stage) or []) or NOT_RECORDED
        if groups and groups[-1][0] == where:
            groups[-1][1].append(stage)
        else:
            groups.append((where, [stage]))
    return "; ".join(f"{', '.join(stages)} on {where}" for where, stages in groups)


def _value(x: float | None, decimals: int, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:{'+' if signed else ''}.{decimals}f}"


def _row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    """The tables, curve and timings as markdown (an oracle column only where the run measured one)."""
    oracle = has_oracle(results)
    extra = [ORACLE_LABEL] if oracle else []
    if is_real(results):
        who = (f"Baseline: avatar trained on each clip's training frames alone. Lifted: the same capture lifted with "
               f"{results['methods']['lifted']['lifted_expressions']} expressions. Mean ± std over clips "
               f"({', '.join(subject_label(s) for s in results['subjects'])}); no oracle row: no true texture of a "
               f"real person exists.")
    else:
        who = (f"Baseline: avatar trained on the sparse capture alone. Lifted: the same capture lifted with "
               f"{results['methods']['lifted']['lifted_expressions']} expressions. Mean ± std over subjects "
               f"(seeds {', '.join(subject_label(s) for s in results['subjects'])}).")
    lines = [f"# LiftAvatar benchmark: {results['name']}", "", results["headline"]["sentence"], "",
             *(["Kinematics: the synthetic truth, not the tracker (`bench --kinematics truth`, an ablation: what "
                "lifting does when tracking is perfect).", ""]
               if results["config"].get("kinematics", "tracked") == "truth" else []),
             who, ""]
    for split, title in results["splits"].items():
        lines += [f"## Test: {title}", "", _row(["metric", "better", "baseline", "lifted", "Δ (lifted − baseline)",
                                                 *extra]), _row(["---"] * (5 + len(extra)))]
        notes = []
        for key, row in results["tables"][split].items():
            d = METRICS[key][3]
            unit = f" ({row['unit']})" if row["unit"] else ""
            if not row["available"]:
                reason = row.get("reason") or "n/a"
                short = NOT_AVAILABLE if reason.startswith(NOT_AVAILABLE) else reason
                lines.append(_row([f"{row['label']}{unit}", row["better"], short, "", "", *[""] * len(extra)]))
                if reason != short:
                    notes.append(f"{row['label']}: {reason[len(NOT_AVAILABLE) + 2:]}")
                continue
            lines.append(_row([f"{row['label']}{unit}", row["better"], fmt(row["baseline"], d), fmt(row["lifted"], d),
                               fmt(row["delta"], d, True), *([fmt(row.get("oracle"), d)] if oracle else [])]))
        lines.append("")
        if oracle:
            lines += [f"{ORACLE_LABEL.capitalize()}: {results['methods']['oracle']['description']}", ""]
        lines += [f"- {note}" for note in notes] + ([""] if notes else [])
        for key, row in results["tables"][split].items():
            if not row["available"]:
                continue
            d = METRICS[key][3]
            per_oracle = (row.get("oracle") or {}).get("per_subject") or [None] * len(results["subjects"])
            lines += [f"<details><summary>{row['label']} per subject ({split})</summary>", "",
                      _row(["subject", "baseline", "lifted", "Δ", *extra]), _row(["---"] * (4 + len(extra)))]
            for s, b, v, dd, o in zip(results["subjects"], row["baseline"]["per_subject"],
                                      row["lifted"]["per_subject"], row["delta"]["per_subject"], per_oracle):
                lines.append(_row([subject_label(s), _value(b, d), _value(v, d), _value(dd, d, True),
                                   *([_value(o, d)] if oracle else [])]))
            lines += [_row(["mean ± std", fmt(row["baseline"], d), fmt(row["lifted"], d), fmt(row["delta"], d, True),
                            *([fmt(row.get("oracle"), d)] if oracle else [])]), "", "</details>", ""]
    curve = results["curve"]
    lines += ["## Curve over the number of lifted expressions", "", results["plateau"], "",
              "| lifted expressions | coverage of the extreme test | PSNR extreme (dB) | AED extreme | PSNR seen (dB) |", "|---|---|---|---|---|"]
    ext, seen = curve.get("extreme", {}), curve.get("seen", {})
    for i, k in enumerate(curve["points"]):
        def cell(block, key, d):
            data = block.get(key)
            if not data or data["mean"][i] is None:
                return "n/a"
            return f"{data['mean'][i]:.{d}f} ± {data['std'][i]:.{d}f}"
        cov = curve["coverage"]["mean"][i]
        lines.append(f"| {k} | {'n/a' if cov is None else f'{cov:.1%}'} | {cell(ext, 'psnr', 2)} | "
                     f"{cell(ext, 'aed', 4)} | {cell(seen, 'psnr', 2)} |")
    lines += ["", "## Timings (seconds) and machines", "", "| stage | seconds | machine |", "|---|---|---|"]
    for name, v in results["timings"]["stages"].items():
        lines.append(f"| {name} | {v['seconds']:.1f}{' (earlier run)' if v.get('resumed') else ''} | "
                     f"{timing_machines(results, name)} |")
    for name, v in results["timings"].get("wall_seconds_this_invocation", {}).items():
        lines.append(f"| wall: {name} | {v:.1f} | {timing_machines(results, 'report')} |")
    lines += ["", f"Machines: {machines_sentence(results)}.", ""]
    return write_text(path, "\n".join(lines))
