"""Headless Chromium driven over the Chrome DevTools Protocol, with the `websockets` package.

`Chromium` starts the browser with a fresh profile and `--remote-debugging-port=0`, reads
the port it picked from `<profile>/DevToolsActivePort`, and stops it by PID. `Page` is a
CDP session on one tab: `call()` sends a command and awaits its answer; events are kept
(exceptions thrown by the page's scripts, console messages) for the test to check.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from websockets.asyncio.client import connect

# The flags the project runs Chromium with (see scripts/setup-browser.sh).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
    "--mute-audio",
]


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in ("chromium", "chromium-browser"):
        p = shutil.which(name)
        if p:
            return p
    return None


class Chromium:
    def __init__(
        self,
        binary: str,
        width: int = 1440,
        height: int = 1000,
        extra_flags: list[str] | None = None,
    ) -> None:
        """`extra_flags` go after the project's FLAGS (e.g. the TLS tests'
        --ignore-certificate-errors-spki-list); the other tests pass none."""
        self.profile = tempfile.mkdtemp(prefix="relay-chromium-")
        self.log_path = Path(self.profile).with_suffix(".log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [
                binary,
                *FLAGS,
                *(extra_flags or []),
                f"--user-data-dir={self.profile}",
                "--remote-debugging-port=0",
                "--remote-debugging-address=127.0.0.1",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.port = self._wait_port(timeout=30.0)

    def _wait_port(self, timeout: float) -> int:
        path = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"chromium exited with {self.proc.returncode} at start-up:\n{self.log()}"
                )
            try:
                lines = path.read_text().split("\n")
                if lines and lines[0].strip().isdigit():
                    return int(lines[0])
            except FileNotFoundError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"chromium wrote no DevToolsActivePort within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def page_ws_url(self) -> str:
        """The DevTools WebSocket of the first tab."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=5) as r:
            targets = json.load(r)
        for t in targets:
            if t.get("type") == "page":
                return t["webSocketDebuggerUrl"]
        raise RuntimeError(f"no page target in {targets}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)
        try:
            self.log_path.unlink()
        except OSError:
            pass


class CdpError(RuntimeError):
    pass


class Page:
    """A CDP session on one tab."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self.exceptions: list[dict] = []
        self.console: list[dict] = []
        self._waiters: list[tuple[str, asyncio.Future]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> "Page":
        ws = await connect(url, max_size=None, ping_interval=None, open_timeout=10)
        page = cls(ws)
        await page.call("Page.enable")
        await page.call("Runtime.enable")
        return page

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = json.loads(raw)
                if "id" in msg:
                    fut = self._pending.pop(msg["id"], None)
                    if fut and not fut.done():
                        if "error" in msg:
                            fut.set_exception(CdpError(str(msg["error"])))
                        else:
                            fut.set_result(msg.get("result", {}))
                    continue
                method = msg.get("method")
                params = msg.get("params", {})
                if method == "Runtime.exceptionThrown":
                    self.exceptions.append(params)
                elif method == "Runtime.consoleAPICalled":
                    self.console.append(params)
                for name, fut in list(self._waiters):
                    if name == method and not fut.done():
                        fut.set_result(params)
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(CdpError("DevTools connection closed"))

    async def call(self, method: str, params: dict | None = None, timeout: float = 15.0) -> dict:
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        await self.ws.send(json.dumps({"id": i, "method": method, "params": params or {}}))
        return await asyncio.wait_for(fut, timeout)

    def event(self, method: str) -> asyncio.Future:
        """A future for the next `method` event (create it before the action causing it)."""
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append((method, fut))
        return fut

    async def navigate(self, url: str, timeout: float = 15.0) -> None:
        loaded = self.event("Page.loadEventFired")
        r = await self.call("Page.navigate", {"url": url})
        if r.get("errorText"):
            raise CdpError(f"navigate {url}: {r['errorText']}")
        await asyncio.wait_for(loaded, timeout)

    async def eval(self, expression: str):
        """The value of a JS expression (JSON-serialisable), raising on a JS exception."""
        r = await self.call(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}
        )
        if "exceptionDetails" in r:
            raise CdpError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def screenshot(self, path: Path) -> None:
        """A PNG of the whole page (beyond the viewport)."""
        metrics = await self.call("Page.getLayoutMetrics")
        size = metrics.get("cssContentSize") or metrics["contentSize"]
        r = await self.call(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {
                    "x": 0,
                    "y": 0,
                    "width": size["width"],
                    "height": size["height"],
                    "scale": 1,
                },
            },
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(r["data"]))

    async def close(self) -> None:
        self._reader.cancel()
        await self.ws.close()
