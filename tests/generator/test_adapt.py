"""`liftavatar adapt`: per-subject adaptation of a prior on a tiny capture (tiny random priors, CPU, a few seconds)."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from liftavatar.capture import Capture
from liftavatar.cli import main
from liftavatar.errors import ConfigError
from liftavatar.generator import adapt as adapt_module
from liftavatar.generator.adapt import ADAPT_FILE, AdaptConfig, adapt, split_frames
from liftavatar.generator.pipeline import LiftAvatarPipeline
from liftavatar.generator.prior import PriorConfig
from liftavatar.generator.transformer import LiftAvatarTransformer
from liftavatar.synth.world import SynthSpec, synthesize

from ..conftest import tiny_prior

SIZE = 32
FRAMES = 2  # the tiny prior's window: clips of 2 frames


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """A tiny random prior (32², windows of 2) and 32 frames of a test subject at 32²."""
    root = tmp_path_factory.mktemp("adapt")
    prior = tiny_prior(root / "prior", frames=FRAMES)
    capture = synthesize(SynthSpec(seed=7411, preset="sparse", frames=32, size=SIZE), root / "capture", progress=False)
    return prior, capture


def _config(**kw) -> AdaptConfig:
    base = dict(mode="full", refs=2, val_clips=2, steps=6, val_every=2, patience=10, lr=1e-3, batch_size=2,
                save_every=100)
    return AdaptConfig(**{**base, **kw})


def _weights(prior) -> dict[str, torch.Tensor]:
    return load_file(str(prior / "model.safetensors"))


def _record(prior) -> dict:
    return json.loads((prior / ADAPT_FILE).read_text())


def test_split_holds_out_blocks_with_guard_bands_away_from_the_references():
    usable = np.ones(60, bool)
    usable[30] = False  # a frame the tracker lost
    split = split_frames(usable, frames=4, val_clips=4, avoid=[10])
    assert len(split.val_starts) == 4 and len(split.blocks) == 2 and split.guard == 2
    held = np.zeros(60, bool)
    for s, e in split.blocks:
        assert usable[s:e].all() and not s <= 10 < e  # whole valid blocks, no reference inside
        held[max(0, s - split.guard):e + split.guard] = True
    for s in split.val_starts:
        assert any(b <= s and s + 4 <= e for b, e in split.blocks)
    for s in split.train_starts:  # training windows are valid and never touch a block or its guard band
        assert usable[s:s + 4].all() and not held[s:s + 4].any()
    assert split.train_frames >= 16


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_adaptation_lowers_the_validation_loss_and_writes_a_prior_like_any_other(subject, tmp_path, mode, capsys):
    prior, capture = subject
    out = tmp_path / "adapted"
    assert main(["adapt", str(capture.path), "-o", str(out), "--prior", str(prior), "--mode", mode, "--refs", "2",
                 "--val-clips", "2", "--steps", "6", "--val-every", "2", "--lr", "1e-3"]) == 0
    assert f"prior: {out}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["adapt.json", "config.json", "loss.png", "model.safetensors"]
    assert not out.with_name("adapted.partial").exists()
    record = _record(out)
    assert record["best_val"] < record["val_before"] and record["best_step"] > 0
    assert [h["val_loss"] is not None for h in record["history"]] == [True, False, True, False, True, False, True]
    source, adapted = _weights(prior), _weights(out)
    assert source.keys() == adapted.keys()  # LoRA merged: a full prior of the same layout
    assert any(not torch.equal(source[k], adapted[k]) for k in source)
    pipe = LiftAvatarPipeline.from_pretrained(PriorConfig(prior=out))
    assert not pipe.model.uses_lora and pipe.size == SIZE and pipe.window == FRAMES
    extra = pipe.model.config.extra
    assert extra["codec"] == {"kind": "pixel", "factor": 2, "vae_path": None}
    assert extra["adaptation"]["mode"] == mode and extra["adaptation"]["subject"] == capture.meta.subject
    assert extra["adaptation"]["best_val"] == record["best_val"]


def test_the_prior_holds_the_best_weights_and_early_stopping_ends_the_run(subject, tmp_path):
    """A learning rate far too high: the validation loss improves, then worsens; the run stops after `patience`
    evaluations without a new best and writes the weights of the best step, which a run that ends there writes too."""
    prior, capture = subject
    config = _config(lr=0.01, steps=12, val_every=1, patience=2)
    first = adapt(capture.path, tmp_path / "first", config, prior, progress=False)
    record = _record(first)
    assert record["stopped"] == "early stopping"
    best = record["best_step"]
    assert 0 < best < record["steps"] == best + 2
    there = adapt(capture.path, tmp_path / "there", replace(config, steps=best), prior, progress=False)
    assert _record(there)["best_step"] == best
    a, b = _weights(first), _weights(there)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_and_a_finished_run_returns_at_once(subject, tmp_path):
    prior, capture = subject
    config = _config(mode="lora", steps=6)
    straight = adapt(capture.path, tmp_path / "straight", config, prior, progress=False)
    out = tmp_path / "split"
    assert adapt(capture.path, out, replace(config, stop_after=3), prior, progress=False) is None
    assert not out.exists() and (tmp_path / "split.partial" / "checkpoints" / "step_00000003").is_dir()
    assert adapt(capture.path, out, config, prior, progress=False) == out
    a, b = _weights(straight), _weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _record(straight)["history"] == _record(out)["history"]
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert adapt(capture.path, out, config, prior, progress=False) == out  # finished: nothing is redone
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_an_interrupted_adaptation_resumes_where_it_stopped(subject, tmp_path, monkeypatch, capsys):
    """SIGINT during the third step: the step ends, a checkpoint is written and the command exits 130; the same
    command continues it to the weights of an uninterrupted run."""
    prior, capture = subject
    straight = adapt(capture.path, tmp_path / "straight", _config(), prior, progress=False)
    real, calls = adapt_module.velocity_loss, []

    def interrupting(*args, **kw):
        if torch.is_grad_enabled():  # a training step, not a validation
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kw)

    monkeypatch.setattr(adapt_module, "velocity_loss", interrupting)
    argv = ["adapt", str(capture.path), "-o", str(tmp_path / "out"), "--prior", str(prior), "--mode", "full",
            "--refs", "2", "--val-clips", "2", "--steps", "6", "--val-every", "2", "--lr", "1e-3"]
    assert main(argv) == 130
    assert [p.name for p in (tmp_path / "out.partial" / "checkpoints").iterdir()] == ["step_00000003"]
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(adapt_module, "velocity_loss", real)
    assert main(argv) == 0
    a, b = _weights(straight), _weights(tmp_path / "out")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_capture_of_another_size_adapts_at_the_priors_size(subject, tmp_path):
    prior, _ = subject
    big = synthesize(SynthSpec(seed=7411, preset="sparse", frames=24, size=2 * SIZE), tmp_path / "big", progress=False)
    out = adapt(big.path, tmp_path / "adapted", _config(steps=2), prior, progress=False)
    record = _record(out)
    assert record["config"]["size"] == SIZE and record["best_val"] <= record["val_before"]


def _adapt_argv(capture, out, prior, *more):
    return ["adapt", str(capture), "-o", str(out), "--prior", str(prior), "--refs", "2", "--val-clips", "2",
            "--steps", "4", *more]


def test_too_few_valid_frames_are_refused_with_the_counts(subject, tmp_path, capsys):
    prior, _ = subject
    short = synthesize(SynthSpec(seed=7411, preset="sparse", frames=8, size=SIZE), tmp_path / "short", progress=False)
    assert main(_adapt_argv(short.path, tmp_path / "out", prior)) == 2
    err = capsys.readouterr().err
    assert "8 valid frames" in err and "needs at least 10" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_a_prior_whose_codec_or_controls_do_not_fit_is_refused(subject, tmp_path, capsys):
    _, capture = subject
    LiftAvatarTransformer.from_preset("tiny", 43, in_channels=12, out_channels=12).save_pretrained(
        tmp_path / "codec", extra={"codec": {"kind": "pixel", "factor": 4, "vae_path": None}, "frames": 2, "size": 32})
    LiftAvatarTransformer.from_preset("tiny", 40, in_channels=12, out_channels=12).save_pretrained(
        tmp_path / "controls", extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None}, "frames": 2})
    for name, needle in (("codec", "48 latent channels, its transformer takes 12"),
                         ("controls", "37 expression coefficients (43 controls a frame)")):
        assert main(_adapt_argv(capture.path, tmp_path / "out", tmp_path / name)) == 2
        err = capsys.readouterr().err
        assert needle in err and str(tmp_path / name) in err, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_other_settings_or_inputs_are_refused_until_force(subject, tmp_path, capsys):
    prior, capture = subject
    out = tmp_path / "out"
    assert main(_adapt_argv(capture.path, out, prior, "--stop-after", "1")) == 0  # paused, checkpointed
    assert main(_adapt_argv(capture.path, out, prior, "--lr", "3e-4")) == 2
    err = capsys.readouterr().err
    assert "interrupted adaptation of other inputs (settings.lr differs)" in err and "--force" in err
    other = tiny_prior(tmp_path / "other_prior", seed=1, frames=FRAMES)
    assert main(_adapt_argv(capture.path, out, other)) == 2
    assert "prior.prior differs" in capsys.readouterr().err
    assert main(_adapt_argv(capture.path, out, prior, "--lr", "3e-4", "--force")) == 0  # starts over, finishes
    assert _record(out)["config"]["lr"] == 3e-4
    assert main(_adapt_argv(capture.path, out, prior)) == 2  # a finished prior of other settings
    assert "holds a prior adapted from other inputs (settings.lr differs)" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--val-every 0"):
        adapt(capture.path, tmp_path / "x", _config(val_every=0), prior, progress=False)


def test_an_output_that_holds_something_else_is_never_replaced(subject, tmp_path, capsys):
    prior, capture = subject
    for target in (prior, tmp_path / "notes"):
        target.mkdir(exist_ok=True)
        (target / "keep.txt").write_text("mine")
        assert main(_adapt_argv(capture.path, target, prior, "--force")) == 2
        assert "is not a prior written by `liftavatar adapt`" in capsys.readouterr().err
        assert (target / "keep.txt").read_text() == "mine"
        (target / "keep.txt").unlink()


def test_lift_adapt_adapts_first_and_lifts_with_the_adapted_prior(tmp_path, capsys):
    """`lift --adapt` through the command line: the prior is adapted into OUT_prior (with lift's references), the
    lifted frames come from it, and the report and the capture name it."""
    prior = tiny_prior(tmp_path / "prior", frames=FRAMES)
    capture = synthesize(SynthSpec(seed=7412, preset="sparse", frames=40, size=SIZE), tmp_path / "capture",
                         progress=False)
    common = ["lift", str(capture.path), "--prior", str(prior), "--num-expressions", "1", "--refs", "2", "--steps",
              "1"]
    assert main([*common, "-o", str(tmp_path / "lifted"), "--adapt"]) == 0
    adapted = tmp_path / "lifted_prior"
    record = _record(adapted)
    assert record["refs"] == 2 and record["best_val"] < record["val_before"]
    assert len(record["split"]["val_clips"]) == 40 // (4 * FRAMES)  # a short capture: a quarter of it held out
    out = Capture.load(tmp_path / "lifted")
    report = json.loads((out.path / "lift_report.json").read_text())
    assert report["adapted_prior"] == str(adapted) == report["prior"]
    assert out.meta.creator["config"]["prior"] == str(adapted)
    assert out.meta.reference_indices == record["reference_indices"]
    assert main([*common, "-o", str(tmp_path / "plain")]) == 0
    n0 = capture.num_frames
    assert not np.array_equal(out.frames(range(n0, out.num_frames)),
                              Capture.load(tmp_path / "plain").frames(range(n0, out.num_frames)))


def test_frames_are_decoded_once_however_many_steps(subject, tmp_path, monkeypatch):
    """Every image the run uses is read at its start: a longer run reads no more PNGs."""
    prior, capture = subject
    reads = []
    real = Capture._read
    monkeypatch.setattr(Capture, "_read", lambda self, folder, i: reads.append((folder, i)) or real(self, folder, i))
    counts = []
    for steps in (1, 6):
        reads.clear()
        adapt(capture.path, tmp_path / f"steps{steps}", _config(steps=steps), prior, progress=False)
        counts.append(len(reads))
    assert counts[0] == counts[1] <= 2 * (capture.num_frames + 2)  # frames and shading maps, the references again
    assert {folder for folder, _ in reads} == {"frames", "shading"}  # masks are not used


def test_a_lora_prior_of_a_wan_base_keeps_its_base_or_is_merged(subject, tmp_path):
    """LoRA mode continues the adapter of a LoRA prior and saves a LoRA prior of the same base (the base is not
    copied); full mode merges it and saves a full prior."""
    from diffusers import WanTransformer3DModel

    from liftavatar.generator.transformer import ADAPTER_NAME, BASE_PRESETS, WEIGHTS_NAME

    _, capture = subject
    WanTransformer3DModel(**{**BASE_PRESETS["tiny"], "in_channels": 12, "out_channels": 12}).save_pretrained(
        tmp_path / "base")
    model = LiftAvatarTransformer.from_base(tmp_path / "base", 43)
    model.add_lora(rank=4)
    model.save_pretrained(tmp_path / "lora", extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None},
                                                    "frames": FRAMES, "size": SIZE})
    lora = adapt(capture.path, tmp_path / "as_lora", _config(mode="lora", steps=2), tmp_path / "lora", progress=False)
    assert (lora / ADAPTER_NAME).is_file() and not (lora / WEIGHTS_NAME).exists()
    loaded = LiftAvatarTransformer.from_pretrained(lora)
    assert loaded.uses_lora and loaded.config.lora["r"] == 4
    assert loaded.config.base_path == str((tmp_path / "base").resolve())
    full = adapt(capture.path, tmp_path / "as_full", _config(mode="full", steps=2), tmp_path / "lora", progress=False)
    assert (full / WEIGHTS_NAME).is_file() and not LiftAvatarTransformer.from_pretrained(full).uses_lora


def test_device_defaults_fill_only_what_is_left_unset():
    cpu, cuda = AdaptConfig(device="cpu").resolved(), AdaptConfig(device="cuda:1").resolved()
    assert (cpu.mixed_precision, cpu.save_every, cpu.steps) == ("no", 8, 16)
    assert (cuda.mixed_precision, cuda.save_every, cuda.steps) == ("bf16", 100, 400)
    mine = AdaptConfig(device="cuda", mixed_precision="no", save_every=5, steps=3).resolved()
    assert (mine.mixed_precision, mine.save_every, mine.steps) == ("no", 5, 3)
    with pytest.raises(ConfigError, match="--save-every 0"):
        adapt_module._check_config(AdaptConfig(save_every=0))
