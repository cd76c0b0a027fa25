"""The trainer and the sampler, checked together on a tiny model (CPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from liftavatar.errors import ConfigError
from liftavatar.generator.data import CaptureClips, SyntheticClipStream, SyntheticDataConfig
from liftavatar.generator.inputs import generation_inputs
from liftavatar.generator.pipeline import GenerationInputs, LiftAvatarPipeline, window_starts
from liftavatar.generator.train import TrainConfig, train

from .conftest import SIZE


def _config(tmp_path, capture, name, **kw):
    base = dict(out=tmp_path / name, preset="tiny", captures=[capture.path], frames=4, refs=2, size=SIZE,
                pixel_factor=2, batch_size=1, lr=2e-3, warmup=10, control_dropout=0.0, save_every=10_000,
                log_every=10, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _psnr(a, b):
    return float(10 * torch.log10(1 / ((a - b) ** 2).mean()))


def test_overfitting_one_clip_then_sampling_reproduces_it(tmp_path, tiny_capture):
    prior = train(_config(tmp_path, tiny_capture, "overfit", steps=600, log_every=20), progress=False)
    history = json.loads(next((tmp_path / "overfit" / "checkpoints").glob("step_*/state.json")).read_text())["history"]
    first, last = history[0][1], history[-1][1]
    assert last * 10 <= first, (first, last)

    clip = CaptureClips([tiny_capture.path], frames=4, refs=2)[0]
    inputs = GenerationInputs(clip["ref_frames"], clip["ref_shading"], clip["ref_controls"], clip["shading"],
                              clip["controls"])
    pipe = LiftAvatarPipeline.from_pretrained(prior)
    video = pipe(inputs, steps=25, seed=0)
    assert video.shape == clip["frames"].shape
    assert _psnr(video, clip["frames"]) >= 25.0

    # a saved-and-reloaded prior generates identical frames for a seed; another seed differs
    again = LiftAvatarPipeline.from_pretrained(prior)(inputs, steps=25, seed=0)
    assert torch.equal(video, again)
    assert not torch.equal(video, pipe(inputs, steps=25, seed=1))
    # the UniPC solver reaches the clip in fewer steps; guidance over the controls also runs
    assert _psnr(pipe(inputs, steps=10, seed=0, solver="unipc"), clip["frames"]) >= 22.0
    guided = pipe(inputs, steps=4, seed=0, guidance=2.0)
    assert torch.isfinite(guided).all()
    assert not torch.allclose(guided, pipe(inputs, steps=4, seed=0), atol=1e-4)  # guidance changes the samples
    assert (tmp_path / "overfit" / "loss.png").is_file()
    assert any((tmp_path / "overfit" / "logs").iterdir())  # TensorBoard events


def test_resume_continues_exactly(tmp_path, tiny_capture):
    straight = train(_config(tmp_path, tiny_capture, "straight", steps=4, save_every=2), progress=False)
    split = _config(tmp_path, tiny_capture, "split", steps=4, save_every=2, stop_after=2)
    assert train(split, progress=False) is None  # paused after 2 steps, checkpointed
    split.stop_after, split.resume = None, True
    resumed = train(split, progress=False)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # and training did change the weights
    first = train(_config(tmp_path, tiny_capture, "one", steps=1), progress=False)
    c = load_file(str(first / "model.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_fast_path_trains_the_same_weights(tmp_path, tiny_capture):
    """--fast-path changes how the forward runs, not what it computes (fp32 on CPU: float rounding only)."""
    plain = train(_config(tmp_path, tiny_capture, "plain", steps=3), progress=False)
    fast = train(_config(tmp_path, tiny_capture, "fast", steps=3, fast_path=True), progress=False)
    a, b = load_file(str(plain / "model.safetensors")), load_file(str(fast / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)
    with pytest.raises(ConfigError, match="fast_path"):
        train(_config(tmp_path, tiny_capture, "bad", steps=1, compile=True), progress=False)


def test_existing_run_needs_resume(tmp_path, tiny_capture):
    train(_config(tmp_path, tiny_capture, "run", steps=1), progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(_config(tmp_path, tiny_capture, "run", steps=2), progress=False)


def test_synthetic_stream_is_deterministic_and_skips_exactly():
    config = SyntheticDataConfig(seed_range=(7402, 7405), frames=2, refs=2, size=SIZE, pool_frames=12,
                                 clips_per_subject=2, supersample=1)
    stream = iter(SyntheticClipStream(config))
    clips = [next(stream) for _ in range(3)]
    assert clips[0]["frames"].shape == (2, 3, SIZE, SIZE)
    assert clips[0]["ref_frames"].shape == (2, 3, SIZE, SIZE)
    assert clips[0]["controls"].shape == (2, 43)
    assert torch.equal(clips[0]["ref_frames"], clips[1]["ref_frames"])  # same subject draw
    assert not torch.equal(clips[0]["frames"], clips[1]["frames"])
    skipped = SyntheticClipStream(config)
    skipped.skip(2)
    assert torch.equal(next(iter(skipped))["frames"], clips[2]["frames"])


def test_window_starts_cover_every_frame():
    assert window_starts(5, 8, 2) == [0]
    for n in (9, 14, 20, 31):
        starts = window_starts(n, 8, 2)
        covered = set().union(*(range(s, s + 8) for s in starts))
        assert covered == set(range(n)) and starts[-1] + 8 == n


def test_generation_inputs_and_bad_inputs(tmp_path, tiny_capture):
    from liftavatar.generator.transformer import LiftAvatarTransformer
    from liftavatar.synth.world import SynthSpec, synthesize

    model = LiftAvatarTransformer.from_preset("tiny", 43, in_channels=12, out_channels=12)
    model.save_pretrained(tmp_path / "prior", extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None},
                                                     "frames": 4, "size": SIZE})
    pipe = LiftAvatarPipeline.from_pretrained(tmp_path / "prior")
    inputs = generation_inputs(tiny_capture, tiny_capture, k=2)
    long = pipe(inputs, steps=2)  # 6 frames in windows of 4, blended
    assert long.shape == (6, 3, SIZE, SIZE) and torch.isfinite(long).all()

    bigger = synthesize(SynthSpec(seed=7401, preset="full", frames=2, size=2 * SIZE), tmp_path / "big", progress=False)
    with pytest.raises(ConfigError, match="resize them to one resolution"):
        pipe(generation_inputs(bigger, tiny_capture, k=2, method="uniform"), steps=1)
    with pytest.raises(ConfigError, match=f"generates at {SIZE}x{SIZE}"):  # tensors given as they are
        pipe(generation_inputs(bigger, bigger, k=2, method="uniform"), steps=1)
    # captures of other sizes (two of them here) are brought to the prior's size
    resized = generation_inputs(bigger, tiny_capture, k=2, method="uniform", size=pipe.size)
    assert resized.ref_frames.shape == (2, 3, SIZE, SIZE) and resized.shading.shape == (6, 3, SIZE, SIZE)
    assert pipe(resized, steps=1).shape == (6, 3, SIZE, SIZE)
    with pytest.raises(ConfigError, match="--steps 0"):
        pipe(inputs, steps=0)
    wrong = GenerationInputs(inputs.ref_frames, inputs.ref_shading, inputs.ref_controls[:, :40], inputs.shading,
                             inputs.controls[:, :40])
    with pytest.raises(ConfigError, match="expression coefficients"):
        pipe(wrong, steps=1)


def test_synthetic_batches_are_the_same_with_worker_processes():
    from torch.utils.data import DataLoader

    from liftavatar.generator.data import SyntheticBatches

    config = SyntheticDataConfig(seed_range=(7402, 7405), frames=2, refs=2, size=SIZE, pool_frames=12,
                                 clips_per_subject=2, supersample=1)
    inline = SyntheticBatches(config, batch_size=3, first=5)
    expected = [inline.batch_at(i) for i in (5, 6, 7)]
    assert expected[0]["frames"].shape == (3, 2, 3, SIZE, SIZE) and expected[0]["frames"].dtype == torch.uint8
    loader = iter(DataLoader(SyntheticBatches(config, batch_size=3, first=5), batch_size=None, num_workers=2,
                             multiprocessing_context="spawn"))
    for want in expected:
        got = next(loader)
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_identity_shards_give_each_batch_one_slice_of_the_identities():
    from liftavatar.generator.data import SyntheticBatches

    config = SyntheticDataConfig(seed_range=(100, 110), clips_per_subject=2, identity_shards=3)
    batches = SyntheticBatches(config, batch_size=4)  # two draws a batch
    stream = SyntheticClipStream(batches.config)
    for batch in range(6):
        seeds = {stream._subject_seed(batch * 2 + d) for d in range(2)}
        assert all((seed - 100) % 3 == batch % 3 and 100 <= seed < 110 for seed in seeds)
    plain = SyntheticClipStream(SyntheticDataConfig(seed_range=(100, 110)))
    assert len({plain._subject_seed(d) for d in range(60)}) > 5


# ---- warm start (--init-from) and resume load every tensor or say which ones they cannot ------------------------

D = 43


def _tiny_base(path):
    from diffusers import WanTransformer3DModel

    from liftavatar.generator.transformer import BASE_PRESETS

    torch.manual_seed(5)
    WanTransformer3DModel(**BASE_PRESETS["tiny"]).save_pretrained(path)
    return path


def _moved(model):
    """Every zero-initialised module (and LoRA B) moved, so that a dropped tensor changes the function."""
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for _, p in model.zero_initialised_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _forward(model):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    with torch.no_grad():
        return model.eval()(r(1, 48, 2, 8, 8), torch.tensor([500.0]), r(1, 48, 2, 8, 8), r(1, 2, 1, D),
                            r(1, 48, 1, 8, 8), r(1, 48, 1, 8, 8), r(1, 1, 1, D))


def _warm(tmp_path, prior, **kw):
    from liftavatar.generator.train import build_model

    return build_model(TrainConfig(out=tmp_path / "run", init_from=prior, **kw), D)


@pytest.fixture(scope="module")
def lora_prior(tmp_path_factory):
    from liftavatar.generator.transformer import LiftAvatarTransformer

    root = tmp_path_factory.mktemp("warm")
    base = _tiny_base(root / "base")
    model = LiftAvatarTransformer.from_base(base, D)
    model.add_lora(rank=4)
    _moved(model).save_pretrained(root / "lora_prior")
    return base, root / "lora_prior", model


def test_warm_start_from_a_lora_prior_keeps_its_adapter(tmp_path, lora_prior):
    base, prior, trained = lora_prior
    want = trained.state_dict()
    for kw in ({"base": base}, {}):  # with --base, and without: the base the prior records
        model = _warm(tmp_path, prior, train_mode="lora", lora_rank=4, **kw)
        got = model.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), kw
        assert model.config.base_path == str(base.resolve())
    # a full run from a LoRA prior starts from its merged weights: the same function
    full = _warm(tmp_path, prior, base=base, train_mode="full")
    assert not full.uses_lora
    torch.testing.assert_close(_forward(full), _forward(trained), rtol=0, atol=1e-5)


def test_warm_start_from_a_full_prior_into_a_lora_run(tmp_path, lora_prior):
    from liftavatar.generator.transformer import LiftAvatarTransformer

    base, _, _ = lora_prior
    full = _moved(LiftAvatarTransformer.from_base(base, D, seed=7))
    full.save_pretrained(tmp_path / "full_prior")
    model = _warm(tmp_path, tmp_path / "full_prior", base=base, train_mode="lora", lora_rank=4)
    assert model.uses_lora
    torch.testing.assert_close(_forward(model), _forward(full), rtol=0, atol=1e-6)


def test_warm_start_that_cannot_load_every_tensor_names_them(tmp_path, lora_prior):
    from liftavatar.generator.transformer import LiftAvatarTransformer

    base, prior, _ = lora_prior
    with pytest.raises(ConfigError, match="--lora-rank 4"):
        _warm(tmp_path, prior, base=base, train_mode="lora", lora_rank=8)
    LiftAvatarTransformer.from_preset("tiny", D, "both").save_pretrained(tmp_path / "both")
    with pytest.raises(ConfigError, match="control_xattn"):  # its cross-attention adapters have no home in "add"
        _warm(tmp_path, tmp_path / "both", preset="tiny", injection="add")


def test_resume_with_another_model_names_the_weights_it_cannot_load(tmp_path, tiny_capture):
    config = _config(tmp_path, tiny_capture, "resume_other", steps=2, save_every=1, stop_after=1)
    assert train(config, progress=False) is None
    config.stop_after, config.resume, config.injection = None, True, "add"
    with pytest.raises(ConfigError, match="control_xattn"):
        train(config, progress=False)


def test_clips_sampled_together_equal_clips_sampled_alone(tmp_path, tiny_capture):
    """generate_clips (what `lift` calls) samples clip c as the pipeline samples it alone with seeds[c]: exactly
    with one clip at a time, up to float rounding in batches."""
    from liftavatar.generator.transformer import LiftAvatarTransformer

    model = LiftAvatarTransformer.from_preset("tiny", 43, in_channels=12, out_channels=12)
    for _, p in model.zero_initialised_parameters():  # so that the shading maps and controls matter
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(2))
    model.save_pretrained(tmp_path / "prior", extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None},
                                                     "frames": 3, "size": SIZE})
    pipe = LiftAvatarPipeline.from_pretrained(tmp_path / "prior")
    inputs = generation_inputs(tiny_capture, tiny_capture, k=2)
    seeds = [4, 9]
    alone = torch.cat([pipe(GenerationInputs(inputs.ref_frames, inputs.ref_shading, inputs.ref_controls,
                                             inputs.shading[3 * c:3 * c + 3], inputs.controls[3 * c:3 * c + 3]),
                            steps=2, seed=s) for c, s in enumerate(seeds)])
    assert torch.equal(pipe.generate_clips(inputs, 3, seeds, steps=2, batch_size=1), alone)
    torch.testing.assert_close(pipe.generate_clips(inputs, 3, seeds, steps=2, batch_size=2), alone, rtol=0, atol=1e-5)
    assert not torch.allclose(alone[:3], alone[3:], atol=1e-3)
    with pytest.raises(ConfigError, match="one seed per clip"):
        pipe.generate_clips(inputs, 3, [4], steps=1)


def test_captures_mixed_with_the_synthetic_stream(tmp_path, tiny_capture):
    """--synthetic-share: every batch holds capture clips and synthetic ones; the run resumes exactly and learns
    something other than the captures alone; a share without captures, of 1 or more, in a batch of one, or with
    captures of another size is refused."""
    from liftavatar.generator.train import concat_batches, mixed_rows

    mixed = dict(synthetic_share=0.5, batch_size=2, seed_range=(7402, 7404), clips_per_subject=1, save_every=2)
    straight = train(_config(tmp_path, tiny_capture, "mix", steps=2, **mixed), progress=False)
    split = _config(tmp_path, tiny_capture, "mix_split", steps=2, stop_after=1, **mixed)
    assert train(split, progress=False) is None
    split.stop_after, split.resume = None, True
    resumed = train(split, progress=False)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    alone = load_file(str(train(_config(tmp_path, tiny_capture, "alone", steps=2, batch_size=2, save_every=2),
                                progress=False) / "model.safetensors"))
    assert not all(torch.equal(a[k], alone[k]) for k in a)
    assert json.loads((tmp_path / "mix" / "train_config.json").read_text())["synthetic_share"] == 0.5

    assert mixed_rows(_config(tmp_path, tiny_capture, "r", synthetic_share=0.25, batch_size=8)) == 2
    assert mixed_rows(_config(tmp_path, tiny_capture, "r", synthetic_share=0.01, batch_size=8)) == 1
    assert mixed_rows(_config(tmp_path, tiny_capture, "r", synthetic_share=0.99, batch_size=8)) == 7
    assert mixed_rows(_config(tmp_path, tiny_capture, "r")) == 0
    for bad, match in ((dict(synthetic_share=1.0, batch_size=2), r"\[0, 1\)"),
                       (dict(synthetic_share=0.5, batch_size=1), "batch-size 2"),
                       (dict(synthetic_share=0.5, batch_size=2, captures=[]), "pass captures"),
                       (dict(synthetic_share=0.5, batch_size=2, size=2 * SIZE), "--size")):
        with pytest.raises(ConfigError, match=match):
            train(_config(tmp_path, tiny_capture, "bad", steps=1, **bad), progress=False)

    capture_clip = collate_one(CaptureClips([tiny_capture.path], frames=4, refs=2)[0])
    synthetic_clip = {k: (v * 255).round().to(torch.uint8) if not k.endswith("controls") else v
                      for k, v in capture_clip.items()}
    both = concat_batches(capture_clip, synthetic_clip)
    assert both["frames"].shape[0] == 2 and both["frames"].dtype == torch.float32
    assert torch.allclose(both["frames"][1], capture_clip["frames"][0], atol=0.5 / 255)


def collate_one(clip):
    return {k: v[None] for k, v in clip.items()}


def test_captures_held_in_memory_give_the_clips_read_from_disk(tiny_capture):
    read = CaptureClips([tiny_capture.path], frames=4, refs=2, stride=1)
    held = CaptureClips([tiny_capture.path], frames=4, refs=2, stride=1, in_memory=True)
    assert len(read) == len(held) == 3 and held.decoded and not read.decoded
    for i in range(len(read)):
        a, b = read[i], held[i]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_capture_clips_take_references_from_the_other_half(tmp_path):
    """references='other-half': every clip's references lie in the half of the capture its middle is not in and
    outside the clip; a capture too short for K in each half is used whole, with a note."""
    from liftavatar.synth.world import SynthSpec, synthesize

    capture = synthesize(SynthSpec(seed=7403, preset="full", frames=24, size=SIZE), tmp_path / "c", progress=False)
    clips = CaptureClips([capture.path], frames=4, refs=3, stride=1, references="other-half")
    first, second = clips.reference_frames[0]
    assert max(first) < 12 - 2 and min(second) >= 12 + 2, (first, second)
    whole = CaptureClips([capture.path], frames=4, refs=3, stride=1)
    assert whole.reference_frames[0][0] == whole.reference_frames[0][1]
    frames = capture.frames()
    for i, (_, start) in enumerate(clips.items):
        refs = first if start + 2 >= 12 else second
        assert not set(refs) & set(range(start, start + 4))
        got = clips[i]["ref_frames"]
        assert torch.allclose(got, torch.from_numpy(frames[refs]).permute(0, 3, 1, 2).float() / 255)

    short = CaptureClips([capture.path], frames=4, refs=11, references="other-half")
    assert short.reference_frames[0][0] == short.reference_frames[0][1] and any("whole capture" in n for n in short.notes)
    with pytest.raises(ConfigError, match="other-half"):
        CaptureClips([capture.path], references="halves")


def test_capture_color_jitter(tmp_path, tiny_capture):
    """--capture-color-jitter changes what is learned, resumes exactly, and a spread outside [0, 1) is refused."""
    jitter = dict(capture_color_jitter=0.2, batch_size=2, save_every=1)
    straight = train(_config(tmp_path, tiny_capture, "j", steps=2, **jitter), progress=False)
    split = _config(tmp_path, tiny_capture, "j_split", steps=2, stop_after=1, **jitter)
    assert train(split, progress=False) is None
    split.stop_after, split.resume = None, True
    a, b = (load_file(str(p / "model.safetensors")) for p in (straight, train(split, progress=False)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = load_file(str(train(_config(tmp_path, tiny_capture, "p", steps=2, batch_size=2), progress=False)
                          / "model.safetensors"))
    assert not all(torch.equal(a[k], plain[k]) for k in a)
    with pytest.raises(ConfigError, match="color-jitter"):
        train(_config(tmp_path, tiny_capture, "bad_j", steps=1, capture_color_jitter=1.0), progress=False)
