"""What a WebSocket user sees through relay, with the `websockets` client library."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from helpers import arun

MiB = 1 << 20


def client(url: str, **kw):
    kw.setdefault("open_timeout", 10)
    kw.setdefault("close_timeout", 5)
    kw.setdefault("ping_interval", None)
    kw.setdefault("compression", None)
    return connect(url, **kw)


@pytest.fixture(params=["python-origin", "echo-origin"])
def any_relay(request):
    """The same test against both origins: Python websockets and relay-bench echo-origin."""
    if request.param == "python-origin":
        return request.getfixturevalue("relay")
    return request.getfixturevalue("echo_relay")


def test_text_and_binary_echo_intact(any_relay):
    async def go():
        async with client(any_relay.url + "/echo") as ws:
            for text in ["hello", "", "héllo wörld ✓ 🚀", "x" * 125, "y" * 126, "z" * 65536]:
                await ws.send(text)
                got = await ws.recv()
                assert isinstance(got, str)
                assert got == text
            for data in [b"\x00", b"", bytes(range(256)) * 4, os.urandom(70000)]:
                await ws.send(data)
                got = await ws.recv()
                assert isinstance(got, bytes)
                assert got == data

    arun(go(), 15)


@pytest.mark.parametrize("size", [1 * MiB, 16 * MiB], ids=["1MiB", "16MiB"])
def test_large_binary_message_echoes_intact(any_relay, size):
    payload = os.urandom(size)

    async def go():
        async with client(any_relay.url + "/big", max_size=size + 1024) as ws:
            await ws.send(payload)
            got = await ws.recv()
            assert len(got) == size
            assert got == payload

    arun(go(), 30)


def test_large_text_message_echoes_intact(relay):
    text = ("0123456789abcdéf" * (MiB // 17 + 1))[: MiB]

    async def go():
        async with client(relay.url, max_size=4 * MiB) as ws:
            await ws.send(text)
            assert await ws.recv() == text

    arun(go(), 15)


def test_fragmented_message_reassembles(relay):
    parts = [b"first-", b"second-", os.urandom(40000), b"-last"]

    async def go():
        async with client(relay.url) as ws:
            await ws.send(iter(parts))  # one message sent as four frames
            assert await ws.recv() == b"".join(parts)

    arun(go(), 10)


def test_ping_resolves_with_pong(any_relay):
    async def go():
        async with client(any_relay.url) as ws:
            for payload in [b"", b"are you there", os.urandom(125)]:
                waiter = await ws.ping(payload)
                latency = await asyncio.wait_for(waiter, 5)
                assert latency >= 0
            # Data still flows after the pings.
            await ws.send("after ping")
            assert await ws.recv() == "after ping"

    arun(go(), 15)


def test_client_close_code_and_reason_reach_origin(relay):
    async def go():
        async with client(relay.url + "/echo", additional_headers={"X-Test-Id": "c1"}) as ws:
            await ws.send("hi")
            assert await ws.recv() == "hi"
            await ws.close(4002, "client says bye")
            # The origin's answering close frame came back through relay.
            assert ws.close_code == 4002
            assert ws.close_reason == "client says bye"

    arun(go(), 10)
    ev = relay.origin.wait_event(lambda e: e["event"] == "closed" and e["tag"] == "c1")
    assert ev["code"] == 4002
    assert ev["reason"] == "client says bye"


def test_normal_close_reaches_origin(relay):
    async def go():
        async with client(relay.url, additional_headers={"X-Test-Id": "c2"}) as ws:
            await ws.send("x")
            await ws.recv()
        assert ws.close_code == 1000

    arun(go(), 10)
    ev = relay.origin.wait_event(lambda e: e["event"] == "closed" and e["tag"] == "c2")
    assert ev["code"] == 1000


def test_origin_close_code_and_reason_reach_client(relay):
    async def go():
        async with client(relay.url + "/close?code=4001&reason=origin%20going%20away") as ws:
            with pytest.raises(ConnectionClosed):
                await ws.recv()
            assert ws.close_code == 4001
            assert ws.close_reason == "origin going away"

    arun(go(), 10)


def test_subprotocol_negotiation_passes_through(relay):
    async def go():
        async with client(relay.url, subprotocols=["chat"]) as ws:
            assert ws.subprotocol == "chat"
            await ws.send("in chat")
            assert await ws.recv() == "in chat"
        # Offering only protocols the origin does not speak: none is selected.
        async with client(relay.url, subprotocols=["superchat"]) as ws:
            assert ws.subprotocol is None

    arun(go(), 10)
    opens = relay.origin.events("open")
    assert opens[0]["subprotocol"] == "chat"


def test_request_headers_reach_origin_with_forwarding_headers(relay):
    async def go():
        async with client(
            relay.url + "/headers?x=1",
            additional_headers={
                "X-Custom-Thing": "value 1",
                "Authorization": "Bearer abc.def",
                "Cookie": "session=42",
                "X-Forwarded-For": "203.0.113.9",
            },
            origin="https://app.example",
        ) as ws:
            return json.loads(await ws.recv())

    pairs = arun(go(), 10)
    headers: dict[str, list[str]] = {}
    for k, v in pairs:
        headers.setdefault(k.lower(), []).append(v)
    assert headers["x-custom-thing"] == ["value 1"]
    assert headers["authorization"] == ["Bearer abc.def"]
    assert headers["cookie"] == ["session=42"]
    assert headers["origin"] == ["https://app.example"]
    assert headers["host"] == [f"127.0.0.1:{relay.port}"]
    # relay appends the client's address to an existing X-Forwarded-For, and adds the proto.
    assert headers["x-forwarded-for"] == ["203.0.113.9, 127.0.0.1"]
    assert headers["x-forwarded-proto"] == ["http"]
    assert headers["forwarded"] == [f"for=127.0.0.1;proto=http;host=\"127.0.0.1:{relay.port}\""]
    # The upgrade itself stays intact for the origin (hop-by-hop headers are relay's own).
    assert [v.lower() for v in headers["upgrade"]] == ["websocket"]
    assert headers["sec-websocket-version"] == ["13"]
    assert len(headers["sec-websocket-key"]) == 1


def test_x_forwarded_for_added_when_absent(relay):
    async def go():
        async with client(relay.url + "/headers") as ws:
            return json.loads(await ws.recv())

    headers = {k.lower(): v for k, v in arun(go(), 10)}
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"


def test_permessage_deflate_negotiates_end_to_end(relay):
    """Extensions are between client and origin; relay passes the negotiation through."""
    text = "compress me " * 10000

    async def go():
        async with connect(
            relay.url + "/deflate", compression="deflate", ping_interval=None, open_timeout=10
        ) as ws:
            assert "permessage-deflate" in (ws.response.headers.get("Sec-WebSocket-Extensions") or "")
            await ws.send(text)
            assert await ws.recv() == text

    arun(go(), 10)
