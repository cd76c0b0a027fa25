"""Training: it improves the renders, densification keeps the binding, resume repeats the run."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from liftavatar.avatar.model import AvatarError, load_avatar
from liftavatar.avatar.train import TrainConfig, load_frames, ssim, train_avatar
from liftavatar.capture import PROVENANCE_LIFTED, Capture
from liftavatar.errors import ConfigError


def _val_log(path):
    return [json.loads(line) for line in (path / "val" / "log.jsonl").read_text().splitlines()]


def test_a_short_training_clearly_improves_held_out_psnr(trained):
    log = _val_log(trained)
    assert [r["step"] for r in log] == [0, 60] and log[0]["held_out"]
    assert log[-1]["psnr"] > log[0]["psnr"] + 3.0, log
    assert (trained / "val" / "step_000060.png").is_file()
    avatar = load_avatar(trained)
    assert avatar.meta.step == 60 and avatar.num_gaussians == log[-1]["gaussians"]


def test_densification_keeps_every_gaussian_on_its_parents_triangle(trained, capture):
    from gsplat.strategy.ops import duplicate, split

    from liftavatar.avatar.train import _bound_strategy, _make_optimizers

    avatar = load_avatar(trained)
    cfg = TrainConfig()
    params = {k: torch.nn.Parameter(v.clone()) for k, v in avatar.params.items()}
    params["binding"] = torch.nn.Parameter(avatar.binding.clone(), requires_grad=False)
    optimizers = _make_optimizers(params, cfg)
    n = len(avatar.binding)
    pick = torch.zeros(n, dtype=torch.bool)
    pick[::7] = True
    parents = avatar.binding[pick]
    duplicate(params, optimizers, {}, pick)
    assert torch.equal(params["binding"][n:], parents)
    split(params, optimizers, {}, torch.cat((pick, torch.zeros(len(parents), dtype=torch.bool))))
    assert torch.equal(params["binding"][-2 * len(parents):], parents.repeat(2))
    # Pruning everything transparent never leaves a triangle without a Gaussian.
    strategy = _bound_strategy(cfg)
    before = set(params["binding"].tolist())
    params["opacities"].data.fill_(-20.0)
    strategy._prune_gs(params, optimizers, {}, 0)
    assert set(params["binding"].tolist()) == before
    assert len(params["binding"]) == len(before)


def test_resume_repeats_the_uninterrupted_run(capture, tmp_path):
    cfg = TrainConfig(iters=12, holdout_every=0, val_every=0, checkpoint_every=0, progress=False, refine_start=3,
                      refine_every=3, grow_grad2d=1e-6)
    train_avatar([capture], tmp_path / "whole", cfg)
    part = train_avatar([capture], tmp_path / "part", cfg, max_steps=7)
    assert part.step == 7 and load_avatar(tmp_path / "part", allow_unfinished=True).meta.step == 7
    resumed = train_avatar([capture], tmp_path / "part", cfg, resume=True)
    assert resumed.step == 12 and len(resumed.history) == 5
    a, b = load_avatar(tmp_path / "whole"), load_avatar(tmp_path / "part")
    assert a.num_gaussians > part.history[0]["gaussians"]  # densification ran, before and after the break
    assert torch.equal(a.binding, b.binding)
    for key in a.params:
        torch.testing.assert_close(a.params[key], b.params[key], atol=1e-6, rtol=1e-5)


def test_lifted_frames_get_the_lifted_weight(capture, tmp_path):
    lifted = tmp_path / "lifted"
    shutil.copytree(capture, lifted)
    with np.load(lifted / "kinematics.npz") as z:
        arrays = dict(z)
    arrays["provenance"][::2] = 1
    np.savez(lifted / "kinematics.npz", **arrays)
    frames = load_frames([lifted], size=32, lifted_weight=0.25)
    assert frames.size == (32, 32) and frames.images.shape == (12, 32, 32, 3)
    np.testing.assert_allclose(frames.weight.numpy(), np.where(arrays["provenance"] == 1, 0.25, 1.0))
    # Intrinsics follow the resize.
    np.testing.assert_allclose(frames.intrinsics[0, 2:].numpy(), [16.0, 16.0])


def test_observed_finish_draws_only_filmed_frames_at_the_end(capture, tmp_path):
    lifted = tmp_path / "lifted"
    shutil.copytree(capture, lifted)
    with np.load(lifted / "kinematics.npz") as z:
        arrays = dict(z)
    arrays["provenance"] = np.where(np.arange(len(arrays["provenance"])) % 2, PROVENANCE_LIFTED, 0).astype(np.uint8)
    np.savez(lifted / "kinematics.npz", **arrays)
    frames = load_frames([lifted], size=32)
    assert frames.lifted.tolist() == [bool(i % 2) for i in range(len(frames))]
    cfg = TrainConfig(iters=40, size=32, observed_finish=0.5, val_every=0, checkpoint_every=0, progress=False)
    history = train_avatar([lifted], tmp_path / "avatar", cfg).history
    drawn = [bool(frames.lifted[r["frame"]]) for r in history]
    assert not any(drawn[20:]) and any(drawn[:20])  # the first half draws lifted frames too
    with pytest.raises(ConfigError, match="observed-finish"):
        train_avatar([lifted], tmp_path / "bad", TrainConfig(iters=4, observed_finish=1.0, progress=False))


def _lifted_and_observed(capture, root, observed: int = 6):
    """A capture whose first ``observed`` frames are observed and the rest lifted (as `lift` appends them), and a
    capture of its observed frames alone (the `train` capture it was lifted from)."""
    from dataclasses import asdict

    from liftavatar.capture import Capture, CaptureMeta, CaptureWriter

    lifted = root / "lifted"
    shutil.copytree(capture, lifted)
    with np.load(lifted / "kinematics.npz") as z:
        arrays = dict(z)
    arrays["provenance"][observed:] = PROVENANCE_LIFTED
    np.savez(lifted / "kinematics.npz", **arrays)
    source = Capture.load(lifted)
    writer = CaptureWriter(root / "train", CaptureMeta(**{**asdict(source.meta), "num_frames": observed}))
    for i in range(observed):
        writer.add_frame(i, source.frame(i), source.mask(i), source.shading(i))
    writer.finalize(source.kinematics.select(range(observed)))
    return lifted, root / "train"


def test_observed_share_draws_what_the_repeated_captures_drew(capture, tmp_path):
    """The draw pool repeats observed frames inside train_avatar exactly as the bench did before by passing the
    observed capture again next to the lifted one: the same images in the same order, the same avatar, so the
    bench's and the demo's numbers do not move."""
    from safetensors.torch import load_file

    from liftavatar.avatar.train import observed_repeats

    lifted, train = _lifted_and_observed(capture, tmp_path)
    repeats = observed_repeats(6, 6, 0.75)
    assert repeats == 3
    common = dict(iters=24, size=32, lifted_weight=0.5, observed_finish=0.25, val_every=0, checkpoint_every=0,
                  progress=False)
    old = train_avatar([lifted] + [train] * (repeats - 1), tmp_path / "old",
                       TrainConfig(**common, observed_share=0.0)).history
    new = train_avatar([lifted], tmp_path / "new", TrainConfig(**common, observed_share=0.75)).history
    old_frames = load_frames([lifted] + [train] * (repeats - 1), size=32)
    new_frames = load_frames([lifted], size=32)
    assert len(old) == len(new) == 24
    for a, b in zip(old, new):
        assert torch.equal(old_frames.images[a["frame"]], new_frames.images[b["frame"]])
        assert a["loss"] == b["loss"]
    drawn = [bool(new_frames.lifted[r["frame"]]) for r in new]
    assert 0 < sum(drawn[:18]) < 18 and not any(drawn[18:])  # both kinds, then the observed-only finish
    a, b = load_file(str(tmp_path / "old" / "avatar.safetensors")), load_file(str(tmp_path / "new" / "avatar.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_observed_repeats_balance_observed_and_lifted_draws():
    from liftavatar.avatar.train import observed_repeats

    assert observed_repeats(300, 0, 0.5) == 1
    assert observed_repeats(300, 800, 0.5) == 3  # 900 observed draws : 800 lifted
    assert observed_repeats(300, 1600, 0.5) == 5
    assert observed_repeats(300, 1600, 0.0) == 1  # plain union
    assert observed_repeats(150, 64, 0.5) == 1
    assert observed_repeats(300, 800, 0.75) == 8 and observed_repeats(150, 80, 0.75) == 2


def test_defaults_are_the_benchmarked_recipe_and_old_states_keep_theirs(capture, tmp_path):
    """The library's defaults are what the benchmark measured; a training state written before observed_share
    (and observed_finish) existed resumes with the recipe it was trained with."""
    cfg = TrainConfig()
    assert (cfg.lifted_weight, cfg.observed_finish, cfg.observed_share) == (0.5, 0.25, 0.75)
    out = tmp_path / "old"
    train_avatar([capture], out, TrainConfig(iters=2, size=32, val_every=0, checkpoint_every=0, progress=False),
                 max_steps=1)
    # What resume reads: the training state in the checkpoint's header, rewritten as an old run wrote it.
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = out / "avatar.safetensors"
    with safe_open(str(path), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    state = json.loads(header["train_state"])
    for key in ("observed_share", "observed_finish"):
        del state["config"][key]
    state["config"]["lifted_weight"] = 1.0
    save_file(tensors, str(path), metadata={**header, "train_state": json.dumps(state)})
    train_avatar([capture], out, TrainConfig(iters=2, size=32, progress=False), resume=True)
    stored = json.loads((out / "train_state.json").read_text())["config"]
    assert (stored["lifted_weight"], stored["observed_finish"], stored["observed_share"]) == (1.0, 0.0, 0.0)
    with pytest.raises(ConfigError, match="observed-share"):
        train_avatar([capture], tmp_path / "bad", TrainConfig(iters=4, observed_share=1.0, progress=False))


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    gen = torch.Generator().manual_seed(6005)
    a = torch.rand(1, 40, 36, 3, generator=gen)
    b = (a + 0.1 * torch.randn(1, 40, 36, 3, generator=gen)).clamp(0, 1)
    ref = structural_similarity(a[0].numpy(), b[0].numpy(), gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False, data_range=1.0, channel_axis=-1)
    assert abs(float(ssim(a, b)[0]) - ref) < 1e-5


def test_bad_training_input_is_named(capture, other_subject, tmp_path):
    with pytest.raises(AvatarError, match="different subjects|train one avatar per subject"):
        load_frames([capture, other_subject])
    invalid = tmp_path / "invalid"
    shutil.copytree(other_subject, invalid)
    with np.load(invalid / "kinematics.npz") as z:
        arrays = dict(z)
    arrays["valid"][:] = False
    np.savez(invalid / "kinematics.npz", **arrays)
    with pytest.raises(AvatarError, match="invalid.*has no valid frames"):
        load_frames([invalid])
    with pytest.raises(AvatarError, match="no capture given"):
        load_frames([])
    with pytest.raises(AvatarError, match="no training state"):
        train_avatar([capture], tmp_path / "fresh", TrainConfig(iters=2, progress=False), resume=True)


def test_kinematics_refinement_learns_per_frame_corrections(capture, tmp_path):
    from safetensors.torch import load_file

    cfg = TrainConfig(iters=4, size=32, refine_kinematics=True, lr_kinematics=1e-3, val_every=0,
                      checkpoint_every=0, progress=False)
    train_avatar([capture], tmp_path / "k", cfg)
    delta = load_file(str(tmp_path / "k" / "avatar.safetensors"))["train.kinematics_delta"]
    assert delta.shape == (12, 37 + 6)
    touched = (delta.abs().sum(-1) > 0).sum()
    assert 1 <= touched <= 4  # only the frames drawn in the 4 iterations moved


# --------------------------------------------------------------------------------------------
# Checkpoints: one atomic unit, whatever moment a kill comes


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the trainer catches it (KeyboardInterrupt would checkpoint)."""


KILL_CFG = TrainConfig(iters=12, size=32, holdout_every=0, val_every=0, checkpoint_every=4, progress=False,
                       refine_start=3, refine_every=3, grow_grad2d=1e-6)


def _count_renames(monkeypatch, die_at: int | None = None) -> list[str]:
    """Every atomic write ends in one os.replace; count them, and die instead of the ``die_at``-th."""
    import os

    real = os.replace
    names: list[str] = []

    def replace(src, dst):
        names.append(os.path.basename(dst))
        if len(names) == die_at:
            raise Killed
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    return names


@pytest.fixture(scope="module")
def kill_refs(capture, tmp_path_factory):
    """The uninterrupted run, the same run stopped at steps 4 and 8, and how many renames one checkpoint makes."""
    root = tmp_path_factory.mktemp("kill")
    mp = pytest.MonkeyPatch()
    renames = _count_renames(mp)
    train_avatar([capture], root / "ref4", KILL_CFG, max_steps=4)  # one checkpoint: the final one
    mp.undo()
    train_avatar([capture], root / "ref8", KILL_CFG, max_steps=8)
    train_avatar([capture], root / "whole", KILL_CFG)
    return root, len(renames)


def _assert_same_avatar(a, b) -> None:
    assert torch.equal(a.binding, b.binding)
    for key in a.params:
        torch.testing.assert_close(a.params[key], b.params[key], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kill", [1, 2, 3, 4])
def test_a_kill_while_a_checkpoint_is_written_leaves_a_whole_checkpoint_and_resume_continues_exactly(
        capture, tmp_path, monkeypatch, kill_refs, kill):
    root, per_checkpoint = kill_refs
    if kill > per_checkpoint:
        pytest.skip(f"a checkpoint makes {per_checkpoint} renames")
    out = tmp_path / "run"
    # The checkpoint at step 4 completes; the one at step 8 dies before its kill-th rename.
    with monkeypatch.context() as m:
        _count_renames(m, die_at=per_checkpoint + kill)
        with pytest.raises(Killed):
            train_avatar([capture], out, KILL_CFG)
    on_disk = load_avatar(out, allow_unfinished=True)
    if kill == 1:
        assert on_disk.meta.step == 4, "nothing of the step-8 checkpoint may be visible"
    assert on_disk.meta.step in (4, 8) and on_disk.meta.iters == 12
    _assert_same_avatar(on_disk, load_avatar(root / f"ref{on_disk.meta.step}", allow_unfinished=True))
    resumed = train_avatar([capture], out, KILL_CFG, resume=True)
    assert resumed.step == 12 and len(resumed.history) == 12 - on_disk.meta.step
    _assert_same_avatar(load_avatar(out), load_avatar(root / "whole"))


def test_the_output_folder_holds_only_the_avatar_and_its_readable_summaries(kill_refs):
    root, _ = kill_refs
    assert sorted(p.name for p in (root / "whole").iterdir()) == ["avatar.json", "avatar.safetensors",
                                                                   "train_state.json", "val"]
    summary = json.loads((root / "whole" / "avatar.json").read_text())
    assert (summary["step"], summary["iters"], summary["finished"]) == (12, 12, True)
    state = json.loads((root / "ref8" / "train_state.json").read_text())
    assert state["step"] == 8 and state["config"]["iters"] == 12
    summary = json.loads((root / "ref8" / "avatar.json").read_text())
    assert (summary["step"], summary["iters"], summary["finished"]) == (8, 12, False)


def test_what_an_output_folder_may_hold(capture, tmp_path):
    cfg = TrainConfig(iters=2, size=32, val_every=0, checkpoint_every=0, progress=False)
    # A run stopped before its first checkpoint left only what training writes: a new run may use the folder.
    early = tmp_path / "early"
    (early / "val").mkdir(parents=True)
    (early / "val" / "log.jsonl").write_text("")
    train_avatar([capture], early, cfg)
    # Beside an avatar of ours, the user's files are theirs: --force replaces the avatar and leaves them.
    (early / "avatar.ply").write_bytes(b"the user's export")
    train_avatar([capture], early, cfg, force=True)
    assert (early / "avatar.ply").read_bytes() == b"the user's export"
    with pytest.raises(AvatarError, match="already holds an avatar"):
        train_avatar([capture], early, cfg)
    # A folder with files and no avatar is not ours, --force or not.
    other = tmp_path / "other"
    other.mkdir()
    (other / "README").write_text("mine")
    with pytest.raises(AvatarError, match="'README' and no avatar"):
        train_avatar([capture], other, cfg, force=True)
    assert [p.name for p in other.iterdir()] == ["README"]


def test_a_deforming_avatar_starts_as_the_plain_binding_and_learns_offsets(capture, tmp_path):
    """The deformation MLP (FlashAvatar-style offsets by expression and head rotation) starts at zero, so the new
    avatar renders exactly as the plain one; training moves it, and render, export and resume carry it."""
    from liftavatar.avatar.export import export_ply, read_ply, render_frames
    from liftavatar.avatar.model import AvatarConfig, bake_deformation, deform_condition, load_avatar

    plain_cfg = TrainConfig(iters=3, size=32, val_every=0, checkpoint_every=0, progress=False,
                            avatar=AvatarConfig(deform_width=0))
    deform_cfg = TrainConfig(iters=3, size=32, val_every=0, checkpoint_every=0, progress=False,
                             avatar=AvatarConfig(deform_width=16, deform_frequencies=2))
    # Zero iterations of change: the two start identical (max_steps=0 writes the initial checkpoint).
    train_avatar([capture], tmp_path / "plain0", plain_cfg, max_steps=0)
    train_avatar([capture], tmp_path / "deform0", deform_cfg, max_steps=0)
    kin = Capture.load(capture).kinematics
    plain0 = load_avatar(tmp_path / "plain0", allow_unfinished=True)
    deform0 = load_avatar(tmp_path / "deform0", allow_unfinished=True)
    assert deform0.deform is not None and plain0.deform is None
    k = tuple(float(v) * 32 / 64 for v in Capture.load(capture).meta.intrinsics)
    a = np.stack(list(render_frames(plain0, kin, k, (32, 32))))
    b = np.stack(list(render_frames(deform0, kin, k, (32, 32))))
    assert np.array_equal(a, b)

    train_avatar([capture], tmp_path / "deform", TrainConfig(**{**deform_cfg.__dict__, "iters": 30}))
    avatar = load_avatar(tmp_path / "deform")
    assert float(avatar.deform["w2"].abs().sum()) > 0, "the output layer learned offsets"
    moved = np.stack(list(render_frames(avatar, kin, k, (32, 32))))
    assert moved.std() > 0
    # Baked at one frame's condition, the plain avatar renders what the deforming one does at that frame.
    one = kin.select([5])
    baked = bake_deformation(avatar, deform_condition(torch.from_numpy(one.expression),
                                                       torch.from_numpy(one.rotation)))
    assert baked.deform is None
    same = np.stack(list(render_frames(baked, one, k, (32, 32))))
    assert np.abs(same.astype(int) - moved[5:6].astype(int)).max() <= 1
    assert len(read_ply(export_ply(avatar, tmp_path / "a.ply"))["x"]) == avatar.num_gaussians


def test_a_deforming_avatar_resumes_exactly(capture, tmp_path):
    from liftavatar.avatar.model import AvatarConfig, load_avatar

    cfg = TrainConfig(iters=8, size=32, val_every=0, checkpoint_every=0, progress=False, densify=False,
                      avatar=AvatarConfig(deform_width=16, deform_frequencies=2))
    train_avatar([capture], tmp_path / "straight", cfg)
    train_avatar([capture], tmp_path / "split", cfg, max_steps=4)
    train_avatar([capture], tmp_path / "split", cfg, resume=True)
    a, b = load_avatar(tmp_path / "straight"), load_avatar(tmp_path / "split")
    for name in a.deform:
        assert torch.allclose(a.deform[name], b.deform[name], atol=1e-6), name
    for name in a.params:
        assert torch.allclose(a.params[name], b.params[name], atol=1e-6), name
