#!/usr/bin/env python
"""Write the embedded prior's model card (README.md) and training curve (training_curve.png).

    python scripts/prior_card.py [--prior liftavatar/generator/default_prior]

Reads the prior's config.json and history.json (written by scripts/export_prior.py, one list of
[step, loss] per training stage) and the held-out results of benchmarks/generator.py
(benchmarks/results/generator.json), so the card's numbers are the measured ones.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PRIOR = ROOT / "liftavatar" / "generator" / "default_prior"

# What the history files cannot tell: how the stages were run (from the training logs).
STAGES = [
    {"name": "stage 1", "steps": 4700, "gpu": "NVIDIA H100 80GB HBM3", "minutes": 35,
     "note": "several warm-started time-sliced runs (lr 3e-4, cosine, 10 data workers; 2–2.5 steps/s, "
             "data-bound); only its last run's loss log was kept"},
    {"name": "stage 2", "steps": 4500, "gpu": "NVIDIA H100 80GB HBM3", "minutes": 25,
     "note": "warm start from stage 1's EMA weights, lr 3e-4 (100 warm-up steps) cosine to 3e-5, "
             "EMA 0.999 on the GPU, 4 GPU-rendering data workers; 3.05 steps/s, compute-bound"},
    {"name": "stage 3", "steps": 2871, "gpu": "NVIDIA H100 80GB HBM3", "minutes": 7.5,
     "note": "warm start from stage 2's EMA weights, data seed 1, lr 1e-4 (100 warm-up steps) cosine planned "
             "over 6,000 steps, `--compile`; 6.39 steps/s; paused at step 2,871 when the device time ran out "
             "and exported there"},
    {"name": "stage 4", "steps": 8000, "gpu": "NVIDIA H100 80GB HBM3", "minutes": 24,
     "note": "warm start from stage 3's EMA weights, data seed 2, lr 1e-4 (100 warm-up steps) cosine to 1e-5, "
             "`--compile`; three time slices resumed from checkpoints, 5.9–6.0 steps/s"},
]
"""How each stage was run (from the training logs); history.json keeps each stage's loss log under its
key ("stage1_last_run", "stage2", …)."""


def plot(history: dict, path: Path) -> None:
    """Each logged stage's loss at its place on the cumulative step axis; stage 1 kept only a loss range."""
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    offset = 0
    for i, stage in enumerate(STAGES):
        log = history.get(stage["name"].replace(" ", ""))
        if log:
            ax.plot([offset + s for s, _ in log], [v for _, v in log], lw=1.2, color=f"C{i}",
                    label=f"{stage['name']} ({stage['steps']:,} steps)")
        elif i == 0 and history.get("stage1_last_run"):
            end = [v for _, v in history["stage1_last_run"]]
            ax.axhspan(min(end), max(end), xmax=stage["steps"] / sum(s["steps"] for s in STAGES), color=f"C{i}",
                       alpha=0.15, label="stage 1, last run: loss range (step positions not kept)")
        if i:
            ax.axvline(offset, color="grey", ls=":", lw=1)
        offset += stage["steps"]
    ax.set_xlim(0, offset)
    ax.set_yscale("log")
    ax.set_xlabel("training step (all stages)")
    ax.set_ylabel("flow-matching loss (50-step mean)")
    ax.set_title("Embedded prior: small preset, 128², batch 32")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prior", type=Path, default=PRIOR)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "generator.json")
    args = parser.parse_args()
    config = json.loads((args.prior / "config.json").read_text())
    extra = config["extra"]
    train = extra["train_config"]
    history = json.loads((args.prior / "history.json").read_text())
    plot(history, args.prior / "training_curve.png")
    bench = json.loads(args.results.read_text())
    main_row = bench["mean"]
    floors = bench["floors"]["mean"]
    shards = sorted(args.prior.glob("model-*.safetensors"))
    size_mb = sum(p.stat().st_size for p in shards) / 2**20
    params = config["base"]
    total_steps = sum(s["steps"] for s in STAGES)
    lines = [
        "# LiftAvatar embedded prior (`small` preset, 128²)", "",
        "The generator that `lift`, `generate` and `demo` use when no `--prior` is given: a "
        f"`WanTransformer3DModel` of the `small` preset ({params.get('num_attention_heads', '?')} heads × "
        f"{params.get('attention_head_dim', '?')} channels, {params.get('num_layers', '?')} layers) with LiftAvatar's "
        "reference tokens, shading-map and kinematic controls, trained from scratch (`train_mode=full`) on the "
        "synthetic world with a pixel codec (4× pixel-unshuffle). "
        f"{len(shards)} fp16 safetensors shards, {size_mb:.1f} MB.", "",
        "## Data", "",
        f"- Subjects: synthetic identities with seeds {train['seed_range'][0]}–{train['seed_range'][1] - 1} "
        "(2,000 identities), rendered on the fly at 128² (2× supersampled).",
        "- References: K = 5 K-means picks (standardised expression + rotation) from a 60-frame `sparse`-preset "
        "trajectory of the same subject — how a phone capture supplies them at lift time.",
        "- Targets: 8-frame clips of the `full` preset at 12.5 fps (the whole expression and pose range).",
        "- Held out: every evaluation seed (5000–5999 benchmarks, 6000–7999 development and tests, "
        "9000–9999 tracking, 900000+ demo) is disjoint from the training range.", "",
        "## Training", "",
        f"Rectified flow (velocity target), logit-normal σ, shift {train['shift']}, batch {train['batch_size']}, "
        f"AdamW (weight decay {train['weight_decay']}), bf16 autocast, control dropout {train['control_dropout']} "
        f"(shading and coefficients dropped together), EMA {train['ema']} (the shipped weights are the EMA). "
        f"`scripts/train_default_prior.py` reproduces it; `scripts/export_prior.py` exports the shards.", "",
        "| stage | steps | GPU | GPU time | how |", "|---|---|---|---|---|"]
    for s in STAGES:
        lines.append(f"| {s['name']} | {s['steps']:,} | {s['gpu']} | ≈ {s['minutes']} min | {s['note']} |")
    lines += [
        f"| total | {total_steps:,} | | ≈ {sum(s['minutes'] for s in STAGES):.0f} min | final loss "
        f"{extra['final_loss']:.4f} |", "",
        "![training curve](training_curve.png)", "",
        "## Held-out results", "",
        f"`python benchmarks/generator.py --ablations` ({bench['machine'].get('gpu', bench['machine']['cpu'])}, "
        f"{bench['steps']} {bench['solver']} steps): {len(bench['settings'][next(iter(bench['settings']))]['subjects'])} "
        f"held-out subjects × {bench['frames']} `extreme` frames from K = 5 `sparse` references:", "",
        f"- PSNR {main_row['psnr']:.2f} dB (target 28 dB: **{'reached' if main_row['psnr'] >= 28 else 'not reached'}**), SSIM {main_row['ssim']:.3f}; "
        f"copying the best reference to every frame gives {floors['reference_copy_psnr']:.2f} dB / "
        f"{floors['reference_copy_ssim']:.3f}.",
    ]
    if "aed" in main_row:
        lines.append(f"- AED {main_row['aed']:.3f} (the tracker on generated and on ground-truth frames, so its own "
                     f"bias cancels; against the true coefficients it errs by {floors.get('tracker_aed_on_truth', float('nan')):.3f}), "
                     f"CSIM {main_row['csim']:.3f}.")
    lines += ["", "Full table and ablations: `benchmarks/results/generator.md`.", "",
              "## Limits", "",
              "Trained on synthetic heads only; at 128² and this training length the generated frames are "
              "blurrier than the ground truth and show visible 8×8-pixel block seams (the pixel codec's "
              "patches; see docs/generator_grid.png). Real captures must be tracked at 128² (`liftavatar track --size 128`).", ""]
    (args.prior / "README.md").write_text("\n".join(lines))
    print(f"wrote {args.prior / 'README.md'} and {args.prior / 'training_curve.png'}")


if __name__ == "__main__":
    main()
