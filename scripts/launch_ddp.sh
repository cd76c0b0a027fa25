#!/usr/bin/env bash
# `liftavatar train` with DDP on every GPU of this machine: the small presets (here `small`, the embedded
# default prior's recipe). Any `liftavatar train` option after the script's name overrides the defaults below.
#
#   scripts/launch_ddp.sh --out runs/prior-ddp [--steps 12000] [--resume]
#
# --batch-size is per GPU (global batch = batch size x GPUs); keep it a multiple of --clips-per-subject so
# the synthetic stream is the same whatever the GPU count. NUM_GPUS overrides the count of visible GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
NUM_GPUS=${NUM_GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}
if [ "$NUM_GPUS" -lt 1 ]; then
    echo "launch_ddp.sh: no CUDA GPU here; on CPUs use configs/accelerate/cpu_gloo.yaml with --device cpu" >&2
    exit 2
fi
exec "$PYTHON" -m accelerate.commands.launch --config_file configs/accelerate/ddp.yaml --num_processes "$NUM_GPUS" \
    -m liftavatar.cli train \
    --preset small --codec pixel --pixel-factor 4 --size 128 --frames 8 --refs 5 \
    --batch-size 32 --clips-per-subject 16 --data-workers 4 --lr 3e-4 --warmup 200 --lr-schedule cosine \
    --mixed-precision bf16 --ema 0.999 --save-every 500 --log-every 50 \
    "$@"
