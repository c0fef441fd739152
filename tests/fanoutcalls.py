"""What a node's fan-out calls (iotvault.fanout.Fanout's callbacks), recorded for the tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class FanoutCalls:
    def __init__(self) -> None:
        self.woken: list[set[str]] = []
        self.woken_all = 0
        self.forgotten: list[set[str]] = []
        self.access = 0
        self.changed = asyncio.Event()

    def wake(self, ids: set[str]) -> None:
        self.woken.append(ids)
        self.changed.set()

    def wake_all(self) -> None:
        self.woken_all += 1
        self.changed.set()

    def forget(self, ids: set[str]) -> None:
        self.forgotten.append(ids)
        self.changed.set()

    def access_changed(self) -> None:
        self.access += 1
        self.changed.set()

    async def until(self, predicate: Callable[[], bool], within_s: float = 5.0) -> None:
        """Wait until ``predicate()`` holds, re-checking after every call."""
        async with asyncio.timeout(within_s):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
