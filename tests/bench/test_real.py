"""The benchmark on real clips: the split by kinematics on constructed kinematics (guard bands, disjointness,
shares), the clips a run records, and `bench --quick --videos` end to end on a synthetic clip treated as real."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from liftavatar.bench import quick_config
from liftavatar.bench.config import BenchError
from liftavatar.bench.real import check_split, clip_entries, min_valid_frames, split_frames
from liftavatar.capture import Kinematics
from liftavatar.errors import ConfigError

E = 6


def kinematics(expression: np.ndarray, rotation: np.ndarray | None = None,
               valid: np.ndarray | None = None) -> Kinematics:
    n = len(expression)
    return Kinematics(expression=expression.astype(np.float32),
                      rotation=(np.zeros((n, 3)) if rotation is None else rotation).astype(np.float32),
                      translation=np.zeros((n, 3), np.float32),
                      valid=np.ones(n, bool) if valid is None else valid, provenance=np.zeros(n, np.uint8),
                      identity=np.zeros(4, np.float32))


def talking(n: int, seed: int = 0) -> np.ndarray:
    """(n, E) small expression coefficients: a clip's typical range."""
    return np.random.default_rng(seed).normal(0.1, 0.02, (n, E)).clip(0, 1)


def check_invariants(split, valid: np.ndarray, guard: int = 3, every: int = 5, block: int = 8) -> None:
    extreme, seen, train = (set(map(int, a)) for a in (split.extreme, split.seen, split.train))
    assert not (extreme & seen) and not (extreme & train) and not (seen & train), "a frame in two splits"
    assert all(valid[f] for f in extreme | seen | train), "an invalid frame in a split"
    for test, later in ((extreme, seen | train), (seen, train)):
        for f in later:
            near = [t for t in test if abs(t - f) <= guard]
            assert not near, f"frame {f} is within the ±{guard} guard band of test frame(s) {near}"
    assert all((f // block) % every == every - 1 for f in seen), "a seen-test frame outside every 5th block of 8"
    assert len(extreme) == max(1, round(0.15 * valid.sum()))
    # Nothing is dropped but guard bands: every valid frame is in a split or guards a test frame.
    for f in np.flatnonzero(valid):
        if f not in extreme | seen | train:
            assert any(abs(t - f) <= guard for t in extreme | seen), f"valid frame {f} dropped without a reason"
    for name in ("extreme", "seen", "train"):
        a = getattr(split, name)
        assert np.all(np.diff(a) > 0), f"{name} not sorted"


def test_the_extreme_test_is_the_clip_s_rarest_frames_with_guard_bands():
    n = 200
    expression = talking(n)
    expression[100:130, :3] = 0.9  # a 30-frame scream (mouth, brows, eyes): 15 % of the clip
    split = split_frames(kinematics(expression))
    assert split.extreme.tolist() == list(range(100, 130))
    assert split.threshold == pytest.approx(split.distance[100:130].min())
    check_invariants(split, np.ones(n, bool))
    # The guard band: 3 frames each side of the burst reach no split.
    for f in (97, 98, 99, 130, 131, 132):
        assert f not in split.seen and f not in split.train
    assert 96 in split.train and 133 in split.train
    # The seen test: blocks 4, 9, 14, 19, 24 (frames 32–39, 72–79, …), but block 14 (112–119) is extreme.
    seen = [*range(32, 40), *range(72, 80), *range(152, 160), *range(192, 200)]
    assert split.seen.tolist() == seen
    rest = n - 30 - 6
    assert len(seen) / rest == pytest.approx(0.195, abs=0.001)  # about 20 % of the remaining frames
    # Train: the rest, less 3 frames each side of every seen block (the clip ends after the last).
    assert 28 in split.train and 29 not in split.train and 42 not in split.train and 43 in split.train
    assert len(split.train) == rest - len(seen) - 3 * 7


def test_a_head_turn_is_extreme_too_and_units_do_not_matter():
    """Expression and rotation are standardised: a turn counts as much as an expression, and rescaling one column
    (radians to degrees) does not change the split."""
    n = 160
    rotation = np.random.default_rng(1).normal(0, 0.02, (n, 3))
    rotation[40:64] = (0.2, 0.6, 0.1)  # a 24-frame head turn with a tilt, 15 % of the clip
    split = split_frames(kinematics(talking(n), rotation))
    assert split.extreme.tolist() == list(range(40, 64))
    degrees = rotation.copy()
    degrees[:, 1] = np.degrees(degrees[:, 1])  # one column rescaled
    again = split_frames(kinematics(talking(n), degrees))
    for name in ("extreme", "seen", "train"):
        assert np.array_equal(getattr(split, name), getattr(again, name)), name


@pytest.mark.parametrize("seed", range(6))
def test_split_invariants_hold_on_random_clips_with_gaps(seed):
    """Random kinematics and random stretches without a face: blocks stay on frame numbers (a gap does not shift
    them), no frame is in two splits, guard bands hold, shares are the protocol's."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(90, 400))
    valid = np.ones(n, bool)
    for _ in range(int(rng.integers(0, 4))):
        start = int(rng.integers(0, n))
        valid[start:start + int(rng.integers(1, 30))] = False
    expression = talking(n, seed)
    for _ in range(3):  # a few bursts of strong expressions
        start = int(rng.integers(0, n - 10))
        expression[start:start + int(rng.integers(3, 20)), int(rng.integers(0, E))] = rng.uniform(0.5, 1.0)
    split = split_frames(kinematics(expression, valid=valid))
    check_invariants(split, valid)
    assert np.all(np.isnan(split.distance[~valid])) and np.all(np.isfinite(split.distance[valid]))
    assert split.distance[split.extreme].min() >= np.nanmax(np.delete(split.distance, split.extreme))


def test_too_few_valid_frames_are_refused_with_the_counts():
    cfg = quick_config()
    need = min_valid_frames(cfg)
    assert need == 80
    valid = np.zeros(100, bool)
    valid[:need - 1] = True
    split = split_frames(kinematics(talking(100), valid=valid))
    with pytest.raises(BenchError, match=f"in only {need - 1} of its 100 frames .* needs at least {need}"):
        check_split("clip.mp4", split, int(valid.sum()), 100, cfg)
    empty = split_frames(kinematics(talking(5), valid=np.zeros(5, bool)))
    assert empty.counts() == {"extreme": 0, "seen": 0, "train": 0} and empty.threshold is None
    with pytest.raises(BenchError, match="only 0 of its 5 frames"):
        check_split("clip.mp4", empty, 0, 5, cfg)
    valid[:] = True
    check_split("clip.mp4", split_frames(kinematics(talking(100), valid=valid)), 100, 100, cfg)


def synthetic_clip(path: Path, frames: int, size: int = 128, seed: int = 7420) -> Path:
    """A phone-style clip of a synthetic subject (talking range, then a few strong expressions), written as H.264:
    a real clip as far as the benchmark knows."""
    from liftavatar.synth.world import SynthSpec, synthesize
    from liftavatar.video import write_video

    sparse = synthesize(SynthSpec(seed=seed, preset="sparse", frames=frames - frames // 6, size=size),
                        path.parent / f".{path.stem}_sparse", progress=False)
    extreme = synthesize(SynthSpec(seed=seed, preset="extreme", frames=frames // 6, size=size),
                         path.parent / f".{path.stem}_extreme", progress=False)
    write_video(path, np.concatenate([sparse.frames(), extreme.frames()]), 25.0)
    return path


def test_clips_are_recorded_by_name_path_and_content(tmp_path):
    from liftavatar.bench.runner import check_run_dir
    from liftavatar.fingerprint import file_digest

    cfg = quick_config()
    clip = synthetic_clip(tmp_path / "me.mp4", 84, size=64)
    (entry,) = clip_entries([clip], cfg)
    assert entry == {"name": "me", "path": str(clip.resolve()), "sha256": file_digest(clip)}
    real = quick_config(clips=(entry,))
    assert real.real and [s.name for s in real.subject_list()] == ["me"] and real.subject_seeds() == []
    assert real.subject("me").clip == str(clip.resolve()) and real.subject_stages()[0] == "track"
    with pytest.raises(ConfigError, match="s5400: not a subject of this run"):
        real.subject("s5400")

    run = tmp_path / "run"
    check_run_dir(run, real, force=False)
    # The same clip moved elsewhere resumes; another clip under the same name is refused.
    moved = tmp_path / "elsewhere" / "me.mp4"
    moved.parent.mkdir()
    moved.write_bytes(clip.read_bytes())
    check_run_dir(run, quick_config(clips=clip_entries([moved], cfg)), force=False)
    other = synthetic_clip(tmp_path / "other" / "me.mp4", 84, size=64, seed=7421)
    with pytest.raises(BenchError, match="clips differ"):
        check_run_dir(run, quick_config(clips=clip_entries([other], cfg)), force=False)
    # A machine without the clip (lift and avatars of a carried run) keeps the hash the run folder stored.
    (absent,) = clip_entries([tmp_path / "not_here" / "me.mp4"], cfg, run=run)
    assert absent["sha256"] == entry["sha256"]
    with pytest.raises(Exception, match="no such file"):
        clip_entries([tmp_path / "not_here" / "me.mp4"], cfg)
    # Too short for the split is refused before any stage runs; two clips of one name too.
    short = synthetic_clip(tmp_path / "short.mp4", 40, size=64)
    with pytest.raises(BenchError, match="has 40 frames .* needs at least 80"):
        clip_entries([short], cfg)
    with pytest.raises(BenchError, match="several clips are named me"):
        clip_entries([clip, moved], cfg)
    with pytest.raises(ConfigError, match="no true kinematics"):
        quick_config(clips=(entry,), kinematics="truth").check()


def test_real_runs_refuse_synthetic_only_stages(tmp_path):
    from liftavatar.bench import run_bench

    cfg = quick_config(clips=({"name": "me", "path": str(tmp_path / "me.mp4"), "sha256": "0"},))
    for stage in ("synth", "video"):
        with pytest.raises(ConfigError, match=f"--until {stage}: a run on real clips has no {stage} stage"):
            run_bench(cfg, tmp_path / "run", until=stage)
    assert not (tmp_path / "run").exists()


def _bench_split():
    """benchmarks/bench_split.py, the script that carries a run between machines, as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_split.py"
    spec = importlib.util.spec_from_file_location("bench_split", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_real_bench_end_to_end(tmp_path, capsys):
    """`bench --quick --videos CLIP` on a synthetic clip treated as real (84 frames; 1 lifted expression, 30 avatar
    iterations), split across two "machines" with benchmarks/bench_split.py as a real run would be: the data stages
    here, lift and avatars in a folder holding only what they read and no clip (the clip is not on that machine),
    evaluation and report back here. The split is the protocol's; the tables and report have no oracle; the
    headline shows the next issue's bounds as criteria; a rerun resumes; another clip under the same name is refused."""
    from liftavatar.bench.layout import avatar_stage_inputs
    from liftavatar.bench.summary import METRICS, REAL_CRITERIA, SPLITS
    from liftavatar.capture import Capture
    from liftavatar.cli import main
    from tests.test_report_html import check_self_contained

    clip = synthetic_clip(tmp_path / "clips" / "me_talking.mp4", 84)
    out, gpu = tmp_path / "run", tmp_path / "gpu"
    tiny = ["--curve", "0", "1", "--lifted", "1", "--iters", "30"]
    bench = ["bench", "--quick", *tiny]
    assert main([*bench, "--videos", str(clip), "-o", str(out), "--until", "refs", "--only", "me_talking"]) == 0
    logged = capsys.readouterr().err
    sdir = out / "subjects" / "me_talking"
    assert "[me_talking] refs: " in logged and "synth" not in logged and "[me_talking] lift" not in logged

    # The split: the protocol's function on the tracked clip, written as three disjoint captures.
    tracked = Capture.load(sdir / "tracked")
    expected = split_frames(tracked.kinematics)
    check_invariants(expected, tracked.kinematics.valid)
    record = json.loads((sdir / "split.json").read_text())
    for name, split in (("train", "train"), ("test_seen", "seen"), ("test_extreme", "extreme")):
        capture = Capture.load(sdir / name)
        frames = capture.meta.creator["config"]["recording_frames"]
        assert frames == getattr(expected, split).tolist(), name
        assert record[name]["frames"] == len(frames) > 0 and record[name]["segment"] == split
        assert np.array_equal(capture.frame(0), tracked.frame(frames[0]))
    assert Capture.load(sdir / "train").meta.reference_indices is not None

    # Lift and avatars where the clip is not: the packed config names it, the path does not exist there.
    split_script = _bench_split()
    split_script.pack(out, "me_talking", gpu)
    assert {f.parts[2] for f in avatar_stage_inputs(gpu, "me_talking") if len(f.parts) > 3} == {
        "train", "test_seen", "test_extreme"}
    absent = tmp_path / "elsewhere" / "me_talking.mp4"
    assert main([*bench, "--videos", str(absent), "-o", str(gpu), "--until", "avatars", "--only", "me_talking"]) == 0
    capsys.readouterr()
    split_script.unpack(gpu, "me_talking", out)

    assert main([*bench, "--videos", str(clip), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    report = out / "report" / "index.html"
    assert captured.out.strip().splitlines()[-1] == f"report: {report.resolve()}"
    assert "[me_talking] lift: complete, skipped" in captured.err

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["clips"][0]["name"] == "me_talking"
    assert list(results["machines"]) == ["track", "split", "refs", "lift", "avatars", "eval", "report"]
    assert "oracle" not in results["methods"] and "oracle appearance" not in results["timings"]["stages"]
    subject = results["subjects"][0]
    assert subject["name"] == "me_talking" and subject["seed"] is None and subject["clip"] == str(clip.resolve())
    assert "oracle" not in subject and not (sdir / "oracle").exists()
    for split in SPLITS:
        for key in METRICS:
            row = results["tables"][split][key]
            assert "oracle" not in row, (split, key)
            if key in ("lpips", "fid") and not row["available"]:
                continue
            assert row["available"] and row["baseline"]["mean"] is not None and row["lifted"]["mean"] is not None
    h = results["headline"]
    assert h["criteria"] == REAL_CRITERIA and not h["assessed"] and not h["passed"]
    assert "shown as criteria, not claimed" in h["sentence"] and "real clip" in h["sentence"]
    assert "extreme_aed_oracle" not in h or h["extreme_aed_oracle"] is None

    md = (out / "results.md").read_text()
    page = report.read_text()
    for text in (md, page):
        assert "oracle appearance" not in text.lower().replace("no oracle appearance", "")
        assert "me_talking" in text and "rarest expressions and poses" in text
    assert "| PSNR (dB) | higher |" in md and md.count("| --- | --- | --- | --- | --- |\n") >= 2
    assert "bound (next issue)" in page and "not claim" in page
    check_self_contained(report)
    for name in ("grid_me_talking_extreme.png", "grid_me_talking_seen.png", "video_me_talking_extreme.mp4",
                 "video_me_talking_seen.mp4", "lifted_me_talking.png", "curve.png"):
        assert (report.parent / name).stat().st_size > 0, name
    from PIL import Image

    grid = np.asarray(Image.open(report.parent / "grid_me_talking_extreme.png"))
    assert grid.shape[0] == 3 * (2 * 128 + 18 + 2)  # ground truth, baseline, lifted (frame, caption, pad): no oracle

    # Resume with the clip moved: nothing recomputed; another clip under the same name: refused, nothing touched.
    moved = tmp_path / "moved" / "me_talking.mp4"
    moved.parent.mkdir()
    moved.write_bytes(clip.read_bytes())
    assert main([*bench, "--videos", str(moved), "-o", str(out)]) == 0
    assert "[me_talking] track: complete, skipped" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["tables"] == results["tables"]
    other = synthetic_clip(tmp_path / "other" / "me_talking.mp4", 84, seed=7421)
    before = (out / "config.json").read_bytes()
    assert main([*bench, "--videos", str(other), "-o", str(out)]) == 2
    assert "me_talking had other contents" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == before
