"""A WebSocket echo origin on the `websockets` library: the fallback when relay-bench is not built.

    python echo_origin.py [--listen 127.0.0.1:0]

Prints `ready <host:port>` on stdout once it listens, then echoes every message until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from websockets.asyncio.server import serve


async def echo(ws) -> None:
    try:
        async for msg in ws:
            await ws.send(msg)
    except Exception:  # a client that vanished mid-message is not an origin failure
        pass


async def main(listen: str) -> None:
    host, port = listen.rsplit(":", 1)
    async with serve(echo, host, int(port), max_size=None, ping_interval=None) as server:
        addr = server.sockets[0].getsockname()
        print(f"ready {addr[0]}:{addr[1]}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--listen", default="127.0.0.1:0")
    try:
        asyncio.run(main(p.parse_args().listen))
    except KeyboardInterrupt:
        sys.exit(0)
