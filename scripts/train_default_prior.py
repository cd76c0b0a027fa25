#!/usr/bin/env python
"""Train the embedded default prior (the `small` preset) on the synthetic world, in time slices.

    python scripts/train_default_prior.py --out runs/prior --minutes 8 [--resume]

Run it repeatedly with --resume until it reports the final step; then `scripts/export_prior.py` writes
the prior (fp16 safetensors shards + config.json) that ships in liftavatar/generator/default_prior/.
The shipped prior took four stages, each warm-started from the last one's exported EMA weights
(the model card lists them); stages 3 and 4 were, on one H100,

    python scripts/train_default_prior.py --out runs/prior3 --init-from STAGE2 --steps 6000 --lr 1e-4 --warmup 100 --seed 1 --compile --minutes 8.4
    python scripts/train_default_prior.py --out runs/prior4 --init-from STAGE3 --steps 8000 --lr 1e-4 --warmup 100 --seed 2 --compile --minutes 8.4 [--resume]

(stage 3 paused at step 2,871 when the device time ran out and was exported there; stage 4 ran in three
time slices on one H100).
Training subjects: seeds 100000–101999 (2,000 identities). Evaluation seeds (5000–5999, 9000–9999,
900000+) and development seeds (1000–1099, 6000–7999) are disjoint from them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from liftavatar.generator.train import TrainConfig, train

CONFIG = dict(preset="small", injection="both", codec="pixel", pixel_factor=4, size=128, frames=8, refs=5,
              ref_method="kmeans", seed_range=(100_000, 102_000), steps=12_000, batch_size=32, lr=3e-4,
              warmup=200, lr_schedule="cosine", mixed_precision="bf16", shift=1.0, control_dropout=0.1,
              ema=0.999, save_every=500, log_every=50, subject_pool=256,
              clips_per_subject=16, data_workers=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/prior"))
    parser.add_argument("--minutes", type=float, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int, default=CONFIG["steps"])
    parser.add_argument("--batch-size", type=int, default=CONFIG["batch_size"])
    parser.add_argument("--init-from", type=Path, default=None, help="warm start from this prior's weights")
    parser.add_argument("--warmup", type=int, default=CONFIG["warmup"])
    parser.add_argument("--lr", type=float, default=CONFIG["lr"], help="peak learning rate (cosine to a tenth of it)")
    parser.add_argument("--seed", type=int, default=0, help="data and noise seed (a new one per warm-started stage)")
    parser.add_argument("--data-workers", type=int, default=CONFIG["data_workers"],
                        help="processes rendering batches on the GPU (part of the data's definition: keep it on resume)")
    parser.add_argument("--fast-path", action="store_true", help="the transformer's fast path (same results)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path's blocks")
    args = parser.parse_args()
    config = TrainConfig(out=args.out, resume=args.resume, time_limit_min=args.minutes, init_from=args.init_from,
                         **{**CONFIG, "steps": args.steps, "batch_size": args.batch_size, "warmup": args.warmup,
                            "lr": args.lr, "seed": args.seed,
                            "data_workers": args.data_workers, "fast_path": args.fast_path or args.compile,
                            "attention": "cudnn" if args.fast_path or args.compile else "default",
                            "compile": args.compile})
    prior = train(config)
    print(f"prior: {prior}" if prior else "paused; run again with --resume")


if __name__ == "__main__":
    main()
