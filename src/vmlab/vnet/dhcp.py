"""DHCPv4 server (RFC 2131/2132) for one network, sans I/O.

It answers BOOTP payloads with BOOTP payloads; the router wraps them in UDP/IP/Ethernet.
Addresses are deterministic per MAC: the network decides them (`address_for`), so a node
gets the same address on every boot and tests can know it before the guest asks.
Each message also yields a `DhcpEvent` for progress display.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Callable

from .frames import mac_str

__all__ = ["DhcpServer", "DhcpEvent", "DISCOVER", "OFFER", "REQUEST", "DECLINE", "ACK", "NAK",
           "RELEASE", "INFORM", "MAGIC_COOKIE", "parse_options"]

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {1: "discover", 2: "offer", 3: "request", 4: "decline", 5: "ack", 6: "nak",
                 7: "release", 8: "inform"}
MAGIC_COOKIE = b"\x63\x82\x53\x63"
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")

OPT_SUBNET_MASK, OPT_ROUTER, OPT_DNS, OPT_HOSTNAME = 1, 3, 6, 12
OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_MSG_TYPE, OPT_SERVER_ID = 50, 51, 53, 54
OPT_RENEWAL, OPT_REBINDING, OPT_END, OPT_PAD = 58, 59, 255, 0


@dataclass(frozen=True, slots=True)
class DhcpEvent:
    """One step of a client's exchange, e.g. ('discover', mac, None) or ('ack', mac, ip)."""
    kind: str
    mac: str
    ip: IPv4Address | None
    hostname: str | None = None


def parse_options(data: bytes) -> dict[int, bytes] | None:
    opts: dict[int, bytes] = {}
    i = 0
    while i < len(data):
        code = data[i]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            return None
        opts[code] = data[i + 2:i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    return opts


def _opt(code: int, value: bytes) -> bytes:
    return bytes([code, len(value)]) + value


class DhcpServer:
    """Leases for one LAN. `address_for(mac) -> IPv4Address | None` decides who gets what;
    None means "not ours" and the request is ignored (as natlab does for unknown MACs)."""

    def __init__(self, *, prefix: IPv4Network, gateway: IPv4Address,
                 dns: list[IPv4Address], address_for: Callable[[bytes], IPv4Address | None],
                 lease_s: int = 3600):
        self.prefix = prefix
        self.gateway = gateway
        self.dns = dns
        self.address_for = address_for
        self.lease_s = lease_s
        #: mac -> (ip, expiry); leases survive until expiry so renewals find them
        self.leases: dict[bytes, tuple[IPv4Address, float]] = {}

    def handle(self, payload: bytes, now: float) -> tuple[bytes | None, list[DhcpEvent]]:
        """Process one BOOTREQUEST. Returns (reply payload or None, events)."""
        if len(payload) < _BOOTP.size + 4:
            return None, []
        (op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yiaddr, _siaddr, giaddr,
         chaddr, _sname, _file) = _BOOTP.unpack_from(payload)
        if op != 1 or htype != 1 or hlen != 6:
            return None, []
        if payload[_BOOTP.size:_BOOTP.size + 4] != MAGIC_COOKIE:
            return None, []
        opts = parse_options(payload[_BOOTP.size + 4:])
        if opts is None or OPT_MSG_TYPE not in opts or len(opts[OPT_MSG_TYPE]) != 1:
            return None, []
        mac = chaddr[:6]
        kind = opts[OPT_MSG_TYPE][0]
        hostname = opts.get(OPT_HOSTNAME, b"").decode("ascii", "replace") or None
        ip = self.address_for(mac)
        events = [DhcpEvent(MESSAGE_NAMES.get(kind, str(kind)), mac_str(mac),
                            _ip_opt(opts.get(OPT_REQUESTED_IP)) or (IPv4Address(ciaddr) if ciaddr != b"\0" * 4 else None),
                            hostname)]
        if ip is None:
            return None, events
        server_id = opts.get(OPT_SERVER_ID)
        if kind == DISCOVER:
            reply_kind = OFFER
        elif kind == REQUEST:
            if server_id is not None and server_id != self.gateway.packed:
                return None, events  # the client chose another server
            wanted = _ip_opt(opts.get(OPT_REQUESTED_IP))
            if wanted is None and ciaddr != b"\0" * 4:
                wanted = IPv4Address(ciaddr)  # RENEWING/REBINDING put it in ciaddr
            reply_kind = ACK if wanted in (None, ip) else NAK
        elif kind == INFORM:
            reply_kind = ACK
        elif kind in (RELEASE, DECLINE):
            self.leases.pop(mac, None)
            return None, events
        else:
            return None, events
        if reply_kind == ACK and kind == REQUEST:
            self.leases[mac] = (ip, now + self.lease_s)
        yiaddr = ip.packed if reply_kind in (OFFER, ACK) and kind != INFORM else b"\0" * 4
        reply = _BOOTP.pack(2, 1, 6, 0, xid, 0, flags, ciaddr, yiaddr, self.gateway.packed,
                            giaddr, chaddr, b"", b"")
        body = [MAGIC_COOKIE, _opt(OPT_MSG_TYPE, bytes([reply_kind])),
                _opt(OPT_SERVER_ID, self.gateway.packed)]
        if reply_kind != NAK:
            body += [_opt(OPT_SUBNET_MASK, self.prefix.netmask.packed),
                     _opt(OPT_ROUTER, self.gateway.packed)]
            if self.dns:
                body.append(_opt(OPT_DNS, b"".join(d.packed for d in self.dns)))
            if kind != INFORM:
                body += [_opt(OPT_LEASE_TIME, struct.pack("!I", self.lease_s)),
                         _opt(OPT_RENEWAL, struct.pack("!I", self.lease_s // 2)),
                         _opt(OPT_REBINDING, struct.pack("!I", self.lease_s * 7 // 8))]
        body.append(bytes([OPT_END]))
        events.append(DhcpEvent(MESSAGE_NAMES[reply_kind], mac_str(mac),
                                ip if reply_kind != NAK else None, hostname))
        return reply + b"".join(body), events


def _ip_opt(value: bytes | None) -> IPv4Address | None:
    return IPv4Address(value) if value is not None and len(value) == 4 else None
