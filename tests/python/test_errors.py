"""Refusals: relay answers with an HTTP status and a reason, never a silent close."""

from __future__ import annotations

import socket
import threading

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from helpers import arun, raw_request, read_answer, read_head, upgrade_request


def refused_by_client_library(url: str, **kw) -> InvalidStatus:
    """Connects with the websockets client and returns the InvalidStatus it raised."""

    async def go():
        with pytest.raises(InvalidStatus) as ei:
            async with connect(url, open_timeout=10, ping_interval=None, **kw):
                pass
        return ei.value

    return arun(go(), 15)


def assert_relay_error(ans, status: int, reason_phrase: str, body_words: str) -> None:
    assert ans.status == status, ans
    assert ans.reason == reason_phrase
    assert (ans.header("Connection") or "").lower() == "close"
    body = ans.body.decode()
    assert body.startswith(f"{status} {reason_phrase}: "), body
    assert body_words in body, body
    assert int(ans.header("Content-Length")) == len(ans.body)


def test_plain_get_gets_426(relay):
    ans = raw_request(
        relay.addr, f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\nAccept: */*\r\n\r\n".encode()
    )
    assert_relay_error(ans, 426, "Upgrade Required", "not a WebSocket upgrade")
    assert (ans.header("Upgrade") or "").lower() == "websocket"
    assert ans.header("Sec-WebSocket-Version") == "13"
    assert ans.extra == b""  # nothing after the body; the relay closed the connection
    assert relay.metric_sum("relay_requests_refused_total", status="426") == 1


def test_plain_get_gets_426_with_urllib(relay):
    """An ordinary HTTP client (urllib) sees the 426 and its reason text."""
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as ei:
        urllib.request.urlopen(f"http://127.0.0.1:{relay.port}/chat", timeout=5)
    assert ei.value.code == 426
    assert b"not a WebSocket upgrade" in ei.value.read()
    ei.value.close()


@pytest.mark.parametrize("version", ["8", "12", "14", "thirteen"])
def test_wrong_websocket_version_gets_426_naming_13(relay, version):
    req, _ = upgrade_request(f"127.0.0.1:{relay.port}", "/", version=version)
    ans = raw_request(relay.addr, req)
    assert_relay_error(ans, 426, "Upgrade Required", "Sec-WebSocket-Version")
    assert ans.header("Sec-WebSocket-Version") == "13"
    # Nothing reached the origin.
    assert relay.origin.events("open") == []


def test_missing_websocket_version_gets_426(relay):
    req = (
        f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    ).encode()
    ans = raw_request(relay.addr, req)
    assert_relay_error(ans, 426, "Upgrade Required", "Sec-WebSocket-Version")
    assert ans.header("Sec-WebSocket-Version") == "13"


ROUTED = """
[workers]
count = 2
pin = false
[[listener]]
address = "{LISTEN}"
[admin]
address = "{ADMIN}"
[[pool]]
name = "chat"
origins = ["{ORIGIN}"]
[[route]]
host = "localhost"
path = "/chat"
pool = "chat"
"""


def test_unknown_route_gets_404(py_origin, start_relay):
    relay = start_relay(origin=py_origin.addr, config=ROUTED)
    # Host 127.0.0.1 matches no route.
    e = refused_by_client_library(relay.url + "/chat")
    assert e.response.status_code == 404
    assert b"no route" in e.response.body
    assert e.response.headers["Connection"].lower() == "close"
    # Right host, path outside the route's prefix.
    e = refused_by_client_library(f"ws://localhost:{relay.port}/other")
    assert e.response.status_code == 404

    # The route itself works: Host "localhost", path under /chat.
    async def ok():
        async with connect(
            f"ws://localhost:{relay.port}/chat/room1", open_timeout=10, ping_interval=None
        ) as ws:
            await ws.send("routed")
            return await ws.recv()

    assert arun(ok(), 10) == "routed"
    assert relay.metric_sum("relay_requests_refused_total", status="404") == 2
    opens = py_origin.events("open")
    assert [o["path"] for o in opens] == ["/chat/room1"]


def test_origin_down_gets_502(down_origin, start_relay):
    relay = start_relay(origin=down_origin)
    e = refused_by_client_library(relay.url + "/")
    assert e.response.status_code == 502
    assert e.response.reason_phrase == "Bad Gateway"
    assert b"origin refused the connection" in e.response.body
    assert relay.metric_sum("relay_requests_refused_total", status="502") == 1
    assert relay.metric_sum("relay_origin_connect_failures_total") == 1


def test_origin_non_101_answer_passes_through(relay):
    e = refused_by_client_library(relay.url + "/reject")
    assert e.response.status_code == 403
    assert e.response.body == b"origin says no\n"
    assert e.response.headers["X-Origin"] == "python"


def test_post_gets_405(relay):
    ans = raw_request(
        relay.addr,
        f"POST / HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\nContent-Length: 0\r\n\r\n".encode(),
    )
    assert_relay_error(ans, 405, "Method Not Allowed", "GET")


def test_garbage_gets_400(relay):
    ans = raw_request(relay.addr, b"\x16\x03\x01\x00\xa5 not http at all\r\n\r\n")
    assert ans.status == 400
    assert (ans.header("Connection") or "").lower() == "close"


def test_client_that_closes_before_the_head_leaves_nothing_behind(relay):
    with socket.create_connection(relay.addr, timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # partial head, then close
    # The active gauge returning to 0 is checked at teardown.


def test_oversized_head_gets_431(relay):
    req, _ = upgrade_request(
        f"127.0.0.1:{relay.port}", "/", extra=[("X-Padding", "p" * 20000)]
    )
    ans = raw_request(relay.addr, req)
    assert_relay_error(ans, 431, "Request Header Fields Too Large", "larger than the limit")


HANDSHAKE_TIMEOUT = """
[workers]
count = 1
pin = false
[[listener]]
address = "{LISTEN}"
[admin]
address = "{ADMIN}"
[timeouts]
handshake = "300ms"
[[pool]]
name = "p"
origins = ["{ORIGIN}"]
[[route]]
pool = "p"
"""


def test_incomplete_head_gets_408_after_handshake_timeout(py_origin, start_relay):
    relay = start_relay(origin=py_origin.addr, config=HANDSHAKE_TIMEOUT, workers=1)
    with socket.create_connection(relay.addr, timeout=5) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n".encode())
        ans = read_answer(s)  # the relay answers by itself once the timeout passes
    assert_relay_error(ans, 408, "Request Timeout", "handshake timeout")


def test_connection_limit_gets_503(py_origin, start_relay):
    relay = start_relay(origin=py_origin.addr, workers=1, extra=["--max-connections", "1"])

    async def go():
        async with connect(relay.url, open_timeout=10, ping_interval=None) as first:
            with pytest.raises(InvalidStatus) as ei:
                async with connect(relay.url, open_timeout=10, ping_interval=None):
                    pass
            await first.send("still here")
            assert await first.recv() == "still here"
            return ei.value

    e = arun(go(), 15)
    assert e.response.status_code == 503
    assert e.response.headers.get("Retry-After") == "1"


class WrongAcceptOrigin:
    """Answers every upgrade with a 101 whose Sec-WebSocket-Accept is wrong."""

    def __init__(self) -> None:
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(10)
        self.addr = f"127.0.0.1:{self.srv.getsockname()[1]}"
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
            with conn:
                conn.settimeout(10)
                read_head(conn)
                conn.sendall(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"
                )
                conn.recv(1)  # until relay closes
        except OSError:
            pass
        finally:
            self.srv.close()


def test_origin_with_wrong_accept_gets_502(start_relay):
    origin = WrongAcceptOrigin()
    relay = start_relay(origin=origin.addr)
    e = refused_by_client_library(relay.url)
    assert e.response.status_code == 502
    assert b"wrong Sec-WebSocket-Accept" in e.response.body
    origin.thread.join(10)
