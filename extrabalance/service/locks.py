"""Per-subscriber serialisation: one asyncio lock per MSISDN with work in flight.

The map holds only subscribers that currently have a holder or waiter, so its size is
bounded by the requests in flight; `subscribers_max` bounds it outright (new
subscribers wait for room rather than growing the map).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

SUBSCRIBERS_IN_FLIGHT_MAX = 50_000


class SubscriberLocks:
    def __init__(self, subscribers_max: int = SUBSCRIBERS_IN_FLIGHT_MAX) -> None:
        self.subscribers_max = subscribers_max
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._room = asyncio.Semaphore(subscribers_max)

    def __len__(self) -> int:
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, msisdn: str) -> AsyncIterator[None]:
        entry = self._locks.get(msisdn)
        if entry is None:
            await self._room.acquire()
            entry = self._locks.get(msisdn)  # another task may have created it meanwhile
            if entry is None:
                entry = (asyncio.Lock(), 0)
            else:
                self._room.release()
        lock, users = entry
        self._locks[msisdn] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[msisdn]
            if users == 1:
                del self._locks[msisdn]
                self._room.release()
            else:
                self._locks[msisdn] = (lock, users - 1)
