"""Per-subscriber serialisation: one asyncio lock per MSISDN with work in flight.

The map holds only subscribers that currently have a holder or waiter, so its size is
bounded by the requests in flight; `subscribers_max` bounds it outright (new
subscribers wait for room rather than growing the map).

Every loan and payback passes through here, so `hold` is a small class rather than a
generator-based context manager, and the common case (nobody else holds this
subscriber, the map has room) completes without suspending.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

SUBSCRIBERS_IN_FLIGHT_MAX = 50_000


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # holder + waiters


class SubscriberLocks:
    def __init__(self, subscribers_max: int = SUBSCRIBERS_IN_FLIGHT_MAX) -> None:
        self.subscribers_max = subscribers_max
        self._locks: dict[str, _Entry] = {}
        self._room = asyncio.Semaphore(subscribers_max)

    def __len__(self) -> int:
        return len(self._locks)

    async def settled(self, msisdn: str, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until nothing runs for this subscriber; True if
        so. For reads that should not show an operation about to finish as pending."""
        if msisdn not in self._locks:
            return True

        async def take_turn() -> None:
            async with self.hold(msisdn):
                pass

        try:
            await asyncio.wait_for(take_turn(), timeout_s)
        except TimeoutError:
            return False
        return True

    def hold(self, msisdn: str) -> _Hold:
        """`async with locks.hold(msisdn):` runs the block alone for that subscriber."""
        return _Hold(self, msisdn)


class _Hold:
    __slots__ = ("_entry", "_msisdn", "_owner")

    def __init__(self, owner: SubscriberLocks, msisdn: str) -> None:
        self._owner = owner
        self._msisdn = msisdn
        self._entry: _Entry | None = None

    async def __aenter__(self) -> None:
        owner, msisdn = self._owner, self._msisdn
        entry = owner._locks.get(msisdn)
        if entry is None:
            await owner._room.acquire()
            entry = owner._locks.get(msisdn)  # another task may have created it meanwhile
            if entry is None:
                entry = owner._locks[msisdn] = _Entry()
            else:
                owner._room.release()
        entry.users += 1
        try:
            await entry.lock.acquire()
        except BaseException:
            self._leave(entry)
            raise
        self._entry = entry

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry = self._entry
        assert entry is not None
        self._entry = None
        entry.lock.release()
        self._leave(entry)

    def _leave(self, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users == 0:
            del self._owner._locks[self._msisdn]
            self._owner._room.release()
