"""`liftavatar bench`: the protocol's pieces, and `bench --quick` end to end (results complete, report
self-contained, runs resume)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from liftavatar.bench import BenchConfig, demo_config, full_config, quick_config, run_bench
from liftavatar.bench.config import BenchError
from liftavatar.bench.stages import subset_capture
from liftavatar.bench.summary import METRICS, SPLITS, headline, plateau_sentence
from liftavatar.capture import Capture
from liftavatar.cli import main
from liftavatar.errors import ConfigError


def test_configs_follow_the_protocol():
    full = full_config()
    assert full.subject_seeds() == [5400, 5401, 5402] and full.size == 128
    assert full.points() == [0, 25, 50, 100, 200] and full.lifted == 100
    assert all(5400 <= s < 5500 for s in full_config(subjects=100).subject_seeds())
    demo = demo_config()
    assert demo.subject_seeds() == [900001] and demo.points()[0] == 0 and len(demo.points()) == 2
    quick = quick_config()
    assert quick.subject_seeds() == [5400] and quick.points() == [0, 1, 2]
    assert BenchConfig(curve=(0, 50), lifted=100).points() == [0, 50, 100]  # the lifted method is always trained
    with pytest.raises(ConfigError, match="--observed-share"):
        quick_config(observed_share=1.0).check()
    with pytest.raises(ConfigError, match="--subjects 0"):
        quick_config(subjects=0).check()
    # settings that only change where and how fast a run goes may differ on resume
    assert full_config(device="cuda", workers=4).protocol() == full.protocol()
    assert full_config(avatar_iters=10).protocol() != full.protocol()
    assert full.track_appearance and full_config(track_appearance=False).protocol() != full.protocol()
    assert full.kinematics == "tracked" and full_config(kinematics="truth").protocol() != full.protocol()
    with pytest.raises(ConfigError, match="--kinematics"):
        quick_config(kinematics="perfect").check()


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_the_bench_trains_avatars_with_the_library_recipe():
    """One home for the avatar recipe: the bench's settings default to the avatar trainer's, and the trainer's
    config of every avatar carries them."""
    from dataclasses import asdict

    from liftavatar.avatar.train import TrainConfig
    from liftavatar.bench.jobs import avatar_config

    library = TrainConfig()
    recipe = ("lifted_weight", "observed_share", "observed_finish")
    for cfg in (full_config(), quick_config(), demo_config()):
        assert {k: getattr(cfg, k) for k in recipe} == {k: getattr(library, k) for k in recipe}
        trainer = avatar_config(cfg, progress=False)
        assert {k: getattr(trainer, k) for k in recipe} == {k: getattr(library, k) for k in recipe}
        assert trainer.iters == cfg.avatar_iters and trainer.size == cfg.size and trainer.seed == cfg.avatar_seed
    # what the committed headline ran with
    committed = json.loads((RESULTS / "bench.json").read_text())["config"]
    assert {k: committed[k] for k in recipe} == {k: v for k, v in asdict(library).items() if k in recipe}


def test_a_run_folder_of_an_earlier_version_resumes(tmp_path):
    """A run folder whose config.json an earlier version wrote (the earlier headline's, and one from before
    observed_finish existed) is not refused as made with its own settings, and is refused with today's defaults where
    they differ."""
    from liftavatar.bench.config import config_from_json
    from liftavatar.bench.runner import check_run_dir

    stored = json.loads((RESULTS / "bench_rig_library.json").read_text())["config"]  # the headline before issue 20
    run = tmp_path / "headline"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"liftavatar_version": "0.1.0", "config": stored}))
    then = dict(deform_width=0, lift_library="rig", lift_poses="wide")
    check_run_dir(run, full_config(curve=tuple(stored["curve"]), **then, device="cuda", workers=4), force=False)
    # its avatars did not deform and it lifted from the rig's presets: today's defaults would mix
    with pytest.raises(BenchError, match="deform_width"):
        check_run_dir(run, full_config(curve=tuple(stored["curve"]), device="cuda", workers=4), force=False)
    with pytest.raises(BenchError, match=r"\(lift_library, lift_poses differ\)"):
        check_run_dir(run, full_config(curve=tuple(stored["curve"]), deform_width=0, device="cuda", workers=4),
                      force=False)

    older = json.loads((RESULTS / "bench_run1_no_finish.json").read_text())["config"]
    assert "observed_finish" not in older and config_from_json(older).observed_finish == 0.0
    run = tmp_path / "older"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": older}))
    check_run_dir(run, full_config(observed_finish=0.0, deform_width=0, lift_library="rig", lift_poses="wide",
                                   track_appearance=True, workers=2), force=False)
    with pytest.raises(BenchError, match="observed_finish"):
        check_run_dir(run, full_config(), force=False)


def test_an_avatar_started_before_observed_share_resumes_on_its_captures(tmp_path):
    """Its stored recipe has no observed_share (the trainer reads 0), so it resumes on the lifted capture and the
    train capture again, as it started."""
    from liftavatar.bench.jobs import avatar_capture, legacy_captures
    from liftavatar.bench.layout import subject_dir

    cfg = full_config(curve=(0, 25, 100))
    sdir = subject_dir(tmp_path, "s5400")
    sdir.mkdir(parents=True)
    (sdir / "lift.json").write_text(json.dumps({"observed_frames": 300, "window": 8}))
    assert avatar_capture(cfg, tmp_path, "s5400", 25) == sdir / "lifted_k025"
    assert avatar_capture(cfg, tmp_path, "s5400", 100) == sdir / "lifted"
    assert legacy_captures(cfg, tmp_path, "s5400", 100) == [sdir / "lifted"] + [sdir / "train"] * 7  # 8 repeats
    assert legacy_captures(cfg, tmp_path, "s5400", 0) == [sdir / "train"]


def test_track_stage_passes_the_appearance_setting(tmp_path, monkeypatch):
    """The run's tracker settings reach `track`: the appearance switch, the synthetic world's camera for a synthetic
    recording, `track`'s default camera for a real clip (the clip itself is tracked)."""
    import liftavatar.face.track as track_module
    from liftavatar.bench.config import Subject
    from liftavatar.bench.stages import track_stage
    from liftavatar.face.track import TrackConfig
    from liftavatar.synth.world import DEFAULT_FOV_DEG

    seen = []

    def fake_track(video, out, config, **kwargs):
        seen.append((Path(video).name, config.appearance, config.fov, config.size))
        raise RuntimeError("stop before tracking")

    monkeypatch.setattr(track_module, "track", fake_track)
    (tmp_path / "recording").mkdir()
    (tmp_path / "recording" / "recording.json").write_text(json.dumps({"video": "recording.mp4"}))
    synthetic, real = Subject("s5400", seed=5400), Subject("me", clip=str(tmp_path / "me.mp4"))
    for value in (True, False):
        with pytest.raises(RuntimeError, match="stop before tracking"):
            track_stage(quick_config(track_appearance=value), tmp_path, synthetic, progress=False)
    with pytest.raises(RuntimeError, match="stop before tracking"):
        track_stage(quick_config(), tmp_path, real, progress=False)
    assert seen == [("recording.mp4", True, DEFAULT_FOV_DEG, 128), ("recording.mp4", False, DEFAULT_FOV_DEG, 128),
                    ("me.mp4", True, TrackConfig().fov, 128)]


def _curve(means):
    points = [0, 25, 50, 100, 200]
    return {"points": points, "extreme": {"psnr": {"mean": means, "std": [0.1] * 5, "per_subject": []}}}


def test_plateau_sentence_is_written_from_the_data():
    text = plateau_sentence(_curve([25.0, 26.0, 26.6, 26.95, 27.0]))
    assert "plateaus at about 100 lifted expressions" in text and "27.00 dB with 200" in text
    text = plateau_sentence(_curve([25.0, 25.5, 26.0, 26.5, 27.5]))
    assert "has not plateaued by 200" in text
    text = plateau_sentence(_curve([25.0, 24.9, 24.8, 24.9, 24.7]))
    assert "did not improve" in text
    assert "two points" in plateau_sentence({"points": [0, 12], "extreme": {"psnr": {"mean": [25, 26], "std": [0, 0]}}})


def test_headline_checks_the_acceptance_criteria():
    def table(base, lifted):
        return {"baseline": {"mean": base}, "lifted": {"mean": lifted}, "delta": {"mean": lifted - base}}

    results = {"subjects": [{}, {}, {}], "tables": {
        "extreme": {"psnr": table(25.0, 26.2), "aed": table(0.10, 0.07)}, "seen": {"psnr": table(35.0, 34.9)}}}
    h = headline(results, full_config())
    assert h["assessed"] and h["passed"] and abs(h["extreme_aed_reduction"] - 0.3) < 1e-9
    results["tables"]["seen"]["psnr"] = table(35.0, 34.7)
    h = headline(results, full_config())
    assert not h["passed"] and not h["checks"]["seen_psnr_change_db"] and "not met" in h["sentence"]
    results["subjects"] = [{}]
    assert not headline(results, full_config())["assessed"]


def test_oracle_appearance_reproduces_the_synthetic_frames(tmp_path):
    """Driven by a synthetic capture's own kinematics (true identity, expressions, pose and camera), the oracle
    appearance is the ground truth over black; another subject's is not."""
    from liftavatar.bench.jobs import oracle_renders
    from liftavatar.bench.layout import gt_frames
    from liftavatar.metrics.image import psnr
    from liftavatar.synth.world import SynthSpec, synthesize

    capture = synthesize(SynthSpec(seed=7011, preset="extreme", frames=3, size=64), tmp_path / "synth",
                         progress=False)
    gt, _ = gt_frames(capture)
    renders = oracle_renders(7011, capture, batch=2)
    assert renders.shape == gt.shape and renders.dtype == np.uint8
    assert min(psnr(r, g) for r, g in zip(renders, gt)) > 40
    other = oracle_renders(7012, capture)  # another subject's texture on the same rig and motion
    assert max(psnr(r, g) for r, g in zip(other, gt)) < 30


def test_oracle_of_tracked_frames_is_cut_as_their_masks_are(tmp_path):
    """The same motion marked as tracked: the oracle keeps the rendered pixels inside the head region and turns the
    rest (the neck and collar below the collar line) black, as the tracker's masks do."""
    from liftavatar.bench.jobs import oracle_renders
    from liftavatar.capture import PROVENANCE_OBSERVED, Kinematics
    from liftavatar.face.masks import head_region
    from liftavatar.synth.world import SynthSpec, synthesize

    capture = synthesize(SynthSpec(seed=7011, preset="sparse", frames=2, size=64), tmp_path / "synth", progress=False)
    rendered = oracle_renders(7011, capture)
    kin = capture.kinematics
    tracked = Kinematics(**{**kin.arrays(), "identity": kin.identity,
                            "provenance": np.full(len(kin), PROVENANCE_OBSERVED, np.uint8)})
    tracked.save_npz(capture.path / "kinematics.npz")
    cut = oracle_renders(7011, Capture.load(capture.path))
    region = head_region(kin.identity, kin.expression, kin.rotation, kin.translation,
                         tuple(capture.meta.intrinsics), capture.size)
    assert np.array_equal(cut[region], rendered[region])
    assert not cut[~region].any() and rendered[~region].any()  # the collar was there, and is gone


def test_truth_kinematics_replace_the_tracker(tmp_path):
    """bench --kinematics truth: the captures carry the synthetic truth (the extreme test's kinematics are the
    extreme take's), framed like a tracked run, so the oracle appearance reproduces the test frames exactly."""
    from liftavatar.bench.jobs import oracle_renders
    from liftavatar.bench.layout import gt_frames
    from liftavatar.metrics.image import psnr

    out = tmp_path / "truth"
    cfg = quick_config(kinematics="truth")
    assert run_bench(cfg, out, until="split", progress=False)["stopped_after"] == "split"
    sdir = out / "subjects" / "s5400"
    tracked = Capture.load(sdir / "tracked")
    assert tracked.size == (cfg.size, cfg.size)
    assert tracked.kinematics.valid.sum() == cfg.train_frames + cfg.seen_frames + cfg.extreme_frames
    test, truth = Capture.load(sdir / "test_extreme"), Capture.load(sdir / "synth" / "extreme")
    assert np.array_equal(test.kinematics.expression, truth.kinematics.expression)
    assert np.array_equal(test.kinematics.identity, truth.kinematics.identity)
    gt, masks = gt_frames(test)
    assert masks.mean() > 20  # the face fills a tracked-size crop, not a corner of the frame
    assert min(psnr(r, g) for r, g in zip(oracle_renders(5400, test), gt)) > 60


def test_subset_capture_links_frames_and_validates(tmp_path):
    from liftavatar.synth.world import SynthSpec, synthesize

    source = synthesize(SynthSpec(seed=5499, preset="sparse", frames=5, size=32), tmp_path / "src", progress=False)
    sub = subset_capture(source, tmp_path / "sub", [4, 1, 2], {"why": "test"}, reference_indices=[0])
    again = Capture.load(sub.path)
    assert again.num_frames == 3 and again.meta.reference_indices == [0]
    assert np.array_equal(again.frame(0), source.frame(4)) and np.array_equal(again.mask(1), source.mask(1))
    assert np.allclose(again.kinematics.expression, source.kinematics.expression[[4, 1, 2]])
    assert os.stat(sub.path / "frames" / "000000.png").st_ino == os.stat(source.path / "frames" / "000004.png").st_ino


def test_a_run_folder_made_with_other_settings_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"config": {**quick_config().__dict__,
                                                                        "avatar_iters": 7}}))
    with pytest.raises(BenchError, match="avatar_iters"):
        run_bench(quick_config(), tmp_path / "run")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "precious.txt").write_text("x")
    with pytest.raises(BenchError, match="not a benchmark run folder"):
        run_bench(quick_config(), tmp_path / "other", force=True)
    assert (tmp_path / "other" / "precious.txt").is_file()


def test_only_runs_the_named_subjects_up_to_a_stage(tmp_path, capsys):
    cfg = quick_config(subjects=2)
    with pytest.raises(ConfigError, match="needs --until"):
        run_bench(cfg, tmp_path / "run", only=[5401])
    with pytest.raises(ConfigError, match="5499: not a subject of this run"):
        run_bench(cfg, tmp_path / "run", until="synth", only=[5499])
    assert main(["bench", "--quick", "--subjects", "2", "-o", str(tmp_path / "run"), "--only", "5401"]) == 2
    assert "--only runs part of the subjects" in capsys.readouterr().err
    assert run_bench(cfg, tmp_path / "run", until="synth", only=[5401]) == {"stopped_after": "synth",
                                                                          "run": str(tmp_path / "run")}
    subjects = sorted(p.name for p in (tmp_path / "run" / "subjects").iterdir())
    assert subjects == ["s5401"] and (tmp_path / "run" / "subjects" / "s5401" / "synth" / "sparse").is_dir()


def _copy(files, src, dst):
    import shutil

    for f in files:
        (dst / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / f, dst / f)


@pytest.mark.slow
def test_quick_bench_end_to_end(tmp_path, capsys, monkeypatch):
    """`bench --quick` (1 subject, 2 lifted expressions, 60 avatar iterations) split across two "machines" as
    benchmarks/bench_split.py runs it: data stages here, lift and avatars in another folder holding only what they
    read (a GPU machine, by name), evaluation and report back here. Results JSON complete with the machine of each
    stage, markdown, plot, self-contained HTML report with grids and videos; a second run resumes everything."""
    import liftavatar.bench.jobs as jobs
    import liftavatar.bench.stages as stages
    from liftavatar.bench.layout import avatar_stage_inputs, avatar_stage_outputs, this_machine

    out, gpu = tmp_path / "quick", tmp_path / "gpu"
    assert main(["bench", "--quick", "-o", str(out), "--until", "refs"]) == 0
    logged = capsys.readouterr().err  # the stages' progress lines are the package's log, on stderr
    sdir = out / "subjects" / "s5400"
    assert "stopped after the refs stage" in logged and "[s5400] refs: " in logged and "[s5400] lift" not in logged
    assert (sdir / "train" / "capture.json").is_file() and not (sdir / "lift.json").exists()
    assert not (out / "results.json").exists()

    inputs = avatar_stage_inputs(out, "s5400")
    assert {f.parts[2] for f in inputs if len(f.parts) > 3} == {"train", "test_seen", "test_extreme"}
    _copy(inputs, out, gpu)
    with monkeypatch.context() as m:  # the other machine, by the name its records give it
        m.setattr(stages, "this_machine", lambda device: "GPU box")
        m.setattr(jobs, "this_machine", lambda device: "GPU box")
        assert main(["bench", "--quick", "-o", str(gpu), "--until", "avatars", "--only", "5400"]) == 0
    capsys.readouterr()
    outputs = avatar_stage_outputs(gpu, "s5400")
    assert not any("lifted" in f.parts or f.suffix == ".safetensors" for f in outputs)
    _copy(outputs, gpu, out)

    assert main(["bench", "--quick", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out.strip().splitlines()
    report = out / "report" / "index.html"
    assert printed[-1] == f"report: {report.resolve()}"
    assert "stage timings" in captured.err and "[s5400] lift: complete, skipped" in captured.err

    results = json.loads((out / "results.json").read_text())
    here = this_machine("cpu")
    assert results["machines"] == {**{s: [here] for s in ("synth", "video", "track", "split", "refs")},
                                   "lift": ["GPU box"], "avatars": ["GPU box"],
                                   **{s: [here] for s in ("eval", "oracle", "report")}}
    assert results["report_machine"]["device"] == "cpu" and "machine" not in results
    md = (out / "results.md").read_text()
    assert "| lift | " in md and "| GPU box |" in md
    assert f"synth, video, track, split, refs on {here}; lift, avatars on GPU box; eval, oracle, report on {here}." in md
    assert "lift, avatars on GPU box" in report.read_text()
    results = json.loads((out / "results.json").read_text())
    for key in ("schema", "config", "machines", "report_machine", "methods", "subjects", "tables", "curve", "headline",
                "plateau", "timings", "report"):
        assert key in results, key
    assert results["config"]["lifted"] == 2 and len(results["subjects"]) == 1
    subject = results["subjects"][0]
    assert subject["seed"] == 5400 and subject["split"]["test_extreme"]["frames"] > 0
    assert [c["k"] for c in subject["lift"]["curve"]] == [0, 1, 2]
    for split in SPLITS:
        for key in METRICS:
            row = results["tables"][split][key]
            if key in ("lpips", "fid") and not row["available"]:
                assert row["reason"].startswith("not available (weights not present locally)")
                continue
            assert row["available"], (split, key)
            for method in ("baseline", "lifted", "delta"):
                assert row[method]["mean"] is not None and row[method]["std"] is not None, (split, key, method)
                assert len(row[method]["per_subject"]) == 1
        for key in ("psnr", "ssim", "aed", "csim"):
            assert None not in results["curve"][split][key]["mean"], (split, key)
        assert results["curve"]["points"] == [0, 1, 2]
    assert 10 < results["tables"]["extreme"]["psnr"]["baseline"]["mean"] < 60
    for split in SPLITS:
        for key in ("psnr", "ssim", "aed", "csim"):
            assert results["tables"][split][key]["oracle"]["mean"] is not None, (split, key)
    assert results["headline"]["extreme_aed_oracle"] == results["tables"]["extreme"]["aed"]["oracle"]["mean"]
    assert "oracle appearance" in results["headline"]["sentence"]
    h = results["headline"]
    assert h["assessed"] is False and h["extreme_psnr_gain_db"] is not None and h["sentence"]
    assert "lifted expressions" in results["plateau"] or "did not improve" in results["plateau"]
    stages = results["timings"]["stages"]
    for stage in ("synth", "video", "track", "split", "refs", "lift", "avatar training", "evaluation"):
        assert stage in stages and stages[stage]["seconds"] >= 0, stage

    from tests.test_report_html import check_self_contained

    check_self_contained(report)
    folder = report.parent
    assert (sdir / "oracle" / "renders_extreme.npz").is_file() and "oracle appearance" in report.read_text()
    for name in ("curve.png", "grid_s5400_extreme.png", "grid_s5400_seen.png", "video_s5400_extreme.mp4",
                 "video_s5400_seen.mp4", "lifted_s5400.png", "results.json", "results.md"):
        assert (folder / name).stat().st_size > 0, name
    assert "| PSNR (dB) |" in (out / "results.md").read_text()
    from liftavatar.video import probe_video

    assert probe_video(folder / "video_s5400_extreme.mp4").num_frames == subject["split"]["test_extreme"]["frames"]

    # Resume: every stage and avatar is complete, so nothing is recomputed.
    assert main(["bench", "--quick", "-o", str(out)]) == 0
    printed = capsys.readouterr().err
    for stage in ("synth", "track", "lift"):
        assert f"{stage}: complete, skipped" in printed
    again = json.loads((out / "results.json").read_text())
    assert again["tables"]["extreme"]["psnr"] == results["tables"]["extreme"]["psnr"]
    assert all(r["resumed"] for r in again["timings"]["avatars"])

    # A run folder that travelled without the earlier stages' bulky outputs (the synthetic takes, the
    # recording, the tracked and lifted captures) resumes: evaluation recomputes from the renders alone.
    import shutil

    for name in ("synth", "recording", "tracked"):
        shutil.rmtree(sdir / name)
    assert not (sdir / "lifted").exists()  # the lifted captures stayed on the other machine
    for split in ("extreme", "seen"):
        (sdir / "avatars" / "k002" / f"eval_{split}.json").unlink()
    assert main(["bench", "--quick", "-o", str(out)]) == 0
    printed = capsys.readouterr().err
    for stage in ("synth", "video", "track", "lift"):
        assert f"{stage}: complete, skipped" in printed
    travelled = json.loads((out / "results.json").read_text())
    assert travelled["tables"]["extreme"]["psnr"] == results["tables"]["extreme"]["psnr"]
    assert travelled["tables"]["seen"]["aed"] == results["tables"]["seen"]["aed"]
    assert (out / "report" / "lifted_s5400.png").stat().st_size > 0

    from tests.test_report_html import find_chromium, screenshot

    if find_chromium():
        image, errors = screenshot(report, tmp_path / "shot.png")
        assert not errors and image.std() > 20
