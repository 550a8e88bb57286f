"""asyncio streams over vnet's userspace TCP (`vmlab.vnet.tcp`).

Owns: `TcpStream`, the app-side view of one `TcpConnection`, with the
`asyncio.StreamReader`/`StreamWriter` verbs the driver and agent server use,
read backpressure through the TCP receive window, and write backpressure
through `drain()`.

Leaves to others: the TCP state machine (`tcp.py`) and running the stack (the
vnet runtime). The runtime passes `kick`; calling it must, on the next loop
iteration (`loop.call_soon`, coalescing repeated kicks), tick the stack with
the current time, send `take_outgoing()`, and re-arm the stack's timer. All of
this runs on the one event loop: callbacks from the stack and the coroutines
here never cross threads.

Read backpressure starts once the window offered in the SYN-ACK (the stack's
`rcv_window`, 64 KiB by default) is used: TCP cannot take an offered window
back. Build the stack with `rcv_window <= read_limit` to bound it from the start.
"""
from __future__ import annotations

import asyncio
from typing import Callable

from vmlab.vnet.tcp import MAX_WINDOW, TcpConnection, TcpState

__all__ = ["TcpStream"]

READ_LIMIT = 256 * 1024       # bytes buffered for the app before the window closes
WRITE_HIGH_WATER = 256 * 1024  # drain() blocks while more than this is unsent or unacked
WRITE_LOW_WATER = 64 * 1024    # and resumes once the connection is down to this


class TcpStream:
    """Reader and writer for one accepted connection.

    Create it synchronously inside the stack's on_accept callback, so no data is missed::

        def on_accept(conn):
            stream = TcpStream(conn, kick)
            asyncio.get_running_loop().create_task(serve(stream))

        async def serve(stream):
            line = await stream.readline()
            stream.write(b"hello " + line)
            await stream.drain()
            stream.close()
            await stream.wait_closed()
    """

    def __init__(self, conn: TcpConnection, kick: Callable[[], None], *,
                 read_limit: int = READ_LIMIT, write_high_water: int = WRITE_HIGH_WATER,
                 write_low_water: int = WRITE_LOW_WATER):
        self._conn = conn
        self._kick = kick
        self._read_limit = read_limit
        self._write_high_water = write_high_water
        self._buffer = bytearray()
        self._eof = False
        self._closing = False   # close() was called: reading stops, incoming data is discarded
        self._closed = False    # the connection is gone (on_closed ran)
        self._error: Exception | None = None
        self._waiters: list[asyncio.Future] = []
        conn.send_low_water = write_low_water
        conn.on_data = self._on_data
        conn.on_eof = self._on_eof
        conn.on_closed = self._on_closed
        conn.on_writable = self._wake
        conn.set_receive_window(self._free())

    def __repr__(self) -> str:
        return f"<TcpStream {self._conn!r} buffered={len(self._buffer)}>"

    @property
    def local(self) -> tuple:
        return self._conn.local

    @property
    def remote(self) -> tuple:
        return self._conn.remote

    # -- callbacks from the stack (run inside receive/tick) ---------------------------------

    def _free(self) -> int:
        return MAX_WINDOW if self._closing else max(0, self._read_limit - len(self._buffer))

    def _on_data(self, data: bytes) -> None:
        if not self._closing:
            self._buffer += data
        self._conn.set_receive_window(self._free())
        self._wake()

    def _on_eof(self) -> None:
        self._eof = True
        self._wake()

    def _on_closed(self, error: Exception | None) -> None:
        self._closed = True
        self._eof = True
        if error is not None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def _raise_error(self) -> None:
        if self._error is not None:
            raise ConnectionResetError(str(self._error)) from self._error

    # -- reading ----------------------------------------------------------------------------

    def _consume(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        if data:
            self._conn.set_receive_window(self._free())  # may open the window: let the runtime say so
            self._kick()
        return data

    async def _fill(self) -> None:
        """Wait for more data or EOF; raise if the connection was reset."""
        self._raise_error()
        if self._eof:
            return
        await self._wait()
        self._raise_error()

    async def read(self, n: int = -1) -> bytes:
        """Up to n bytes (at least one unless at EOF); n=-1 reads until EOF."""
        if n == 0:
            return b""
        if n < 0:
            # Take the buffer as it fills: waiting with it full would close the window for good.
            chunks = []
            while True:
                chunks.append(self._consume(len(self._buffer)))
                if self._eof:
                    break
                await self._fill()
            self._raise_error()
            return b"".join(chunks) + self._consume(len(self._buffer))
        while not self._buffer and not self._eof:
            await self._fill()
        if not self._buffer:
            self._raise_error()
        return self._consume(n)

    async def readexactly(self, n: int) -> bytes:
        """Exactly n bytes; asyncio.IncompleteReadError if EOF comes first."""
        # Take bytes as they come rather than waiting for all n in the buffer: n may exceed
        # the read limit, and a full buffer closes the receive window for good.
        chunks: list[bytes] = []
        need = n
        while need:
            if self._buffer:
                chunk = self._consume(min(need, len(self._buffer)))
                chunks.append(chunk)
                need -= len(chunk)
                continue
            if self._eof:
                self._raise_error()
                raise asyncio.IncompleteReadError(b"".join(chunks), n)
            await self._fill()
        return b"".join(chunks)

    async def readline(self) -> bytes:
        """Bytes up to and including b"\\n", or what is left at EOF."""
        start = 0
        while True:
            i = self._buffer.find(b"\n", start)
            if i >= 0:
                return self._consume(i + 1)
            if self._eof:
                self._raise_error()
                return self._consume(len(self._buffer))
            start = len(self._buffer)
            await self._fill()

    def at_eof(self) -> bool:
        """True once the peer sent FIN (or the connection is gone) and the buffer is empty."""
        return self._eof and not self._buffer

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue data; call drain() to wait for room."""
        self._raise_error()
        if self._closing or self._conn.state not in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            raise ConnectionResetError(f"{self!r}: write() after close(), write_eof() or the peer's reset")
        self._conn.send(data)
        self._kick()

    async def drain(self) -> None:
        """Wait until at most the high-water mark is unsent or unacked."""
        while True:
            self._raise_error()
            if self._conn.send_buffered <= self._write_high_water or self._closed:
                return
            await self._wait()

    def write_eof(self) -> None:
        """Send FIN after the queued data; reading continues until the peer's EOF."""
        self._conn.close()
        self._kick()

    def close(self) -> None:
        """Send FIN after the queued data, and discard whatever the peer still sends,
        keeping the window open so the peer can finish and close too."""
        if self._closing:
            return
        self._closing = True
        self._buffer.clear()
        self._conn.close()
        self._conn.set_receive_window(MAX_WINDOW)
        self._kick()
        self._wake()

    def abort(self) -> None:
        """Reset the connection at once."""
        self._closing = True
        self._conn.abort()
        self._kick()

    def is_closing(self) -> bool:
        return self._closing or self._closed

    async def wait_closed(self) -> None:
        """Wait until our FIN is acked and the peer has closed (or a reset); raises on reset."""
        while not self._closed:
            await self._wait()
        self._raise_error()
