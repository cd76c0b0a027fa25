"""Headless Chromium driven through the DevTools protocol (for pages that keep running: the avatar viewer).

The DevTools websocket is spoken with `websockets` (a dependency of viser). WebGL works in headless Chromium
without flags here: it falls back to SwiftShader (software WebGL 2).
"""

from __future__ import annotations

import base64
import contextlib
import io
import itertools
import json
import subprocess
import tempfile
import time
import urllib.request
from typing import Self

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from tests.test_report_html import find_chromium


class Browser:
    """One headless Chromium with one page; :meth:`close` ends the browser (and its profile folder)."""

    def __init__(self, width: int = 1000, height: int = 700):
        from websockets.sync.client import connect

        binary = find_chromium()
        if binary is None:
            pytest.skip("no Chromium binary found (install Debian's chromium package, or set LIFTAVATAR_CHROMIUM)")
        self._profile = tempfile.TemporaryDirectory(prefix="liftavatar-chromium-")
        self.process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--no-first-run", "--remote-debugging-port=0",
             f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 60
        for line in self.process.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            if "DevTools listening on" in line:
                port = int(line.split("ws://", 1)[1].split("/", 1)[0].rsplit(":", 1)[1])
                break
            if time.monotonic() > deadline:
                break
        if port is None:
            self.close()
            pytest.fail("Chromium did not open its DevTools port")
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=10))
        page = next(t for t in targets if t["type"] == "page")
        self._ws = connect(page["webSocketDebuggerUrl"], max_size=None)
        self._ids = itertools.count(1)
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        request = next(self._ids)
        self._ws.send(json.dumps({"id": request, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv(timeout=60))
            if message.get("id") == request:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def open(self, url: str) -> None:
        self.call("Page.enable")
        self.call("Page.navigate", url=url)

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def screenshot(self) -> np.ndarray:
        from PIL import Image

        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))

    def close(self) -> None:
        with contextlib.suppress(OSError, ConnectionClosed):
            self._ws.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._profile.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
