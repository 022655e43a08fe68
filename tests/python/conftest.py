"""Fixtures: the real `relay` binary in front of a real origin, on loopback.

Binaries come from $RELAY_BIN (default <repo>/target/debug/relay) and $RELAY_BENCH_BIN
(default <repo>/target/debug/relay-bench); relative paths are taken from the repo root.
$RELAY_TEST_DATA_PATH=copy|splice|auto runs every relay with that --data-path.

Every process a fixture starts is stopped by its PID at teardown (SIGTERM, then SIGKILL if
it does not exit in time). Before a relay is stopped, teardown asserts that its
`relay_connections_active` gauge went back to 0: a test that leaves a session behind
(a leaked slot, a connection the relay never closed) errors even if its own asserts passed.
"""

from __future__ import annotations

import datetime
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import PortReservation, wait_until

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

START_TIMEOUT = 15.0  # seconds for a process to report ready
STOP_TIMEOUT = 10.0  # seconds for a process to exit after SIGTERM
DRAIN_TIMEOUT = 10.0  # seconds for relay's active gauge to return to 0


def _bin(env: str, default: str) -> Path:
    p = Path(os.environ.get(env, default))
    return p if p.is_absolute() else REPO / p


RELAY_BIN = _bin("RELAY_BIN", "target/debug/relay")
RELAY_BENCH_BIN = _bin("RELAY_BENCH_BIN", "target/debug/relay-bench")
# The whole suite can run on another data path (as relay/tests does): copy, splice or auto.
DATA_PATH = os.environ.get("RELAY_TEST_DATA_PATH", "")


# --------------------------------------------------------------------------- processes


class ManagedProcess:
    """A child process whose stdout/stderr lines are collected by reader threads."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None) -> None:
        self.name = name
        self.argv = argv
        self.out: list[str] = []
        self.err: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            bufsize=1,
        )
        self.pid = self.proc.pid
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _pump(self, stream, sink: list[str]) -> None:
        for line in stream:
            with self._cond:
                sink.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_line(self, stream: str, pred, timeout: float, what: str) -> str:
        """Blocks until a line of `stream` ("out" or "err") satisfies `pred`; returns it."""
        sink = self.out if stream == "out" else self.err
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                while seen < len(sink):
                    line = sink[seen]
                    seen += 1
                    if pred(line):
                        return line
                if self.proc.poll() is not None and all(not t.is_alive() for t in self._threads):
                    raise AssertionError(
                        f"{self.name} exited with {self.proc.returncode} before {what}\n"
                        + self.log()
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no {what} within {timeout}s\n" + self.log())
                self._cond.wait(min(left, 0.5))

    def log(self) -> str:
        with self._cond:
            return (
                f"--- {self.name} {' '.join(self.argv)}\n--- stdout:\n"
                + "\n".join(self.out[-50:])
                + "\n--- stderr:\n"
                + "\n".join(self.err[-50:])
            )

    def stop(self) -> int:
        """SIGTERM by PID, wait, SIGKILL if needed. Returns the exit status."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        for t in self._threads:
            t.join(2)
        return self.proc.returncode


class PyOrigin(ManagedProcess):
    """origin_server.py: the Python `websockets` server as origin (over TLS with `tls`)."""

    def __init__(self, tls: "CertFiles | None" = None, client_ca: Path | None = None) -> None:
        argv = [sys.executable, "-u", str(HERE / "origin_server.py"), "--port", "0"]
        if tls is not None:
            argv += ["--tls-cert", str(tls.cert), "--tls-key", str(tls.key)]
            if client_ca is not None:
                argv += ["--tls-client-ca", str(client_ca)]
        super().__init__("python-origin" + ("-tls" if tls else ""), argv)
        line = self.wait_line("out", lambda l: '"ready"' in l, START_TIMEOUT, "ready event")
        self.port = json.loads(line)["port"]
        self.addr = f"127.0.0.1:{self.port}"

    def events(self, event: str | None = None) -> list[dict]:
        with self._cond:
            lines = list(self.out)
        evs = [json.loads(l) for l in lines if l.startswith("{")]
        return [e for e in evs if event is None or e["event"] == event]

    def wait_event(self, pred, timeout: float = 10.0, what: str = "origin event") -> dict:
        line = self.wait_line(
            "out", lambda l: l.startswith("{") and pred(json.loads(l)), timeout, what
        )
        return json.loads(line)


class EchoOrigin(ManagedProcess):
    """`relay-bench echo-origin`: the Rust echo origin from bench/."""

    def __init__(self, threads: int = 1) -> None:
        super().__init__(
            "echo-origin",
            [
                str(RELAY_BENCH_BIN),
                "echo-origin",
                "--listen",
                "127.0.0.1:0",
                "--threads",
                str(threads),
            ],
        )
        line = self.wait_line("out", lambda l: l.startswith("ready "), START_TIMEOUT, "ready line")
        self.addr = line.split()[1]
        self.port = int(self.addr.rsplit(":", 1)[1])


class Relay(ManagedProcess):
    """The relay binary, started in quick mode or with a config file."""

    def __init__(
        self,
        argv: list[str],
        listen: PortReservation,
        admin: PortReservation,
        extra_res: dict[str, PortReservation] | None = None,
    ) -> None:
        env = dict(os.environ)
        env.setdefault("RELAY_LOG", "info")
        super().__init__("relay", argv, env=env)
        self.listen = listen
        self.admin_res = admin
        # Further listeners ({LISTEN2} in a config, the plain --listen next to --listen-tls).
        self.extra_res = dict(extra_res or {})
        self.port = listen.port
        self.addr = ("127.0.0.1", listen.port)
        self.url = f"ws://127.0.0.1:{listen.port}"
        # The same listener when it is a TLS one: wss:// and https://.
        self.wss_url = f"wss://127.0.0.1:{listen.port}"
        self.admin = f"http://127.0.0.1:{admin.port}"
        try:
            self.wait_line("err", lambda l: "relay ready" in l, START_TIMEOUT, "'relay ready'")
        except BaseException:
            # Not ready in time (or exited): stop it by PID so it does not outlive the test.
            ManagedProcess.stop(self)
            raise

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(self.admin + path, timeout=timeout) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metrics_text(self) -> str:
        status, body = self.get("/metrics")
        assert status == 200, (status, body)
        return body

    def metrics(self) -> dict[tuple[str, tuple], float]:
        """Every sample, keyed by (sample name, sorted label items)."""
        out = {}
        for fam in text_string_to_metric_families(self.metrics_text()):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric_sum(self, name: str, **labels: str) -> float:
        """Sum of a sample over every worker (and any label not given)."""
        total = 0.0
        for (n, lbls), v in self.metrics().items():
            d = dict(lbls)
            if n == name and all(d.get(k) == v2 for k, v2 in labels.items()):
                total += v
        return total

    def active(self) -> int:
        return int(self.metric_sum("relay_connections_active"))

    def wait_idle(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Waits until no connection is open in any worker."""
        wait_until(lambda: self.active() == 0, timeout, what="relay_connections_active == 0")

    def stop(self) -> int:
        try:
            return super().stop()
        finally:
            self.listen.release()
            self.admin_res.release()
            for r in self.extra_res.values():
                r.release()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def relay_bin() -> Path:
    if not RELAY_BIN.is_file():
        pytest.fail(
            f"relay binary not found at {RELAY_BIN}: build it (cargo build -p relay) "
            "or set RELAY_BIN",
            pytrace=False,
        )
    return RELAY_BIN


@pytest.fixture(scope="session")
def bench_bin() -> Path:
    if not RELAY_BENCH_BIN.is_file():
        pytest.fail(
            f"relay-bench binary not found at {RELAY_BENCH_BIN}: build it "
            "(cargo build -p relay-bench) or set RELAY_BENCH_BIN",
            pytrace=False,
        )
    return RELAY_BENCH_BIN


@pytest.fixture
def py_origin():
    o = PyOrigin()
    yield o
    o.stop()


@pytest.fixture
def echo_origin(bench_bin):
    o = EchoOrigin()
    yield o
    o.stop()


@pytest.fixture
def down_origin():
    """An address where nothing listens (held so no one else takes it): connect is refused."""
    r = PortReservation()
    yield r.addr
    r.release()


@pytest.fixture
def start_relay(relay_bin, tmp_path):
    """Factory: start_relay(origin=ADDR) or start_relay(config=TOML).

    In a config, {LISTEN}, {ADMIN} and {ORIGIN} are replaced by the listener address, the
    admin address and `origin`; {LISTEN2} (if present) by a second reserved address, kept
    in `relay.extra_res["LISTEN2"]`. Teardown checks the active gauge returned to 0, then
    stops the relay by PID and checks that it drained and exited 0.

    TLS quick mode: start_relay(tls=CertFiles, origin=ADDR or None) runs
    `relay --listen-tls ADDR --cert F --key F [--origin ADDR]` (no origin: the embedded
    default apps); `plain_too=True` adds a plain `--listen` (in `relay.extra_res["plain"]`).
    """
    relays: list[Relay] = []

    def start(
        origin: str | None = None,
        config: str | None = None,
        workers: int = 2,
        extra: list[str] | None = None,
        tls: "CertFiles | None" = None,
        plain_too: bool = False,
    ) -> Relay:
        listen, admin = PortReservation(), PortReservation()
        extra_res: dict[str, PortReservation] = {}
        if config is None and tls is not None:
            argv = [
                str(relay_bin),
                "--listen-tls",
                listen.addr,
                "--cert",
                str(tls.cert),
                "--key",
                str(tls.key),
                "--admin",
                admin.addr,
            ]
            if origin is not None:
                argv += ["--origin", origin]
            if plain_too:
                extra_res["plain"] = PortReservation()
                argv += ["--listen", extra_res["plain"].addr]
        elif config is None:
            assert origin is not None
            argv = [
                str(relay_bin),
                "--listen",
                listen.addr,
                "--origin",
                origin,
                "--admin",
                admin.addr,
            ]
        else:
            if "{LISTEN2}" in config:
                extra_res["LISTEN2"] = PortReservation()
                config = config.replace("{LISTEN2}", extra_res["LISTEN2"].addr)
            text = (
                config.replace("{LISTEN}", listen.addr)
                .replace("{ADMIN}", admin.addr)
                .replace("{ORIGIN}", origin or "127.0.0.1:9")
            )
            path = tmp_path / f"relay-{len(relays)}.toml"
            path.write_text(text)
            argv = [str(relay_bin), "--config", str(path)]
        argv += ["--workers", str(workers), "--no-pin"] + (extra or [])
        if DATA_PATH:
            argv += ["--data-path", DATA_PATH]
        try:
            r = Relay(argv, listen, admin, extra_res)
        except BaseException:
            listen.release()
            admin.release()
            for res in extra_res.values():
                res.release()
            raise
        relays.append(r)
        return r

    yield start

    problems = []
    for r in relays:
        if r.proc.poll() is not None:
            problems.append(f"relay exited early with {r.proc.returncode}\n{r.log()}")
            r.stop()
            continue
        try:
            r.wait_idle()
        except AssertionError as e:
            gauges = [
                l
                for l in r.metrics_text().splitlines()
                if l.startswith(("relay_connections_active", "relay_connections_closed"))
            ]
            problems.append(f"{e}\n" + "\n".join(gauges))
            # A session is stuck: a graceful drain would wait for it, so kill by PID.
            os.kill(r.pid, signal.SIGKILL)
            r.stop()
            continue
        code = r.stop()
        if code != 0:
            problems.append(f"relay exited with {code} after SIGTERM\n{r.log()}")
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


# Origin fixtures come before start_relay in these signatures so that teardown (reverse
# order) checks and stops the relay while its origin is still up: an origin that died first
# would close leaked sessions and hide them from the active-gauge check.


@pytest.fixture
def relay(py_origin, start_relay):
    """relay in quick mode in front of the Python websockets origin."""
    r = start_relay(origin=py_origin.addr)
    r.origin = py_origin
    return r


@pytest.fixture
def echo_relay(echo_origin, start_relay):
    """relay in quick mode in front of relay-bench echo-origin."""
    r = start_relay(origin=echo_origin.addr)
    r.origin = echo_origin
    return r


# --------------------------------------------------------------------------- TLS


@dataclass
class CertFiles:
    """A certificate chain and its private key as PEM files, as relay's config names them."""

    name: str
    cert: Path  # PEM chain, leaf first
    key: Path  # PEM private key
    leaf_der: bytes

    @property
    def serial(self) -> int:
        from cryptography import x509

        return x509.load_der_x509_certificate(self.leaf_der).serial_number

    def copy_to(self, cert: Path, key: Path) -> None:
        """Writes this pair over other files (a certificate rotation, for SIGHUP)."""
        cert.write_bytes(self.cert.read_bytes())
        key.write_bytes(self.key.read_bytes())


class Pki:
    """Test certificates from `trustme`: one CA that clients and relay trust, and a second
    CA nobody trusts. Files are written under one session directory."""

    def __init__(self, directory: Path) -> None:
        import trustme

        self._trustme = trustme
        self.dir = directory
        self.ca = trustme.CA(organization_name="relay tests CA")
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.untrusted_ca = trustme.CA(organization_name="nobody trusts this CA")
        self._n = itertools.count()
        # relay's own listener: clients connect to 127.0.0.1 (no SNI) or name relay.test.
        self.server = self.issue("server", "127.0.0.1", "localhost", "relay.test")
        # An origin behind a TLS pool (tls_server_name = "origin.test").
        self.origin = self.issue("origin", "origin.test", "127.0.0.1")
        # The same names, signed by the CA relay does not trust.
        self.rogue_origin = self.issue(
            "rogue-origin", "origin.test", "127.0.0.1", ca=self.untrusted_ca
        )

    def issue(
        self,
        name: str,
        *identities: str,
        ca=None,
        rsa: bool = False,
        key_format: str = "native",
        common_name: str | None = None,
        not_before: datetime.datetime | None = None,
        not_after: datetime.datetime | None = None,
    ) -> CertFiles:
        """A leaf for `identities` (DNS names, IPs). key_format: "native" (what trustme
        writes: SEC1 for EC, PKCS#1 for RSA) or "pkcs8"."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        ca = ca or self.ca
        kt = self._trustme.KeyType.RSA if rsa else self._trustme.KeyType.ECDSA
        leaf = ca.issue_cert(
            *identities,
            common_name=common_name,
            not_before=not_before,
            not_after=not_after,
            key_type=kt,
        )
        stem = f"{name}-{next(self._n)}"
        cert = self.dir / f"{stem}.pem"
        key = self.dir / f"{stem}.key"
        chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
        cert.write_bytes(chain)
        key_pem = leaf.private_key_pem.bytes()
        if key_format == "pkcs8":
            k = serialization.load_pem_private_key(key_pem, password=None)
            key_pem = k.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        else:
            assert key_format == "native", key_format
        key.write_bytes(key_pem)
        der = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes()).public_bytes(
            serialization.Encoding.DER
        )
        return CertFiles(name, cert, key, der)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_origin(pki):
    """origin_server.py over TLS with a certificate for origin.test / 127.0.0.1 from the CA."""
    o = PyOrigin(tls=pki.origin)
    yield o
    o.stop()


@pytest.fixture
def mtls_origin(pki):
    """A TLS origin that demands a client certificate signed by the test CA."""
    o = PyOrigin(tls=pki.origin, client_ca=pki.ca_file)
    yield o
    o.stop()


@pytest.fixture
def rogue_tls_origin(pki):
    """origin_server.py over TLS with a certificate from a CA relay does not trust."""
    o = PyOrigin(tls=pki.rogue_origin)
    yield o
    o.stop()


def pytest_report_header(config):
    return [
        f"relay: {RELAY_BIN}" + ("" if RELAY_BIN.is_file() else " (missing)"),
        f"relay-bench: {RELAY_BENCH_BIN}" + ("" if RELAY_BENCH_BIN.is_file() else " (missing)"),
        f"data path: {DATA_PATH or 'relay default'}",
    ]
