"""The browser viewer (`liftavatar avatar view`): its Gaussians, the page in headless Chromium, bad input, and
that closing the browser stops it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from liftavatar.avatar.model import (
    deform_condition,
    deform_features,
    gaussians_world,
    load_avatar,
)
from liftavatar.avatar.viewer import AvatarPoser, AvatarViewer, Playback, pose_rotation
from liftavatar.cli import main
from tests.avatar.conftest import with_one_expression_fewer

REPO = Path(__file__).resolve().parents[2]


def test_poser_gives_the_avatars_gaussians_in_the_y_up_world(trained):
    from gsplat.cuda._torch_impl import _quat_to_rotmat

    avatar = load_avatar(trained)
    assert avatar.deform is not None
    torch.manual_seed(0)
    avatar.params["shN"] = 0.3 * torch.randn_like(avatar.params["shN"])  # view-dependent colour to get right
    avatar.deform["w2"] = 0.05 * torch.randn_like(avatar.deform["w2"])  # a deformation that moves something
    reference = np.array([0.01, -0.02, 0.6], np.float32)
    poser = AvatarPoser(avatar, reference)
    rng = np.random.default_rng(0)
    expression = rng.uniform(0, 0.6, len(avatar.meta.expression_names)).astype(np.float32)
    rotation, offset = np.array([0.1, 0.3, -0.1], np.float32), np.array([0.01, 0.0, 0.02], np.float32)
    frame = poser.pose(expression, rotation, offset)

    e, r = torch.from_numpy(expression)[None], torch.from_numpy(rotation)[None]
    verts = avatar.vertices(e, r, torch.from_numpy(reference + offset)[None])
    world = gaussians_world(avatar.params, avatar.binding, verts, avatar.faces, 1, "local", deform=avatar.deform,
                            features=deform_features(avatar), condition=deform_condition(e, r))
    flip = np.array([1.0, -1.0, -1.0])
    np.testing.assert_allclose(frame.centers, (world.means[0].numpy() - reference) * flip, atol=1e-6)
    axes = (_quat_to_rotmat(world.quats[0]) * world.scales[0][:, None]).numpy()
    covariances = axes @ axes.transpose(0, 2, 1) * flip[:, None] * flip[None]
    np.testing.assert_allclose(frame.covariances, covariances, rtol=1e-4, atol=1e-4 * np.abs(covariances).max())
    np.testing.assert_allclose(frame.rgbs, world.colors[0].clamp(0, 1).numpy(), atol=1e-5)
    np.testing.assert_allclose(frame.opacities[:, 0], world.opacities.numpy(), atol=1e-6)
    assert frame.centers.dtype == np.float32 and frame.covariances.shape == (avatar.num_gaussians, 3, 3)


def test_pose_sliders_turn_the_head_as_labelled(rig):
    """Yaw turns the nose toward the subject's left (+x), pitch lifts the chin (nose goes up, +y), roll tips the
    head toward the subject's left shoulder (the forehead goes to +x); in the y-up world of the viewer."""

    def nose_and_forehead(yaw, pitch, roll):
        verts = rig.vertices(np.zeros(rig.num_identity, np.float32), rig.neutral_expression(1),
                             pose_rotation(yaw, pitch, roll)[None], np.zeros((1, 3), np.float32))[0].numpy()
        return verts[[1, 10]] * np.array([1.0, -1.0, -1.0])  # FaceMesh 1: nose tip, 10: top of the forehead

    nose0, top0 = nose_and_forehead(0, 0, 0)
    assert nose0[2] > 0.03 and top0[1] > nose0[1]  # the face looks along +z, the forehead above the nose
    assert nose_and_forehead(30, 0, 0)[0][0] > nose0[0] + 0.02
    assert nose_and_forehead(0, 30, 0)[0][1] > nose0[1] + 0.02
    assert nose_and_forehead(0, 0, 30)[1][0] > top0[0] + 0.02


def _render(viewer: AvatarViewer, timeout: float = 60.0) -> np.ndarray:
    """The page's 3D canvas (viser's get_render), once the browser has connected and the worker has drawn."""
    deadline = time.monotonic() + timeout
    while not viewer.server.get_clients():
        assert time.monotonic() < deadline, "the page never connected to the viewer"
        time.sleep(0.2)
    client = next(iter(viewer.server.get_clients().values()))
    time.sleep(1.0)
    return client.get_render(height=360, width=480, transport_format="png", timeout=timeout)[..., :3]


def test_the_page_draws_the_avatar_and_a_slider_changes_it(trained, capture, tmp_path):
    from liftavatar.capture import Capture
    from tests.cdp import Browser

    cap = Capture.load(capture)
    poser = AvatarPoser(load_avatar(trained), None)
    viewer = AvatarViewer([poser], ["trained"], Playback.from_capture(cap), port=0)
    viewer.start()
    try:
        with Browser(800, 600) as browser:
            browser.open(viewer.url)
            # viser fades new splats in, and a busy CPU draws slowly (software WebGL): look again until drawn.
            deadline = time.monotonic() + 60
            while True:
                first = _render(viewer)
                background = np.median(np.concatenate([first[:8].reshape(-1, 3), first[-8:].reshape(-1, 3)]), 0)
                drawn = np.abs(first.astype(int) - background).max(-1) > 40
                if drawn.mean() > 0.03 or time.monotonic() > deadline:
                    break
            assert drawn.mean() > 0.03, f"the avatar covers {drawn.mean():.1%} of the canvas"
            # The state shows the capture's first frame; move sliders through viser's API (a head turn, jaw open).
            count = viewer.stats.count
            viewer.pose_sliders[0].value = 35.0
            viewer.expression_sliders[viewer.names.index("jawOpen")].value = 1.0
            deadline = time.monotonic() + 30
            while viewer.stats.count == count or viewer.state.version != viewer._drawn_version:
                assert time.monotonic() < deadline, "the viewer sent no update after the slider moved"
                time.sleep(0.1)
            deadline = time.monotonic() + 60
            while True:
                second = _render(viewer)
                changed = np.abs(first.astype(int) - second.astype(int)).max(-1) > 40
                if changed.mean() > 0.01 or time.monotonic() > deadline:
                    break
            assert changed.mean() > 0.01, f"moving the slider changed {changed.mean():.2%} of the canvas"
            assert viewer.state.source == "sliders" and "the sliders" in viewer.info.content
            page = browser.screenshot()
            assert page.std() > 10  # the page with its GUI panel, not a blank window
            (tmp_path / "page.npy").write_bytes(page.tobytes())
    finally:
        viewer.stop()
    assert not [t for t in viewer._threads if t.is_alive()]


def test_playback_marks_observed_and_lifted_frames():
    n = 10
    provenance = np.array([0] * 6 + [1] * 4, np.uint8)
    pb = Playback(np.zeros((n, 3), np.float32), np.zeros((n, 3), np.float32), np.zeros((n, 3), np.float32),
                  provenance, np.ones(n, bool), 25.0, "cap")
    assert pb.segments() == [(0, "observed"), (6, "lifted")]


def _one_line_exit_2(args: list[str], needle: str, capsys) -> None:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and err.startswith("error: "), err


def test_bad_input_is_one_sentence_and_exit_2(trained, other_subject, tmp_path, capsys):
    _one_line_exit_2(["avatar", "view", str(other_subject), "--port", "0"], "avatar.safetensors: missing", capsys)
    _one_line_exit_2(["avatar", "view", str(tmp_path / "nope"), "--port", "0"], "no such avatar directory", capsys)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _one_line_exit_2(["avatar", "view", str(trained), "--port", str(port)], f"--port {port}: cannot be used",
                         capsys)
    fewer = with_one_expression_fewer(other_subject, tmp_path / "fewer")
    _one_line_exit_2(["avatar", "view", str(trained), "--kinematics", str(fewer), "--port", "0"],
                     "expression coefficients", capsys)
    _one_line_exit_2(["avatar", "view", str(trained), str(trained), str(trained), "--port", "0"], "3 runs given",
                     capsys)


@pytest.mark.slow
def test_a_clip_without_a_face_is_refused(trained, tmp_path, capsys):
    from liftavatar.video import write_video

    rng = np.random.default_rng(0)
    clip = tmp_path / "no_face.mp4"
    write_video(clip, [np.full((128, 128, 3), 90 + 10 * i, np.uint8) + rng.integers(0, 20, (128, 128, 3),
                                                                                      dtype=np.uint8)
                       for i in range(4)], fps=10)
    assert main(["avatar", "view", str(trained), "--drive", str(clip), "--port", "0"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the tracker's progress
    assert last.startswith("error: ") and "no face found" in last, last


def test_closing_the_browser_stops_the_viewer(trained):
    """The command serves until its last page has been gone for --linger seconds, then exits 0 with nothing
    left running and its port free."""
    from tests.cdp import Browser

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "liftavatar.cli", "avatar", "view", str(trained), "--port", "0",
                             "--linger", "1", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 120
        while "viewer: http" not in line:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
        url = line.split()[1]
        port = int(url.rsplit(":", 1)[1])
        with Browser(640, 480) as browser:
            browser.open(url)
            deadline = time.monotonic() + 60
            while not browser.evaluate("document.body.innerText.includes('Blendshapes')"):  # the GUI came
                assert time.monotonic() < deadline, "the page never showed the viewer's GUI"
                time.sleep(0.5)
            time.sleep(2.0)
            assert proc.poll() is None  # a page is open: still serving
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "viewer stopped (browser closed)" in out
    with socket.socket() as probe:  # the port is free again
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", port))
