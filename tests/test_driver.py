"""The driver's per-node connection pool, on real TcpStreams over stand-in TCP connections
(no VM and no stack: the pool's logic is all that is under test)."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

from vmlab.driver import HELLO_PREFIX, Driver
from vmlab.vnet.tcp import TcpState
from vmlab.vnet.tcp_stream import TcpStream

MAC = "52:cc:cc:cc:01:00"


class Conn:
    """Stands in for a TcpConnection: the stream sets its callbacks; close and abort end it
    at once, as the stack does once the peer has answered."""

    def __init__(self, port: int):
        self.state = TcpState.ESTABLISHED
        self.local = ("52.52.0.2", 8008)
        self.remote = ("192.168.1.101", port)
        self.send_buffered = 0
        self.ended = False

    def set_receive_window(self, n: int) -> None:
        pass

    def send(self, data: bytes) -> int:
        return len(data)

    def close(self) -> None:
        self._end()

    def abort(self) -> None:
        self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.state = TcpState.CLOSED
            self.on_closed(None)


async def _connect(driver: Driver, port: int, instance: str) -> tuple[TcpStream, Conn]:
    conn = Conn(port)
    stream = TcpStream(conn, kick=lambda: None)
    hello = {"mac": MAC, "hostname": "n", "version": "t", "conn_id": port, "instance": instance}
    conn.on_data(HELLO_PREFIX + json.dumps(hello).encode() + b"\n")
    asyncio.get_running_loop().create_task(driver.handle(stream, SimpleNamespace(name="lan")))
    for _ in range(5):  # let the handler read the hello and park the stream
        await asyncio.sleep(0)
    return stream, conn


def test_a_restarted_agents_hello_retires_the_old_processes_idle_connections():
    """An agent process that died without its FIN reaching vnet leaves connections that look
    alive, and the first request on one would fail. A new process's hello says they are dead."""
    async def main():
        driver = Driver()
        old = [await _connect(driver, 40000 + i, "111-aaaa") for i in range(2)]
        assert driver.hello(MAC).instance == "111-aaaa"
        assert not any(conn.ended for _s, conn in old)
        new_stream, new_conn = await _connect(driver, 40010, "222-bbbb")
        assert all(conn.ended for _s, conn in old), "the old process's connections stayed pooled"
        assert driver.hello(MAC).instance == "222-bbbb"
        assert await driver._take(MAC, 1) is new_stream
        # Connections of one process stay pooled side by side.
        again, again_conn = await _connect(driver, 40011, "222-bbbb")
        assert not again_conn.ended and not new_conn.ended
        assert await driver._take(MAC, 1) is again
        for conn in (new_conn, again_conn):
            conn.close()
        await asyncio.sleep(0)
        assert not driver.is_connected(MAC) or driver._pool(MAC).connections == 0
    asyncio.run(asyncio.wait_for(main(), 10))
