"""Look at avatars in the browser (``liftavatar avatar view``): a local web page served by viser.

viser (https://viser.studio) serves the page, draws the Gaussians in the browser with WebGL, and gives the
GUI controls; this module deforms the avatar on the CPU and sends it a new set of Gaussians per update:

- :class:`AvatarPoser`: an avatar's Gaussians for one frame (expression, head rotation, head position) in the
  viewer's world, as viser takes them (centres, 3×3 covariances, RGB, opacity). The world is the export's
  (:data:`liftavatar.avatar.export.Y_UP`: metres, right-handed, y up, the face looking along +z, the head
  frame's origin at the world origin). Colours are evaluated for the capture camera (in front of the face at
  the capture's distance), the view the avatar was trained from: viser draws one colour per Gaussian, so a
  view-dependent (SH) colour cannot follow the browser's camera.
- :class:`AvatarViewer`: the server and its GUI: a slider per named blendshape and for the head's yaw, pitch
  and roll, a reset button; with kinematics (a Capture, or a clip tracked with ``--drive``), play / pause / a
  frame slider whose marks show where observed and lifted frames lie; one or two avatars (side by side, or
  one at a time) driven by the same kinematics; with ``--drive``, the clip's frame in the panel beside the avatars.

One worker thread computes and sends updates: a GUI event only records what changed and wakes it, so a
burst of slider events costs one update, not one per event, and the updates never pile up.

Speed (``benchmarks/viewer.py``): the update is the deformation MLP, the rig, the triangle frames and the
covariances of every Gaussian (torch, CPU), then viser's packing (32 bytes a Gaussian: float32 centre, six
float16 covariance terms, RGBA8) and the websocket send.

Covariances travel as float16, whose smallest normal value (6e-5) is above the variance of a millimetre-wide
Gaussian in m²: the splats are sent in centimetres (:data:`SPLAT_UNITS`) and the scene node scales them back
to metres.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from liftavatar.avatar.export import Y_UP, check_kinematics, reference_translation
from liftavatar.avatar.model import (
    Avatar,
    AvatarError,
    activate_gaussians,
    deform_condition,
    deform_features,
    deform_gaussians,
    triangle_frames,
)
from liftavatar.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["AvatarPoser", "AvatarViewer", "Playback", "SplatFrame", "check_port", "pose_rotation", "view_avatars"]

SPLAT_UNITS = 100.0
"""Splats are sent in centimetres (see the module docstring); the scene node's scale is its inverse."""
DEFAULT_DISTANCE = 0.62
"""Metres from the camera to the head when no capture gives it (the synthetic world's camera distance)."""
POSE_LIMIT_DEG = 60.0
"""Range of the head-pose sliders, degrees either way."""
SIDE_BY_SIDE_GAP = 0.26
"""Metres between the centres of two avatars (or an avatar and the driving clip's frame) shown side by side."""


@dataclass
class SplatFrame:
    """Gaussians as viser takes them, in the viewer's world (metres unless scaled): centres (N, 3),
    covariances (N, 3, 3), colours (N, 3) RGB in [0, 1], opacities (N, 1), all float32."""

    centers: np.ndarray
    covariances: np.ndarray
    rgbs: np.ndarray
    opacities: np.ndarray

    @property
    def num_gaussians(self) -> int:
        return int(self.centers.shape[0])


def pose_rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """(3,) axis-angle (radians, head frame to camera, OpenCV axes) of a head turned by ``yaw`` (toward the
    subject's left, positive), ``pitch`` (chin up, positive) and ``roll`` (toward the subject's left shoulder,
    positive), degrees, applied in that order: what the viewer's pose sliders mean."""
    from scipy.spatial.transform import Rotation

    # In the y-up world the face looks along +z: yaw turns about +y, pitch about -x, roll about -z; in the head
    # frame's OpenCV-like axes (y and z flipped) that is -y, -x and +z.
    rot = Rotation.from_euler("YXZ", [-yaw, -pitch, roll], degrees=True)
    return rot.as_rotvec().astype(np.float32)


class AvatarPoser:
    """One avatar's Gaussians, frame by frame, on the CPU (see the module docstring).

    Args:
        avatar: the avatar (moved to the CPU).
        reference: (3,) metres (default 0.62 m straight ahead), where the head frame's origin sits in the capture camera's frame at zero offset:
            the colours are those seen from the camera (at its origin); the Gaussians are returned about it.
    """

    def __init__(self, avatar: Avatar, reference: np.ndarray | None = None, rig=None):
        from liftavatar.face.rig import FaceRig

        self.rig = rig or FaceRig.load()
        self.avatar = avatar.to("cpu")
        cfg = self.avatar.meta.config
        self.sh_degree, self.sh_frame = cfg.sh_degree, cfg.sh_frame
        self.reference = torch.as_tensor(
            np.array([0.0, 0.0, DEFAULT_DISTANCE], np.float32) if reference is None else reference,
            dtype=torch.float32)
        with torch.no_grad():
            self.local = activate_gaussians({k: v.detach() for k, v in self.avatar.params.items()})
            self.features = None if self.avatar.deform is None else deform_features(self.avatar, rig=self.rig)
        self.identity = self.avatar.identity
        self._flip = torch.tensor(Y_UP)

    @property
    def num_gaussians(self) -> int:
        return self.avatar.num_gaussians

    @property
    def expression_names(self) -> list[str]:
        return list(self.avatar.meta.expression_names)

    @torch.no_grad()
    def pose(self, expression: np.ndarray, rotation: np.ndarray, offset: np.ndarray | None = None) -> SplatFrame:
        """The Gaussians of one frame: ``expression`` (E,) coefficients, ``rotation`` (3,) axis-angle (head frame
        to camera, OpenCV axes), ``offset`` (3,) metres of the head from the reference position (OpenCV axes);
        returned in the viewer's world (metres, y up, the reference position at the origin).

        The same Gaussians as :func:`~liftavatar.avatar.model.gaussians_world` (a test holds them equal), computed
        as batched 3×3 matrix products, which the CPU runs several times faster than that function's
        elementwise quaternion path (written for CUDA graphs), and ending in the covariances viser takes."""
        from gsplat.cuda._torch_impl import _quat_to_rotmat, _spherical_harmonics

        expr = torch.as_tensor(expression, dtype=torch.float32).reshape(1, -1)
        rot = torch.as_tensor(rotation, dtype=torch.float32).reshape(1, 3)
        shift = torch.zeros(1, 3) if offset is None else torch.as_tensor(offset, dtype=torch.float32).reshape(1, 3)
        verts = self.rig.vertices(self.identity, expr, rot, self.reference + shift)
        local = self.local
        if self.avatar.deform is not None:
            local = deform_gaussians(local, self.avatar.deform, self.features, deform_condition(expr, rot))
        cen, frame, k = (t[0].index_select(0, self.avatar.binding)
                         for t in triangle_frames(verts, self.avatar.faces))  # (N, 3), (N, 3, 3), (N,)
        means = cen + k[:, None] * (frame @ local.means.reshape(-1, 3, 1))[..., 0]
        # Σ = A Aᵀ with A = k R R_l diag(σ); the turn to y-up (diag(f), its own inverse) gives f A.
        axes = (frame @ _quat_to_rotmat(local.quats.reshape(-1, 4))) * (k[:, None] * local.scales.reshape(-1, 3))[:, None]
        axes = axes * self._flip[:, None]
        covariances = axes @ axes.transpose(1, 2)
        coeffs = local.coeffs.reshape(means.shape[0], -1, 3)
        if self.sh_degree == 0:
            colors = coeffs[:, 0] * 0.28209479177387814 + 0.5
        else:
            dirs = means  # from the capture camera, at the origin
            if self.sh_frame == "local":
                dirs = (frame.transpose(1, 2) @ dirs[..., None])[..., 0]
            colors = _spherical_harmonics(self.sh_degree, dirs, coeffs) + 0.5
        centers = (means - self.reference) * self._flip
        return SplatFrame(centers.numpy(), covariances.numpy(), colors.clamp(0, 1).numpy(),
                          local.opacities[:, None].numpy())


def check_port(host: str, port: int) -> None:
    """Refuse a port another program listens on (viser itself would quietly move to the next one).

    Raises:
        ConfigError: naming the port and the fix.
    """
    if port == 0:
        return
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port}: use a port number from 1 to 65535 (or 0 for any free port).")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as viser's server binds
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"--port {port}: cannot be used on {host} ({exc.strerror}); another program may "
                              f"serve there: pass another --port, or 0 for any free port.") from None


@dataclass
class Playback:
    """Kinematics to play: per frame expression (N, E), rotation (N, 3), offset (N, 3) from the reference
    position (OpenCV axes, metres), provenance (N,) and valid (N,); ``frames`` gives the picture of frame i
    to show beside the avatars (the driving clip), or None."""

    expression: np.ndarray
    rotation: np.ndarray
    offset: np.ndarray
    provenance: np.ndarray
    valid: np.ndarray
    fps: float
    name: str
    frames: object = None  # callable (int) -> (H, W, 3) uint8, or None

    @property
    def num_frames(self) -> int:
        return len(self.expression)

    @classmethod
    def from_capture(cls, capture, with_frames: bool = False) -> Playback:
        kin = capture.kinematics
        return cls(kin.expression, kin.rotation, kin.translation - reference_translation(kin), kin.provenance,
                   kin.valid, float(capture.meta.fps), capture.path.name,
                   capture.frame if with_frames else None)

    def segments(self) -> list[tuple[int, str]]:
        """(first frame, "observed" / "lifted" / "synthetic") of every run of frames of one provenance."""
        names = {0: "observed", 1: "lifted", 2: "synthetic"}
        starts = [0] + [i for i in range(1, self.num_frames) if self.provenance[i] != self.provenance[i - 1]]
        return [(i, names.get(int(self.provenance[i]), "?")) for i in starts]


@dataclass
class _State:
    """What the next update shows; GUI callbacks change it under the viewer's lock."""

    source: str = "sliders"  # "sliders" or "kinematics"
    frame: int = 0
    playing: bool = False
    version: int = 0  # bumped on every change; the worker draws when it differs from what it drew


@dataclass
class UpdateStats:
    """Updates the worker has sent: count, seconds spent computing and sending, and when the last one went."""

    count: int = 0
    seconds: float = 0.0
    last: float = 0.0
    times: list = field(default_factory=list)


class AvatarViewer:
    """The web viewer of one or two avatars (see the module docstring). :meth:`start` serves it and returns;
    :meth:`stop` stops everything it started (server, worker and playback threads)."""

    def __init__(self, posers: list[AvatarPoser], labels: list[str], playback: Playback | None = None,
                 host: str = "127.0.0.1", port: int = 8080, verbose: bool = False):
        if not 1 <= len(posers) <= 2:
            raise ValueError("the viewer shows one or two avatars")
        self.posers, self.labels, self.playback = posers, labels, playback
        self.host, self.requested_port, self.verbose = host, port, verbose
        self.names = posers[0].expression_names
        self.state = _State(source="kinematics" if playback is not None else "sliders")
        self.stats = UpdateStats()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._drawn_version = -1
        self._connected_once = threading.Event()
        self.server = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> str:
        """Serve the page (the port checked first) and start the worker; returns the page's URL."""
        import viser

        check_port(self.host, self.requested_port)
        self.server = viser.ViserServer(host=self.host, port=self.requested_port, verbose=self.verbose,
                                        label="LiftAvatar")
        self.server.on_client_connect(lambda client: self._connected_once.set())
        self._build_scene()
        self._build_gui()
        self._bump()
        for target in (self._worker, self._player):
            thread = threading.Thread(target=target, name=f"liftavatar-viewer-{target.__name__}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self.url

    @property
    def port(self) -> int:
        return self.server.get_port()

    @property
    def url(self) -> str:
        host = "localhost" if self.host in ("127.0.0.1", "0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def stop(self) -> None:
        """Stop the worker and playback threads, then the server; idempotent."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()
        if self.server is not None:
            self.server.stop()
            self.server = None

    def wait(self, linger: float = 5.0, poll: float = 0.25) -> str:
        """Block until a browser has come and every browser has been gone for ``linger`` seconds ("closed"), or
        :meth:`stop` was called ("stopped"). Ctrl+C propagates (KeyboardInterrupt)."""
        gone_since = None
        while not self._stopping.is_set():
            time.sleep(poll)
            if not self._connected_once.is_set() or self.server is None:
                continue
            if self.server.get_clients():
                gone_since = None
            elif gone_since is None:
                gone_since = time.monotonic()
            elif time.monotonic() - gone_since >= linger:
                return "closed"
        return "stopped"

    # ---------------------------------------------------------------- scene and GUI

    def _offsets(self) -> list[float]:
        """x (metres) of each avatar."""
        count = len(self.posers)
        return [SIDE_BY_SIDE_GAP * (i - (count - 1) / 2) for i in range(count)]

    def _build_scene(self) -> None:
        server = self.server
        server.scene.set_up_direction("+y")
        server.scene.world_axes.visible = False
        server.gui.configure_theme(control_layout="floating", control_width="medium", show_share_button=False)
        offsets = self._offsets()
        distance = float(self.posers[0].reference.norm())
        server.initial_camera.position = (0.0, 0.02, distance)
        server.initial_camera.look_at = (0.0, 0.0, 0.0)
        server.initial_camera.up = (0.0, 1.0, 0.0)
        # Vertical field of view: the head and neck (about 0.42 m), or the row of them in a wide window.
        extent = max(0.42, (max(offsets) - min(offsets) + 0.3) / 1.3)
        server.initial_camera.fov = float(2 * np.arctan(0.5 * extent / distance))
        server.initial_camera.near = 0.01
        self.splats = []
        self.label_handles = []
        for i, (poser, label) in enumerate(zip(self.posers, self.labels)):
            frame = poser.pose(np.zeros(len(self.names), np.float32), np.zeros(3, np.float32))
            handle = server.scene.add_gaussian_splats(
                f"/avatar{i}", frame.centers * SPLAT_UNITS, frame.covariances * SPLAT_UNITS**2, frame.rgbs,
                frame.opacities, scale=1.0 / SPLAT_UNITS, position=(offsets[i], 0.0, 0.0))
            self.splats.append(handle)
            if len(self.posers) > 1:
                self.label_handles.append(server.scene.add_label(f"/label{i}", label,
                                                                 position=(offsets[i], 0.13, 0.0)))

    def _build_gui(self) -> None:
        gui = self.server.gui
        self.clip_image = None
        self.info = gui.add_markdown(self._info_text())
        if len(self.posers) > 1:
            self.layout = gui.add_dropdown("Show", ("side by side", self.labels[0], self.labels[1]),
                                           initial_value="side by side")
            self.layout.on_update(lambda _: self._apply_layout())
        if self.playback is not None:
            pb = self.playback
            with gui.add_folder(f"Kinematics: {pb.name}"):
                self.play = gui.add_button("Play")
                self.play.on_click(lambda _: self._toggle_play())
                marks = tuple((i, kind) for i, kind in pb.segments()[:12])
                self.frame = gui.add_slider("Frame", 0, max(pb.num_frames - 1, 1), 1, 0, marks=marks)
                self.frame.on_update(lambda event: self._on_frame(event))
                self.copy = gui.add_button("Frame to sliders")
                self.copy.on_click(lambda _: self._frame_to_sliders())
                # The clip's frame goes in the panel, not the 3D scene: a scene image retextured at the playback
                # rate was often not drawn at all in (software-WebGL) Chromium, and in the panel it never hides
                # behind the controls.
                if pb.frames is not None:
                    self.clip_image = gui.add_image(pb.frames(0), label="clip frame", format="jpeg")
        with gui.add_folder("Head pose (degrees)"):
            self.pose_sliders = [gui.add_slider(name, -POSE_LIMIT_DEG, POSE_LIMIT_DEG, 1.0, 0.0)
                                 for name in ("yaw", "pitch", "roll")]
        self.reset = gui.add_button("Reset")
        self.reset.on_click(lambda _: self._reset())
        with gui.add_folder("Blendshapes"):
            self.expression_sliders = [gui.add_slider(name, 0.0, 1.0, 0.01, 0.0) for name in self.names]
        for slider in (*self.pose_sliders, *self.expression_sliders):
            slider.on_update(lambda _: self._on_slider())

    def _apply_layout(self) -> None:
        choice = self.layout.value
        offsets = self._offsets()
        for i, (handle, label) in enumerate(zip(self.splats, self.labels)):
            handle.visible = choice in ("side by side", label)
            handle.position = (offsets[i] if choice == "side by side" else 0.0, 0.0, 0.0)
        for i, (handle, label) in enumerate(zip(self.label_handles, self.labels)):
            handle.visible = choice in ("side by side", label)
            handle.position = (offsets[i] if choice == "side by side" else 0.0, 0.13, 0.0)

    def _info_text(self) -> str:
        runs = " · ".join(f"**{label}** ({p.num_gaussians:,} Gaussians)" for label, p in zip(self.labels, self.posers))
        state = self.state
        if state.source == "kinematics" and self.playback is not None:
            pb = self.playback
            kind = {0: "observed", 1: "lifted", 2: "synthetic"}.get(int(pb.provenance[state.frame]), "?")
            valid = "" if pb.valid[state.frame] else ", no face (invalid)"
            shown = f"frame {state.frame + 1} / {pb.num_frames}: **{kind}**{valid}"
        else:
            shown = "the sliders"
        return f"{runs}  \nShowing {shown}"

    # ---------------------------------------------------------------- events

    def _bump(self) -> None:
        """Record a change and wake the worker (the lock is taken here)."""
        with self._wake:
            self.state.version += 1
            self._wake.notify_all()

    def _on_slider(self) -> None:
        with self._lock:
            self.state.source = "sliders"
            was_playing, self.state.playing = self.state.playing, False
        if was_playing:
            self.play.label = "Play"
        self._bump()

    def _on_frame(self, event) -> None:
        with self._lock:
            self.state.frame = int(self.frame.value)
            self.state.source = "kinematics"
            stopped = event.client is not None and self.state.playing  # a person dragged it: stop playing
            if stopped:
                self.state.playing = False
        if stopped:
            self.play.label = "Play"
        self._bump()

    def _toggle_play(self) -> None:
        with self._lock:
            self.state.playing = not self.state.playing
            if self.state.playing:
                self.state.source = "kinematics"
        self.play.label = "Pause" if self.state.playing else "Play"
        self._bump()

    def set_playing(self, playing: bool) -> None:
        """Start or pause playback (what the Play / Pause button does)."""
        if self.playback is not None and self.state.playing != playing:
            self._toggle_play()

    def _reset(self) -> None:
        with self.server.atomic():
            for slider in (*self.pose_sliders, *self.expression_sliders):
                slider.value = 0.0
        self._on_slider()

    def _frame_to_sliders(self) -> None:
        pb = self.playback
        i = self.state.frame
        with self.server.atomic():
            for slider, value in zip(self.expression_sliders, pb.expression[i]):
                slider.value = float(np.clip(round(float(value), 2), 0.0, 1.0))
            from scipy.spatial.transform import Rotation

            yaw, pitch, roll = Rotation.from_rotvec(pb.rotation[i]).as_euler("YXZ", degrees=True)
            for slider, value in zip(self.pose_sliders, (-yaw, -pitch, roll)):
                slider.value = float(np.clip(round(value), -POSE_LIMIT_DEG, POSE_LIMIT_DEG))
        self._on_slider()

    # ---------------------------------------------------------------- threads

    def current(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
        """(expression, rotation, offset, frame or None) that the state asks for."""
        state = self.state
        if state.source == "kinematics" and self.playback is not None:
            pb, i = self.playback, state.frame
            return pb.expression[i], pb.rotation[i], pb.offset[i], i
        expression = np.array([s.value for s in self.expression_sliders], np.float32)
        rotation = pose_rotation(*(s.value for s in self.pose_sliders))
        return expression, rotation, np.zeros(3, np.float32), None

    def draw(self) -> None:
        """Compute and send one update of what the state asks for (the worker's step; callable directly)."""
        started = time.perf_counter()
        with self._lock:
            version = self.state.version
            expression, rotation, offset, frame = self.current()
        frames = [poser.pose(expression, rotation, offset) for poser in self.posers]
        with self.server.atomic():
            for handle, f in zip(self.splats, frames):
                handle.set_gaussians(f.centers * SPLAT_UNITS, f.covariances * SPLAT_UNITS**2, f.rgbs, f.opacities)
            if frame is not None and self.clip_image is not None:
                self.clip_image.image = self.playback.frames(frame)
            self.info.content = self._info_text()
        self._drawn_version = version
        now = time.perf_counter()
        self.stats.count += 1
        self.stats.seconds += now - started
        self.stats.last = now

    def _worker(self) -> None:
        while not self._stopping.is_set():
            with self._wake:
                while self.state.version == self._drawn_version and not self._stopping.is_set():
                    self._wake.wait(timeout=0.5)
            if self._stopping.is_set():
                return
            try:
                self.draw()
            except Exception:  # a bug: keep serving, say what happened
                logger.exception("viewer update failed")
                time.sleep(0.5)

    def _player(self) -> None:
        """Advance the frame at the kinematics' frame rate while playing (frames are skipped, not queued, when
        updates are slower than that)."""
        if self.playback is None:
            return
        period = 1.0 / max(self.playback.fps, 1e-3)
        started, first = time.monotonic(), self.state.frame
        while not self._stopping.wait(min(period, 0.05)):
            if not self.state.playing:
                started, first = time.monotonic(), self.state.frame
                continue
            target = (first + int((time.monotonic() - started) / period)) % self.playback.num_frames
            if target != self.state.frame:
                self.frame.value = target  # on_update records it and wakes the worker


def _load_posers(runs: list[Path], reference: np.ndarray | None, allow_unfinished: bool) -> list[AvatarPoser]:
    from liftavatar.avatar.model import load_avatar

    avatars = [load_avatar(run, allow_unfinished=allow_unfinished) for run in runs]
    if len(avatars) == 2 and avatars[0].meta.expression_names != avatars[1].meta.expression_names:
        raise AvatarError(f"{runs[1]}: its expression set differs from {runs[0]}'s, so one set of kinematics cannot "
                          f"drive both; compare avatars trained on captures of the same rig.")
    return [AvatarPoser(avatar, reference) for avatar in avatars]


def view_avatars(runs: list[Path], kinematics: Path | None = None, drive: Path | None = None, port: int = 8080,
                 host: str = "127.0.0.1", linger: float = 5.0, drive_size: int = 256,
                 drive_max_frames: int | None = None, allow_unfinished: bool = False,
                 on_ready=None) -> str:
    """Serve the viewer of ``runs`` (one or two avatar directories) until the browser is closed (every page gone
    for ``linger`` seconds) or Ctrl+C; everything it started is stopped before it returns ("closed" or
    "interrupted").

    ``kinematics``: a Capture whose kinematics the avatars can play; ``drive``: a video, tracked first (into a
    temporary capture of ``drive_size``² frames, removed at the end) and played beside its frames.
    ``on_ready(viewer)`` is called once the page is served (tests; the CLI prints the URL).

    Raises:
        AvatarError: a run is not an avatar; the kinematics' expression set is not the avatars'.
        ConfigError: the port is taken; both --kinematics and --drive are given.
        TrackError: the clip has no face (or cannot be tracked).
        CaptureError: the kinematics capture does not load.
    """
    import tempfile

    from liftavatar.capture import Capture

    if kinematics is not None and drive is not None:
        raise ConfigError("--kinematics and --drive both give kinematics; pass one of them.")
    if not 1 <= len(runs) <= 2:
        raise ConfigError(f"{len(runs)} runs given; pass one avatar, or two to compare side by side.")
    check_port(host, port)  # before minutes of loading and tracking, not after
    with tempfile.TemporaryDirectory(prefix="liftavatar-drive-") as tmp:
        capture = None
        if kinematics is not None:
            capture = Capture.load(kinematics)
        elif drive is not None:
            from liftavatar.face.track import TrackConfig, track

            # Validate the avatars before minutes of tracking.
            _load_posers(runs, None, allow_unfinished)
            logger.info("tracking %s to drive the avatar ...", drive)
            capture, report = track(drive, Path(tmp) / "capture",
                                    TrackConfig(size=drive_size, max_frames=drive_max_frames))
            logger.info(report.summary())
        reference = None if capture is None else reference_translation(capture.kinematics)
        posers = _load_posers(runs, reference, allow_unfinished)
        playback = None
        if capture is not None:
            check_kinematics(capture, posers[0].avatar)
            playback = Playback.from_capture(capture, with_frames=drive is not None)
            if drive is not None:
                playback.name = Path(drive).name
        labels = [Path(run).resolve().name for run in runs]
        if len(labels) == 2 and labels[0] == labels[1]:
            labels = [f"{labels[0]} (1)", f"{labels[1]} (2)"]
        viewer = AvatarViewer(posers, labels, playback, host=host, port=port)
        try:
            viewer.start()
            if playback is not None:
                viewer.set_playing(True)
            if on_ready is not None:
                on_ready(viewer)
            try:
                return viewer.wait(linger)
            except KeyboardInterrupt:
                return "interrupted"
        finally:
            viewer.stop()
