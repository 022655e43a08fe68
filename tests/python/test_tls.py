"""TLS termination (and TLS to origins) as a client sees it: wss:// with the Python
`websockets` client and raw `ssl` sockets (OpenSSL, through the stdlib), certificates from
`trustme` (the `pki` session fixture in conftest.py). The interface under test is the one
relay documents for TLS: `[listener.tls]` with `[[listener.tls.certificate]]`, pool `tls`,
`tls_ca`, `tls_server_name`, `--listen-tls/--cert/--key`, SIGHUP reload, the
`relay_tls_handshakes_total{kind}` and `relay_tls_handshake_failures_total{reason}` counters.

What each test asserts is what a user sees: the bytes echoed, the certificate served (its
SAN and serial, read from the client's side), `session_reused`, the status line, the alert
record, when the connection was closed, the exit status and message, and the counters.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest
from cryptography import x509
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import ManagedProcess, Relay
from helpers import (
    OP_CLOSE,
    OP_TEXT,
    OP_BINARY,
    PortReservation,
    RawWs,
    accept_for,
    arun,
    client_hello,
    close_payload,
    encode_frame,
    parse_head,
    read_answer,
    read_until_closed,
    raw_request,
    tls_alerts,
    tls_client_context,
    tls_connect,
    upgrade_request,
    wait_until,
)

KB = 1024
MiB = 1 << 20
HANDSHAKE_TIMEOUT = 1.0  # seconds: timeouts.handshake in the failure tests' relay
PLAIN_HTTP_BODY = "plain HTTP request sent to a TLS port"
ALERT_FATAL = 2

TEXTS = ["hello", "", "héllo wörld ✓ 🚀", "x" * 125, "y" * 126, "z" * 65536, "t" * (100 * KB)]
BINARIES = [b"", b"\x00", bytes(range(256)) * 4, os.urandom(100 * KB), os.urandom(1 * MiB)]


# --------------------------------------------------------------------------- config


def toml_str(p) -> str:
    return json.dumps(str(p))  # a TOML basic string is a JSON string for paths like ours


def listener_tls(
    certs,
    address: str = "{LISTEN}",
    min_version: str | None = None,
    session_cache: int | None = None,
    tickets: bool | None = None,
    names: dict[int, list[str]] | None = None,
) -> str:
    """A [[listener]] with a [listener.tls] table and one [[listener.tls.certificate]] per
    entry of `certs` (CertFiles, or (cert_path, key_path) pairs); the first is the default."""
    out = [f'[[listener]]\naddress = "{address}"\n', "[listener.tls]"]
    if min_version is not None:
        out.append(f'min_version = "{min_version}"')
    if session_cache is not None:
        out.append(f"session_cache = {session_cache}")
    if tickets is not None:
        out.append(f"tickets = {'true' if tickets else 'false'}")
    for i, c in enumerate(certs):
        cert, key = (c.cert, c.key) if hasattr(c, "cert") else c
        out.append("\n[[listener.tls.certificate]]")
        out.append(f"cert = {toml_str(cert)}\nkey = {toml_str(key)}")
        if names and i in names:
            out.append(f"names = {json.dumps(names[i])}")
    return "\n".join(out) + "\n"


def relay_config(
    listeners: str,
    handshake: str | None = None,
    pool: str | None = None,
    echo_app: bool = True,
) -> str:
    """Admin on {ADMIN}; /echo served by relay's echo app; everything else to `pool` (a
    [[pool]] body; default: the plain origin at {ORIGIN})."""
    parts = [listeners, '[admin]\naddress = "{ADMIN}"\n']
    if handshake:
        parts.append(f'[timeouts]\nhandshake = "{handshake}"\n')
    parts.append(pool or 'origins = ["{ORIGIN}"]')
    parts[-1] = '[[pool]]\nname = "origin"\n' + parts[-1] + "\n"
    if echo_app:
        parts.append('[[route]]\nname = "echo"\npath = "/echo"\napp = "echo"\n')
    parts.append('[[route]]\nname = "origin"\npool = "origin"\n')
    return "\n".join(parts)


# --------------------------------------------------------------------------- clients


def ctx_for(pki, version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    return tls_client_context(pki.ca_file, version=version)


def wss_client(url: str, ctx: ssl.SSLContext, **kw):
    kw.setdefault("open_timeout", 10)
    kw.setdefault("close_timeout", 5)
    kw.setdefault("ping_interval", None)
    kw.setdefault("compression", None)
    kw.setdefault("max_size", 4 * MiB)
    return connect(url, ssl=ctx, **kw)


async def echo_all(ws, texts=TEXTS, binaries=BINARIES) -> None:
    """Every message comes back byte-exact and with its type."""
    for text in texts:
        await ws.send(text)
        got = await ws.recv()
        assert isinstance(got, str), type(got)
        assert got == text, (len(got), len(text))
    for data in binaries:
        await ws.send(data)
        got = await ws.recv()
        assert isinstance(got, bytes), type(got)
        assert got == data, (len(got), len(data))


def ws_echo(ws: RawWs, payload: bytes, opcode: int = OP_TEXT) -> None:
    ws.send_frame(opcode, payload)
    assert ws.recv_message() == (opcode, payload)


def ws_close(ws: RawWs) -> None:
    """A clean close: our close frame, the peer's answer, then the socket."""
    ws.send_frame(OP_CLOSE, close_payload(1000))
    op, payload = ws.recv_message()
    assert op == OP_CLOSE and payload[:2] == b"\x03\xe8", (op, payload)
    ws.close()


def peer_cert(sock: ssl.SSLSocket) -> x509.Certificate:
    return x509.load_der_x509_certificate(sock.getpeercert(binary_form=True))


def peer_dns_names(sock: ssl.SSLSocket) -> list[str]:
    """The served leaf's DNS SANs as the client library decoded them (needs verification on)."""
    return [v for k, v in sock.getpeercert()["subjectAltName"] if k == "DNS"]


def served_serial(relay, pki, server_hostname: str | None = "127.0.0.1") -> int:
    with tls_connect(relay.addr, ctx_for(pki), server_hostname) as s:
        return peer_cert(s).serial_number


# --------------------------------------------------------------------------- metrics


def tls_counter(relay: Relay, name: str, **labels) -> int:
    return int(relay.metric_sum(name, **labels))


def handshakes(relay: Relay, kind: str) -> int:
    return tls_counter(relay, "relay_tls_handshakes_total", kind=kind)


def failures(relay: Relay, reason: str) -> int:
    return tls_counter(relay, "relay_tls_handshake_failures_total", reason=reason)


def wait_counters(relay: Relay, want: dict[tuple[str, str], int], timeout: float = 5.0) -> None:
    """Waits until each (metric kind/reason) counter has its value, e.g.
    {("full", ""): 1, ("", "timeout"): 1}: ("full", "") is a handshake kind, ("", r) a failure
    reason. Counters are published by the workers, so they are polled (bounded)."""

    def read():
        got = {}
        for (kind, reason) in want:
            got[(kind, reason)] = handshakes(relay, kind) if kind else failures(relay, reason)
        return got

    try:
        wait_until(lambda: read() == want, timeout, what=f"TLS counters {want}")
    except AssertionError as e:
        tls_lines = [l for l in relay.metrics_text().splitlines() if l.startswith("relay_tls_")]
        raise AssertionError(f"{e}: got {read()}\n" + "\n".join(tls_lines)) from None


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def tls_relay(pki, py_origin, start_relay):
    """A TLS listener (pki.server) in front of the plain Python origin; /echo = echo app."""
    r = start_relay(origin=py_origin.addr, config=relay_config(listener_tls([pki.server])))
    r.origin = py_origin
    return r


@pytest.fixture
def short_relay(pki, start_relay):
    """A TLS listener with timeouts.handshake = 1s, one worker, only the echo app."""
    cfg = relay_config(
        listener_tls([pki.server]),
        handshake=f"{int(HANDSHAKE_TIMEOUT * 1000)}ms",
        pool='origins = ["{ORIGIN}"]',
    )
    return start_relay(config=cfg, workers=1)


# =========================================================================== 1. wss -> ws


def test_wss_echo_to_plain_origin_byte_exact(pki, tls_relay):
    async def go():
        async with wss_client(tls_relay.wss_url + "/chat", ctx_for(pki)) as ws:
            sslobj = ws.transport.get_extra_info("ssl_object")
            assert sslobj.version() in ("TLSv1.3", "TLSv1.2")
            assert peer_cert(sslobj).serial_number == pki.server.serial
            await echo_all(ws)

    arun(go(), 30)
    opens = tls_relay.origin.events("open")
    assert [o["path"] for o in opens] == ["/chat"]
    wait_counters(tls_relay, {("full", ""): 1, ("resumed", ""): 0})


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
def test_wss_echo_each_version_and_alpn(pki, tls_relay, version):
    """Both versions work; ALPN "http/1.1" is selected when the client offers it."""
    ctx = ctx_for(pki, version)
    ctx.set_alpn_protocols(["http/1.1"])
    ws = RawWs.connect(tls_relay.addr, "/chat", tls=ctx)
    try:
        assert ws.sock.version() == {ssl.TLSVersion.TLSv1_2: "TLSv1.2",
                                     ssl.TLSVersion.TLSv1_3: "TLSv1.3"}[version]
        assert ws.sock.selected_alpn_protocol() == "http/1.1"
        name, _proto, _bits = ws.sock.cipher()
        # AEAD suites only, with ECDHE for 1.2.
        assert "GCM" in name or "CHACHA20" in name, name
        for payload in [b"small", os.urandom(100 * KB)]:
            ws_echo(ws, payload, OP_BINARY)
        ws_close(ws)
    finally:
        ws.close()


@pytest.mark.parametrize(
    "cipher",
    ["ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
     "ECDHE-ECDSA-CHACHA20-POLY1305"],
)
def test_tls12_aead_suites_accepted(pki, tls_relay, cipher):
    ctx = ctx_for(pki, ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers(cipher)
    ws = RawWs.connect(tls_relay.addr, "/echo", tls=ctx)
    try:
        assert ws.sock.cipher()[0] == cipher
        ws_echo(ws, "über ✓".encode())
        ws_close(ws)
    finally:
        ws.close()


@pytest.mark.parametrize("kind", ["ec-sec1", "ec-pkcs8", "rsa-pkcs1", "rsa-pkcs8"])
def test_key_formats(pki, start_relay, kind):
    """PKCS#8, PKCS#1 RSA and SEC1 EC private keys all load; the client sees that cert."""
    rsa = kind.startswith("rsa")
    cert = pki.issue(kind, "127.0.0.1", rsa=rsa,
                     key_format="pkcs8" if kind.endswith("pkcs8") else "native")
    relay = start_relay(config=relay_config(listener_tls([cert])))
    ws = RawWs.connect(relay.addr, "/echo", tls=ctx_for(pki))
    try:
        assert peer_cert(ws.sock).serial_number == cert.serial
        ws_echo(ws, b"key format " + kind.encode())
        ws_close(ws)
    finally:
        ws.close()


def test_echo_app_over_tls_with_many_clients(pki, tls_relay):
    """20 concurrent wss clients on the echo app, each sees only its own messages."""

    async def one(i: int):
        async with wss_client(tls_relay.wss_url + "/echo", ctx_for(pki)) as ws:
            for j in range(5):
                msg = f"client {i} message {j} " + "p" * (i * 997)
                await ws.send(msg)
                assert await ws.recv() == msg

    async def go():
        await asyncio.gather(*(one(i) for i in range(20)))

    arun(go(), 30)
    wait_counters(tls_relay, {("full", ""): 20})


class PiecewiseTls:
    """A TLS client (OpenSSL through ssl.SSLObject over memory BIOs) that writes its
    ciphertext to the socket in pieces of `piece` bytes, one send each (TCP_NODELAY): relay's
    receives then end inside records, record headers and handshake messages."""

    def __init__(self, addr, ctx: ssl.SSLContext, piece: int) -> None:
        self.sock = socket.create_connection(addr, timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.piece = piece
        self.sends = 0

    def _flush(self) -> None:
        data = self.outgoing.read()
        for i in range(0, len(data), self.piece):
            self.sock.sendall(data[i : i + self.piece])
            self.sends += 1

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("relay closed the connection")
        self.incoming.write(chunk)

    def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def recv_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            try:
                out += self.obj.read(n - len(out))
            except ssl.SSLWantReadError:
                self._flush()  # e.g. a TLS 1.3 KeyUpdate answer
                self._fill()
        return bytes(out)

    def recv_head(self) -> bytes:
        buf = bytearray()
        while not buf.endswith(b"\r\n\r\n"):
            buf += self.recv_exact(1)
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("piece", [1, 7, 1000])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
def test_ciphertext_in_small_pieces(pki, short_relay, version, piece):
    """ClientHello, Finished and application records arrive a few bytes per receive; relay
    reassembles them: the handshake completes and a 40 KB message (three records) and a
    small one echo intact. (Within timeouts.handshake: 1 s.)"""
    c = PiecewiseTls(short_relay.addr, ctx_for(pki, version), piece)
    try:
        c.handshake()
        req, key = upgrade_request(f"127.0.0.1:{short_relay.port}", "/echo")
        c.send(req)
        status, _, headers = parse_head(c.recv_head())
        assert status == 101
        assert dict((k.lower(), v) for k, v in headers)["sec-websocket-accept"] == accept_for(key)
        for payload in [os.urandom(40 * KB), b"tiny"]:
            c.send(encode_frame(OP_BINARY, payload, mask=True))
            head = c.recv_exact(2)
            n = head[1] & 0x7F
            if n == 126:
                n = int.from_bytes(c.recv_exact(2), "big")
            elif n == 127:
                n = int.from_bytes(c.recv_exact(8), "big")
            assert head[0] == 0x80 | OP_BINARY
            assert c.recv_exact(n) == payload
        c.send(encode_frame(OP_CLOSE, close_payload(1000), mask=True))
        assert c.recv_exact(2)[0] == 0x80 | OP_CLOSE
    finally:
        c.close()
    if piece < 1000:
        assert c.sends > 100  # it really was cut up
    wait_counters(short_relay, {("full", ""): 1, ("", "timeout"): 0, ("", "protocol"): 0})


def test_200_clients_handshake_at_once(pki, start_relay):
    """200 wss clients connect concurrently (handshakes interleaved on both workers), all
    stay open together, then each echoes its own message."""
    relay = start_relay(config=relay_config(listener_tls([pki.server])))
    ctx = ctx_for(pki)
    n = 200

    async def go():
        all_open = asyncio.Event()
        opened = 0

        async def one(i: int):
            nonlocal opened
            async with wss_client(relay.wss_url + "/echo", ctx, open_timeout=20) as ws:
                opened += 1
                if opened == n:
                    all_open.set()
                await all_open.wait()
                await ws.send(f"client {i}")
                assert await ws.recv() == f"client {i}"

        await asyncio.gather(*(one(i) for i in range(n)))

    arun(go(), 40)
    wait_counters(relay, {("full", ""): n, ("", "timeout"): 0, ("", "protocol"): 0,
                          ("", "closed"): 0})


# =========================================================================== 2. TLS origins


def tls_pool(origin_addr: str, ca_file, server_name: str | None = "origin.test",
             scheme: bool = False) -> str:
    """A [[pool]] body speaking TLS to `origin_addr`."""
    lines = []
    if scheme:
        lines.append(f'origins = ["wss://{origin_addr}"]')  # implies tls = true
    else:
        lines += [f'origins = ["{origin_addr}"]', "tls = true"]
    lines.append(f"tls_ca = {toml_str(ca_file)}")
    if server_name is not None:
        lines.append(f'tls_server_name = "{server_name}"')
    return "\n".join(lines)


@pytest.mark.parametrize("client_side", ["wss", "ws"])
@pytest.mark.parametrize("pool_style", ["tls-true", "wss-scheme"])
def test_echo_through_tls_origin(pki, tls_origin, start_relay, client_side, pool_style):
    """Client -> relay (TLS or plain listener) -> TLS origin verified against tls_ca and
    tls_server_name: every message comes back byte-exact."""
    pool = tls_pool(tls_origin.addr, pki.ca_file, scheme=(pool_style == "wss-scheme"))
    if client_side == "wss":
        listeners = listener_tls([pki.server])
    else:
        listeners = '[[listener]]\naddress = "{LISTEN}"\n'
    relay = start_relay(config=relay_config(listeners, pool=pool))
    url = (relay.wss_url if client_side == "wss" else relay.url) + "/via-tls"

    async def go():
        kw = {"ssl": ctx_for(pki)} if client_side == "wss" else {}
        async with connect(url, open_timeout=10, close_timeout=5, ping_interval=None,
                           compression=None, max_size=4 * MiB, **kw) as ws:
            await echo_all(ws)

    arun(go(), 30)
    assert [o["path"] for o in tls_origin.events("open")] == ["/via-tls"]


def test_tls_origin_verified_against_its_ip_by_default(pki, tls_origin, start_relay):
    """No tls_server_name: the name verified is the origin's host (here 127.0.0.1, an IP SAN
    of the origin's certificate)."""
    pool = tls_pool(tls_origin.addr, pki.ca_file, server_name=None)
    relay = start_relay(config=relay_config(listener_tls([pki.server]), pool=pool))
    ws = RawWs.connect(relay.addr, "/ip", tls=ctx_for(pki))
    try:
        ws_echo(ws, b"verified by IP")
        ws_close(ws)
    finally:
        ws.close()


def upgrade_over_tls(relay, pki, path: str = "/"):
    req, _ = upgrade_request(f"127.0.0.1:{relay.port}", path)
    return raw_request(relay.addr, req, timeout=10, tls=ctx_for(pki),
                       server_hostname="127.0.0.1")


class PlaintextHttpOrigin:
    """A TCP server that answers anything with a plaintext `HTTP/1.1 400` and closes, as a
    plain HTTP server does when it is sent a ClientHello."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.served = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                except OSError:
                    pass
                self.served += 1

    def events(self, _kind: str) -> list:
        return []  # never upgrades anything

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def plaintext_http_origin():
    o = PlaintextHttpOrigin()
    yield o
    o.stop()


@pytest.mark.parametrize(
    "case", ["untrusted-ca", "wrong-server-name", "origin-answers-plaintext", "origin-closes"]
)
def test_origin_tls_failure_gets_502(pki, request, case):
    """The client's own TLS handshake with relay succeeds; the upgrade is answered 502
    because relay could not make a verified TLS connection to the origin."""
    fixture, name = {
        "untrusted-ca": ("rogue_tls_origin", "origin.test"),
        "wrong-server-name": ("tls_origin", "not-the-origin.test"),
        "origin-answers-plaintext": ("plaintext_http_origin", "origin.test"),
        # origin_server.py (plaintext) closes without a word on a ClientHello
        "origin-closes": ("py_origin", "origin.test"),
    }[case]
    # The origin first, so that teardown stops relay before it (see conftest).
    origin = request.getfixturevalue(fixture)
    start_relay = request.getfixturevalue("start_relay")
    pool = tls_pool(origin.addr, pki.ca_file, server_name=name)
    relay = start_relay(config=relay_config(listener_tls([pki.server]), pool=pool))
    ans = upgrade_over_tls(relay, pki, "/bad-origin")
    assert ans.status == 502, ans
    assert ans.reason == "Bad Gateway"
    assert ans.body.decode().startswith("502 Bad Gateway: "), ans.body
    assert relay.metric_sum("relay_requests_refused_total", status="502") == 1
    if case == "origin-closes":
        # No TLS error to report: the origin hung up (relay says so).
        assert "origin closed the connection" in ans.body.decode(), ans.body
    else:
        assert "TLS handshake with the origin failed" in ans.body.decode(), ans.body
        wait_until(lambda: relay.metric_sum("relay_origin_tls_failures_total") == 1, 5,
                   what="relay_origin_tls_failures_total == 1")
    # Nothing was upgraded at the origin.
    assert origin.events("open") == []
    wait_counters(relay, {("full", ""): 1})


@pytest.mark.parametrize("with_client_cert", [True, False], ids=["client-cert", "none"])
def test_mtls_to_origin(pki, mtls_origin, start_relay, with_client_cert):
    """An origin that demands a client certificate: relay presents tls_client_cert (echo
    works), or has none (the origin refuses the handshake: 502)."""
    pool = tls_pool(mtls_origin.addr, pki.ca_file)
    if with_client_cert:
        client = pki.issue("relay-client", "relay-client.test")
        pool += f"\ntls_client_cert = {toml_str(client.cert)}"
        pool += f"\ntls_client_key = {toml_str(client.key)}"
    relay = start_relay(config=relay_config(listener_tls([pki.server]), pool=pool))
    if with_client_cert:
        ws = RawWs.connect(relay.addr, "/mtls", tls=ctx_for(pki))
        try:
            ws_echo(ws, os.urandom(100 * KB), OP_BINARY)
            ws_close(ws)
        finally:
            ws.close()
        assert [o["path"] for o in mtls_origin.events("open")] == ["/mtls"]
    else:
        ans = upgrade_over_tls(relay, pki, "/mtls")
        assert ans.status == 502, ans
        assert mtls_origin.events("open") == []


def test_origin_sees_x_forwarded_proto_https(pki, tls_relay):
    """The origin's /headers path sends back the request headers it got."""
    ws = RawWs.connect(tls_relay.addr, "/headers", tls=ctx_for(pki))
    try:
        op, data = ws.recv_message()
        headers = {k.lower(): v for k, v in json.loads(data)}
        assert headers.get("x-forwarded-proto") == "https", headers
        ws_close(ws)
    finally:
        ws.close()


def relay_to(request, pki, origin_tls: bool):
    """A TLS-listener relay in front of the Python origin, plain or over TLS."""
    origin = request.getfixturevalue("tls_origin" if origin_tls else "py_origin")
    start_relay = request.getfixturevalue("start_relay")
    pool = tls_pool(origin.addr, pki.ca_file) if origin_tls else None
    relay = start_relay(origin=origin.addr,
                        config=relay_config(listener_tls([pki.server]), pool=pool))
    relay.origin = origin
    return relay


@pytest.mark.parametrize("origin_tls", [False, True], ids=["plain-origin", "tls-origin"])
def test_close_codes_cross_tls_both_ways(pki, request, origin_tls):
    relay = relay_to(request, pki, origin_tls)
    ctx = ctx_for(pki)

    async def go():
        async with wss_client(relay.wss_url + "/chat", ctx,
                              additional_headers={"X-Test-Id": "c1"}) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            await ws.close(4002, "client says bye")
            # The origin's answering close frame came back through relay.
            assert ws.close_code == 4002
            assert ws.close_reason == "client says bye"
        async with wss_client(relay.wss_url + "/close?code=4001&reason=origin%20going%20away",
                              ctx) as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4001
            assert ws.close_reason == "origin going away"

    arun(go(), 15)
    ev = relay.origin.wait_event(lambda e: e["event"] == "closed" and e["tag"] == "c1")
    assert (ev["code"], ev["reason"]) == (4002, "client says bye")


@pytest.mark.slow
@pytest.mark.parametrize("origin_tls", [False, True], ids=["plain-origin", "tls-origin"])
def test_16mib_message_over_tls_intact(pki, request, origin_tls):
    """A message far larger than relay's 64 KiB per-direction pending buffer: decrypt,
    backpressure and re-encrypt keep every byte in order."""
    relay = relay_to(request, pki, origin_tls)
    payload = os.urandom(16 * MiB)

    async def go():
        async with wss_client(relay.wss_url + "/big", ctx_for(pki), max_size=17 * MiB) as ws:
            await ws.send(payload)
            got = await ws.recv()
            assert len(got) == len(payload)
            assert got == payload

    arun(go(), 40)


# =========================================================================== 3. SNI


@pytest.fixture
def sni_relay(pki, start_relay):
    a = pki.issue("a", "a.test")
    b = pki.issue("b", "*.b.test")
    relay = start_relay(config=relay_config(listener_tls([a, b])))
    relay.certs = {"a": a, "b": b}
    return relay


@pytest.mark.parametrize(
    "sni, served",
    [
        ("a.test", "a"),
        ("x.b.test", "b"),  # wildcard
        (None, "a"),  # no SNI: the first certificate is the default
        ("unknown.test", "a"),  # a name no certificate covers: the default
        ("b.test", "a"),  # *.b.test does not cover b.test itself
        ("y.x.b.test", "a"),  # ... nor two labels below it
        ("A.TEST", "a"),  # names compare case-insensitively
        ("X.B.Test", "b"),
    ],
)
def test_sni_selects_certificate(pki, sni_relay, sni, served):
    ctx = ctx_for(pki)
    ctx.check_hostname = False  # still verified against the CA; the name is checked below
    with tls_connect(sni_relay.addr, ctx, server_hostname=sni) as s:
        want = sni_relay.certs[served]
        assert peer_cert(s).serial_number == want.serial
        assert peer_dns_names(s) == {"a": ["a.test"], "b": ["*.b.test"]}[served]
    if sni is not None and (served == "b" or sni.lower() == "a.test"):
        # Where a certificate covers the name, a fully verifying client (hostname check
        # on) accepts what relay served.
        with tls_connect(sni_relay.addr, ctx_for(pki), server_hostname=sni) as v:
            assert peer_cert(v).serial_number == sni_relay.certs[served].serial


def test_sni_names_override(pki, start_relay):
    """`names` replaces the certificate's own SANs for selection."""
    a = pki.issue("a", "a.test")
    b = pki.issue("b", "*.b.test")
    relay = start_relay(config=relay_config(listener_tls([a, b], names={1: ["named.test"]})))
    ctx = ctx_for(pki)
    ctx.check_hostname = False
    for sni, want in [("named.test", b), ("x.b.test", a), ("a.test", a)]:
        with tls_connect(relay.addr, ctx, server_hostname=sni) as s:
            assert peer_cert(s).serial_number == want.serial, sni


def test_sni_routes_still_by_host_header(pki, sni_relay):
    """SNI picks the certificate; the WebSocket upgrade over it echoes as usual."""
    ctx = ctx_for(pki)
    ws = RawWs.connect(sni_relay.addr, "/echo", tls=ctx, server_hostname="x.b.test")
    try:
        assert peer_dns_names(ws.sock) == ["*.b.test"]
        ws_echo(ws, b"through the wildcard certificate")
        ws_close(ws)
    finally:
        ws.close()


# =========================================================================== 4. resumption


RESUME_MODES = {
    # mode: (listener options, workers, resumption expected)
    "tickets": ({"tickets": True, "session_cache": 0}, 2, True),
    "cache": ({"tickets": False, "session_cache": 1024}, 1, True),
    "default": ({}, 2, True),
    "off": ({"tickets": False, "session_cache": 0}, 2, False),
}


@pytest.mark.parametrize("mode", list(RESUME_MODES))
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls1.2", "tls1.3"])
def test_session_resumption(pki, start_relay, version, mode):
    """A second (and third, fourth, ...) connection offering the first one's session
    resumes it: the client reports session_reused and relay counts kind="resumed".

    "tickets" and "default" use 2 workers and 4 resumptions, so some land on the other
    worker: stateless tickets must be accepted by every worker. The per-worker session
    cache is tested with one worker."""
    opts, workers, resumes = RESUME_MODES[mode]
    relay = start_relay(config=relay_config(listener_tls([pki.server], **opts)),
                        workers=workers)
    ctx = ctx_for(pki, version)
    first = RawWs.connect(relay.addr, "/echo", tls=ctx)
    others = []
    try:
        assert first.sock.session_reused is False
        # For TLS 1.3 the tickets come after the handshake: read a message first.
        ws_echo(first, b"first")
        session = first.sock.session
        assert session is not None
        n = 4 if workers > 1 else 2
        for i in range(n):
            ws = RawWs.connect(relay.addr, "/echo", tls=ctx, session=session)
            others.append(ws)
            assert ws.sock.session_reused is resumes, (i, ws.sock.version())
            ws_echo(ws, f"resumed {i}".encode())
            # Offer the newest session next time, as browsers do (RFC 8446 C.4: a client
            # should not use a TLS 1.3 ticket twice; a server may accept each only once).
            session = ws.sock.session
        want_resumed = n if resumes else 0
        wait_counters(relay, {("full", ""): 1 + n - want_resumed, ("resumed", ""): want_resumed})
        for ws in [first, *others]:
            ws_close(ws)
    finally:
        for ws in [first, *others]:
            ws.close()


# =========================================================================== 5. failures


@pytest.mark.parametrize("request_kind", ["upgrade", "plain-get"])
def test_plain_http_to_tls_port_gets_plaintext_400(short_relay, request_kind):
    if request_kind == "upgrade":
        req, _ = upgrade_request(f"127.0.0.1:{short_relay.port}", "/echo")
    else:
        req = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{short_relay.port}\r\n\r\n".encode()
    ans = raw_request(short_relay.addr, req)  # plaintext, read until relay closes
    assert ans.status == 400, ans
    assert ans.reason == "Bad Request"
    assert PLAIN_HTTP_BODY in ans.body.decode(), ans.body
    wait_counters(short_relay, {("", "plain_http"): 1, ("", "timeout"): 0,
                                ("", "protocol"): 0, ("full", ""): 0})


def test_tls_stats_json_matches_metrics(pki, short_relay):
    """/v1/stats carries the TLS figures under "tls", the same as /metrics."""
    req, _ = upgrade_request(f"127.0.0.1:{short_relay.port}", "/echo")
    assert raw_request(short_relay.addr, req).status == 400
    ws = RawWs.connect(short_relay.addr, "/echo", tls=ctx_for(pki))
    ws_echo(ws, b"x")
    ws_close(ws)
    wait_counters(short_relay, {("full", ""): 1, ("", "plain_http"): 1})
    status, body = short_relay.get("/v1/stats")
    assert status == 200
    stats = json.loads(body)
    tls = stats["total"]["tls"]  # relay's totals; each worker has its own "tls" too
    assert tls["handshakes_full"] == 1
    assert tls["handshakes_resumed"] == 0
    assert tls["failures"] == {"plain_http": 1, "timeout": 0, "protocol": 0, "closed": 0}
    assert sum(w["tls"]["handshakes_full"] for w in stats["workers"]) == 1


def assert_closed_at_handshake_timeout(sock: socket.socket) -> bytes:
    """Blocks until relay closes `sock`; checks that happened at timeouts.handshake."""
    t0 = time.monotonic()
    try:
        data, _how = read_until_closed(sock, timeout=HANDSHAKE_TIMEOUT + 9)
    except socket.timeout:
        raise AssertionError(
            f"relay kept the connection open {HANDSHAKE_TIMEOUT + 9}s "
            f"(timeouts.handshake = {HANDSHAKE_TIMEOUT}s)"
        ) from None
    elapsed = time.monotonic() - t0
    # relay's timers tick every 100 ms from the tick the connection arrived in: the timeout
    # fires 0.9-1.0 s after the connect, so allow two ticks.
    assert elapsed >= HANDSHAKE_TIMEOUT - 0.2, f"closed after {elapsed:.3f}s, before the timeout"
    assert elapsed < HANDSHAKE_TIMEOUT + 3, f"closed only after {elapsed:.3f}s"
    return data


def test_silent_client_closed_at_handshake_timeout(short_relay):
    with socket.create_connection(short_relay.addr, timeout=5) as s:
        data = assert_closed_at_handshake_timeout(s)
    # Nothing, or an alert: never an HTTP answer to a client that spoke no TLS yet.
    if data:
        assert all(level == ALERT_FATAL for level, _ in tls_alerts(data)), data
    wait_counters(short_relay, {("", "timeout"): 1, ("", "closed"): 0, ("", "protocol"): 0})


def test_partial_client_hello_closed_at_handshake_timeout(pki, short_relay):
    hello = client_hello(ctx_for(pki))
    with socket.create_connection(short_relay.addr, timeout=5) as s:
        s.sendall(hello[: len(hello) // 2])
        data = assert_closed_at_handshake_timeout(s)
    if data:
        assert all(level == ALERT_FATAL for level, _ in tls_alerts(data)), data
    wait_counters(short_relay, {("", "timeout"): 1, ("", "protocol"): 0})


def test_client_that_stops_after_client_hello_closed_at_handshake_timeout(pki, short_relay):
    """A whole ClientHello, then silence: relay's flight comes back, then the close."""
    hello = client_hello(ctx_for(pki, ssl.TLSVersion.TLSv1_3))
    with socket.create_connection(short_relay.addr, timeout=5) as s:
        s.sendall(hello)
        data = assert_closed_at_handshake_timeout(s)
    assert data[:1] == b"\x16", data[:16]  # relay's ServerHello ... came first
    wait_counters(short_relay, {("", "timeout"): 1, ("full", ""): 0})


def test_tls_done_but_no_request_gets_408_over_tls(pki, short_relay):
    """The handshake timeout still covers the HTTP head after a completed TLS handshake:
    the 408 comes back encrypted."""
    with tls_connect(short_relay.addr, ctx_for(pki)) as s:
        t0 = time.monotonic()
        s.settimeout(HANDSHAKE_TIMEOUT + 9)
        ans = read_answer(s)
        assert time.monotonic() - t0 < HANDSHAKE_TIMEOUT + 3
    assert ans.status == 408, ans
    assert "handshake timeout" in ans.body.decode()
    wait_counters(short_relay, {("full", ""): 1, ("", "timeout"): 0})


def test_client_that_closes_mid_handshake_is_counted(pki, short_relay):
    hello = client_hello(ctx_for(pki))
    with socket.create_connection(short_relay.addr, timeout=5) as s:
        s.sendall(hello[:40])
        s.shutdown(socket.SHUT_WR)
        data, _ = read_until_closed(s, timeout=HANDSHAKE_TIMEOUT / 2)  # before the timeout
    wait_counters(short_relay, {("", "closed"): 1, ("", "timeout"): 0})


GARBAGE = {
    # a handshake record holding a "ClientHello" that is not one
    "garbage-client-hello": b"\x16\x03\x01\x00\x2c\x01\x00\x00\x28" + bytes(range(0x28)),
    # a record header announcing more than a TLS record may hold
    "oversized-record": b"\x16\x03\x01\xff\xff" + b"\xa5" * 64,
    # a 0x16 byte and then bytes that are no record header at all
    "0x16-then-junk": b"\x16\xee\xee\xee\xee\xee\xee\xee\xee\xee",
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_bad_client_hello_gets_alert_and_close(short_relay, name):
    with socket.create_connection(short_relay.addr, timeout=5) as s:
        s.sendall(GARBAGE[name])
        try:
            data, _ = read_until_closed(s, timeout=HANDSHAKE_TIMEOUT + 9)
        except socket.timeout:
            raise AssertionError("relay kept the connection open") from None
    alerts = tls_alerts(data)
    assert alerts, f"relay closed without a TLS alert: {data!r}"
    assert alerts[0][0] == ALERT_FATAL, alerts
    wait_counters(short_relay, {("", "protocol"): 1, ("", "timeout"): 0})


def handshake_error(addr, ctx, server_hostname="127.0.0.1") -> ssl.SSLError:
    with pytest.raises(ssl.SSLError) as ei:
        with tls_connect(addr, ctx, server_hostname):
            pass
    return ei.value


def alert_text(e: ssl.SSLError) -> str:
    """What OpenSSL says about the alert it got, e.g. "TLSV1 ALERT PROTOCOL VERSION"."""
    return f"{e.reason or ''} {e}".upper().replace("_", " ")


def test_tls11_only_client_fails_handshake(short_relay):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx = tls_client_context(verify=False, version=ssl.TLSVersion.TLSv1_1)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let OpenSSL 3 offer TLS 1.1 at all
    e = handshake_error(short_relay.addr, ctx)
    # The alert relay sent, as OpenSSL reports it (e.g. TLSV1_ALERT_PROTOCOL_VERSION).
    assert "ALERT" in alert_text(e), e
    wait_counters(short_relay, {("", "protocol"): 1, ("full", ""): 0})


def test_no_common_cipher_fails_handshake(pki, short_relay):
    ctx = ctx_for(pki, ssl.TLSVersion.TLSv1_2)
    ctx.set_ciphers("AES128-SHA:AES256-SHA")  # CBC, RSA key exchange: nothing relay offers
    e = handshake_error(short_relay.addr, ctx)
    assert "ALERT" in alert_text(e), e
    wait_counters(short_relay, {("", "protocol"): 1, ("full", ""): 0})


def test_h2_only_alpn_client_refused(pki, short_relay):
    """relay speaks http/1.1 only: a client offering only h2 gets no_application_protocol."""
    ctx = ctx_for(pki)
    ctx.set_alpn_protocols(["h2"])
    e = handshake_error(short_relay.addr, ctx)
    assert "NO APPLICATION PROTOCOL" in alert_text(e), e
    wait_counters(short_relay, {("", "protocol"): 1, ("full", ""): 0})


def test_min_version_13_refuses_tls12_client(pki, start_relay):
    relay = start_relay(config=relay_config(listener_tls([pki.server], min_version="1.3")))
    e = handshake_error(relay.addr, ctx_for(pki, ssl.TLSVersion.TLSv1_2))
    assert "ALERT" in alert_text(e), e
    ws = RawWs.connect(relay.addr, "/echo", tls=ctx_for(pki, ssl.TLSVersion.TLSv1_3))
    try:
        assert ws.sock.version() == "TLSv1.3"
        ws_echo(ws, b"1.3 only")
        ws_close(ws)
    finally:
        ws.close()
    wait_counters(relay, {("", "protocol"): 1, ("full", ""): 1})


def test_plain_and_tls_listeners_side_by_side(pki, py_origin, start_relay):
    """A plain [[listener]] next to a TLS one: ws:// on one, wss:// on the other."""
    listeners = listener_tls([pki.server]) + '\n[[listener]]\naddress = "{LISTEN2}"\n'
    relay = start_relay(origin=py_origin.addr, config=relay_config(listeners))
    plain_port = relay.extra_res["LISTEN2"].port

    async def go():
        async with wss_client(relay.wss_url + "/tls", ctx_for(pki)) as ws:
            await echo_all(ws, texts=["over tls"], binaries=[os.urandom(100 * KB)])
        async with connect(f"ws://127.0.0.1:{plain_port}/plain", open_timeout=10,
                           ping_interval=None, compression=None) as ws:
            await ws.send("over plain")
            assert await ws.recv() == "over plain"

    arun(go(), 20)
    assert sorted(o["path"] for o in py_origin.events("open")) == ["/plain", "/tls"]
    wait_counters(relay, {("full", ""): 1, ("", "plain_http"): 0})


# =========================================================================== 6. start-up


def run_relay_to_exit(relay_bin, argv_tail: list[str], timeout: float = 15.0) -> ManagedProcess:
    """Starts relay and waits for it to exit; fails if it reports ready instead."""
    p = ManagedProcess("relay", [str(relay_bin), *argv_tail])
    deadline = time.monotonic() + timeout
    try:
        while p.proc.poll() is None:
            with p._cond:
                if any("relay ready" in l for l in p.err):
                    raise AssertionError("relay started despite the bad setup\n" + p.log())
                p._cond.wait(0.2)
            if time.monotonic() > deadline:
                raise AssertionError(f"relay neither exited nor got ready in {timeout}s\n"
                                     + p.log())
    finally:
        p.stop()
    return p


def utc(days: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=days)


def bad_setups(pki, tmp: Path) -> dict:
    """case -> (certificate[1] as (cert path, key path), key named in the message)."""
    good_other = pki.issue("other", "other.test")
    expired = pki.issue("expired", "expired.test", not_before=utc(-30), not_after=utc(-1))
    future = pki.issue("future", "future.test", not_before=utc(1), not_after=utc(30))
    empty = tmp / "empty.pem"
    empty.write_text("")
    only_text = tmp / "text.pem"
    only_text.write_text("this is not PEM at all\n")
    e = "listener[0].tls.certificate[1]"
    return {
        "missing-cert-file": ((tmp / "nope.pem", good_other.key), f"{e}.cert"),
        "missing-key-file": ((good_other.cert, tmp / "nope.key"), f"{e}.key"),
        "cert-is-a-directory": ((tmp, good_other.key), f"{e}.cert"),
        "key-does-not-match-cert": ((good_other.cert, pki.server.key), e),
        "cert-expired": ((expired.cert, expired.key), f"{e}.cert"),
        "cert-not-yet-valid": ((future.cert, future.key), f"{e}.cert"),
        "no-certificate-in-pem-key-file": ((good_other.key, good_other.key), f"{e}.cert"),
        "no-certificate-in-pem-empty": ((empty, good_other.key), f"{e}.cert"),
        "no-certificate-in-pem-text": ((only_text, good_other.key), f"{e}.cert"),
        "no-key-in-pem-cert-file": ((good_other.cert, good_other.cert), f"{e}.key"),
        "no-key-in-pem-empty": ((good_other.cert, empty), f"{e}.key"),
    }


START_CASES = [
    "missing-cert-file", "missing-key-file", "cert-is-a-directory", "key-does-not-match-cert",
    "cert-expired", "cert-not-yet-valid", "no-certificate-in-pem-key-file",
    "no-certificate-in-pem-empty", "no-certificate-in-pem-text",
    "no-key-in-pem-cert-file", "no-key-in-pem-empty",
]


@pytest.mark.parametrize("case", START_CASES)
def test_startup_error_names_the_key(pki, relay_bin, tmp_path, case):
    pair, key_name = bad_setups(pki, tmp_path)[case]
    listen, admin = PortReservation(), PortReservation()
    try:
        cfg = relay_config(listener_tls([pki.server, pair]), echo_app=True)
        cfg = cfg.replace("{LISTEN}", listen.addr).replace("{ADMIN}", admin.addr)
        cfg = cfg.replace("{ORIGIN}", "127.0.0.1:9")
        f = tmp_path / "bad.toml"
        f.write_text(cfg)
        p = run_relay_to_exit(relay_bin, ["--config", str(f), "--workers", "1", "--no-pin"])
    finally:
        listen.release()
        admin.release()
    assert p.proc.returncode != 0, p.log()
    assert key_name in "\n".join(p.err), f"{key_name!r} not in the message\n{p.log()}"


@pytest.mark.parametrize("case", ["key-does-not-match-cert", "cert-expired", "good"])
def test_check_config_loads_the_files(pki, relay_bin, tmp_path, case):
    """`relay check-config` reads the certificate files too (a deploy catches them)."""
    if case == "good":
        pair, key_name = pki.issue("other", "other.test"), None
    else:
        pair, key_name = bad_setups(pki, tmp_path)[case]
    cfg = relay_config(listener_tls([pki.server, pair]))
    cfg = cfg.replace("{LISTEN}", "127.0.0.1:18443").replace("{ADMIN}", "127.0.0.1:19090")
    cfg = cfg.replace("{ORIGIN}", "127.0.0.1:9")
    f = tmp_path / "check.toml"
    f.write_text(cfg)
    r = subprocess.run([str(relay_bin), "check-config", str(f)], capture_output=True,
                       text=True, timeout=10)
    if key_name is None:
        assert r.returncode == 0, r.stderr
    else:
        assert r.returncode != 0, r.stdout
        assert key_name in r.stderr, r.stderr


def test_startup_control_good_second_certificate_starts(pki, start_relay):
    """The same config shape as the start-up error cases, with a good second certificate:
    relay starts (so the errors above come from the bad file, not the shape)."""
    other = pki.issue("other", "other.test")
    relay = start_relay(config=relay_config(listener_tls([pki.server, other])))
    assert served_serial(relay, pki) == pki.server.serial


def test_startup_error_pool_tls_ca_missing(pki, relay_bin, tmp_path):
    listen, admin = PortReservation(), PortReservation()
    try:
        pool = tls_pool("127.0.0.1:9", tmp_path / "no-ca.pem")
        cfg = relay_config(listener_tls([pki.server]), pool=pool)
        cfg = cfg.replace("{LISTEN}", listen.addr).replace("{ADMIN}", admin.addr)
        f = tmp_path / "bad.toml"
        f.write_text(cfg)
        p = run_relay_to_exit(relay_bin, ["--config", str(f), "--workers", "1", "--no-pin"])
    finally:
        listen.release()
        admin.release()
    assert p.proc.returncode != 0, p.log()
    assert "pool[0].tls_ca" in "\n".join(p.err), p.log()


@pytest.mark.parametrize("which", ["--cert", "--key"])
def test_quick_mode_missing_file_names_the_file(pki, relay_bin, tmp_path, which):
    listen, admin = PortReservation(), PortReservation()
    cert = str(tmp_path / "nope.pem") if which == "--cert" else str(pki.server.cert)
    key = str(tmp_path / "nope.key") if which == "--key" else str(pki.server.key)
    try:
        p = run_relay_to_exit(relay_bin, ["--listen-tls", listen.addr, "--cert", cert,
                                          "--key", key, "--admin", admin.addr,
                                          "--workers", "1", "--no-pin"])
    finally:
        listen.release()
        admin.release()
    assert p.proc.returncode != 0, p.log()
    missing = cert if which == "--cert" else key
    assert missing in "\n".join(p.err), p.log()


# =========================================================================== 7. quick mode


def test_quick_mode_tls_to_origin(pki, py_origin, start_relay):
    relay = start_relay(tls=pki.server, origin=py_origin.addr)

    async def go():
        async with wss_client(relay.wss_url + "/quick", ctx_for(pki)) as ws:
            await echo_all(ws)

    arun(go(), 30)
    assert [o["path"] for o in py_origin.events("open")] == ["/quick"]


def room_members(relay: Relay, name: str) -> int:
    status, body = relay.get("/v1/rooms")
    assert status == 200, (status, body)
    return {r["name"]: r["members"] for r in json.loads(body)["rooms"]}.get(name, 0)


def test_quick_mode_tls_without_origin_serves_embedded_apps(pki, start_relay):
    """No --origin: /echo, /rooms/{name} and the demo page at /, all over TLS."""
    relay = start_relay(tls=pki.server)
    ctx = ctx_for(pki)

    async def go():
        async with wss_client(relay.wss_url + "/echo", ctx) as ws:
            await echo_all(ws, binaries=[b"", os.urandom(100 * KB)],
                           texts=["hello", "t" * (100 * KB)])
        async with wss_client(relay.wss_url + "/rooms/tls-room", ctx) as a, \
                wss_client(relay.wss_url + "/rooms/tls-room", ctx) as b:
            # Membership has no event a client sees: wait for /v1/rooms to list both.
            await asyncio.to_thread(wait_until, lambda: room_members(relay, "tls-room") == 2,
                                    5, what="2 members in tls-room")
            await a.send("ping from a")
            assert await asyncio.wait_for(b.recv(), 5) == "ping from a"
            await b.send("pong from b")
            assert await asyncio.wait_for(a.recv(), 5) == "pong from b"

    arun(go(), 30)
    # The demo page over https.
    with tls_connect(relay.addr, ctx) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\nConnection: close"
                  "\r\n\r\n".encode())
        ans = read_answer(s, to_eof=True)
    assert ans.status == 200, ans
    assert (ans.header("Content-Type") or "").startswith("text/html")
    assert b"<title>relay \xe2\x80\x94 rooms demo</title>" in ans.body


def test_quick_mode_tls_and_plain_together(pki, py_origin, start_relay):
    relay = start_relay(tls=pki.server, origin=py_origin.addr, plain_too=True)
    plain_port = relay.extra_res["plain"].port

    async def go():
        async with wss_client(relay.wss_url + "/a", ctx_for(pki)) as ws:
            await ws.send("tls")
            assert await ws.recv() == "tls"
        async with connect(f"ws://127.0.0.1:{plain_port}/b", open_timeout=10,
                           ping_interval=None) as ws:
            await ws.send("plain")
            assert await ws.recv() == "plain"

    arun(go(), 20)
    assert sorted(o["path"] for o in py_origin.events("open")) == ["/a", "/b"]


# =========================================================================== 8. SIGHUP


def wait_stderr(relay: Relay, since: int, pred, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    with relay._cond:
        while True:
            for line in relay.err[since:]:
                if pred(line):
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {what} within {timeout}s\n" + relay.log())
            relay._cond.wait(min(left, 0.5))


def test_sighup_reloads_certificates_live_connections_untouched(pki, start_relay, tmp_path):
    v1 = pki.issue("v1", "127.0.0.1", "relay.test", common_name="relay v1")
    v2 = pki.issue("v2", "127.0.0.1", "relay.test", common_name="relay v2")
    live_cert, live_key = tmp_path / "live.pem", tmp_path / "live.key"
    v1.copy_to(live_cert, live_key)
    relay = start_relay(config=relay_config(listener_tls([(live_cert, live_key)])))
    ctx = ctx_for(pki)

    held = RawWs.connect(relay.addr, "/echo", tls=ctx)
    try:
        assert peer_cert(held.sock).serial_number == v1.serial
        ws_echo(held, b"before reload")

        # Rotate the files, then SIGHUP. The reload has no event a client can see other
        # than the certificate new connections get: poll for it (bounded).
        v2.copy_to(live_cert, live_key)
        os.kill(relay.pid, signal.SIGHUP)
        wait_until(lambda: served_serial(relay, pki) == v2.serial, 10,
                   what="new connections to get the reloaded certificate")
        # Every worker has it (connections spread over both workers).
        assert [served_serial(relay, pki) for _ in range(8)] == [v2.serial] * 8
        fresh = RawWs.connect(relay.addr, "/echo", tls=ctx)
        assert peer_cert(fresh.sock).serial_number == v2.serial
        subject = dict(rdn[0] for rdn in fresh.sock.getpeercert()["subject"])
        assert subject["commonName"] == "relay v2", subject
        ws_echo(fresh, b"after reload")
        ws_close(fresh)

        # The connection opened before the reload keeps echoing, still on v1.
        assert peer_cert(held.sock).serial_number == v1.serial
        for payload in [b"still here", os.urandom(100 * KB)]:
            ws_echo(held, payload, OP_BINARY)

        # A bad file on reload is logged and the current certificates stay.
        live_cert.write_text("not a certificate\n")
        since = len(relay.err)
        os.kill(relay.pid, signal.SIGHUP)
        wait_stderr(
            relay,
            since,
            lambda l: ("live.pem" in l or "tls.certificate" in l) and ("ERROR" in l or "WARN" in l),
            10,
            "an error logged about the bad certificate file on reload",
        )
        assert relay.proc.poll() is None, relay.log()
        assert [served_serial(relay, pki) for _ in range(4)] == [v2.serial] * 4
        ws_echo(held, b"after the bad reload")
        ws_close(held)
    finally:
        held.close()
