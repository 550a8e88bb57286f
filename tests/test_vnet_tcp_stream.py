"""TcpStream's app-side contract with the receive window (no sockets, no real peer)."""
from __future__ import annotations

import asyncio

from vmlab.vnet.tcp import TcpState
from vmlab.vnet.tcp_stream import READ_LIMIT, TcpStream


class WindowedConn:
    """Stands in for a TcpConnection: remembers the window the app offers, so the test can
    send only what a real peer could (a peer never sends beyond the advertised window)."""

    def __init__(self):
        self.window = 0
        self.state = TcpState.ESTABLISHED
        self.local = ("52.52.0.2", 8008)
        self.remote = ("192.168.1.101", 40000)
        self.send_buffered = 0

    def set_receive_window(self, n: int) -> None:
        self.window = n


def test_readexactly_larger_than_read_limit_completes():
    async def main():
        conn = WindowedConn()
        stream = TcpStream(conn, kick=lambda: None)
        want = 3 * READ_LIMIT + 123
        payload = bytes(i % 251 for i in range(want))
        reader = asyncio.ensure_future(stream.readexactly(want))
        sent = 0
        while sent < want:
            n = min(conn.window, 1460, want - sent)
            if n == 0:
                await asyncio.sleep(0)  # the reader must reopen the window by itself
                assert not reader.done() or reader.exception() is None
                if conn.window == 0:
                    raise AssertionError(f"window stuck at 0 after {sent} of {want} bytes")
                continue
            conn.on_data(payload[sent:sent + n])
            sent += n
            await asyncio.sleep(0)
        assert await asyncio.wait_for(reader, 5) == payload

    asyncio.run(main())
