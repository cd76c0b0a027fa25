#!/usr/bin/env bash
# The GPU part of the real-clip results (issue 19) as it ran: one H200 lent through a device whose calls each carry
# at most 64 MiB (the repository included) and return at most 8 files, so the work went as several calls in a row to
# one warm machine, each carrying part of what the later ones read. Steps, each one call, run from the repository
# root there:
#
#   setup WHEELS PACKS        install WHEELS/*.whl into /root/site (MediaPipe, gsplat, tyro, …), keep the packs
#                             (benchmarks/bench_split.py pack folders) in /root/packs, build gsplat's CUDA code
#   d512  WHEELS CLIPS PACKS  install more wheels (PyAV, diffusers), keep more packs; track every clip at 512² and
#                             train and score an avatar on each with the library's defaults
#                             (benchmarks/avatar_real.py): $OUT/avatar_real_eval_512.json
#   adapt, genreal            (issue 20) ran on one H100 on 2026-12-05: adapt as below; genreal with JOBS=5 VARIANTS="base full"
#                             LIMIT=470, then twice more to resume (VARIANTS=full). Five adaptations sharing the GPU ran
#                             each about 5x slower than one alone (no gain in throughput), and a carried folder replaces
#                             the one there, checkpoints included: a resuming call carries the work folder under another
#                             name and merges it in (cp -r --update=none GRC2/. GRC/) before this step (it resumed once;
#                             the next call found the finished clips gone and started them over)
#   adapt WHEELS              (issue 20) install WHEELS (diffusers), keep the embedded prior (carried in this call) in
#                             /root/prior, time `liftavatar adapt` on CUDA (benchmarks/adapt_speed.py):
#                             $OUT/adapt_speed.json
#   genreal WORK              (issue 20) a benchmarks/generator_real.py work folder (split here): every clip adapted
#                             and its extreme frames generated, ${JOBS:-3} processes sharing the GPU;
#                             $OUT/genreal.tar for `tar -xf genreal.tar -C WORK` here, then its score phase
#   stash DIR [WHEELS]        keep DIR/gp (tracked train/ clips) in /root/gp and DIR/grw (a generator_real work folder)
#                             in /root/grw; the 11 clips and 9 split clips travelled in four calls (64 MiB each)
#   prior NAME -- TRAIN OPTIONS
#                             (issue 20 item 2) `liftavatar train` from the embedded prior on the synthetic stream plus
#                             /root/gp, in the background; on 2026-12-06 (one H200, 11 min, stopped at step 2,294 of
#                             3,000; the step then took no NAME and wrote /root/runs/generic):
#                               --synthetic-share 0.5 --capture-color-jitter 0.1 --batch-size 32 --mixed-precision bf16
#                               --lr 1e-4 --warmup 100 --steps 3000 --ema 0.999 --seed 3 --seed-range 100000 102000
#                               --clips-per-subject 16 --subject-pool 256 --data-workers 4 --fast-path --attention cudnn
#                               --compile --save-every 250 --log-every 50 --time-limit-min 11 --device cuda
#                             on 2026-12-06 (second run, one H100): NAME s75lr3 with --synthetic-share 0.75 --lr 3e-5
#                             --steps 1600 --data-workers 5 --time-limit-min 10, otherwise as above: 1,600 steps in
#                             9 min 48 s (3.3 steps/s). Two names side by side do not pay: each main process decodes
#                             and jitters its capture clips on the CPU (1,400 % alone), and two of them on 16 cores
#                             ran 0.7 steps/s each, so the second run (lr 1e-4) was stopped at step 77
#   poll [SECONDS]            wait, then the background steps' last lines
#   priorval NAME...          export each run's EMA weights (fp16 shards) and generate /root/grw's extreme frames with
#                             the embedded prior (base) and each (base@NAME): $OUT/gen_priors.tar; then, that day,
#                             PRIOR=/root/generic_prior PRIOR_NAME=generic VARIANTS=full genreal on the eval clips
#                             (copy the clips into the work folder *before* starting genreal: it lists them at start)
#   shipprior NAME            the prior's shards and its run's last state to $OUT
#   lift  PACKS -- BENCH OPTIONS
#                             keep the last packs (in $KEEP, one folder per run); every kept pack's lift and avatars
#                             (`liftavatar bench --device cuda --until avatars --only NAME`), what the evaluation
#                             reads of each finished one tarred to ${TARS:-$OUT}/NAME.tar for `bench_split.py unpack`
#   ship  TARS                the tars a lift step left in TARS and no earlier ship step sent, as many as fit in
#                             what one call brings back ($OUT)
#
# A step can outlive its call: started with `setsid nohup … &` from a copy of the repository (/root/repo, so that a
# later call's tree does not change it under the running process), it runs on while later calls carry more packs or
# only poll; the machine goes back after 30 s without a call, with everything on it, so poll with `sleep` calls and
# ship what finished as soon as it exists. The headline of 2026-12-06 ran so: both lift steps (6 real packs, 3
# synthetic) in the background on one H200, about 11 minutes for all nine subjects, then two ship steps.
#
# The packs of a real run are made here with `python benchmarks/bench_split.py pack RUN NAME DIR` after
# `liftavatar bench --videos … --until refs -o RUN`; after the lift step, `tar -xf NAME.tar -C BACK/NAME`,
# `python benchmarks/bench_split.py unpack BACK/NAME NAME RUN` and `… finish RUN -- OPTIONS` evaluate and report.
set -euo pipefail
step=$1
shift
SITE=/root/site
KEEP=${KEEP:-/root/packs}  # one folder per run: a later lift step of another run names its own
OUT=${OUT:-/tmp/out}
mkdir -p "$SITE" "$KEEP" "$OUT"
export PYTHONPATH="$SITE:$PWD" MAX_JOBS=16 PYTHONUNBUFFERED=1
install() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$1"/*.whl; }
keep() { cp -r "$1"/. "$KEEP"/; ls "$KEEP"; }
# The embedded prior travels in one call only (44 MB): kept for later calls that cannot carry it.
prior_here() {
  local prior=liftavatar/generator/default_prior
  if ls "$prior"/model-*.safetensors > /dev/null 2>&1; then
    mkdir -p /root/prior && cp "$prior"/model-*.safetensors /root/prior/
  else
    cp /root/prior/model-*.safetensors "$prior"/
  fi
}

case "$step" in
  setup)
    install "$1"
    keep "$2"
    python3 - <<'EOF'
import time
import numpy as np
import torch
t = time.time()
from liftavatar.avatar.raster import rasterization
dev = torch.device("cuda")
m = torch.tensor([[0.0, 0.0, 1.0]], device=dev)
k = torch.tensor([[[16.0, 0, 8], [0, 16.0, 8], [0, 0, 1]]], device=dev)
out = rasterization(m, torch.tensor([[1.0, 0, 0, 0]], device=dev), torch.full((1, 3), 0.01, device=dev),
                    torch.ones(1, device=dev), torch.ones(1, 3, device=dev), torch.eye(4, device=dev)[None], k, 16, 16)
print("gsplat built and ran:", tuple(out[0].shape), f"{time.time() - t:.0f} s")
import mediapipe as mp
seg = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
print("mediapipe selfie segmentation:", seg.process(np.zeros((256, 256, 3), np.uint8)).segmentation_mask.shape)
import liftavatar.cli, liftavatar.bench.runner, liftavatar.lift, liftavatar.avatar.train  # noqa: F401,E401
print("liftavatar imports")
EOF
    ;;
  d512)
    install "$1"
    keep "$3"
    mkdir -p /root/t512
    for clip in "$2"/*; do
      name=$(basename "${clip%.*}")
      OMP_NUM_THREADS=2 python3 -m liftavatar.cli track "$clip" -o "/root/t512/$name" --size 512 --force \
        > "/root/t512/$name.log" 2>&1 &
    done
    wait
    tail -n 2 /root/t512/*.log
    # Results merge into the JSON as each avatar finishes; stopped before the call's 10 minutes so they come back.
    timeout "${LIMIT:-470}" python3 benchmarks/avatar_real.py --captures $(ls -d /root/t512/*/) --variants default='{}' --device cuda \
      --jobs 6 --work /root/ar512 --out "$OUT/avatar_real_eval_512.json" || true
    ;;
  adapt)
    install "$1"
    prior_here
    python3 benchmarks/adapt_speed.py --device cuda \
      --note "the library's CUDA defaults on the benchmark's synthetic capture, each mode alone on the GPU"
    cp benchmarks/results/adapt_speed.json "$OUT"/
    ;;
  genreal)
    prior_here
    # PRIOR / PRIOR_NAME: adapt another prior than the embedded one (variants named VARIANT@PRIOR_NAME)
    other=()
    [ -n "${PRIOR:-}" ] && other=(--prior "$PRIOR" --prior-name "$PRIOR_NAME")
    work=$1
    mapfile -t names < <(for d in "$work"/*/role.json; do basename "$(dirname "$d")"; done)
    jobs=${JOBS:-3}
    pids=()
    for ((j = 0; j < jobs; j++)); do
      mine=()
      for ((i = j; i < ${#names[@]}; i += jobs)); do mine+=("${names[i]}"); done
      [ ${#mine[@]} -eq 0 ] && continue
      # Stopped before the call's 10 minutes so that what finished comes back; a later call resumes the rest.
      OMP_NUM_THREADS=4 timeout "${LIMIT:-500}" python3 benchmarks/generator_real.py generate --work "$work" \
        --device cuda --variants ${VARIANTS:-full lora} "${other[@]}" --only "${mine[@]}" > "$OUT/genreal_$j.log" 2>&1 &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || true; done
    tail -n 4 "$OUT"/genreal_*.log
    (cd "$work" && tar -cf "$OUT/genreal.tar" $(ls -d */gen_*.npz */timings.json */prior_*/adapt.json */prior_*/loss.png \
      2>/dev/null))
    ;;
  lift)
    prior_here
    keep "$1"
    shift
    [ "${1:-}" = "--" ] && shift
    pids=()
    for pack in "$KEEP"/*/; do
      name=$(basename "$pack")
      [ -f "$pack/job_done" ] && continue
      # Stopped before the call's 10 minutes so that what finished is tarred; a later lift step resumes the rest.
      # One CPU thread each: nine runs lifting side by side with torch's default (all 16 cores each) took 9-14 s an
      # expression with the GPU at 8 %; with one thread each 1.3 s, the GPU at 100 % (H200, 2026-12-06).
      OMP_NUM_THREADS=1 timeout "${LIMIT:-520}" python3 -m liftavatar.cli bench --device cuda --workers 2 --until avatars --only "$name" -o "$pack" "$@" \
        > "$KEEP/$name.log" 2>&1 && touch "$pack/job_done" &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait "$pid" || true; done
    tail -n 3 "$KEEP"/*.log
    python3 - "$KEEP" "${TARS:-$OUT}" <<'EOF'
import sys, tarfile
from pathlib import Path
from liftavatar.bench.layout import avatar_stage_outputs
keep, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for pack in sorted(p for p in keep.iterdir() if p.is_dir() and (p / "job_done").is_file()):
    files = avatar_stage_outputs(pack, pack.name)
    with tarfile.open(out / f"{pack.name}.tar", "w") as tar:
        for f in files:
            tar.add(pack / f, arcname=str(f))
    print(pack.name, len(files), "files")
EOF
    ;;
  ship)
    # The finished packs' tars (TARS, written by lift steps) not shipped before, as many as one call brings back
    # (8 files, 16 MiB each, 64 MiB together): a later ship step brings the rest. A tar over 15 MiB goes as pieces
    # NAME.tar.00, NAME.tar.01, … (here: cat NAME.tar.?? > NAME.tar).
    mkdir -p "$1/shipped"
    for tar in "$1"/*.tar; do
      [ -f "$tar" ] && [ "$(stat -c %s "$tar")" -gt $((15 << 20)) ] && split -b 15M -d "$tar" "$tar." && rm "$tar"
    done
    total=0
    for tar in "$1"/*.tar "$1"/*.tar.[0-9][0-9]; do
      [ -f "$tar" ] || continue
      name=$(basename "$tar")
      [ -f "$1/shipped/$name" ] && continue
      size=$(stat -c %s "$tar")
      if [ $(ls "$OUT" | wc -l) -ge 7 ] || [ $((total + size)) -gt $((60 << 20)) ]; then
        echo "left for a later ship step: $name ($((size >> 20)) MiB)"
        continue
      fi
      cp "$tar" "$OUT/" && touch "$1/shipped/$name" && total=$((total + size))
    done
    ls -l "$OUT"
    ;;
  stash)
    # A carried folder's gp/ (tracked train/ clips) and grw/ (a generator_real work folder) kept for later steps;
    # WHEELS installed when given.
    [ -n "${2:-}" ] && install "$2"
    for part in gp grw; do
      [ -d "$1/$part" ] && mkdir -p "/root/$part" && cp -r "$1/$part"/. "/root/$part"/
    done
    ls /root/gp /root/grw 2>/dev/null | tr '\n' ' ' || true; echo
    ;;
  prior)
    # (issue 20 item 2) a generic prior NAME: the embedded prior fine-tuned on the synthetic stream plus every kept
    # clip of /root/gp, `liftavatar train` with the options after --, in the background from a copy of the
    # repository (it outlives this call; `poll` watches it): /root/runs/NAME, /root/train_NAME.log. Several
    # names may run side by side, but on 16 cores they slow each other down (see the header): run one at a time.
    name=$1
    shift
    prior_here
    [ "${1:-}" = "--" ] && shift
    [ -d /root/repo ] || cp -r "$PWD" /root/repo
    (cd /root/repo && PYTHONPATH="$SITE:/root/repo" setsid nohup python3 -m liftavatar.cli train \
      --out "/root/runs/$name" --init-from liftavatar/generator/default_prior --captures $(ls -d /root/gp/*/) "$@" \
      > "/root/train_$name.log" 2>&1 < /dev/null &)
    sleep "${WAIT:-150}"
    # A log still empty would fail grep and, under pipefail, the step (and a chain of steps after it).
    tr '\r' '\n' < "/root/train_$name.log" | grep -v '^$' | tail -n 6 || true
    ;;
  poll)
    sleep "${1:-240}"
    for log in /root/train_*.log /root/genreal.log; do
      [ -f "$log" ] && { echo "== $log"; tr '\r' '\n' < "$log" | grep -v '^$' | tail -n 3 || true; }
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
    ;;
  priorval)
    # Each named run exported (EMA weights, fp16 shards) to /root/prior_NAME, and /root/grw's extreme frames
    # generated by the embedded prior (variant base, once) and by each (base@NAME), tarred to $OUT/gen_priors.tar
    # for `generator_real.py score` here; `shipprior NAME` brings a prior's shards back.
    prior_here
    python3 benchmarks/generator_real.py generate --work /root/grw --device cuda --variants base
    for name in "$@"; do
      rm -rf "/root/prior_$name"
      python3 scripts/export_prior.py "/root/runs/$name" "/root/prior_$name" --shard-mb 15
      python3 benchmarks/generator_real.py generate --work /root/grw --device cuda --variants base \
        --prior "/root/prior_$name" --prior-name "$name"
    done
    (cd /root/grw && tar -cf "$OUT/gen_priors.tar" $(ls -d */gen_*.npz */timings.json))
    # A first look before the scoring here: PSNR inside the mask, as generator_real.py scores it.
    python3 - <<'EOF'
import json
from pathlib import Path
import numpy as np
from liftavatar.bench.layout import gt_frames, over_black
from liftavatar.capture import Capture
from liftavatar.metrics.image import psnr
for clip in sorted(p for p in Path("/root/grw").iterdir() if (p / "role.json").is_file()):
    gt, masks = gt_frames(Capture.load(clip / "test_extreme"))
    role = json.loads((clip / "role.json").read_text())["role"]
    row = {f.stem[4:]: np.mean([psnr(over_black(np.load(f)["frames"], masks)[i], gt[i]) for i in range(len(gt))])
           for f in sorted(clip.glob("gen_base*.npz"))}
    print(f"{clip.name:45s} {role:10s}", "  ".join(f"{k} {v:.2f}" for k, v in row.items()))
EOF
    ls -l "$OUT"
    ;;
  shipprior)
    cp "/root/prior_$1"/* "$OUT"/
    (cd "/root/runs/$1" && tar -cf "$OUT/run.tar" train_config.json $(ls -d checkpoints/*/state.json | tail -n 1))
    ls -l "$OUT"
    ;;
  *)
    echo "unknown step $step: setup, d512, adapt, genreal, lift, ship, stash, prior, poll, priorval or shipprior" >&2
    exit 2
    ;;
esac
