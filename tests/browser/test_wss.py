"""relay's embedded apps over TLS in headless Chromium: https:// and wss:// end to end.

relay runs in TLS quick mode without an origin (`relay --listen-tls ADDR --cert F --key F`:
the demo page at /, /echo, /rooms/{name}) with a certificate from a throwaway `trustme` CA.
Chromium trusts exactly that certificate's key through
`--ignore-certificate-errors-spki-list=<base64 SHA-256 of its SubjectPublicKeyInfo>` (not a
blanket --ignore-certificate-errors); a control test shows that without the flag the same
page is refused for its certificate, so the flag (and relay serving that certificate) is
what makes the others pass.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from cdp import Page
from conftest import RELAY_BIN, Process, Reservation
from test_demo import AppsRelay, click, press_enter, type_into, until

ROOM = "tls-room"


@dataclass
class TlsFiles:
    ca: Path
    cert: Path
    key: Path
    spki_sha256: str  # base64, as --ignore-certificate-errors-spki-list takes it


def spki_hash(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@pytest.fixture
def tls_files(tmp_path) -> TlsFiles:
    import trustme

    ca = trustme.CA(organization_name="relay browser tests CA")
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    files = TlsFiles(tmp_path / "ca.pem", tmp_path / "relay.pem", tmp_path / "relay.key", "")
    ca.cert_pem.write_to_path(str(files.ca))
    files.cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(files.key))
    files.spki_sha256 = spki_hash(leaf.cert_chain_pems[0].bytes())
    return files


class TlsAppsRelay(AppsRelay):
    """`relay --listen-tls ... --cert ... --key ...` with no origin: the embedded apps.
    Rooms and stop() as in the plaintext demo relay."""

    def __init__(self, tls: TlsFiles) -> None:
        self.listen, self.admin_res = Reservation(), Reservation()
        Process.__init__(
            self,
            "relay",
            [
                str(RELAY_BIN),
                "--listen-tls",
                f"127.0.0.1:{self.listen.port}",
                "--cert",
                str(tls.cert),
                "--key",
                str(tls.key),
                "--admin",
                f"127.0.0.1:{self.admin_res.port}",
                "--workers",
                "2",
                "--no-pin",
            ],
        )
        self.port = self.listen.port
        self.https = f"https://127.0.0.1:{self.port}"
        self.wss = f"wss://127.0.0.1:{self.port}"
        self.admin = f"127.0.0.1:{self.admin_res.port}"
        self.wait_line("err", lambda l: "relay ready" in l, "'relay ready'")


@pytest.fixture
def tls_relay(tls_files):
    if not RELAY_BIN.is_file():
        pytest.fail(f"no relay binary at {RELAY_BIN}: cargo build -p relay, or set RELAY_BIN")
    r = TlsAppsRelay(tls_files)
    try:
        yield r
    finally:
        code = r.stop()
        assert code == 0, f"relay exited with {code}:\n{r.log()}"


@pytest.fixture
def tls_chromium(tls_files, start_chromium):
    """Chromium that accepts exactly the test certificate's public key."""
    return start_chromium(
        [f"--ignore-certificate-errors-spki-list={tls_files.spki_sha256}"]
    )


async def eval_async(page: Page, expression: str, timeout: float = 20.0):
    """The value of an expression that yields a Promise (awaited by the page)."""
    r = await page.call(
        "Runtime.evaluate",
        {"expression": expression, "returnByValue": True, "awaitPromise": True},
        timeout=timeout,
    )
    if "exceptionDetails" in r:
        raise AssertionError(f"page threw: {r['exceptionDetails']}")
    return r["result"].get("value")


# Opens wss://<this page's host>/echo, sends each message (texts, then a 100 KB binary
# pattern), collects what comes back, closes with 1000 and resolves with what it saw.
ECHO_JS = r"""
(async () => {
  const texts = %s;
  const bin = new Uint8Array(100 * 1024);
  for (let i = 0; i < bin.length; i++) bin[i] = (i * 7 + 3) %% 251;
  const ws = new WebSocket("wss://" + location.host + "/echo");
  ws.binaryType = "arraybuffer";
  const got = [];
  let wantN = texts.length + 1;
  const done = new Promise((resolve, reject) => {
    ws.onmessage = (e) => {
      got.push(e.data);
      if (got.length === wantN) ws.close(1000, "done");
    };
    ws.onclose = (e) => resolve({code: e.code, wasClean: e.wasClean});
    ws.onerror = () => reject(new Error("WebSocket error; got " + got.length));
  });
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    setTimeout(() => reject(new Error("no open in 10 s")), 10000);
  });
  for (const t of texts) ws.send(t);
  ws.send(bin);
  const closed = await done;
  const echoedBin = new Uint8Array(got[got.length - 1]);
  let same = echoedBin.length === bin.length;
  for (let i = 0; same && i < bin.length; i++) same = echoedBin[i] === bin[i];
  return {
    url: ws.url,
    protocol: location.protocol,
    texts: got.slice(0, texts.length),
    binLength: echoedBin.length,
    binSame: same,
    close: closed,
  };
})()
"""


def test_https_page_exchanges_messages_over_wss(tls_relay, tls_chromium):
    texts = ["hello over wss", "", "héllo wörld ✓ 🚀", "x" * 125, "y" * 70000]

    async def run():
        page = await Page.open(tls_chromium.page_ws_url())
        try:
            await page.navigate(tls_relay.https + "/")
            assert await page.eval("location.href") == tls_relay.https + "/"
            assert await page.eval("document.title") == "relay — rooms demo"
            r = await eval_async(page, ECHO_JS % json.dumps(texts))
            assert r["protocol"] == "https:"
            assert r["url"] == tls_relay.wss + "/echo"
            assert r["texts"] == texts
            assert r["binLength"] == 100 * 1024 and r["binSame"] is True
            assert r["close"] == {"code": 1000, "wasClean": True}
            assert page.exceptions == []
        finally:
            await page.close()

    asyncio.run(asyncio.wait_for(run(), 60))


def test_demo_page_over_https_chats_with_a_wss_client(tls_relay, tls_chromium, tls_files):
    """The demo page (served over https) joins a room over wss://; a Python client in the
    same room, also over wss://, sees the page's message and the page shows the client's."""

    async def rooms_settle(want: dict[str, int], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while (got := await asyncio.to_thread(tls_relay.rooms)) != want:
            if time.monotonic() > deadline:
                raise AssertionError(f"/v1/rooms: {got}, want {want}")
            await asyncio.sleep(0.05)

    async def run():
        ctx = ssl.create_default_context(cafile=str(tls_files.ca))
        page = await Page.open(tls_chromium.page_ws_url())
        try:
            await page.navigate(tls_relay.https + "/")
            await type_into(page, "room", ROOM)
            await type_into(page, "name", "tab")
            await click(page, "join")
            await until(page, f"document.getElementById('status').textContent === "
                              f"'in room {ROOM}'", f"'in room {ROOM}'")
            async with connect(f"{tls_relay.wss}/rooms/{ROOM}", ssl=ctx, open_timeout=10,
                               ping_interval=None) as py:
                await rooms_settle({ROOM: 2})
                await py.send("python: hello tab")
                await until(
                    page,
                    "[...document.querySelectorAll('#log .line')].some((d) => "
                    "d.textContent === 'python: hello tab')",
                    "the Python client's message",
                )
                await type_into(page, "msg", "hello python ✓")
                await press_enter(page)
                assert await asyncio.wait_for(py.recv(), 10) == "tab: hello python ✓"
            await click(page, "join")
            await until(page, "document.getElementById('status').textContent"
                              ".startsWith('closed (1000')", "closed (1000 …)")
            assert page.exceptions == []
        finally:
            await page.close()
        await rooms_settle({})

    asyncio.run(asyncio.wait_for(run(), 60))


def test_without_the_spki_flag_the_certificate_is_refused(tls_relay, start_chromium):
    """Control: a Chromium that does not trust the key refuses relay's certificate, so the
    tests above pass because of the pinned key (and relay serving that certificate)."""

    async def run():
        chromium = start_chromium()
        page = await Page.open(chromium.page_ws_url())
        try:
            r = await page.call("Page.navigate", {"url": tls_relay.https + "/"})
            assert r.get("errorText", "").startswith("net::ERR_CERT_"), r
        finally:
            await page.close()

    asyncio.run(asyncio.wait_for(run(), 30))
