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
from .transport import DgramNic, StreamNic

__all__ = ["VNetRuntime"]

log = logging.getLogger("vmlab.vnet.runtime")


class VNetRuntime:
    def __init__(self, vnet: VNet):
        self.vnet = vnet
        self.loop = asyncio.get_running_loop()
        self.nics: dict[str, StreamNic | DgramNic] = {}
        self._tasks: list[asyncio.Task] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._kicked: set[str | None] = set()
        #: lan_ping echoes awaiting their reply: (network, (ident, seq)) -> future of the RTT
        self._pings: dict[tuple[str, tuple[int, int]], asyncio.Future] = {}
        self._ping_seq = 0

    # ------------------------------------------------------------------ NICs

    def attach_stream(self, port: Port, path: Path) -> StreamNic:
        """Connect `port` to the QEMU stream socket at `path` (retrying until it exists)."""
        nic = StreamNic(port.name, path, lambda frame: self._from_port(port, frame))
        port.sink = nic
        self.nics[port.name] = nic
        self._tasks.append(self.loop.create_task(nic.run(), name=f"vnet-nic-{port.name}"))
        return nic

    def attach_dgram(self, port: Port, local_path: Path, peer_path: Path) -> DgramNic:
        """Bind vnet's datagram socket at `local_path` for `port`; QEMU binds `peer_path`.
        Call before QEMU starts, so its first frames find the socket."""
        nic = DgramNic(port.name, local_path, peer_path, lambda frame: self._from_port(port, frame))
        nic.open()
        port.sink = nic
        self.nics[port.name] = nic
        return nic

    def _from_port(self, port: Port, frame: bytes) -> None:
        self._send(self.vnet.receive(port, frame, self.loop.time()))
        if self._pings:
            self._collect_echo_replies()

    # ------------------------------------------------------------------ lan_ping

    #: ICMP identifier of vnet's own echo requests ("vm" in ASCII, easy to spot in a pcap)
    PING_IDENT = 0x766D

    async def ping(self, network: str, address: IPv4Address, *, timeout_s: float) -> float | None:
        """Send one echo request from `network`'s gateway to `address`; the round trip in
        seconds, or None if no reply came within `timeout_s`."""
        router = self.vnet.routers[network]
        self._ping_seq = (self._ping_seq + 1) & 0xFFFF
        key = (network, (self.PING_IDENT, self._ping_seq))
        future = self.loop.create_future()
        self._pings[key] = future
        try:
            self._send(router.echo_request(address, *key[1], self.loop.time()))
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            return None
        finally:
            self._pings.pop(key, None)
            router.echo_replies.pop(key[1], None)

    def _collect_echo_replies(self) -> None:
        for (network, echo), future in list(self._pings.items()):
            reply = self.vnet.routers[network].echo_replies.pop(echo, None)
            if reply is not None and not future.done():
                future.set_result(reply[1])

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

    def _kick(self, router: Router | None) -> None:
        """An app queued TCP work on `router`'s stack (None: the internet's): flush it on the
        next loop iteration, once however many kicks came in between. Deferred because the
        stack must never be re-entered from inside one of its own callbacks (tcp_stream.py)."""
        key = router.name if router is not None else None
        if key in self._kicked:
            return
        self._kicked.add(key)

        def flush() -> None:
            self._kicked.discard(key)
            self._send(self.vnet.kick(router, self.loop.time()))

        self.loop.call_soon(flush)

    def serve_tcp(self, ip: IPv4Address, port: int,
                  handler: Callable[[TcpStream, Router], Awaitable[None]], what: str) -> None:
        """Run `handler(stream, router)` for each TCP connection to ip:port from any LAN."""

        def on_accept(router: Router, conn: TcpConnection) -> None:
            stream = TcpStream(conn, kick=lambda: self._kick(router))
            task = self.loop.create_task(self._run_handler(handler, stream, router),
                                         name=f"vnet-tcp-{what}")
            self._tasks.append(task)
            task.add_done_callback(self._forget)

        self.vnet.listen_tcp(ip, port, on_accept, what)

    def serve_tcp_vip(self, ip, port: int,
                      handler: Callable[[TcpStream, Router | None], Awaitable[None]],
                      what: str) -> None:
        """Run `handler(stream, router)` for each TCP connection to public address ip:port
        (IPv4 or IPv6; made a VIP if it is not one). The service sits on the internet, after
        any NAT: `stream.remote` is the post-NAT source, and `router` the network it came
        from (None if no network owns the source address)."""

        def on_accept(conn: TcpConnection) -> None:
            stream = TcpStream(conn, kick=lambda: self._kick(None))
            router = self.vnet.internet.router_for(conn.remote[0])
            task = self.loop.create_task(self._run_handler(handler, stream, router),
                                         name=f"vnet-tcp-{what}")
            self._tasks.append(task)
            task.add_done_callback(self._forget)

        self.vnet.listen_tcp_vip(ip, port, on_accept, what)

    def serve_udp(self, ip, port: int, handler, what: str) -> None:
        """Answer UDP to public address ip:port with `handler(payload, (src_ip, src_port))`,
        which returns the reply payload or None (see services.UdpHandler)."""
        self.vnet.serve_udp(ip, port, handler, what)

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
