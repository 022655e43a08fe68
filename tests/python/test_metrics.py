"""The admin listener: Prometheus text that parses, and byte meters that match the wire.

Metering is what a CDN bills, so the byte counters are checked for exact equality with the
bytes a raw-socket client put on and took off the wire after the upgrade heads (the
`websockets` library is avoided here only because it is free to add frames of its own).
"""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    RawWs,
    accept_for,
    close_payload,
    encode_frame,
    frame_len,
    raw_request,
    read_head,
    request_header,
    upgrade_request,
)

C2O = "client_to_origin"
O2C = "origin_to_client"

SIZES = [0, 1, 125, 126, 1000, 65535, 65536, 300_000]


def bytes_counters(relay) -> tuple[int, int]:
    return (
        int(relay.metric_sum("relay_bytes_total", direction=C2O)),
        int(relay.metric_sum("relay_bytes_total", direction=O2C)),
    )


def test_metrics_parse_as_prometheus_text(echo_relay):
    text = echo_relay.metrics_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "relay_connections_accepted": "counter",
        "relay_connections_active": "gauge",
        "relay_connections_upgraded": "counter",
        "relay_requests_refused": "counter",
        "relay_connections_closed": "counter",
        "relay_bytes": "counter",
        "relay_connection_seconds": "counter",
        "relay_workers": "gauge",
    }
    for name, kind in expected.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, (name, families[name].type)
    # One sample per worker (2) for per-worker metrics; every refusal status is present.
    active = [s for s in families["relay_connections_active"].samples]
    assert sorted(s.labels["worker"] for s in active) == ["0", "1"]
    statuses = {s.labels["status"] for s in families["relay_requests_refused"].samples}
    assert {"400", "404", "426", "431", "502", "503", "504"} <= statuses
    dirs = {s.labels["direction"] for s in families["relay_bytes"].samples}
    assert dirs == {C2O, O2C}
    assert families["relay_workers"].samples[0].value == 2


def test_health_ready_and_json_stats(echo_relay):
    assert echo_relay.get("/healthz") == (200, "ok\n")
    assert echo_relay.get("/readyz") == (200, "ready\n")
    assert echo_relay.get("/nope")[0] == 404
    # Some traffic, then /v1/stats totals agree with /metrics.
    ws = RawWs.connect(echo_relay.addr)
    ws.send_frame(OP_TEXT, b"hello")
    assert ws.recv_message() == (OP_TEXT, b"hello")
    ws.send_frame(OP_CLOSE, close_payload(1000))
    assert ws.recv_message()[0] == OP_CLOSE
    ws.sock.shutdown(socket.SHUT_WR)
    ws.read_to_eof()
    ws.close()
    echo_relay.wait_idle()
    status, body = echo_relay.get("/v1/stats")
    assert status == 200
    stats = json.loads(body)
    total = stats["total"]
    assert total["accepted"] == 1
    assert total["upgraded"] == 1
    assert total["active"] == 0
    assert total["bytes_client_to_origin"] == ws.sent
    assert total["bytes_origin_to_client"] == ws.received
    assert len(stats["workers"]) == 2
    assert sum(w["accepted"] for w in stats["workers"]) == 1
    assert (total["bytes_client_to_origin"], total["bytes_origin_to_client"]) == bytes_counters(
        echo_relay
    )


def echo_session(ws: RawWs) -> tuple[int, int]:
    """Known frames through an echo origin; returns the wire bytes we computed by hand."""
    sent = recv = 0
    for i, n in enumerate(SIZES):
        op = OP_TEXT if i % 2 == 0 else OP_BINARY
        payload = (b"abcdefgh" * (n // 8 + 1))[:n] if op == OP_TEXT else os.urandom(n)
        ws.send_frame(op, payload)
        sent += frame_len(n, masked=True)
        assert ws.recv_message() == (op, payload)
        recv += frame_len(n, masked=False)
    ws.send_frame(OP_PING, b"meter me")
    sent += frame_len(8, masked=True)
    assert ws.recv_message() == (OP_PONG, b"meter me")
    recv += frame_len(8, masked=False)
    ws.send_frame(OP_CLOSE, close_payload(1000, "done"))
    sent += frame_len(6, masked=True)
    op, payload = ws.recv_message()
    assert op == OP_CLOSE and payload[:2] == b"\x03\xe8"
    recv += frame_len(len(payload), masked=False)
    ws.sock.shutdown(socket.SHUT_WR)
    assert ws.read_to_eof() == b""  # the origin closes after the close handshake
    ws.close()
    return sent, recv


def test_byte_counters_equal_wire_bytes(echo_relay):
    totals = [0, 0]
    for _ in range(3):  # three connections: the counters add up across workers
        ws = RawWs.connect(echo_relay.addr, path="/meter")
        sent, recv = echo_session(ws)
        assert (ws.sent, ws.received) == (sent, recv)  # our own accounting agrees with itself
        totals[0] += sent
        totals[1] += recv
    echo_relay.wait_idle()
    assert bytes_counters(echo_relay) == tuple(totals)
    assert echo_relay.metric_sum("relay_connections_upgraded_total") == 3


def test_refused_requests_add_no_relayed_bytes(echo_relay):
    raw_request(echo_relay.addr, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    req, _ = upgrade_request("a", version="8")
    raw_request(echo_relay.addr, req)
    echo_relay.wait_idle()
    assert bytes_counters(echo_relay) == (0, 0)
    assert echo_relay.metric_sum("relay_requests_refused_total", status="426") == 2
    assert echo_relay.metric_sum("relay_connections_closed_total", cause="refused") == 2


def test_frame_in_same_write_as_request_head_is_counted(echo_relay):
    """A client frame that arrives in the same read as the upgrade head is relayed (it
    reaches the origin, whose echo comes back) and must be metered like any other."""
    first = encode_frame(OP_TEXT, b"early bird", mask=True)
    ws = RawWs.connect(echo_relay.addr, path="/early", first_frame=first)
    assert ws.recv_message() == (OP_TEXT, b"early bird")
    sent, recv = echo_session(ws)
    assert ws.sent == sent + len(first)
    echo_relay.wait_idle()
    c2o, o2c = bytes_counters(echo_relay)
    assert o2c == ws.received
    assert c2o == ws.sent, (
        f"relay metered {c2o} client->origin bytes, the client sent {ws.sent} after its head "
        f"(difference {ws.sent - c2o}: the {len(first)}-byte frame that shared a read with "
        "the head)"
    )


class FrameBehind101Origin:
    """A hand-written origin that sends its 101 and a first text frame in one write, then
    answers a close frame with a close frame and closes."""

    def __init__(self, first_payload: bytes) -> None:
        self.first = encode_frame(OP_TEXT, first_payload, mask=False)
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.srv.settimeout(10)
        self.addr = f"127.0.0.1:{self.srv.getsockname()[1]}"
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        try:
            conn, _ = self.srv.accept()
            with conn:
                conn.settimeout(10)
                head, rest = read_head(conn)
                key = request_header(head, "Sec-WebSocket-Key")
                answer = (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept_for(key)}\r\n\r\n"
                ).encode()
                conn.sendall(answer + self.first)
                # Read the client's masked close frame (2 + 4 + 2 bytes), answer, close.
                buf = bytearray(rest)
                while len(buf) < 8:
                    chunk = conn.recv(64)
                    if not chunk:
                        break
                    buf += chunk
                conn.sendall(encode_frame(OP_CLOSE, close_payload(1000), mask=False))
        except BaseException as e:  # reported by the test
            self.error = e
        finally:
            self.srv.close()


def test_origin_frame_behind_101_is_counted(start_relay):
    origin = FrameBehind101Origin(b"welcome!")
    relay = start_relay(origin=origin.addr)
    ws = RawWs.connect(relay.addr)
    assert ws.recv_message() == (OP_TEXT, b"welcome!")
    ws.send_frame(OP_CLOSE, close_payload(1000))
    op, _ = ws.recv_message()
    assert op == OP_CLOSE
    ws.read_to_eof()
    ws.close()
    origin.thread.join(10)
    assert origin.error is None, origin.error
    relay.wait_idle()
    assert bytes_counters(relay) == (ws.sent, ws.received)
    assert ws.received == frame_len(8, False) + frame_len(2, False)
    assert ws.sent == frame_len(2, True)
