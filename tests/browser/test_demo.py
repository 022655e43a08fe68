"""The rooms demo page (a `demo` route: relay serves it itself at `/`) in headless Chromium,
opened in two tabs (two CDP targets) that join the same room and chat through relay.

Each tab types into #room / #name, clicks #join, waits for the page's own "in room" status,
types a message into #msg and presses Enter (real key events over CDP). The other tab's
#log must show the message; the sender's #log shows it exactly once (its own local line:
a room never sends a member's message back to it). Screenshots of both tabs go to
test-artifacts/demo-tab1.png and demo-tab2.png.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from cdp import Page
from conftest import ARTIFACTS, RELAY_BIN, Process, Reservation

ROOM = "e2e-room"

CONFIG = """
[workers]
count = 2
pin = false

[[listener]]
address = "127.0.0.1:{port}"

[admin]
address = "127.0.0.1:{admin}"

[apps]
publish_token = "browser-test"

[[route]]
name = "rooms"
path = "/rooms/"
app = "rooms"

[[route]]
name = "demo"
path = "/"
app = "demo"
"""


class AppsRelay(Process):
    """relay serving the rooms app and the demo page, from a config file."""

    def __init__(self, tmp_path) -> None:
        self.listen, self.admin_res = Reservation(), Reservation()
        cfg = tmp_path / "demo.toml"
        cfg.write_text(CONFIG.format(port=self.listen.port, admin=self.admin_res.port))
        super().__init__("relay", [str(RELAY_BIN), "--config", str(cfg)])
        self.port = self.listen.port
        self.http = f"http://127.0.0.1:{self.port}"
        self.admin = f"127.0.0.1:{self.admin_res.port}"
        self.wait_line("err", lambda l: "relay ready" in l, "'relay ready'")

    def rooms(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://{self.admin}/v1/rooms", timeout=5) as r:
            return {x["name"]: x["members"] for x in json.load(r)["rooms"]}

    def stop(self, timeout: float = 10.0) -> int:
        try:
            return super().stop(timeout)
        finally:
            self.listen.release()
            self.admin_res.release()


@pytest.fixture
def apps_relay(tmp_path):
    if not RELAY_BIN.is_file():
        pytest.fail(f"no relay binary at {RELAY_BIN}: cargo build -p relay, or set RELAY_BIN")
    r = AppsRelay(tmp_path)
    try:
        yield r
    finally:
        code = r.stop()
        assert code == 0, f"relay exited with {code}:\n{r.log()}"


def new_tab(port: int) -> str:
    """A second page target; returns its DevTools WebSocket URL."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)["webSocketDebuggerUrl"]


async def until(page: Page, expression: str, what: str, timeout: float = 10.0):
    """Polls a JS expression in the page until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        v = await page.eval(expression)
        if v:
            return v
        if time.monotonic() > deadline:
            log = await page.eval("document.getElementById('log').innerText")
            status = await page.eval("document.getElementById('status').textContent")
            raise AssertionError(f"page never showed {what}; status {status!r}, log {log!r}")
        await asyncio.sleep(0.05)


async def type_into(page: Page, element_id: str, text: str) -> None:
    """Focuses an input, clears it, and types `text` as the keyboard would."""
    await page.eval(
        f"(() => {{ const e = document.getElementById({element_id!r}); e.focus(); e.select(); "
        "return true; })()"
    )
    await page.call("Input.dispatchKeyEvent", {"type": "keyDown", "key": "Backspace",
                                               "code": "Backspace", "windowsVirtualKeyCode": 8})
    await page.call("Input.dispatchKeyEvent", {"type": "keyUp", "key": "Backspace",
                                               "code": "Backspace", "windowsVirtualKeyCode": 8})
    await page.call("Input.insertText", {"text": text})


async def press_enter(page: Page) -> None:
    for kind in ("keyDown", "keyUp"):
        await page.call(
            "Input.dispatchKeyEvent",
            {"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13,
             "text": "\r" if kind == "keyDown" else ""},
        )


async def click(page: Page, element_id: str) -> None:
    """A real mouse click in the middle of the element."""
    box = await page.eval(
        f"(() => {{ const r = document.getElementById({element_id!r}).getBoundingClientRect(); "
        "return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()"
    )
    for kind in ("mousePressed", "mouseReleased"):
        await page.call(
            "Input.dispatchMouseEvent",
            {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
        )


async def log_lines(page: Page) -> list[dict]:
    return await page.eval(
        "[...document.querySelectorAll('#log .line')]"
        ".map((d) => ({text: d.textContent, cls: d.className}))"
    )


async def rooms_settle(relay: AppsRelay, want: dict[str, int], timeout: float = 5.0) -> None:
    """Waits for /v1/rooms to list `want` (member counts are published once per tick)."""
    deadline = time.monotonic() + timeout
    while (got := await asyncio.to_thread(relay.rooms)) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"/v1/rooms: {got}, want {want}")
        await asyncio.sleep(0.05)


def test_demo_page_two_tabs_chat_through_a_room(apps_relay, chromium):
    async def run() -> None:
        tab1 = await Page.open(chromium.page_ws_url())
        tab2 = await Page.open(new_tab(chromium.port))
        tabs = {"alice": tab1, "bob": tab2}
        try:
            for name, tab in tabs.items():
                await tab.navigate(apps_relay.http + "/")
                assert await tab.eval("document.title") == "relay — rooms demo"
                await type_into(tab, "room", ROOM)
                await type_into(tab, "name", name)
                await click(tab, "join")
                await until(
                    tab,
                    f"document.getElementById('status').textContent === 'in room {ROOM}'",
                    f"'in room {ROOM}'",
                )
                assert await tab.eval("document.getElementById('msg').disabled") is False
            await rooms_settle(apps_relay, {ROOM: 2})

            for sender, receiver, text in [
                ("alice", "bob", "hello from tab 1 ✓"),
                ("bob", "alice", "hi tab 1, this is tab 2"),
            ]:
                line = f"{sender}: {text}"
                await type_into(tabs[sender], "msg", text)
                await press_enter(tabs[sender])
                await until(
                    tabs[receiver],
                    f"[...document.querySelectorAll('#log .line')].some((d) => "
                    f"d.textContent === {json.dumps(line)} && !d.classList.contains('me'))",
                    f"{line!r} in the other tab",
                )
                # The sender shows its own line once (local, class "me"): the room did not
                # send it back.
                mine = [l for l in await log_lines(tabs[sender]) if l["text"] == line]
                assert len(mine) == 1 and "me" in mine[0]["cls"].split(), mine
                assert await tabs[sender].eval("document.getElementById('msg').value") == ""

            # Each tab's log: joined, then the two messages, in order, nothing else.
            for name, tab in tabs.items():
                texts = [l["text"] for l in await log_lines(tab)]
                assert texts == [
                    f"joined {ROOM}",
                    "alice: hello from tab 1 ✓",
                    "bob: hi tab 1, this is tab 2",
                ], (name, texts)

            await tab1.screenshot(ARTIFACTS / "demo-tab1.png")
            await tab2.screenshot(ARTIFACTS / "demo-tab2.png")
            for name, tab in tabs.items():
                assert tab.exceptions == [], (name, tab.exceptions)

            # Leave: the button says so, and the room empties.
            for tab in tabs.values():
                await click(tab, "join")
                await until(tab, "document.getElementById('status').textContent"
                            ".startsWith('closed (1000')", "closed (1000 …)")
        finally:
            for tab in tabs.values():
                await tab.close()

    async def run_all() -> None:
        await run()
        await rooms_settle(apps_relay, {})

    asyncio.run(asyncio.wait_for(run_all(), 60))
