"""A WebSocket origin on the Python `websockets` server, run as its own process by conftest.

    python origin_server.py [--port 0] [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]

With --tls-cert/--tls-key it serves wss:// (the stdlib `ssl` module) instead of ws://; with
--tls-client-ca it also demands a client certificate signed by that CA (mTLS).

Prints one JSON object per line on stdout: first {"event": "ready", "port": N}, then an
"open" event per upgraded connection and a "closed" event when it ends (with the close code
and reason the origin received), so tests can assert what reached the origin.

Behaviour by request path:
  /headers        sends the request headers it received as one JSON text message, then echoes
  /close?code=C&reason=R
                  closes right after the upgrade with that code and reason
  /reject         answers 403 with a body instead of upgrading (non-101 passthrough)
  anything else   echoes every message back unchanged (text stays text, binary binary)
It offers the subprotocol "chat" (selected when the client offers it) and no extensions
unless the client asks for permessage-deflate on a path starting /deflate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory


def emit(**event) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def process_request(conn: ServerConnection, request):
    path = urlsplit(request.path).path
    if path == "/reject":
        resp = conn.respond(HTTPStatus.FORBIDDEN, "origin says no\n")
        resp.headers["X-Origin"] = "python"
        return resp
    # Compression only where a test asks for it, so payload sizes stay predictable elsewhere.
    if not path.startswith("/deflate"):
        conn.protocol.available_extensions = []
    return None


def select_subprotocol(conn: ServerConnection, offered):
    """"chat" when the client offers it; no subprotocol (rather than a refusal) otherwise."""
    return "chat" if "chat" in offered else None


async def handler(ws: ServerConnection) -> None:
    url = urlsplit(ws.request.path)
    tag = ws.request.headers.get("X-Test-Id", "")
    emit(
        event="open",
        path=url.path,
        tag=tag,
        subprotocol=ws.subprotocol,
        headers=list(ws.request.headers.raw_items()),
    )
    try:
        if url.path == "/close":
            q = parse_qs(url.query)
            await ws.close(int(q["code"][0]), q.get("reason", [""])[0])
        else:
            if url.path == "/headers":
                await ws.send(json.dumps(list(ws.request.headers.raw_items())))
            async for msg in ws:
                await ws.send(msg)
    except ConnectionClosed:
        pass
    finally:
        # The close frame the client sent (if any): what "reached the origin".
        rcvd = ws.protocol.close_rcvd
        emit(
            event="closed",
            path=url.path,
            tag=tag,
            code=rcvd.code if rcvd else None,
            reason=rcvd.reason if rcvd else None,
        )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--tls-cert", help="PEM certificate chain: serve over TLS")
    ap.add_argument("--tls-key", help="PEM private key for --tls-cert")
    ap.add_argument("--tls-client-ca", help="demand a client certificate signed by this CA")
    args = ap.parse_args()
    tls = None
    if args.tls_cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
        if args.tls_client_ca:
            tls.verify_mode = ssl.CERT_REQUIRED
            tls.load_verify_locations(cafile=args.tls_client_ca)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handler,
        "127.0.0.1",
        args.port,
        select_subprotocol=select_subprotocol,
        process_request=process_request,
        extensions=[ServerPerMessageDeflateFactory()],
        compression=None,
        max_size=None,
        max_queue=64,
        ping_interval=None,
        close_timeout=5,
        ssl=tls,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        emit(event="ready", port=port)
        await stop


if __name__ == "__main__":
    asyncio.run(main())
