"""The dashboard page (`GET /` on the admin listener) in headless Chromium during a load run.

The page is opened before any client connects; then WebSocket clients through relay rise to
50 and to 150 (each echoing a message every 0.25 s). The numbers the page shows (read with
Runtime.evaluate) must follow: total active 0 -> 50 -> 150, accepted at least as many, the
per-worker rows summing to the total, the route row counting them. A screenshot of the page
at 150 goes to test-artifacts/dashboard.png. The live feed itself (`GET /v1/live`) is also
checked with a plain `websockets` client: cadence, pings, the closing handshake, the cap on
live clients and the refusal of foreign origins.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from cdp import Page
from conftest import ARTIFACTS
from load import Load

SCREENSHOT = ARTIFACTS / "dashboard.png"


async def displayed(page: Page) -> dict:
    """The figures the page shows now, as the page shows them."""
    return await page.eval(
        """(() => {
          const num = (id) => {
            const el = document.getElementById(id);
            return { text: el.textContent, value: Number(el.dataset.value) };
          };
          const rows = (id) => [...document.querySelectorAll('#' + id + ' tbody tr')]
            .map((tr) => [...tr.cells].map((td) => td.textContent));
          return {
            status: document.getElementById('status').dataset.state,
            active: num('total-active'),
            accepted: num('total-accepted'),
            upgraded: num('total-upgraded'),
            c2o: num('total-bytes-c2o'),
            o2c: num('total-bytes-o2c'),
            workers: rows('workers'),
            routes: rows('routes'),
            updates: window.relayDashboard.updates,
            samples: window.relayDashboard.samples.length,
            chartActiveMax: Math.max(0, ...window.relayDashboard.samples.map((s) => s.total.active)),
          };
        })()"""
    )


def routes_total(d):
    """Sum of the route table's active column, or None when the page shows no route rows."""
    try:
        return sum(as_int(r[1]) for r in d["routes"])
    except (ValueError, IndexError, TypeError):
        return None


def as_int(text: str) -> int:
    return int(text.replace(",", ""))


async def wait_displayed(page: Page, pred, what: str, timeout: float = 15.0, trail=None) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        d = await displayed(page)
        if trail is not None:
            trail.append(d["active"]["value"])
        if pred(d):
            return d
        if time.monotonic() > deadline:
            raise AssertionError(f"page never showed {what}; last: {json.dumps(d)}")
        await asyncio.sleep(0.2)


def test_dashboard_shows_rising_load(relay, chromium):
    async def run() -> None:
        page = await Page.open(chromium.page_ws_url())
        load = Load(relay.url)
        try:
            await page.navigate(f"http://{relay.admin}/")
            assert await page.eval("document.title") == "relay · live"
            # Live and idle: a couple of pushes, zero connections.
            d = await wait_displayed(
                page,
                lambda d: d["status"] == "live" and d["updates"] >= 3,
                "the live feed",
            )
            assert d["active"]["value"] == 0 and d["active"]["text"] == "0"
            assert len(d["workers"]) == 2, d["workers"]

            trail: list[int] = []
            for target in (50, 150):
                await load.open(target - load.count)
                # Per-route figures are published once per 100 ms tick, worker totals on
                # every loop turn: wait until the page shows both at the target.
                d = await wait_displayed(
                    page,
                    lambda d: d["active"]["value"] == target
                    and routes_total(d) in (None, target),
                    f"total-active == {target} and the routes' active sum with it",
                    trail=trail,
                )
                # What the page shows is what relay counts.
                stats = relay.stats()
                assert stats["total"]["active"] == target
                assert as_int(d["active"]["text"]) == target
                assert d["accepted"]["value"] >= target
                assert as_int(d["accepted"]["text"]) == d["accepted"]["value"]
                assert d["upgraded"]["value"] >= target
                # One row per worker; the rows' active column sums to the total.
                assert [r[0] for r in d["workers"]] == ["0", "1"], d["workers"]
                assert sum(as_int(r[1]) for r in d["workers"]) == target, d["workers"]
                if "routes" in stats:
                    names = [r["name"] for r in stats["routes"]]
                    assert [r[0] for r in d["routes"]] == names, d["routes"]
                    assert sum(as_int(r[1]) for r in d["routes"]) == target, d["routes"]
                else:
                    assert "not reported" in d["routes"][0][0]
            # The displayed count only ever rose during the ramp.
            assert trail == sorted(trail), trail
            assert trail[-1] == 150

            # Let the charts show the plateau and the echo traffic, then check what they hold.
            await asyncio.sleep(3)
            d = await wait_displayed(
                page, lambda d: d["o2c"]["value"] > 0 and d["c2o"]["value"] > 0, "bytes moving"
            )
            assert d["samples"] >= 10, d
            assert d["chartActiveMax"] == 150, d
            rate = await page.eval("Number(document.getElementById('total-rate-o2c').dataset.value)")
            assert rate > 0, "throughput rate shown as 0 while clients echo"
            blank = await page.eval(
                """(() => {
                  const c = document.getElementById('chart-active');
                  const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                  let lit = 0;
                  for (let i = 3; i < px.length; i += 4) if (px[i]) lit++;
                  return lit;
                })()"""
            )
            assert blank > 1000, f"the active-connections chart is (nearly) empty: {blank} px"

            await page.screenshot(SCREENSHOT)
            assert SCREENSHOT.stat().st_size > 10_000

            # And back down when the clients leave.
            await load.close()
            await wait_displayed(page, lambda d: d["active"]["value"] == 0, "total-active == 0")
            assert not page.exceptions, page.exceptions[:3]
        finally:
            if not load._stop.is_set():
                await load.close()
            await page.close()

    asyncio.run(asyncio.wait_for(run(), 90))
    print(f"screenshot: {SCREENSHOT}")


def test_page_is_self_contained(relay):
    import urllib.request

    with urllib.request.urlopen(f"http://{relay.admin}/", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/html")
        body = r.read().decode()
    for id_ in ("total-active", "total-accepted", "chart-active", "workers", "routes"):
        assert f'id="{id_}"' in body
    assert "http://" not in body and "https://" not in body


def test_live_feed_protocol(relay):
    """`GET /v1/live` with a plain client: a JSON snapshot every ~0.5 s, pings answered, a
    clean closing handshake."""

    async def run() -> None:
        url = f"ws://{relay.admin}/v1/live"
        async with connect(url, ping_interval=None, open_timeout=5) as ws:
            t0 = time.monotonic()
            frames = [json.loads(await asyncio.wait_for(ws.recv(), 3)) for _ in range(4)]
            took = time.monotonic() - t0
            # The first comes at once, then one each 0.5 s.
            assert 1.2 < took < 2.5, took
            for f in frames:
                assert {"total", "workers", "open_fds"} <= f.keys()
                assert len(f["workers"]) == 2
            pong = await ws.ping(b"are you there")
            await asyncio.wait_for(pong, 3)
        assert ws.close_code == 1000, ws.close_code

    asyncio.run(asyncio.wait_for(run(), 30))


def test_live_feed_refusals(relay):
    async def run() -> None:
        url = f"ws://{relay.admin}/v1/live"
        # A page from another site may not read the feed.
        with pytest.raises(InvalidStatus) as e:
            await connect(url, origin="http://evil.example", open_timeout=5)
        assert e.value.response.status_code == 403
        # At most 32 live clients; the next is told 503, and a place frees when one leaves.
        clients = [await connect(url, ping_interval=None, open_timeout=5) for _ in range(32)]
        try:
            with pytest.raises(InvalidStatus) as e:
                await connect(url, open_timeout=5)
            assert e.value.response.status_code == 503
            # Scrapes still work while 32 live clients are served.
            assert relay.stats()["total"]["active"] == 0
            await clients.pop().close()
            deadline = time.monotonic() + 5
            while True:
                try:
                    extra = await connect(url, open_timeout=5)
                    clients.append(extra)
                    break
                except InvalidStatus as err:
                    assert err.response.status_code == 503
                    assert time.monotonic() < deadline, "place not freed after a close"
                    await asyncio.sleep(0.1)
        finally:
            for c in clients:
                await c.close()

    asyncio.run(asyncio.wait_for(run(), 30))
