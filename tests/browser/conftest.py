"""Fixtures: the real `relay` binary in front of an echo origin, and headless Chromium.

Binaries: $RELAY_BIN (default <repo>/target/debug/relay); the origin is
$RELAY_BENCH_BIN (default <repo>/target/debug/relay-bench) `echo-origin` when that is built,
else `echo_origin.py` on the `websockets` library. Chromium: $CHROMIUM or `chromium` on PATH,
installed by scripts/setup-browser.sh. Every process is stopped by its PID at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cdp import Chromium, find_chromium

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ARTIFACTS = REPO / "test-artifacts"
START_TIMEOUT = 15.0


def _bin(env: str, default: str) -> Path:
    p = Path(os.environ.get(env, default))
    return p if p.is_absolute() else REPO / p


RELAY_BIN = _bin("RELAY_BIN", "target/debug/relay")
RELAY_BENCH_BIN = _bin("RELAY_BENCH_BIN", "target/debug/relay-bench")


class Reservation:
    """A loopback port held by a bound, non-listening SO_REUSEADDR|SO_REUSEPORT socket, so
    that the process under test can bind it and nobody else is handed it meanwhile."""

    def __init__(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        self.sock = s
        self.port = s.getsockname()[1]

    def release(self) -> None:
        self.sock.close()


class Process:
    """A child whose output lines are collected by reader threads."""

    def __init__(self, name: str, argv: list[str]) -> None:
        self.name, self.argv = name, argv
        self.lines: dict[str, list[str]] = {"out": [], "err": []}
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        for key, stream in (("out", self.proc.stdout), ("err", self.proc.stderr)):
            threading.Thread(target=self._pump, args=(stream, key), daemon=True).start()

    def _pump(self, stream, key: str) -> None:
        for line in stream:
            with self.cond:
                self.lines[key].append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_line(self, key: str, pred, what: str, timeout: float = START_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for line in self.lines[key][seen:]:
                    if pred(line):
                        return line
                seen = len(self.lines[key])
                if self.proc.poll() is not None:
                    raise AssertionError(f"{self.name} exited before {what}:\n{self.log()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"{self.name}: no {what} within {timeout}s:\n{self.log()}")
                self.cond.wait(0.2)

    def log(self) -> str:
        with self.cond:
            return (
                f"--- {' '.join(self.argv)}\n--- stdout\n"
                + "\n".join(self.lines["out"][-40:])
                + "\n--- stderr\n"
                + "\n".join(self.lines["err"][-40:])
            )

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"{self.name} ignored SIGTERM:\n{self.log()}")
        return self.proc.returncode


class Relay(Process):
    def __init__(self, origin: str) -> None:
        self.listen, self.admin_res = Reservation(), Reservation()
        super().__init__(
            "relay",
            [
                str(RELAY_BIN),
                "--listen",
                f"127.0.0.1:{self.listen.port}",
                "--origin",
                origin,
                "--admin",
                f"127.0.0.1:{self.admin_res.port}",
                "--workers",
                "2",
                "--no-pin",
            ],
        )
        self.port = self.listen.port
        self.url = f"ws://127.0.0.1:{self.port}"
        self.admin = f"127.0.0.1:{self.admin_res.port}"
        self.wait_line("err", lambda l: "relay ready" in l, "'relay ready'")

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://{self.admin}/v1/stats", timeout=5) as r:
            return json.load(r)

    def stop(self, timeout: float = 10.0) -> int:
        try:
            return super().stop(timeout)
        finally:
            self.listen.release()
            self.admin_res.release()


@pytest.fixture
def origin():
    if RELAY_BENCH_BIN.is_file():
        argv = [str(RELAY_BENCH_BIN), "echo-origin", "--listen", "127.0.0.1:0", "--threads", "1"]
    else:
        argv = [sys.executable, str(HERE / "echo_origin.py"), "--listen", "127.0.0.1:0"]
    p = Process("echo-origin", argv)
    try:
        p.addr = p.wait_line("out", lambda l: l.startswith("ready "), "ready line").split()[1]
        yield p
    finally:
        p.stop()


@pytest.fixture
def relay(origin):
    if not RELAY_BIN.is_file():
        pytest.fail(f"no relay binary at {RELAY_BIN}: cargo build -p relay, or set RELAY_BIN")
    r = Relay(origin.addr)
    try:
        yield r
    finally:
        code = r.stop()
        assert code == 0, f"relay exited with {code}:\n{r.log()}"


@pytest.fixture
def chromium():
    binary = find_chromium()
    if binary is None:
        pytest.fail(
            "no Chromium: run scripts/setup-browser.sh (or set CHROMIUM=/path/to/chromium)",
            pytrace=False,
        )
    c = Chromium(binary)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def start_chromium():
    """Factory: start_chromium(extra_flags) -> a Chromium with those flags added to the
    project's (cdp.FLAGS); each is stopped at teardown. `chromium` above is the same with
    no extra flags."""
    binary = find_chromium()
    if binary is None:
        pytest.fail(
            "no Chromium: run scripts/setup-browser.sh (or set CHROMIUM=/path/to/chromium)",
            pytrace=False,
        )
    started: list[Chromium] = []

    def start(extra_flags: list[str] | None = None) -> Chromium:
        c = Chromium(binary, extra_flags=extra_flags)
        started.append(c)
        return c

    try:
        yield start
    finally:
        for c in started:
            c.stop()
