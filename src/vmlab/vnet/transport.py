"""NIC transports: how frames travel between a hypervisor's NIC and vnet.

`StreamNic` speaks QEMU's `-netdev stream` framing over a unix socket: each Ethernet frame
is preceded by its length as a 4-byte big-endian integer. QEMU is the listening side
(`server=on`) and vnet connects, because a QEMU 7.2 stream *client* never reconnects while
a server re-accepts: vnet can attach whenever the NIC's socket appears, and again after a
restore. Transports only move bytes; what the frames mean is `VNet`'s business.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from pathlib import Path
from typing import Callable

__all__ = ["StreamNic", "MAX_FRAME", "MAX_WRITE_BUFFER"]

log = logging.getLogger("vmlab.vnet.transport")

#: Largest frame accepted (jumbo frames are not simulated; 65535 is QEMU's own limit).
MAX_FRAME = 65535
#: Bytes queued towards a NIC beyond which frames are dropped, like a full NIC ring, so a
#: guest that stopped reading cannot make vnet buffer without bound.
MAX_WRITE_BUFFER = 4 * 1024 * 1024
_LEN = struct.Struct("!I")


class StreamNic:
    """One NIC connection. `on_frame(frame)` is called on the loop for each frame read."""

    def __init__(self, name: str, path: Path, on_frame: Callable[[bytes], None]):
        self.name = name
        self.path = path
        self.on_frame = on_frame
        self.connected = asyncio.Event()
        self.frames_in = self.frames_out = self.drops = 0
        self._writer: asyncio.StreamWriter | None = None
        self._closing = False
        self.log = log.getChild(name.replace("/", "."))

    def send(self, frame: bytes) -> None:
        w = self._writer
        if w is None or w.is_closing():
            self.drops += 1
            return
        if w.transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self.drops += 1
            return
        w.write(_LEN.pack(len(frame)) + frame)
        self.frames_out += 1

    async def run(self, retry_s: float = 0.02) -> None:
        """Connect (retrying until the socket exists), pump frames, reconnect on EOF.
        Runs until cancelled or `close()`."""
        while not self._closing:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path))
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(retry_s)
                continue
            self._writer = writer
            self.connected.set()
            self.log.debug("connected to %s", self.path)
            try:
                while True:
                    header = await reader.readexactly(4)
                    (length,) = _LEN.unpack(header)
                    if length == 0 or length > MAX_FRAME:
                        self.log.warning("bad frame length %d; resetting the connection", length)
                        break
                    frame = await reader.readexactly(length)
                    self.frames_in += 1
                    try:
                        self.on_frame(frame)
                    except Exception:  # a vnet bug must not kill the NIC; say so loudly
                        self.log.exception("vnet failed on a frame from %s", self.name)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                self._writer = None
                self.connected.clear()
                writer.close()
            if not self._closing:
                self.log.debug("disconnected from %s; reconnecting", self.path)
                await asyncio.sleep(retry_s)

    def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            self._writer.close()
