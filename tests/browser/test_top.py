"""`relay top --once` against a running relay holding a known number of connections."""

from __future__ import annotations

import asyncio
import subprocess

from conftest import RELAY_BIN, Reservation
from load import Load


def top(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(RELAY_BIN), "top", *args], capture_output=True, text=True, timeout=30
    )


def rows(out: str, first: str) -> list[list[str]]:
    return [l.split() for l in out.splitlines() if l.split()[:1] == [first]]


def test_top_once_shows_workers_and_routes(relay):
    async def run() -> str:
        load = Load(relay.url, period=0.1)
        await load.open(40)
        try:
            # `relay top` blocks for its interval; run it off the event loop so the clients
            # keep echoing (and the byte rates are not zero).
            r = await asyncio.to_thread(top, "--admin", relay.admin, "--once", "--interval", "0.5")
        finally:
            await load.close()
        assert r.returncode == 0, r.stderr
        return r.stdout

    out = asyncio.run(asyncio.wait_for(run(), 60))
    print(out)
    assert "\x1b" not in out, "--once must print no escape codes"
    assert out.startswith(f"relay top - {relay.admin} - 2 workers")
    header = rows(out, "WORKER")[0]
    assert header[:4] == ["WORKER", "ACTIVE", "ACCEPTED", "ACCEPT/S"]
    w0, w1, total = rows(out, "0")[0], rows(out, "1")[0], rows(out, "total")[0]
    assert int(total[1]) == 40
    assert int(w0[1]) + int(w1[1]) == 40
    assert int(total[2].replace(",", "")) >= 40
    # accepts/s, then bytes/s each way as "<n> <unit>/s"; the clients echo, so neither is 0.
    float(total[3])
    assert total[5].endswith("/s") and total[7].endswith("/s"), total
    assert float(total[4]) > 0 and float(total[6]) > 0, total

    stats = relay.stats()
    if "routes" in stats:
        assert rows(out, "ROUTE"), out
        for r in stats["routes"]:
            name = r["name"] or "(unnamed)"
            row = rows(out, name)
            assert row, f"no row for route {name!r}:\n{out}"
        assert sum(int(rows(out, r["name"] or "(unnamed)")[0][1]) for r in stats["routes"]) == 40
    else:
        assert "per-route figures are not reported" in out


def test_top_reports_an_unreachable_admin():
    free = Reservation()  # bound, not listening: connections are refused
    try:
        r = top("--admin", f"127.0.0.1:{free.port}", "--once", "--interval", "0.1")
    finally:
        free.release()
    assert r.returncode == 1
    assert "cannot read /v1/stats" in r.stderr and str(free.port) in r.stderr, r.stderr
    assert r.stdout == ""


def test_top_rejects_a_bad_interval():
    r = top("--interval", "0", "--once")
    assert r.returncode == 2
    assert "--interval" in r.stderr
