"""Running a benchmark: :func:`run_bench` takes a run folder through the stages of :mod:`liftavatar.bench` (or up to
one of them, for a run split across machines), spreads subjects and avatars over worker processes, and writes the
results and the report."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import liftavatar
from liftavatar.bench.config import STAGES, BenchConfig, BenchError, config_from_json
from liftavatar.bench.html import write_report
from liftavatar.bench.jobs import avatar_job, eval_job, on_cpu, oracle_job
from liftavatar.bench.layout import avatar_dir
from liftavatar.bench.stages import prepare_subject
from liftavatar.bench.summary import summarise, write_markdown
from liftavatar.errors import ConfigError
from liftavatar.io import write_json
from liftavatar.report import machine_info

__all__ = ["check_run_dir", "run_bench", "run_many"]

logger = logging.getLogger(__name__)


def _worker_init(threads: int, log_level: int) -> None:
    """A worker's share of the CPU cores (MediaPipe, rig fits and CPU-side work of every job), and the package's
    log lines on its stderr as the parent shows them (a spawned process starts without the parent's handlers)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    package = logging.getLogger("liftavatar")
    if log_level <= logging.INFO and not package.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        package.addHandler(handler)
    package.setLevel(log_level)


def run_many(fn: Callable[..., Any], jobs: list[tuple], workers: int, desc: str) -> list[Any]:
    """``fn(*job)`` for every job: in this process (workers 1) or a spawn pool; results in job order."""
    from tqdm import tqdm

    if workers <= 1 or len(jobs) <= 1:
        return [fn(*job, progress=True) for job in jobs]
    import multiprocessing

    results: list[Any] = [None] * len(jobs)
    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    level = logging.getLogger("liftavatar").getEffectiveLevel()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init, initargs=(threads, level)) as pool:
        futures = {pool.submit(fn, *job, progress=False): i for i, job in enumerate(jobs)}
        bar = tqdm(total=len(jobs), desc=desc, unit="job")
        from concurrent.futures import as_completed

        for future in as_completed(futures):
            results[futures[future]] = future.result()
            bar.update(1)
        bar.close()
    return results


def _warm_up_cuda(device: str) -> None:
    """Build gsplat's CUDA kernels once here (JIT on first use) rather than in every worker at once."""
    import torch

    from liftavatar.avatar.raster import rasterization

    dev = torch.device(device)
    means = torch.tensor([[0.0, 0.0, 1.0]], device=dev)
    quats = torch.tensor([[1.0, 0.0, 0.0, 0.0]], device=dev)
    scales = torch.full((1, 3), 0.01, device=dev)
    viewmat = torch.eye(4, device=dev)[None]
    k = torch.tensor([[[16.0, 0, 8], [0, 16.0, 8], [0, 0, 1]]], device=dev)
    rasterization(means, quats, scales, torch.ones(1, device=dev), torch.ones(1, 3, device=dev), viewmat, k, 16, 16)


def check_run_dir(run: Path, cfg: BenchConfig, force: bool) -> None:
    """Make ``run`` ready for ``cfg``: a new folder, or one holding a run of the same protocol (its
    ``config.json``, of this version or an earlier one; :meth:`BenchConfig.protocol`), which resumes. ``force``
    empties a run folder first. Raises :class:`BenchError` for a folder that holds something else or a run made
    with other settings."""
    path = run / "config.json"
    if force and run.exists():
        if not (path.is_file() or not any(run.iterdir())):
            raise BenchError(f"{run}: exists and is not a benchmark run folder (no config.json); "
                             f"choose another --out rather than have --force delete it.")
        shutil.rmtree(run)
    if path.is_file():
        stored = json.loads(path.read_text())
        old = config_from_json(stored.get("config", {})).protocol()
        new = {c["name"]: c["sha256"] for c in cfg.protocol()["clips"]}
        other = sorted(c["name"] for c in old["clips"] if c["name"] in new and new[c["name"]] != c["sha256"])
        if other:
            raise BenchError(f"{run}: holds a run whose clip{'s' if len(other) > 1 else ''} {', '.join(other)} had "
                             f"other contents (clips differ); pass --force to start it over, or choose another --out.")
        if old != cfg.protocol():
            changed = sorted(k for k in set(old) | set(cfg.protocol()) if old.get(k) != cfg.protocol().get(k))
            raise BenchError(f"{run}: holds a run made with other settings ({', '.join(changed)} differ); pass "
                             f"--force to start it over, or choose another --out.")
    elif run.exists() and any(p.name != "report" for p in run.iterdir()):
        raise BenchError(f"{run}: exists and is not a benchmark run folder (no config.json); choose another --out.")
    run.mkdir(parents=True, exist_ok=True)
    write_json(path, {"liftavatar_version": liftavatar.__version__, "config": asdict(cfg)})


def run_bench(cfg: BenchConfig, out: str | Path, force: bool = False, progress: bool = True,
              until: str | None = None, only: Sequence[str | int] | None = None) -> dict[str, Any]:
    """Run (or resume) the benchmark into ``out``: stages per subject, avatars, evaluation, aggregation, report.

    ``until`` (one of :data:`STAGES`) stops after that stage for every subject, without results: a run split
    across machines makes its data stages on one (say ``until="refs"`` where the tracker is installed), lifts
    and trains avatars on a GPU (``until="avatars"``), and evaluates and reports back on the first; each part
    resumes from the files the other left. ``only`` (subjects of the run by name, or a synthetic subject's seed,
    with ``until`` at most ``"avatars"``) runs those subjects alone, so a run can travel one subject at a time where
    a machine call carries little. Returns the results (also in ``out/results.json``;
    ``results["report"]`` is the HTML report's path), or ``{"stopped_after": until}``.
    """
    from functools import partial

    cfg.check()
    if until is not None and until not in STAGES:
        raise ConfigError(f"--until {until}: use one of {', '.join(STAGES)}.")
    data_stages = cfg.subject_stages()
    if until is not None and cfg.real and until not in (*data_stages, "avatars", "eval"):
        raise ConfigError(f"--until {until}: a run on real clips has no {until} stage (a clip is its own "
                          f"recording); use one of {', '.join((*data_stages, 'avatars', 'eval'))}.")
    subjects = cfg.subject_list()
    if only is not None:
        if until is None or STAGES.index(until) > STAGES.index("avatars"):
            raise ConfigError("--only runs part of the subjects, so it needs --until avatars or an earlier stage "
                              "(the evaluation and report need every subject).")
        unknown = [str(key) for key in only if not any(s.called(key) for s in subjects)]
        if unknown:
            raise ConfigError(f"--only {' '.join(unknown)}: not a subject of this run "
                              f"(its subjects: {', '.join(s.label for s in subjects)}).")
        subjects = [s for s in subjects if any(s.called(key) for key in only)]
    run = Path(out)
    check_run_dir(run, cfg, force)
    if cfg.prior is None and until not in data_stages[:-1]:  # the stages before lift need no prior
        from liftavatar.generator.prior import resolve_prior

        resolve_prior(None)  # fail now, not after synthesis, when no prior is installed
    workers = max(1, int(cfg.workers))
    wall = time.perf_counter()
    clock: dict[str, float] = {}

    start = time.perf_counter()
    last = until if until in data_stages else data_stages[-1]
    subject_timings = run_many(partial(prepare_subject, until=last), [(cfg, run, s) for s in subjects], workers,
                               "subjects")
    clock[f"subjects ({data_stages[0]} → {data_stages[-1]})"] = time.perf_counter() - start
    if until in data_stages:
        return _stopped(run, until)

    jobs = [(cfg, run, s.name, k) for s in subjects for k in cfg.points()]
    pending = [job for job in jobs if not (avatar_dir(run, job[2], job[3]) / "job.json").is_file()]
    if pending and not on_cpu(cfg.device):
        start = time.perf_counter()
        _warm_up_cuda(cfg.device)
        clock["gsplat warm-up"] = time.perf_counter() - start
    logger.info("[bench] %d avatars (%d subjects × curve %s), %d iterations each, on %s with %d worker(s)",
                len(jobs), len(subjects), cfg.points(), cfg.avatar_iters, cfg.device, workers)
    start = time.perf_counter()
    records = run_many(avatar_job, jobs, workers, "avatars")
    clock["avatars (train + render)"] = time.perf_counter() - start
    if until == "avatars":
        return _stopped(run, until)

    start = time.perf_counter()
    # Metrics run the tracker (AED) and dlib (CSIM) on the CPU: one process unless asked for more.
    evals = run_many(eval_job, jobs, workers if on_cpu(cfg.device) else 1, "evaluation")
    records = [{**r, **e, "resumed": r["resumed"] and e["resumed"]} for r, e in zip(records, evals)]
    # A real clip has no true texture: no oracle appearance.
    oracles = run_many(oracle_job, [(cfg, run, s.name) for s in subjects if s.seed is not None],
                       workers if on_cpu(cfg.device) else 1, "oracle")
    clock["evaluation"] = time.perf_counter() - start
    if until == "eval":
        return _stopped(run, until)

    start = time.perf_counter()
    here = machine_info(cfg.device)
    results = summarise(cfg, run, subject_timings, records, oracles, here)
    results["workers"] = workers
    results["timings"]["wall_seconds_this_invocation"] = {k: round(v, 2) for k, v in clock.items()}
    write_json(run / "results.json", results)
    write_markdown(results, run / "results.md")
    report = write_report(results, run, run / "report")
    clock["report"] = time.perf_counter() - start
    results["timings"]["wall_seconds_this_invocation"] = {k: round(v, 2) for k, v in clock.items()}
    results["timings"]["wall_seconds_total_this_invocation"] = round(time.perf_counter() - wall, 2)
    results["report"] = str(report)
    for folder in (run, run / "report"):
        write_json(folder / "results.json", results)
        write_markdown(results, folder / "results.md")
    _log_timings(results)
    return results


def _stopped(run: Path, until: str) -> dict[str, Any]:
    logger.info("[bench] stopped after the %s stage, as asked; run the same command without --until (on any "
                "machine, with %s copied there) to go on.", until, run)
    return {"stopped_after": until, "run": str(run)}


def _log_timings(results: dict[str, Any]) -> None:
    t = results["timings"]
    parts = [f"{name} {v['seconds']:.1f}s" + (" (earlier run)" if v.get("resumed") else "")
             for name, v in t["stages"].items()]
    logger.info("stage timings (summed over subjects): %s", ", ".join(parts))
    wall = t.get("wall_seconds_this_invocation", {})
    logger.info("wall time of this invocation: %s; total %.1fs", ", ".join(f"{k} {v:.1f}s" for k, v in wall.items()),
                t.get("wall_seconds_total_this_invocation", float("nan")))
