"""The Env's event loop on its own thread, and the one sync-to-async bridge.

vnet, the QMP clients, the driver and (later) the web server share this loop. Test code
is synchronous and calls into it only through `LoopThread.call`, which bounds the wait,
cancels the coroutine on timeout and raises vmlab's timeout error. Loop code must never
call `call` (it would wait on itself).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from typing import Awaitable, TypeVar

from .errors import StateError, VmlabTimeout

__all__ = ["LoopThread"]

T = TypeVar("T")


class LoopThread:
    def __init__(self, name: str = "vmlab-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Awaitable[T], timeout_s: float | None, what: str = "operation") -> T:
        if threading.current_thread() is self._thread:
            raise StateError("LoopThread.call from the loop thread would deadlock; await instead")
        if self.loop.is_closed():
            raise StateError(f"{what}: the Env is closed; create a new Env")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            if fut.done():
                raise  # the coroutine's own TimeoutError (e.g. AgentTimeout), not our bound
            fut.cancel()
            raise VmlabTimeout(f"{what} did not finish within {timeout_s} s") from None

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()
