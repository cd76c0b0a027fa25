"""Benchmark the browser viewer (``liftavatar avatar view``): updates per second and bytes per update.

A 40k-Gaussian deforming avatar (the package's default avatar config, ``gaussians_per_triangle`` raised so
that the rig's triangles carry about 40,000 Gaussians; random deformation weights and SH colour, since the
cost does not depend on the values) is posed on the CPU. Three measurements per torch thread count:

- ``pose``: :meth:`AvatarPoser.pose` alone (deformation MLP, rig, triangle frames, covariances, colours);
- ``update``: one whole update of the viewer without a browser (pose, viser's packing, message queued);
- ``served``: the running viewer with one websocket client attached (a Python client speaking viser's
  subprotocol, which reads what a browser would read): a driver thread moves the yaw slider as fast as it can,
  the viewer's worker coalesces the events and sends updates as fast as it can; updates/s is what the worker
  sent, bytes/update what the client received divided by that (splats, GUI echoes and framing included).

The browser's side (decoding, sorting and drawing the splats with WebGL) is not measured: it runs on the
user's machine and GPU.

    python benchmarks/viewer.py            # writes benchmarks/results/viewer.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from liftavatar.avatar.model import AvatarConfig, AvatarMeta, init_avatar
from liftavatar.avatar.viewer import AvatarPoser, AvatarViewer
from liftavatar.face.rig import FaceRig
from liftavatar.report import machine_info

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "viewer.json"


def make_avatar(target: int = 40_000, seed: int = 0):
    """A deforming avatar of about ``target`` Gaussians with non-trivial deformation and SH."""
    rig = FaceRig.load()
    base = init_avatar(rig, np.zeros(rig.num_identity, np.float32), _meta(rig, AvatarConfig(gaussians_per_triangle=1)))
    per = max(1, round(target / base.num_gaussians))
    avatar = init_avatar(rig, np.zeros(rig.num_identity, np.float32),
                         _meta(rig, AvatarConfig(gaussians_per_triangle=per)), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    avatar.deform["w2"] = 0.01 * torch.randn(avatar.deform["w2"].shape, generator=gen)
    avatar.params["shN"] = 0.1 * torch.randn(avatar.params["shN"].shape, generator=gen)
    return avatar


def _meta(rig, config):
    return AvatarMeta(subject="bench", rig={"name": rig.name, "version": rig.version},
                      expression_names=list(rig.expression_names), size=(512, 512),
                      intrinsics=(700.0, 700.0, 256.0, 256.0), config=config)


def time_calls(fn, seconds: float) -> list[float]:
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def served(viewer: AvatarViewer, seconds: float) -> dict:
    """Updates/s and bytes/update of the running viewer with one websocket client draining it."""
    import viser
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    received = {"bytes": 0, "messages": 0}
    stop = threading.Event()
    ws = connect(f"ws://127.0.0.1:{viewer.port}", subprotocols=[f"viser-v{viser.__version__}"], max_size=None)

    def drain() -> None:
        while not stop.is_set():
            try:
                msg = ws.recv(timeout=0.5)
            except TimeoutError:
                continue
            except ConnectionClosed:
                return
            received["bytes"] += len(msg)
            received["messages"] += 1

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    time.sleep(2.0)  # the scene and GUI the page gets on connecting
    yaw = viewer.pose_sliders[0]

    def drive() -> None:
        value = 0.0
        while not stop.is_set():
            value = (value + 1.0) % 60.0
            yaw.value = value
            time.sleep(0.002)

    driver = threading.Thread(target=drive, daemon=True)
    sent0, bytes0 = viewer.stats.count, received["bytes"]
    start = time.perf_counter()
    driver.start()
    time.sleep(seconds)
    sent, got = viewer.stats.count - sent0, received["bytes"] - bytes0
    elapsed = time.perf_counter() - start
    stop.set()
    driver.join()
    time.sleep(1.0)
    ws.close()
    reader.join(timeout=5)
    return {"seconds": round(elapsed, 2), "updates": sent, "updates_per_s": round(sent / elapsed, 1),
            "bytes_received": got, "bytes_per_update": round(got / max(sent, 1)),
            "megabytes_per_s": round(got / elapsed / 1e6, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gaussians", type=int, default=40_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    avatar = make_avatar(args.gaussians)
    n = avatar.num_gaussians
    rig = FaceRig.load()
    expression = np.zeros(rig.num_expressions, np.float32)
    expression[rig.expression_index("jawOpen")] = 0.6
    rotation = np.array([0.0, 0.3, 0.0], np.float32)
    results = {"gaussians": n, "deform_width": avatar.meta.config.deform_width,
               "sh_degree": avatar.meta.config.sh_degree, "runs": []}
    for threads in args.threads:
        torch.set_num_threads(threads)
        poser = AvatarPoser(avatar)
        pose_s = time_calls(lambda poser=poser: poser.pose(expression, rotation), args.seconds / 2)
        viewer = AvatarViewer([poser], ["bench"], port=0)
        viewer.start()
        try:
            time.sleep(1.0)
            update_s = time_calls(viewer.draw, args.seconds / 2)
            run = {
                "torch_threads": threads,
                "pose_ms_median": round(1e3 * statistics.median(pose_s), 1),
                "update_ms_median": round(1e3 * statistics.median(update_s), 1),
                "update_per_s_no_client": round(1 / statistics.median(update_s), 1),
                "served": served(viewer, args.seconds),
            }
        finally:
            viewer.stop()
        print(json.dumps(run))
        results["runs"].append(run)
    results["bytes_per_gaussian_packed"] = 32
    results["machine"] = machine_info("cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
