"""The driver: the test side of agent connections.

Agents dial the driver VIP; vnet terminates the TCP and hands each connection here. The
agent opens with one hello line, ``VMLAB-AGENT 1 {json}``, naming its MAC; after that the
connection carries HTTP/1.1 with the driver as client and the agent as server. The agent
keeps two idle connections open, so the driver can have several requests in flight per node:
each request takes an idle connection from that node's pool and returns it afterwards.

Everything here runs on the Env's loop.
"""
from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from dataclasses import dataclass, field

from .errors import AgentError, VmlabTimeout
from .vnet.router import Router
from .vnet.tcp_stream import TcpStream

__all__ = ["Driver", "AgentHello", "HELLO_PREFIX"]

log = logging.getLogger("vmlab.driver")

HELLO_PREFIX = b"VMLAB-AGENT 1 "
#: Bound on the hello line and on response headers: an agent is trusted, but a broken one
#: must not make the driver buffer without limit.
MAX_LINE = 64 * 1024


@dataclass(frozen=True)
class AgentHello:
    mac: str
    hostname: str
    version: str
    conn_id: int
    #: new with each agent process; "" from agents that predate it
    instance: str = ""


@dataclass
class _Pool:
    idle: deque = field(default_factory=deque)
    cond: asyncio.Condition = field(default_factory=asyncio.Condition)
    hello: AgentHello | None = None
    connected_at: float | None = None
    connections: int = 0


class Driver:
    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}
        self.on_connect = lambda mac, hello: None
        #: called with the MAC when a connected agent's last connection closes
        self.on_disconnect = lambda mac: None

    def _pool(self, mac: str) -> _Pool:
        mac = mac.lower()
        pool = self._pools.get(mac)
        if pool is None:
            pool = self._pools[mac] = _Pool()
        return pool

    def is_connected(self, mac: str) -> bool:
        pool = self._pools.get(mac.lower())
        return bool(pool and pool.hello is not None)

    def hello(self, mac: str) -> AgentHello | None:
        pool = self._pools.get(mac.lower())
        return pool.hello if pool else None

    async def handle(self, stream: TcpStream, router: Router) -> None:
        """The VIP handler: read the hello, then park the connection in its node's pool."""
        line = await asyncio.wait_for(stream.readline(), 30)
        if not line.startswith(HELLO_PREFIX) or len(line) > MAX_LINE:
            log.warning("connection from %s on %s did not start with a vmlab hello: %r",
                        stream.remote, router.name, line[:80])
            return
        try:
            info = json.loads(line[len(HELLO_PREFIX):])
            hello = AgentHello(str(info["mac"]).lower(), str(info.get("hostname", "")),
                               str(info.get("version", "")), int(info.get("conn_id", 0)),
                               str(info.get("instance", "")))
        except (ValueError, KeyError, TypeError) as err:
            log.warning("bad hello from %s: %s", stream.remote, err)
            return
        pool = self._pool(hello.mac)
        if pool.hello is not None and hello.instance != pool.hello.instance:
            self._retire_idle(pool, hello)
        first = pool.hello is None
        pool.hello = hello
        pool.connections += 1
        if first:
            pool.connected_at = asyncio.get_running_loop().time()
            log.info("agent %s (%s) connected from %s via %s", hello.mac, hello.hostname,
                     stream.remote[0], router.name)
            self.on_connect(hello.mac, hello)
        elif pool.connections == 1:  # back after all its connections had closed
            self.on_connect(hello.mac, hello)
        async with pool.cond:
            pool.idle.append(stream)
            pool.cond.notify_all()
        # The stream now belongs to the pool; keep this handler alive until it closes so the
        # runtime's cleanup (which closes the stream) does not run early.
        await stream.wait_closed()
        pool.connections -= 1
        if pool.connections == 0:
            self.on_disconnect(hello.mac)

    def _retire_idle(self, pool: _Pool, hello: AgentHello) -> None:
        """A new agent process says hello: the previous one died (systemd restarted it, or it
        crashed), and its idle connections only look alive if its FIN or RST never reached
        vnet. The first request on one would fail, so close them now."""
        stale = [s for s in pool.idle if not s.is_closing()]
        pool.idle.clear()
        for stream in stale:
            stream.abort()
        if stale:
            log.info("agent %s restarted (instance %s -> %s): dropped %d idle connection(s)",
                     hello.mac, pool.hello.instance or "?", hello.instance or "?", len(stale))

    async def wait_connected(self, mac: str) -> AgentHello:
        pool = self._pool(mac)
        async with pool.cond:
            await pool.cond.wait_for(lambda: pool.hello is not None)
        return pool.hello

    async def _take(self, mac: str, timeout_s: float) -> TcpStream:
        pool = self._pool(mac)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        async with pool.cond:
            while True:
                while pool.idle:
                    stream = pool.idle.popleft()
                    if not stream.is_closing() and not stream.at_eof():
                        return stream
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise VmlabTimeout(
                        f"no idle agent connection from {mac} within {timeout_s:.0f} s "
                        f"({pool.connections} open, agent {'seen' if pool.hello else 'never seen'}); "
                        f"is the agent running? check the node's console log")
                try:
                    await asyncio.wait_for(pool.cond.wait(), remaining)
                except asyncio.TimeoutError:
                    pass

    async def _give_back(self, mac: str, stream: TcpStream) -> None:
        pool = self._pool(mac)
        async with pool.cond:
            pool.idle.append(stream)
            pool.cond.notify_all()

    async def request(self, mac: str, method: str, path: str, body: dict | None = None,
                      *, timeout_s: float = 60.0) -> dict:
        """One HTTP request to the agent of `mac`; returns the decoded JSON body."""
        stream = await self._take(mac, min(timeout_s, 30.0))
        payload = json.dumps(body).encode() if body is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n").encode()
        try:
            stream.write(head + payload)
            await stream.drain()
            status, data = await asyncio.wait_for(_read_response(stream), timeout_s)
        except asyncio.TimeoutError:
            stream.close()
            raise VmlabTimeout(f"agent {mac}: {method} {path} got no answer within {timeout_s} s")
        except (ConnectionError, asyncio.IncompleteReadError) as err:
            stream.close()
            raise AgentError(f"agent {mac}: connection lost during {method} {path}: {err!r}") from err
        await self._give_back(mac, stream)
        try:
            result = json.loads(data) if data else {}
        except ValueError as err:
            raise AgentError(f"agent {mac}: {method} {path} answered non-JSON: {data[:200]!r}") from err
        if status != 200:
            raise AgentError(f"agent {mac}: {method} {path} failed with HTTP {status}: "
                             f"{result.get('error', result)}")
        return result


async def _read_response(stream: TcpStream) -> tuple[int, bytes]:
    status_line = await stream.readline()
    if not status_line:
        raise ConnectionResetError("agent closed the connection")
    parts = status_line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ConnectionResetError(f"bad status line {status_line[:80]!r}")
    status = int(parts[1])
    length = 0
    total = 0
    while True:
        line = await stream.readline()
        total += len(line)
        if total > MAX_LINE:
            raise ConnectionResetError("response headers too long")
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())
    data = await stream.readexactly(length) if length else b""
    return status, data
