"""The benchmark split across machines, as the headline ran (README, *The benchmark and the demo*); runs on real clips
(``-- --videos CLIP …``) split the same way.

The data stages need the tracker (MediaPipe), the lift and the avatars want a GPU, and the GPU machine the headline
used has neither MediaPipe nor dlib, and each call to it carries at most 64 MiB. So:

1. ``data``: here, on the CPU: ``liftavatar bench --until refs -o RUN`` (synth, video, track, split, refs of every
   subject; track, split, refs of every real clip).
2. per subject (a seed, or a real clip's name): ``pack`` copies what its lift and avatar stages read into a folder
   of its own (``config.json``, the subject's ``timings.json`` and its ``train``, ``test_seen`` and ``test_extreme``
   captures: :func:`liftavatar.bench.layout.avatar_stage_inputs`; about 12 MiB at the headline's size; a real clip
   itself stays here, since neither stage reads it); that folder goes to the GPU machine, which runs ``liftavatar
   bench --device cuda --until avatars --only SUBJECT -o PACK`` (with ``--videos``, the clips' paths need not
   exist there: the packed config.json holds their names and hashes); ``unpack``
   brings back what the evaluation and the report read (``lift.json``, ``lift_samples.npz``, ``timings.json``, and
   each avatar's ``job.json`` and renders: :func:`~liftavatar.bench.layout.avatar_stage_outputs`; the lifted captures
   and the avatars' weights stay behind).
3. ``finish``: here again: ``liftavatar bench -o RUN`` evaluates every avatar and the oracle appearance and writes
   the results and the report, which name the machine of each stage.

Every step takes the same bench options after ``--`` (a run folder refuses settings other than its own), e.g. the
headline's ``-- --curve 0 25 50 100``. ``all`` does the three steps for every subject; the GPU part runs over ssh on
``--gpu-host`` (the folder copied with rsync to ``--gpu-dir`` there, ``--gpu-command`` being how liftavatar is
called there) or, without a host, in a folder next to the run on this machine with ``--gpu-device`` (a machine that
has both; or ``--gpu-device cpu`` to try the split end to end on a CPU):

    python benchmarks/bench_split.py all runs/bench --gpu-host gpu-box --gpu-dir /scratch/bench -- --curve 0 25 50 100
    python benchmarks/bench_split.py all runs/real --gpu-host gpu-box -- --videos clips/a.mp4 clips/b.mp4
    python benchmarks/bench_split.py data runs/bench -- --curve 0 25 50 100
    python benchmarks/bench_split.py pack runs/bench 5400 /tmp/pack5400
    # on the GPU machine, with /tmp/pack5400 copied there:
    #   liftavatar bench --device cuda --until avatars --only 5400 -o /tmp/pack5400 --curve 0 25 50 100
    python benchmarks/bench_split.py unpack /tmp/pack5400 5400 runs/bench
    python benchmarks/bench_split.py finish runs/bench -- --curve 0 25 50 100
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from liftavatar.bench.config import Subject, config_from_json
from liftavatar.bench.layout import avatar_stage_inputs, avatar_stage_outputs

LOCAL = [sys.executable, "-m", "liftavatar.cli"]


def bench(args: list[str], prefix: list[str] = LOCAL) -> None:
    """Run ``liftavatar bench ARGS``; a failed step stops the split."""
    command = [*prefix, "bench", *args]
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True)


def copy(files: list[Path], src: Path, dst: Path, keep: bool = False) -> str:
    """Copy ``files`` (relative paths) from the run folder ``src`` to ``dst``, leaving those ``dst`` already has
    when ``keep``; returns what was copied, in words."""
    count = size = 0
    for f in files:
        if keep and (dst / f).is_file():
            continue
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / f, dst / f)
        count, size = count + 1, size + (src / f).stat().st_size
    return f"{count} of {len(files)} files copied ({size / 2**20:.1f} MiB)"


def subject_of(run: Path, key: str) -> Subject:
    """The subject of the run in ``run`` that ``key`` names (its name, or a synthetic subject's seed)."""
    path = run / "config.json"
    if not path.is_file():
        sys.exit(f"{run}: no config.json; run the data step first.")
    cfg = config_from_json(json.loads(path.read_text())["config"])
    found = [s for s in cfg.subject_list() if s.called(key)]
    if not found:
        sys.exit(f"{key}: not a subject of {run} (its subjects: {', '.join(s.label for s in cfg.subject_list())}).")
    return found[0]


def pack(run: Path, key: str, dest: Path) -> Path:
    """What subject ``key``'s lift and avatar stages read, copied from ``run`` into the run folder ``dest`` (files
    it already has are kept: packing again into a folder whose GPU part was interrupted lets that part resume)."""
    name = subject_of(run, key).name
    files = avatar_stage_inputs(run, name)
    if len(files) < 3:
        sys.exit(f"{run}: subject {key} has no train and test captures yet; run the data step first.")
    print(f"packed subject {key} into {dest}: {copy(files, run, dest, keep=True)}", flush=True)
    return dest


def unpack(pack_dir: Path, key: str, run: Path) -> None:
    """What the evaluation and the report read of subject ``key``'s lift and avatars, from ``pack_dir`` into ``run``."""
    files = avatar_stage_outputs(pack_dir, subject_of(pack_dir, key).name)
    if not any(f.name == "job.json" for f in files):
        sys.exit(f"{pack_dir}: subject {key} has no finished avatars; run its GPU part first.")
    print(f"unpacked subject {key} into {run}: {copy(files, pack_dir, run)}", flush=True)


def gpu_part(run: Path, subject: Subject, options: list[str], args: argparse.Namespace) -> None:
    """Pack ``subject``, run its lift and avatars on the GPU machine (or here), and unpack what comes back."""
    local = run.with_name(f"{run.name}.gpu") / subject.name
    pack(run, subject.name, local)
    stage = ["--device", args.gpu_device, "--until", "avatars", "--only", subject.name]
    if not args.gpu_host:
        bench([*stage, "-o", str(local), *options])
        unpack(local, subject.name, run)
        return
    remote = f"{args.gpu_dir.rstrip('/')}/{subject.name}"
    subprocess.run(["ssh", args.gpu_host, shlex.join(["mkdir", "-p", remote])], check=True)
    subprocess.run(["rsync", "-a", "--ignore-existing", f"{local}/", f"{args.gpu_host}:{remote}/"], check=True)
    command = [*shlex.split(args.gpu_command), "bench", *stage, "-o", remote, *options]
    print(f"$ ssh {args.gpu_host} {shlex.join(command)}", flush=True)
    subprocess.run(["ssh", args.gpu_host, shlex.join(command)], check=True)
    back = local.with_name(f"{subject.name}.back")
    subprocess.run(["rsync", "-a", "--exclude", "*.safetensors", "--exclude", "lifted*/",
                    f"{args.gpu_host}:{remote}/", f"{back}/"], check=True)
    unpack(back, subject.name, run)


def subjects_of(run: Path) -> list[Subject]:
    """The subjects of the run in ``run`` (from its config.json)."""
    path = run / "config.json"
    if not path.is_file():
        sys.exit(f"{run}: no config.json; run the data step first.")
    return config_from_json(json.loads(path.read_text())["config"]).subject_list()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True)
    for name, text in (("data", "data stages here (until refs)"), ("finish", "evaluation and report here")):
        sub.add_parser(name, help=text).add_argument("run", type=Path)
    p = sub.add_parser("pack", help="copy what one subject's lift and avatars read into a folder")
    p.add_argument("run", type=Path)
    p.add_argument("subject", help="a subject seed, or a real clip's name")
    p.add_argument("dest", type=Path)
    p = sub.add_parser("unpack", help="copy one subject's lift and avatar records and renders back into the run")
    p.add_argument("pack", type=Path)
    p.add_argument("subject", help="a subject seed, or a real clip's name")
    p.add_argument("run", type=Path)
    p = sub.add_parser("all", help="every step, every subject")
    p.add_argument("run", type=Path)
    p.add_argument("--gpu-host", default=None, help="ssh host of the GPU machine (default: run the GPU part here)")
    p.add_argument("--gpu-dir", default="/tmp/liftavatar-bench", help="where the packed subjects go on that host")
    p.add_argument("--gpu-command", default="liftavatar", help="how liftavatar is called on that host")
    p.add_argument("--gpu-device", default="cuda", help="torch device of the lift and avatars (default cuda)")
    args = parser.parse_args(argv)

    if args.step == "data":
        bench(["--until", "refs", "-o", str(args.run), *options])
    elif args.step == "pack":
        pack(args.run, args.subject, args.dest)
    elif args.step == "unpack":
        unpack(args.pack, args.subject, args.run)
    elif args.step == "finish":
        bench(["-o", str(args.run), *options])
    else:
        bench(["--until", "refs", "-o", str(args.run), *options])
        for subject in subjects_of(args.run):
            gpu_part(args.run, subject, options, args)
        bench(["-o", str(args.run), *options])


if __name__ == "__main__":
    main()
