"""A bound on each write of one stream: a client that stops reading fills the transport's
window (HTTP/2 flow control, TCP) and the write blocks; the router cuts it off instead of holding
its sequence forever."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


class WriteCutoff:
    """Bounds each write of one stream to `timeout_s`: TimeoutError when the client has not
    read for that long. One loop timer per write, not an `asyncio.timeout` (a context object and
    task bookkeeping besides the timer, on every chunk the router sends). Made by the task that
    writes; a cancel from elsewhere (the client went away) passes through."""

    __slots__ = ("timeout_s", "_task", "_loop", "_fired")

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        task = asyncio.current_task()
        assert task is not None, "WriteCutoff belongs to the task that writes"
        self._task = task
        self._loop = asyncio.get_running_loop()
        self._fired = False

    def _fire(self) -> None:
        self._fired = True
        self._task.cancel()

    async def bound(self, write: Awaitable[None]) -> None:
        timer = self._loop.call_later(self.timeout_s, self._fire)
        try:
            await write
        except asyncio.CancelledError:
            if self._fired and self._task.uncancel() == 0:  # ours, not the client's cancel
                raise asyncio.TimeoutError from None
            raise
        finally:
            timer.cancel()
