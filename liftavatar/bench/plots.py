"""Matplotlib figures of a benchmark run (written as PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from liftavatar.io import atomic_write

__all__ = ["curve_plot"]


def curve_plot(results: dict[str, Any], path: Path) -> Path:
    """PSNR (extreme and seen-range tests), AED (extreme) and coverage of the extreme test against the number of
    lifted expressions: means over subjects with ± std bars, thin lines per subject."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = results["curve"]
    x = np.array(curve["points"], dtype=float)
    panels = [("PSNR (dB)", [("extreme", "psnr", "unseen extreme", "tab:red"), ("seen", "psnr", "seen range", "tab:blue")]),
              ("AED (lower is better)", [("extreme", "aed", "unseen extreme", "tab:red")]),
              ("coverage of the extreme test", [(None, "coverage", "coverage", "tab:green")])]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.8), dpi=110)
    for ax, (ylabel, series) in zip(axes, panels):
        drawn = False
        for split, key, label, colour in series:
            data = curve["coverage"] if split is None else curve.get(split, {}).get(key)
            if not data or any(m is None for m in data["mean"]):
                continue
            mean = np.array(data["mean"], float)
            std = np.array([s or 0.0 for s in data["std"]], float)
            for row in np.array(data["per_subject"], dtype=object).T:
                values = np.array([np.nan if v is None else v for v in row], float)
                if len(data["per_subject"][0]) > 1:
                    ax.plot(x, values, color=colour, alpha=0.25, lw=0.8)
            ax.errorbar(x, mean, yerr=std, color=colour, marker="o", capsize=3, lw=1.8, label=label)
            drawn = True
        if split is None and drawn:
            ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0))
        ax.set_xlabel("lifted expressions")
        ax.set_ylabel(ylabel)
        ax.set_xticks(x)
        ax.grid(alpha=0.3)
        if drawn and len(series) > 1:
            ax.legend(fontsize=8)
        if not drawn:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    n = len(results["subjects"])
    fig.suptitle(f"{results['name']}: {n} subject{'s' if n != 1 else ''}, mean ± std", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    return path
