"""VNetRuntime: runs a `VNet` on an asyncio loop.

It is the only place where vnet meets I/O and the clock: it feeds frames from NIC
transports into `VNet.receive`, sends what comes out, keeps one timer armed at
`VNet.next_deadline()`, and turns TCP connections accepted by VIPs into `TcpStream`s.
Everything runs on the owning loop's thread; nothing here is thread-safe.
"""
from __future__ import annotations

import asyncio
import logging
from ipaddress import IPv4Address
from pathlib import Path
from typing import Awaitable, Callable

from .core import VNet
from .router import Router
from .switch import Emit, Port
from .tcp import TcpConnection
from .tcp_stream import TcpStream
from .transport import StreamNic

__all__ = ["VNetRuntime"]

log = logging.getLogger("vmlab.vnet.runtime")


class VNetRuntime:
    def __init__(self, vnet: VNet):
        self.vnet = vnet
        self.loop = asyncio.get_running_loop()
        self.nics: dict[str, StreamNic] = {}
        self._tasks: list[asyncio.Task] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None

    # ------------------------------------------------------------------ NICs

    def attach_stream(self, port: Port, path: Path) -> StreamNic:
        """Connect `port` to the QEMU stream socket at `path` (retrying until it exists)."""
        nic = StreamNic(port.name, path, lambda frame: self._from_port(port, frame))
        port.sink = nic
        self.nics[port.name] = nic
        self._tasks.append(self.loop.create_task(nic.run(), name=f"vnet-nic-{port.name}"))
        return nic

    def _from_port(self, port: Port, frame: bytes) -> None:
        self._send(self.vnet.receive(port, frame, self.loop.time()))

    def _send(self, emits: list[Emit]) -> None:
        for port, frame in emits:
            sink = port.sink
            if sink is not None:
                sink.send(frame)
        self._arm_timer()

    # ------------------------------------------------------------------ timers

    def _arm_timer(self) -> None:
        deadline = self.vnet.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._send(self.vnet.tick(self.loop.time()))

    # ------------------------------------------------------------------ VIP TCP services

    def serve_tcp(self, ip: IPv4Address, port: int,
                  handler: Callable[[TcpStream, Router], Awaitable[None]], what: str) -> None:
        """Run `handler(stream, router)` for each TCP connection to ip:port from any LAN."""

        def on_accept(router: Router, conn: TcpConnection) -> None:
            stream = TcpStream(conn, kick=lambda: self._send(router.flush_tcp(self.loop.time())))
            task = self.loop.create_task(self._run_handler(handler, stream, router),
                                         name=f"vnet-tcp-{what}")
            self._tasks.append(task)
            task.add_done_callback(self._forget)

        self.vnet.listen_tcp(ip, port, on_accept, what)

    def _forget(self, task: asyncio.Task) -> None:
        try:
            self._tasks.remove(task)
        except ValueError:
            pass

    @staticmethod
    async def _run_handler(handler, stream: TcpStream, router: Router) -> None:
        try:
            await handler(stream, router)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("VIP handler failed for %s", stream.remote)
        finally:
            stream.close()

    # ------------------------------------------------------------------ teardown

    async def close(self) -> None:
        """Stop accepting, close NICs, cancel tasks and await them (qemu.qmp's order)."""
        for nic in self.nics.values():
            nic.close()
        if self._timer is not None:
            self._timer.cancel()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
