"""STUN on the simulated internet: RFC 5389 binding and RFC 5780 NAT behaviour discovery.

Owns: the STUN message format (what a server needs of it), and `StunServer`, which answers
binding requests on the two STUN VIPs (`STUN_PRIMARY_IPV4`, `STUN_ALTERNATE_IPV4`), each on
ports 3478 and 3479. Every answer carries the request's post-NAT source (XOR-MAPPED-ADDRESS),
where it was answered from (RESPONSE-ORIGIN) and the other address and port of the pair
(OTHER-ADDRESS); CHANGE-REQUEST makes the answer leave from the other address and/or port,
so a client can tell the NAT's mapping and filtering behaviour apart (RFC 5780 §4).
Requests without the RFC 5389 magic cookie are RFC 3489 ("classic STUN") requests and get
the classic attributes instead (MAPPED-ADDRESS, SOURCE-ADDRESS, CHANGED-ADDRESS), because
old clients such as Debian's `stun` reject comprehension-required attributes they do not know.

Leaves to others: routing (internet.py calls `handle` for UDP to a STUN VIP and routes what
it returns). Only the two STUN VIPs answer STUN: a test that serves its own UDP on port 3478
elsewhere keeps it. There is no authentication (MESSAGE-INTEGRITY) and no TCP or TLS STUN.
"""
from __future__ import annotations

import logging
import struct
import zlib
from dataclasses import dataclass
from ipaddress import IPv4Address

__all__ = ["StunServer", "StunMessage", "parse_stun", "build_stun", "STUN_PRIMARY_IPV4",
           "STUN_ALTERNATE_IPV4", "STUN_PORT", "STUN_ALTERNATE_PORT", "STUN_VIPS", "MAGIC_COOKIE"]

log = logging.getLogger("vmlab.vnet.stun")

Endpoint = tuple[IPv4Address, int]

#: The STUN server pair, 52.52.0.78/79 after the ports 3478/3479 (mnemonic, like natlab VIPs).
STUN_PRIMARY_IPV4 = IPv4Address("52.52.0.78")
STUN_ALTERNATE_IPV4 = IPv4Address("52.52.0.79")
STUN_PORT = 3478
STUN_ALTERNATE_PORT = 3479
STUN_VIPS = {STUN_PRIMARY_IPV4: "STUN (RFC 5389/5780, primary)",
             STUN_ALTERNATE_IPV4: "STUN (RFC 5389/5780, alternate)"}

MAGIC_COOKIE = 0x2112A442
FINGERPRINT_XOR = 0x5354554E
BINDING_REQUEST, BINDING_SUCCESS, BINDING_ERROR = 0x0001, 0x0101, 0x0111

# Attribute types (RFC 5389 §18.2, RFC 5780 §7, RFC 3489 §11.2).
MAPPED_ADDRESS = 0x0001
RESPONSE_ADDRESS = 0x0002
CHANGE_REQUEST = 0x0003
SOURCE_ADDRESS = 0x0004
CHANGED_ADDRESS = 0x0005
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
XOR_MAPPED_ADDRESS = 0x0020
PADDING = 0x0026
RESPONSE_PORT = 0x0027
SOFTWARE = 0x8022
FINGERPRINT = 0x8028
RESPONSE_ORIGIN = 0x802B
OTHER_ADDRESS = 0x802C
CHANGE_IP, CHANGE_PORT = 0x04, 0x02

#: comprehension-required attributes a request may carry that we act on or may ignore:
#: the RFC 5780 ones, and those of ICE connectivity checks (USERNAME 0x0006,
#: MESSAGE-INTEGRITY 0x0008, PRIORITY 0x0024, USE-CANDIDATE 0x0025), which a server that does
#: not authenticate answers like any binding request
_KNOWN_REQUIRED = {CHANGE_REQUEST, RESPONSE_PORT, PADDING, RESPONSE_ADDRESS,
                   0x0006, 0x0008, 0x0024, 0x0025}
SOFTWARE_NAME = b"vmlab vnet STUN"
_HEADER = struct.Struct("!HHI12s")


@dataclass
class StunMessage:
    type: int
    #: 12 bytes after the cookie (RFC 5389) or all 16 bytes (RFC 3489, `classic`)
    transaction_id: bytes
    classic: bool
    attributes: list[tuple[int, bytes]]

    def get(self, attr: int) -> bytes | None:
        for t, v in self.attributes:
            if t == attr:
                return v
        return None


def parse_stun(data: bytes) -> StunMessage | None:
    """A STUN message, or None if `data` is not one (RFC 5389 §6: top two bits zero,
    length a multiple of 4 that matches the datagram)."""
    if len(data) < 20 or data[0] & 0xC0:
        return None
    mtype, length, cookie, tid = _HEADER.unpack_from(data)
    if length % 4 or 20 + length != len(data):
        return None
    classic = cookie != MAGIC_COOKIE
    attrs: list[tuple[int, bytes]] = []
    i = 20
    while i < len(data):
        if i + 4 > len(data):
            return None
        atype, alen = struct.unpack_from("!HH", data, i)
        if i + 4 + alen > len(data):
            return None
        attrs.append((atype, data[i + 4:i + 4 + alen]))
        i += 4 + alen + (-alen % 4)
    full_tid = data[4:20] if classic else tid
    return StunMessage(mtype, full_tid, classic, attrs)


def _address(ep: Endpoint) -> bytes:
    return struct.pack("!BBH4s", 0, 1, ep[1], ep[0].packed)


def _xor_address(ep: Endpoint) -> bytes:
    port = ep[1] ^ (MAGIC_COOKIE >> 16)
    addr = int(ep[0]) ^ MAGIC_COOKIE
    return struct.pack("!BBHI", 0, 1, port, addr)


def build_stun(mtype: int, transaction_id: bytes, attributes: list[tuple[int, bytes]], *,
               classic: bool = False, fingerprint: bool = False) -> bytes:
    body = b""
    for atype, value in attributes:
        body += struct.pack("!HH", atype, len(value)) + value + b"\0" * (-len(value) % 4)
    head_id = transaction_id if classic else struct.pack("!I", MAGIC_COOKIE) + transaction_id
    if not fingerprint:
        return struct.pack("!HH", mtype, len(body)) + head_id + body
    msg = struct.pack("!HH", mtype, len(body) + 8) + head_id + body
    crc = (zlib.crc32(msg) ^ FINGERPRINT_XOR) & 0xFFFFFFFF
    return msg + struct.pack("!HHI", FINGERPRINT, 4, crc)


class StunServer:
    """Answers binding requests sent to any of the four (VIP, port) pairs of the server.

    `handle(src, dst, payload)` returns ``[(from, to, payload)]`` to route, ``[]`` when the
    request is answered with nothing (not STUN, or not a request), or ``None`` when `dst` is
    not a STUN endpoint at all."""

    def __init__(self, primary: IPv4Address = STUN_PRIMARY_IPV4,
                 alternate: IPv4Address = STUN_ALTERNATE_IPV4,
                 ports: tuple[int, int] = (STUN_PORT, STUN_ALTERNATE_PORT)):
        self.addresses = (primary, alternate)
        self.ports = ports
        self.stats = {"requests": 0, "errors": 0, "ignored": 0}

    def serves(self, dst: Endpoint) -> bool:
        return dst[0] in self.addresses and dst[1] in self.ports

    def _other(self, ep: Endpoint, change_ip: bool, change_port: bool) -> Endpoint:
        a, b = self.addresses
        p, q = self.ports
        ip = (b if ep[0] == a else a) if change_ip else ep[0]
        port = (q if ep[1] == p else p) if change_port else ep[1]
        return (ip, port)

    def handle(self, src: Endpoint, dst: Endpoint, payload: bytes
               ) -> list[tuple[Endpoint, Endpoint, bytes]] | None:
        if not self.serves(dst):
            return None
        msg = parse_stun(payload)
        if msg is None or msg.type != BINDING_REQUEST:
            # Indications and responses get no answer (RFC 5389 §7.3); nor does non-STUN.
            self.stats["ignored"] += 1
            return []
        self.stats["requests"] += 1
        fingerprint = msg.get(FINGERPRINT) is not None
        unknown = [t for t, _ in msg.attributes if t < 0x8000 and t not in _KNOWN_REQUIRED]
        if unknown:
            # RFC 5389 §7.3.1: 420 listing the comprehension-required attributes we lack.
            self.stats["errors"] += 1
            err = struct.pack("!HBB", 0, 4, 20) + b"Unknown Attribute"
            listing = b"".join(struct.pack("!H", t) for t in unknown)
            reply = build_stun(BINDING_ERROR, msg.transaction_id,
                               [(ERROR_CODE, err), (UNKNOWN_ATTRIBUTES, listing)],
                               classic=msg.classic, fingerprint=fingerprint)
            return [(dst, src, reply)]
        change = msg.get(CHANGE_REQUEST)
        flags = struct.unpack("!I", change)[0] if change is not None and len(change) == 4 else 0
        origin = self._other(dst, bool(flags & CHANGE_IP), bool(flags & CHANGE_PORT))
        other = self._other(dst, True, True)
        to = src
        resp_port = msg.get(RESPONSE_PORT)
        if resp_port is not None and len(resp_port) == 4 and not msg.classic:
            to = (src[0], struct.unpack("!H", resp_port[:2])[0])  # RFC 5780 §7.5
        if msg.classic:
            attrs = [(MAPPED_ADDRESS, _address(src)), (SOURCE_ADDRESS, _address(origin)),
                     (CHANGED_ADDRESS, _address(other))]
        else:
            attrs = [(XOR_MAPPED_ADDRESS, _xor_address(src)), (MAPPED_ADDRESS, _address(src)),
                     (RESPONSE_ORIGIN, _address(origin)), (OTHER_ADDRESS, _address(other)),
                     (SOFTWARE, SOFTWARE_NAME)]
        reply = build_stun(BINDING_SUCCESS, msg.transaction_id, attrs, classic=msg.classic,
                           fingerprint=fingerprint)
        log.debug("<-- binding %s:%d at %s:%d, answered from %s:%d", src[0], src[1], dst[0],
                  dst[1], origin[0], origin[1])
        return [(origin, to, reply)]
