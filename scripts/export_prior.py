#!/usr/bin/env python
"""Export a training run's newest checkpoint (EMA weights when present) as a shippable prior:
config.json + fp16 safetensors shards of at most --shard-mb each.

    python scripts/export_prior.py runs/prior OUT_DIR [--shard-mb 15]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from liftavatar.face.rig import FaceRig
from liftavatar.generator.checkpoint import complete_checkpoints
from liftavatar.generator.inputs import num_controls
from liftavatar.generator.train import prior_metadata
from liftavatar.generator.transformer import LiftAvatarTransformer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--shard-mb", type=float, default=15.0)
    parser.add_argument("--raw", action="store_true", help="export the raw weights, not the EMA")
    args = parser.parse_args()
    ckpt = complete_checkpoints(args.run / "checkpoints")[-1]
    state = json.loads((ckpt / "state.json").read_text())
    cfg = state["config"]
    rig = FaceRig.load()
    factor = cfg["pixel_factor"]
    model = LiftAvatarTransformer.from_preset(cfg["preset"], num_controls(rig.num_expressions), cfg["injection"],
                                              in_channels=3 * factor**2, out_channels=3 * factor**2)
    ema = ckpt / "ema.safetensors"
    weights = ema if ema.is_file() and not args.raw else ckpt / "model.safetensors"
    model.load_state_dict(load_file(str(weights)), strict=True)
    history = state.get("history", [])
    model.save_pretrained(args.out, extra={**prior_metadata(cfg, state["step"], history, rig.expression_names),
                                           "weights": weights.name, "train_config": cfg})
    # fp16 shards (each under the transfer and repository limits), then drop the fp32 file
    full = load_file(str(args.out / "model.safetensors"))
    shards, current, size = [], {}, 0
    for key, value in full.items():
        value = value.half() if value.is_floating_point() else value
        if current and size + value.numel() * value.element_size() > args.shard_mb * 2**20:
            shards.append(current)
            current, size = {}, 0
        current[key] = value.contiguous()
        size += value.numel() * value.element_size()
    shards.append(current)
    for i, shard in enumerate(shards):
        save_file(shard, str(args.out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"))
    (args.out / "model.safetensors").unlink()
    (args.out / "history.json").write_text(json.dumps(history))
    print(f"exported step {state['step']} ({weights.name}) to {args.out}: {len(shards)} shards")


if __name__ == "__main__":
    main()
