"""The benchmark's HTML report opens in headless Chromium without console errors and renders a non-blank page.

The page is made by the report writer from a small fabricated run (real plot, grid PNG and H.264 video); the
real `bench --quick` report is loaded the same way in tests/bench/test_bench.py. Skipped where no Chromium is
installed (Debian: `apt-get install chromium`; `.ci/run` tries that).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from liftavatar.bench import quick_config
from liftavatar.bench.summary import METRICS, SPLITS, headline, plateau_sentence, stats

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    env = os.environ.get("LIFTAVATAR_CHROMIUM")
    if env:
        return env if Path(env).exists() or shutil.which(env) else None
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(page: Path, out: Path, size: tuple[int, int] = (1280, 2400)) -> tuple[np.ndarray, list[str]]:
    """Load ``page`` in headless Chromium, save a screenshot to ``out``; returns it and the console errors."""
    browser = find_chromium()
    if browser is None:
        pytest.skip("no Chromium binary found (install Debian's chromium package, or set LIFTAVATAR_CHROMIUM)")
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--enable-logging=stderr", "--v=0", f"--window-size={size[0]},{size[1]}", f"--screenshot={out}",
           page.resolve().as_uri()]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HOME": str(out.parent)})
    assert out.is_file(), f"Chromium wrote no screenshot:\n{result.stderr[-3000:]}"
    errors = [line for line in result.stderr.splitlines()
              if "Uncaught" in line or "ERROR:CONSOLE" in line
              or ("CONSOLE" in line and re.search(r"error|failed to load|not allowed", line, re.I))]
    from PIL import Image

    return np.asarray(Image.open(out).convert("RGB")), errors


def local_references(page: Path) -> list[str]:
    """The src/href targets of a page that are not anchors."""
    text = page.read_text()
    return [ref for ref in re.findall(r"""(?:src|href)=['"]([^'"]+)['"]""", text) if not ref.startswith("#")]


def check_self_contained(page: Path) -> None:
    text = page.read_text()
    assert not re.search(r"(?:src|href)=['\"](?:https?:)?//", text), "the report fetches from the network"
    assert "<script" not in text.lower()
    for ref in local_references(page):
        assert (page.parent / ref).is_file(), f"{page.name} links {ref}, which is not in the report folder"


def fake_results(root: Path) -> tuple[dict, dict]:
    """A results dict with the real structure (2 subjects, curve 0/1/2) and its assets in ``root``."""
    from liftavatar.bench.html import labelled_grid, labelled_row
    from liftavatar.bench.plots import curve_plot
    from liftavatar.io import save_png
    from liftavatar.video import write_video

    cfg = quick_config(seeds=(5400, 5401), subjects=2)
    rng = np.random.default_rng(0)
    points = cfg.points()
    base = {"psnr": 25.0, "psnr_masked": 21.0, "ssim": 0.85, "aed": 0.05, "apd_rotation": 5.0,
            "apd_translation": 4.0, "csim": 0.95}
    step = {"psnr": 0.8, "psnr_masked": 0.7, "ssim": 0.01, "aed": -0.01, "apd_rotation": -0.5,
            "apd_translation": -0.3, "csim": 0.005}
    subjects = []
    for seed in cfg.subject_seeds():
        metrics = {split: {str(k): {key: (None if key in ("lpips", "fid") else
                                          base[key] + step[key] * min(k, 1) + rng.normal(0, 0.01)) for key in METRICS}
                           for k in points} for split in SPLITS}
        subjects.append({"seed": seed, "metrics": metrics, "lift": {"curve": [{"k": k, "coverage": 0.1 * k}
                                                                              for k in points], "window": 8}})
    tables = {}
    for split in SPLITS:
        tables[split] = {}
        for key, (label, better, unit, _) in METRICS.items():
            b = [s["metrics"][split]["0"][key] for s in subjects]
            v = [s["metrics"][split][str(cfg.lifted)][key] for s in subjects]
            d = [None if x is None else y - x for x, y in zip(b, v)]
            row = {"label": label, "better": better, "unit": unit, "available": key not in ("lpips", "fid"),
                   "baseline": stats(b), "lifted": stats(v), "delta": stats(d)}
            if not row["available"]:
                row["reason"] = "not available (weights not present locally): LPIPS skipped: no weights here"
            tables[split][key] = row
    curve = {"points": points, "coverage": {"mean": [0.1 * k for k in points], "std": [0.0] * len(points),
                                            "per_subject": [[0.1 * k] * 2 for k in points]}}
    for split in SPLITS:
        curve[split] = {}
        for key in ("psnr", "ssim", "aed", "csim"):
            rows = [[s["metrics"][split][str(k)][key] for s in subjects] for k in points]
            st = [stats(r) for r in rows]
            curve[split][key] = {"mean": [x["mean"] for x in st], "std": [x["std"] for x in st], "per_subject": rows}
    from dataclasses import asdict

    results = {"schema": "liftavatar-bench/1", "name": "fabricated", "liftavatar_version": "0", "created": "now",
               "run": str(root), "config": asdict(cfg),
               "methods": {"baseline": {"lifted_expressions": 0}, "lifted": {"lifted_expressions": cfg.lifted}},
               "splits": SPLITS, "subjects": subjects, "tables": tables, "curve": curve,
               "timings": {"stages": {"synth": {"seconds": 1.0, "resumed": False}},
                           "wall_seconds_this_invocation": {"all": 2.0}, "wall_seconds_total_this_invocation": 2.0},
               "machine": {"device": "cpu", "cpu": "test"}, "workers": 1}
    results["headline"] = headline(results, cfg)
    results["plateau"] = plateau_sentence(curve)
    frame = (rng.uniform(0, 255, (64, 64, 3))).astype(np.uint8)
    assets = {"curve": curve_plot(results, root / "curve.png").name, "subjects": []}
    save_png(labelled_grid([[frame] * 3] * 3, ["ground truth", "baseline", "lifted"], [["a"] * 3] * 3),
             root / "grid.png")
    write_video(root / "video.mp4", [labelled_row([frame] * 3, ["gt", "baseline", "lifted"])] * 6, 25.0)
    for seed in cfg.subject_seeds():
        assets["subjects"].append({"seed": seed, "grids": {"extreme": "grid.png", "seen": "grid.png"},
                                   "videos": {"extreme": "video.mp4"}, "lifted": "grid.png"})
    (root / "results.json").write_text("{}")
    (root / "results.md").write_text("#")
    return results, assets


def test_report_is_self_contained_and_renders_in_headless_chromium(tmp_path):
    from liftavatar.bench.html import render_html

    results, assets = fake_results(tmp_path)
    page = tmp_path / "index.html"
    page.write_text(render_html(results, assets), encoding="utf-8")
    check_self_contained(page)
    text = page.read_text()
    for needle in ("Headline", "Curve over the number of lifted expressions", "Plateau", "<video", "Machine",
                   "not available (weights not present locally)", "Timings", "Config"):
        assert needle in text, needle

    image, errors = screenshot(page, tmp_path / "shot.png")
    assert not errors, "console errors:\n" + "\n".join(errors)
    assert image.shape[0] >= 1000 and image.shape[1] == 1280
    assert image.std() > 20, "the screenshot is blank"
    assert len(np.unique(image.reshape(-1, 3)[::97], axis=0)) > 50  # text, tables, plot and pictures, not one colour


def test_console_errors_are_caught(tmp_path):
    """The harness is not vacuous: a page with a script error fails it."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    _, errors = screenshot(page, tmp_path / "broken.png", size=(400, 300))
    assert any("undefinedFunction" in line for line in errors), errors
