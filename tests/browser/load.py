"""A small load of WebSocket clients through relay, for the dashboard and `relay top` tests."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect


class Load:
    """Clients that each hold a connection through relay and echo a message every `period`
    seconds (so the byte counters move), until `close()`."""

    def __init__(self, url: str, size: int = 512, period: float = 0.25) -> None:
        self.url = url
        self.payload = "x" * size
        self.period = period
        self.tasks: list[asyncio.Task] = []
        self.errors: list[BaseException] = []
        self.echoed = 0
        self._stop = asyncio.Event()

    async def _client(self, opened: asyncio.Future) -> None:
        try:
            async with connect(self.url, open_timeout=10, ping_interval=None) as ws:
                opened.set_result(None)
                while not self._stop.is_set():
                    await ws.send(self.payload)
                    assert await asyncio.wait_for(ws.recv(), 10) == self.payload
                    self.echoed += 1
                    try:
                        await asyncio.wait_for(self._stop.wait(), self.period)
                    except asyncio.TimeoutError:
                        pass
        except BaseException as e:  # noqa: BLE001 - reported by the test
            if not opened.done():
                opened.set_exception(e)
            elif not isinstance(e, asyncio.CancelledError):
                self.errors.append(e)

    async def open(self, n: int, per_step: int = 10, step: float = 0.1) -> None:
        """Opens `n` more connections, `per_step` at a time (a visible ramp), and returns
        once every one of them completed its handshake."""
        for i in range(0, n, per_step):
            batch = []
            for _ in range(min(per_step, n - i)):
                opened = asyncio.get_running_loop().create_future()
                self.tasks.append(asyncio.create_task(self._client(opened)))
                batch.append(opened)
            await asyncio.gather(*batch)
            await asyncio.sleep(step)

    @property
    def count(self) -> int:
        return len(self.tasks)

    async def close(self) -> None:
        self._stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 20)
        assert not self.errors, self.errors[:3]
