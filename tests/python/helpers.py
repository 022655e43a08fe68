"""Raw-socket helpers: ports, HTTP heads, WebSocket frames (RFC 6455) byte for byte.

The `websockets` library is the "real client"; these helpers exist for what it does not
let a test control: the exact bytes on the wire (metering), a non-WebSocket request, a wrong
`Sec-WebSocket-Version`, or a head and a frame in one write.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import ssl
import struct
import time
from dataclasses import dataclass, field

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

OP_CONT, OP_TEXT, OP_BINARY = 0x0, 0x1, 0x2
OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA


# --------------------------------------------------------------------------- ports


class PortReservation:
    """A loopback port held by a bound, non-listening socket until `release()`.

    The socket has SO_REUSEADDR and SO_REUSEPORT, so the process under test (relay's
    SO_REUSEPORT listeners, or the admin's std listener with SO_REUSEADDR) can still bind the
    port while we hold it, but the kernel's port-0 autobind will not hand the same port to
    anyone else in the meantime (other test suites run on this machine concurrently).
    Nothing listens on a reserved port until the process under test does: a connection to it
    is refused, which is what a "down origin" needs.
    """

    def __init__(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", 0))
        self._sock: socket.socket | None = s
        self.port: int = s.getsockname()[1]

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def release(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# --------------------------------------------------------------------------- HTTP


@dataclass
class HttpAnswer:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    head_len: int
    extra: bytes = b""  # bytes read past the head (and past the body, if any)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None


def make_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def accept_for(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode() + WS_GUID).digest()).decode()


def upgrade_request(
    host: str,
    path: str = "/",
    key: str | None = None,
    version: str = "13",
    extra: list[tuple[str, str]] | None = None,
) -> tuple[bytes, str]:
    key = key or make_key()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        f"Sec-WebSocket-Version: {version}",
    ]
    for k, v in extra or []:
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode(), key


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def read_head(sock: socket.socket, limit: int = 65536) -> tuple[bytes, bytes]:
    """Reads one HTTP head. Returns (head incl. CRLFCRLF, bytes read after it)."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"EOF inside an HTTP head: {bytes(buf)!r}")
        buf += chunk
        if len(buf) > limit:
            raise ValueError("HTTP head too large")
    end = buf.index(b"\r\n\r\n") + 4
    return bytes(buf[:end]), bytes(buf[end:])


def parse_head(head: bytes) -> tuple[int, str, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    proto, code, *reason = lines[0].split(" ", 2)
    assert proto == "HTTP/1.1", lines[0]
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        k, _, v = line.partition(":")
        headers.append((k.strip(), v.strip()))
    return int(code), (reason[0] if reason else ""), headers


def request_header(head: bytes, name: str) -> str | None:
    """A header's value from a request head (first occurrence)."""
    for line in head.decode("latin-1").split("\r\n")[1:]:
        k, sep, v = line.partition(":")
        if sep and k.strip().lower() == name.lower():
            return v.strip()
    return None


def read_answer(sock: socket.socket, to_eof: bool = True) -> HttpAnswer:
    """Reads an HTTP answer; the body by Content-Length, and (to_eof) until the peer closes."""
    head, rest = read_head(sock)
    status, reason, headers = parse_head(head)
    ans = HttpAnswer(status, reason, headers, b"", len(head))
    clen = ans.header("Content-Length")
    data = bytearray(rest)
    if to_eof:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    elif clen is not None:
        while len(data) < int(clen):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if clen is not None:
        ans.body, ans.extra = bytes(data[: int(clen)]), bytes(data[int(clen) :])
    else:
        ans.body = bytes(data)
    return ans


def raw_request(
    addr: tuple[str, int],
    request: bytes,
    timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> HttpAnswer:
    """Sends `request` on a fresh connection, returns the answer read until the peer closes.
    With `tls`, over a TLS connection made with that client context (see tls_connect)."""
    if tls is not None:
        s = tls_connect(addr, tls, server_hostname, timeout=timeout)
    else:
        s = socket.create_connection(addr, timeout=timeout)
    with s:
        s.sendall(request)
        return read_answer(s, to_eof=True)


# --------------------------------------------------------------------------- TLS


def tls_client_context(
    ca_file=None,
    version: ssl.TLSVersion | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client context (OpenSSL, through the stdlib `ssl` module) trusting `ca_file`.
    `version` pins both the minimum and maximum protocol version."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ctx.load_verify_locations(cafile=str(ca_file))
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = version
        ctx.maximum_version = version
    return ctx


def tls_connect(
    addr: tuple[str, int],
    ctx: ssl.SSLContext,
    server_hostname: str | None = "127.0.0.1",
    session: ssl.SSLSession | None = None,
    timeout: float = 10.0,
) -> ssl.SSLSocket:
    """TCP connect and a complete TLS handshake. `server_hostname` is both the SNI sent and
    the name verified (an IP address is verified but, as RFC 6066 says, not sent as SNI;
    None sends no SNI and needs ctx.check_hostname off)."""
    raw = socket.create_connection(addr, timeout=timeout)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_hostname, session=session)
    except BaseException:
        raw.close()
        raise


def client_hello(ctx: ssl.SSLContext, server_hostname: str | None = "relay.test") -> bytes:
    """The bytes of the ClientHello `ctx` would send (its first flight), made in memory."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    assert hello[:1] == b"\x16", hello[:16]
    return hello


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, str]:
    """Reads until the peer closes; returns (bytes read, "eof" | "reset"). Raises
    socket.timeout when the peer keeps the connection open past `timeout`."""
    sock.settimeout(timeout)
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(out), "reset"
        if not chunk:
            return bytes(out), "eof"
        out += chunk


def tls_alerts(data: bytes) -> list[tuple[int, int]]:
    """(level, description) of every plaintext TLS alert record in `data` (bytes a server
    sent before the handshake's keys are in use); raises if a record is not an alert."""
    alerts = []
    i = 0
    while i < len(data):
        assert len(data) - i >= 5, f"truncated record header: {data[i:]!r}"
        ctype, _ver, n = data[i], data[i + 1 : i + 3], struct.unpack("!H", data[i + 3 : i + 5])[0]
        body = data[i + 5 : i + 5 + n]
        assert ctype == 0x15, f"record type {ctype:#x}, not an alert: {data[i:i + 16]!r}"
        assert len(body) == n == 2, f"alert record of {n} bytes: {data!r}"
        alerts.append((body[0], body[1]))
        i += 5 + n
    return alerts


# --------------------------------------------------------------------------- frames


def encode_frame(
    opcode: int, payload: bytes, mask: bool, fin: bool = True, mask_key: bytes | None = None
) -> bytes:
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    m = 0x80 if mask else 0
    if n < 126:
        head = struct.pack("!BB", b0, m | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", b0, m | 126, n)
    else:
        head = struct.pack("!BBQ", b0, m | 127, n)
    if not mask:
        return head + payload
    key = mask_key or os.urandom(4)
    return head + key + mask_bytes(payload, key)


def mask_bytes(payload: bytes, key: bytes) -> bytes:
    if not payload:
        return b""
    n = len(payload)
    k = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(k, "big")).to_bytes(n, "big")


def frame_len(payload_len: int, masked: bool) -> int:
    """Bytes a frame of this payload length occupies on the wire."""
    n = 2 if payload_len < 126 else 4 if payload_len < 1 << 16 else 10
    return n + (4 if masked else 0) + payload_len


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


@dataclass
class Frame:
    fin: bool
    opcode: int
    payload: bytes
    wire_len: int


@dataclass
class RawWs:
    """A minimal blocking WebSocket client over a plain socket that counts its wire bytes."""

    sock: socket.socket
    sent: int = 0  # bytes written after the request head
    received: int = 0  # bytes read after the 101 head
    _buf: bytearray = field(default_factory=bytearray)

    @classmethod
    def connect(
        cls,
        addr: tuple[str, int],
        path: str = "/",
        first_frame: bytes | None = None,
        timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = "127.0.0.1",
        session: ssl.SSLSession | None = None,
    ) -> "RawWs":
        """Upgrades; with `first_frame`, the head and that frame go out in one write.
        With `tls`, over TLS (see tls_connect): `ws.sock` is then an ssl.SSLSocket."""
        if tls is not None:
            sock = tls_connect(addr, tls, server_hostname, session=session, timeout=timeout)
        else:
            sock = socket.create_connection(addr, timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req, key = upgrade_request(f"{addr[0]}:{addr[1]}", path)
        ws = cls(sock)
        if first_frame is not None:
            sock.sendall(req + first_frame)
            ws.sent += len(first_frame)
        else:
            sock.sendall(req)
        head, rest = read_head(sock)
        status, _, headers = parse_head(head)
        if status != 101:
            raise AssertionError(f"expected 101, got {head!r}")
        got = {k.lower(): v for k, v in headers}
        assert got.get("sec-websocket-accept") == accept_for(key), headers
        ws._buf += rest
        ws.received += len(rest)
        return ws

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True) -> None:
        data = encode_frame(opcode, payload, mask=True, fin=fin)
        self.sock.sendall(data)
        self.sent += len(data)

    def _need(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("EOF inside a frame")
            self._buf += chunk
            self.received += len(chunk)

    def recv_frame(self) -> Frame:
        self._need(2)
        b0, b1 = self._buf[0], self._buf[1]
        assert not (b1 & 0x80), "a server frame must not be masked"
        n = b1 & 0x7F
        hl = 2
        if n == 126:
            self._need(4)
            n = struct.unpack("!H", self._buf[2:4])[0]
            hl = 4
        elif n == 127:
            self._need(10)
            n = struct.unpack("!Q", self._buf[2:10])[0]
            hl = 10
        self._need(hl + n)
        payload = bytes(self._buf[hl : hl + n])
        del self._buf[: hl + n]
        return Frame(bool(b0 & 0x80), b0 & 0x0F, payload, hl + n)

    def recv_message(self) -> tuple[int, bytes]:
        """A whole data message (continuations joined); control frames are returned alone."""
        f = self.recv_frame()
        if f.opcode >= 0x8:
            return f.opcode, f.payload
        op, data = f.opcode, bytearray(f.payload)
        while not f.fin:
            f = self.recv_frame()
            assert f.opcode == OP_CONT, f
            data += f.payload
        return op, bytes(data)

    def read_to_eof(self, timeout: float = 10.0) -> bytes:
        self.sock.settimeout(timeout)
        out = bytearray(self._buf)
        self._buf.clear()
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                break
            self.received += len(chunk)
            out += chunk
        return bytes(out)

    def close(self) -> None:
        self.sock.close()


def wait_until(pred, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Polls `pred` (for state that has no event to wait on, e.g. a metrics gauge)."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = pred()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def arun(coro, timeout: float = 30.0):
    """Runs a coroutine to completion in a fresh event loop, bounded by `timeout`."""
    import asyncio

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())
