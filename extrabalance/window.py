"""A window of requests in flight: at most `size` holders at once, the others waiting
in arrival order.

A released slot is handed straight to the first waiter, so a newcomer can never
overtake a caller that was already waiting. `asyncio.Semaphore` gives no such order
and, in Python 3.11, scans its waiters on every acquire: with hundreds of callers
queued behind a window that scan was the costliest line of a publisher. Used by the
SMPP connection (its window of unanswered requests) and by the simulators' MQTT
recharge publisher (its publishes awaiting PUBACK).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class FifoWindow:
    """`await acquire()` a slot, `release()` it when done (in a `finally`)."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError("a window needs at least one slot")
        self.free = size  # slots nobody holds or has been handed
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        """Callers queued for a slot."""
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # release() handed its slot to this waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to this caller
                return
        self.free += 1
