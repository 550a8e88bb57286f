"""NIC transports: how frames travel between a hypervisor's NIC and vnet.

`StreamNic` speaks QEMU's `-netdev stream` framing over a unix socket: each Ethernet frame
is preceded by its length as a 4-byte big-endian integer. QEMU is the listening side
(`server=on`) and vnet connects, because a QEMU 7.2 stream *client* never reconnects while
a server re-accepts: vnet can attach whenever the NIC's socket appears, and again after a
restore. Transports only move bytes; what the frames mean is `VNet`'s business.

`DgramNic` speaks QEMU's `-netdev dgram` over unix datagram sockets: one Ethernet frame per
datagram, no header (measurements-net-channels.md §1.1). vnet binds its own socket before
QEMU starts and sends to QEMU's bound path; there is no connection, so nothing to
reconnect after a restore, and a frame sent while QEMU's socket is missing or full is
dropped and counted, quietly (a NIC ring would drop it too). On close it removes both
socket files: QEMU leaves its own behind when it exits (§1.2).
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Callable

__all__ = ["StreamNic", "DgramNic", "MAX_FRAME", "MAX_WRITE_BUFFER", "DGRAM_SOCKET_BUFFER"]

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


#: Kernel buffer per datagram socket (natlab uses 4 MiB on its unix sockets); the kernel
#: caps it at net.core.{r,w}mem_max unless we are root.
DGRAM_SOCKET_BUFFER = 4 * 1024 * 1024
#: Datagrams read per wake-up before yielding to the loop, so one busy NIC cannot starve
#: the others.
_DGRAM_BATCH = 64
#: sendto errors meaning "QEMU's socket is not there or not reading": drop quietly.
_PEER_GONE = {errno.ENOENT, errno.ECONNREFUSED, errno.ENOTCONN, errno.EAGAIN, errno.ENOBUFS}


class DgramNic:
    """One NIC over a unix datagram socket pair. `on_frame(frame)` runs on the loop.

    `local_path` is vnet's socket (bound by `open`, before QEMU starts), `peer_path` QEMU's
    (`-netdev dgram,local.path=peer_path,remote.path=local_path`).
    """

    def __init__(self, name: str, local_path: Path, peer_path: Path,
                 on_frame: Callable[[bytes], None]):
        self.name = name
        self.local_path = local_path
        self.peer_path = peer_path
        self.on_frame = on_frame
        #: set once QEMU has sent a frame (there is no connection to wait for)
        self.connected = asyncio.Event()
        self.frames_in = self.frames_out = self.drops = 0
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._peer = os.fsencode(peer_path)
        self.log = log.getChild(name.replace("/", "."))

    def open(self) -> None:
        """Bind vnet's socket and start reading. Call on the loop, before QEMU starts."""
        self._loop = asyncio.get_running_loop()
        try:
            os.unlink(self.local_path)  # a stale file from a killed run would make bind fail
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                sock.setsockopt(socket.SOL_SOCKET, opt, DGRAM_SOCKET_BUFFER)
            sock.bind(os.fsencode(self.local_path))
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(_DGRAM_BATCH):
            try:
                frame = sock.recv(MAX_FRAME + 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self.log.debug("recv failed: %s", err)
                return
            if not frame or len(frame) > MAX_FRAME:
                self.drops += 1
                continue
            self.frames_in += 1
            if not self.connected.is_set():
                self.connected.set()
            try:
                self.on_frame(frame)
            except Exception:  # a vnet bug must not kill the NIC; say so loudly
                self.log.exception("vnet failed on a frame from %s", self.name)

    def send(self, frame: bytes) -> None:
        sock = self._sock
        if sock is None:
            self.drops += 1
            return
        try:
            sock.sendto(frame, self._peer)
        except OSError as err:
            self.drops += 1
            if err.errno not in _PEER_GONE:
                self.log.debug("sendto %s failed: %s", self.peer_path, err)
            return
        self.frames_out += 1

    def close(self) -> None:
        """Stop reading, close the socket, remove both socket files. Idempotent."""
        sock, self._sock = self._sock, None
        if sock is not None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.remove_reader(sock.fileno())
            sock.close()
        for path in (self.local_path, self.peer_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                self.log.debug("cannot remove %s: %s", path, err)
