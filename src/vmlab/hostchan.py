"""The host channel: how a node gets its configuration without the network.

The guest's agent polls over a virtio-serial port named ``vmlab.hostchan`` (or AF_VSOCK
port `HOSTCHAN_VSOCK_PORT` where the host has /dev/vhost-vsock). One line protocol:

    guest -> host   ``poll {json}``      "anything for me?" (the json says what state it is in)
    host  -> guest  ``wait``             nothing yet (while a snapshot is being prepared);
                                         the newline is optional, guests accept both
    host  -> guest  ``{json}``           the node's config: ip, mask, gw, mac, dns, driver,
                                         time, seed, hostname, nics (or {"dhcp": true})
    guest -> host   ``applied {json}``   the config is in place
    host  -> guest  ``up``               the NIC link is up; dial the driver now

A config set while the guest is blocked waiting (a restored snapshot whose last poll went
to a host that no longer exists) is pushed as soon as the channel connects, so a restored
agent does not wait for its next poll. This module is the host side; the guest side is
`vmlab/agent/agent.py`.
"""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Awaitable, Callable

__all__ = ["HostChannel", "HOSTCHAN_NAME", "HOSTCHAN_VSOCK_PORT"]

log = logging.getLogger("vmlab.hostchan")

HOSTCHAN_NAME = "vmlab.hostchan"
HOSTCHAN_VSOCK_PORT = 51011
#: A guest line longer than this is a broken guest, not a message.
MAX_LINE = 64 * 1024


class HostChannel:
    """Host side of one node's channel over a QEMU chardev unix socket (QEMU listens)."""

    def __init__(self, name: str, path: Path,
                 on_applied: Callable[[dict], Awaitable[None]] | None = None):
        self.name = name
        self.path = path
        self.on_applied = on_applied
        self.polls = 0
        self.last_state: dict = {}
        self.applied = asyncio.Event()
        self.applied_info: dict = {}
        self._polled = asyncio.Event()
        self._config: dict | None = None
        self._pushed = False
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self.log = log.getChild(name)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"hostchan-{self.name}")

    def set_config(self, config: dict) -> None:
        """Hand `config` to the guest: now if connected, else as soon as the channel connects."""
        self._config = config
        self._pushed = False
        if self._writer is not None:
            self._push()

    async def wait_polled(self, count: int = 1) -> None:
        """Until the guest has polled at least `count` times (it is up and idle, waiting)."""
        while self.polls < count:
            self._polled.clear()
            await self._polled.wait()

    def _push(self) -> None:
        if self._config is not None and not self._pushed and self._writer is not None:
            self._writer.write(json.dumps(self._config, separators=(",", ":")).encode() + b"\n")
            self._pushed = True
            self.log.debug("--> config")

    async def _run(self, retry_s: float = 0.01) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=MAX_LINE)
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(retry_s)
                continue
            self._writer = writer
            self._push()  # a restored guest is already waiting: do not wait for its next poll
            try:
                while True:
                    line = await reader.readline()
                    if not line:
                        break
                    await self._on_line(line.decode("utf-8", "replace").strip(), writer)
            except (ConnectionError, asyncio.LimitOverrunError, ValueError) as err:
                self.log.warning("host channel broke: %s", err)
            finally:
                self._writer = None
                writer.close()
            await asyncio.sleep(retry_s)

    async def _on_line(self, line: str, writer: asyncio.StreamWriter) -> None:
        verb, _, rest = line.partition(" ")
        try:
            info = json.loads(rest) if rest else {}
        except ValueError:
            info = {"raw": rest}
        if verb == "poll":
            self.polls += 1
            self.last_state = info
            self._polled.set()
            if self._config is None:
                writer.write(b"wait\n")
            else:
                self._pushed = False
                self._push()
        elif verb == "applied":
            self.applied_info = info
            if self.on_applied is not None:
                await self.on_applied(info)
            writer.write(b"up\n")
            self.applied.set()
            self.log.debug("guest applied its config: %s", info)
        else:
            self.log.warning("unexpected line from guest: %r", line[:200])

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
