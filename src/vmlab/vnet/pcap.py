"""pcapng capture of one Env's vnet, readable by Wireshark and tshark.

Owns: the pcapng encoding (draft-ietf-opsawg-pcapng: Section Header, Interface Description
and Enhanced Packet blocks, little-endian, microsecond timestamps) and `PcapWriter`, which
VNet's capture hook (`VNet.set_tap`) feeds. Each interface is described the first time it
carries a packet, with its name and link type:

    <node>/eth<k>      Ethernet   every frame the NIC sends or receives
    <network>-lan      Ethernet   what the router's LAN port sees (before NAT going out,
                                  after NAT coming in, and its own DHCP/NDP/ICMP)
    <network>-wan      raw IP     packets crossing the router's WAN side (after NAT going
                                  out, before NAT coming in); both families

Leaves to others: what is captured and when (core.py, switch.py, internet.py call the hook),
the file's lifetime (the Env opens and closes it). Writes go to a buffered file object and
are flushed every FLUSH_EVERY packets and on close, never fsync'd: natlab found per-packet
fsync capped its throughput at ~290 kB/s. Memory is bounded: the interface table is bounded
by MAX_INTERFACES, and a packet is written, not kept.
"""
from __future__ import annotations

import struct
from typing import BinaryIO

__all__ = ["PcapWriter", "LINKTYPE_ETHERNET", "LINKTYPE_RAW", "MAX_INTERFACES", "SNAPLEN"]

LINKTYPE_ETHERNET = 1
LINKTYPE_RAW = 101   # raw IPv4 or IPv6, told apart by the version nibble
SNAPLEN = 65535
#: Interfaces described per file; beyond it packets on new interfaces are not recorded.
MAX_INTERFACES = 4096
FLUSH_EVERY = 64

_SHB = 0x0A0D0D0A
_IDB = 0x00000001
_EPB = 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_ENDOFOPT, _OPT_COMMENT, _IF_NAME, _IF_TSRESOL, _SHB_USERAPPL = 0, 1, 2, 9, 4


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _block(kind: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", kind, total) + body + struct.pack("<I", total)


class PcapWriter:
    """Writes one pcapng section to `out`. `epoch_offset` turns the `now` vnet passes (the
    loop's monotonic clock) into Unix time: wall = now + epoch_offset."""

    def __init__(self, out: BinaryIO, *, epoch_offset: float = 0.0, application: str = "vmlab"):
        self.out = out
        self.epoch_offset = epoch_offset
        self.interfaces: dict[str, int] = {}
        self.packets = 0
        self.skipped = 0
        self._last_now = 0.0
        self._closed = False
        options = _option(_SHB_USERAPPL, application.encode()) + _option(_OPT_ENDOFOPT, b"")
        # version 1.0, section length -1 (unknown: we stream)
        body = struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + options
        out.write(_block(_SHB, body))

    def _interface(self, name: str) -> int | None:
        idx = self.interfaces.get(name)
        if idx is not None:
            return idx
        if len(self.interfaces) >= MAX_INTERFACES:
            return None
        linktype = LINKTYPE_RAW if name.endswith("-wan") else LINKTYPE_ETHERNET
        options = (_option(_IF_NAME, name.encode()) + _option(_IF_TSRESOL, bytes([6]))
                   + _option(_OPT_ENDOFOPT, b""))
        self.out.write(_block(_IDB, struct.pack("<HHI", linktype, 0, SNAPLEN) + options))
        idx = self.interfaces[name] = len(self.interfaces)
        return idx

    def __call__(self, interface: str, data: bytes, now: float | None) -> None:
        """The capture hook: record `data` on `interface` at `now` (None: the last time)."""
        if self._closed:
            return
        if now is None:
            now = self._last_now
        else:
            self._last_now = now
        idx = self._interface(interface)
        if idx is None:
            self.skipped += 1
            return
        usec = int((now + self.epoch_offset) * 1_000_000)
        captured = data[:SNAPLEN]
        body = struct.pack("<IIIII", idx, (usec >> 32) & 0xFFFFFFFF, usec & 0xFFFFFFFF,
                           len(captured), len(data)) + _pad4(captured)
        self.out.write(_block(_EPB, body))
        self.packets += 1
        if self.packets % FLUSH_EVERY == 0:
            self.out.flush()

    def flush(self) -> None:
        if not self._closed:
            self.out.flush()

    def close(self) -> None:
        """Flush and close the file. Later packets are ignored."""
        if not self._closed:
            self._closed = True
            self.out.flush()
            self.out.close()
