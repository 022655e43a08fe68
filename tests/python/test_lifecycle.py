"""Connections that end badly: each side vanishing, and what the other side then sees.

The teardown of every test also checks that relay freed the session (active gauge 0).
"""

from __future__ import annotations

import os
import signal
import socket
import struct

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from helpers import OP_TEXT, RawWs, arun


def test_origin_process_dying_closes_the_client(relay):
    async def go():
        async with connect(relay.url, open_timeout=10, ping_interval=None, close_timeout=5) as ws:
            await ws.send("before")
            assert await ws.recv() == "before"
            os.kill(relay.origin.pid, signal.SIGKILL)
            with pytest.raises(ConnectionClosedError):
                await ws.recv()
            # No close frame came: the origin vanished, and relay closed the TCP connection.
            assert ws.close_code == 1006

    arun(go(), 15)
    relay.wait_idle()
    assert relay.metric_sum("relay_connections_closed_total", cause="origin_close") + relay.metric_sum(
        "relay_connections_closed_total", cause="origin_error"
    ) == 1


def test_client_reset_mid_stream_frees_the_session(echo_relay):
    ws = RawWs.connect(echo_relay.addr)
    ws.send_frame(OP_TEXT, b"x" * 1000)
    assert ws.recv_message() == (OP_TEXT, b"x" * 1000)
    ws.send_frame(OP_TEXT, os.urandom(100_000))  # in flight when the client goes away
    ws.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ws.close()  # RST
    echo_relay.wait_idle()
    assert echo_relay.metric_sum("relay_connections_upgraded_total") == 1


def test_many_short_connections_all_freed(echo_relay):
    async def go():
        for i in range(50):
            async with connect(echo_relay.url, open_timeout=10, ping_interval=None) as ws:
                await ws.send(f"short {i}")
                assert await ws.recv() == f"short {i}"

    arun(go(), 20)
    echo_relay.wait_idle()
    assert echo_relay.metric_sum("relay_connections_accepted_total") == 50
    assert echo_relay.metric_sum("relay_connections_closed_total", cause="client_close") + echo_relay.metric_sum(
        "relay_connections_closed_total", cause="origin_close"
    ) == 50
