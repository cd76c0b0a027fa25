#!/usr/bin/env bash
# `liftavatar train` with FSDP2 on every GPU of this machine: LoRA on Wan2.1-14B (configs/accelerate/fsdp_14b.yaml:
# full shard per WanTransformerBlock, activation checkpointing, bf16). Any `liftavatar train` option after the
# script's name overrides the defaults below; docs/multi_gpu.md has the memory budget.
#
#   WAN_DIR=/models/Wan2.1-T2V-14B-Diffusers scripts/launch_fsdp_14b.sh --out runs/lift-14b --captures caps/* [--resume]
#
# WAN_DIR: a local diffusers Wan2.1-T2V-14B folder (transformer/ and vae/); without it the 14B preset starts
# from random weights with the pixel codec (a smoke test of the set-up, not a useful prior).
# --batch-size is per GPU (global batch = batch size x GPUs). NUM_GPUS overrides the count of visible GPUs.
# A run resumes under any GPU count (--resume); keep batch size x GPUs equal to continue it exactly.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NUM_GPUS=${NUM_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
if [ "$NUM_GPUS" -lt 1 ]; then
    echo "launch_fsdp_14b.sh: no CUDA GPU here; FSDP runs on GPUs only (accelerate enables it for accelerators)" >&2
    exit 2
fi
if [ -n "${WAN_DIR:-}" ]; then
    MODEL=(--base "$WAN_DIR" --codec wan-vae --vae "$WAN_DIR/vae" --frames 17 --size 512 --shift 3.0)
else
    echo "launch_fsdp_14b.sh: WAN_DIR unset: wan2.1-14b preset with random weights (smoke test)" >&2
    MODEL=(--preset wan2.1-14b --codec pixel --pixel-factor 4 --frames 8 --size 256)
fi
exec "$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate/fsdp_14b.yaml \
    --num_processes "$NUM_GPUS" -m liftavatar.cli train \
    "${MODEL[@]}" --train-mode lora --lora-rank 32 --refs 5 \
    --batch-size 1 --lr 1e-4 --warmup 100 --lr-schedule cosine --mixed-precision bf16 \
    --save-every 250 --log-every 10 \
    "$@"
