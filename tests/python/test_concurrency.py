"""Many clients at once, each a real `websockets` client."""

from __future__ import annotations

import asyncio
import os

import pytest
from websockets.asyncio.client import connect

from helpers import arun, frame_len

CLIENTS = 200
MESSAGES = 20


class Gate:
    """Opens once every client is connected, so all 200 are open at the same time."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.open = asyncio.Event()

    def arrive(self) -> None:
        self.left -= 1
        if self.left == 0:
            self.open.set()


def message(i: int, j: int) -> str | bytes:
    if j % 2:
        return os.urandom(16 + (i * 37 + j * 101) % 4000)
    return f"client {i} message {j} " + "x" * ((i + j) % 300)


def wire_bytes() -> tuple[int, int]:
    """What every client puts on the wire and takes off it after the upgrade: one frame per
    message each way (masked up, unmasked down) plus the close handshake (1000, no reason)."""
    up = down = 0
    for i in range(CLIENTS):
        for j in range(MESSAGES):
            n = len(message(i, j)) if j % 2 else len(message(i, j).encode())
            up += frame_len(n, masked=True)
            down += frame_len(n, masked=False)
        up += frame_len(2, masked=True)
        down += frame_len(2, masked=False)
    return up, down


async def one_client(url: str, i: int, gate: Gate) -> int:
    async with connect(
        url, open_timeout=20, close_timeout=5, ping_interval=None, compression=None
    ) as ws:
        gate.arrive()
        await gate.open.wait()
        for j in range(MESSAGES):
            msg = message(i, j)
            await ws.send(msg)
            got = await ws.recv()
            assert got == msg, f"client {i} message {j}"
    return MESSAGES


async def swarm(url: str) -> list:
    gate = Gate(CLIENTS)
    tasks = [asyncio.create_task(one_client(url, i, gate)) for i in range(CLIENTS)]
    await asyncio.wait(
        [asyncio.ensure_future(gate.open.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED
    )
    # Either the gate opened, or a client ended early (failed to connect): open it anyway so
    # the others finish and the failure is reported below instead of hanging.
    gate.open.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("origin", ["echo-origin", "python-origin"])
def test_200_concurrent_clients_20_messages_each(request, origin):
    relay = request.getfixturevalue("echo_relay" if origin == "echo-origin" else "relay")
    results = arun(swarm(relay.url + "/swarm"), 40)
    errors = [r for r in results if not isinstance(r, int)]
    assert not errors, f"{len(errors)} of {CLIENTS} clients failed, first: {errors[0]!r}"
    assert sum(results) == CLIENTS * MESSAGES
    assert relay.metric_sum("relay_connections_upgraded_total") == CLIENTS
    # Both workers took a share of the connections (SO_REUSEPORT spreads them).
    per_worker = [
        relay.metric_sum("relay_connections_accepted_total", worker=str(w)) for w in range(2)
    ]
    assert sum(per_worker) == CLIENTS
    assert all(n > 0 for n in per_worker), per_worker
    # Metering under load: every byte of every connection, summed over both workers.
    relay.wait_idle()
    up, down = wire_bytes()
    assert relay.metric_sum("relay_bytes_total", direction="client_to_origin") == up
    assert relay.metric_sum("relay_bytes_total", direction="origin_to_client") == down
