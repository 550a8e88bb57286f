"""IPv6 for vnet: the wire format, ICMPv6 and NDP, and the IPv6 side of a network's router.

Owns: IPv6 and ICMPv6 parsing and building (RFC 8200, RFC 4443), neighbour discovery
(RFC 4861: router solicitation and advertisement, neighbour solicitation and
advertisement), SLAAC addressing (RFC 4862: a node's address is the network's /64 plus
the modified EUI-64 of its MAC, RFC 4291 App. A, which Linux uses unless told otherwise),
and `Ipv6Lan`: one network's /64 with its router, which

* advertises the /64 (on-link, autonomous), itself as default router and the DNS VIP
  (RDNSS, RFC 8106) in answer to router solicitations and every RA_INTERVAL_S;
* answers neighbour solicitations for its own addresses and, like the switch's proxy ARP,
  for every node it knows (never for duplicate address detection probes, whose source is
  ::, or the probing node would think its address taken);
* routes between the LAN and the internet without NAT, decrementing the hop limit, and
  answers ICMPv6 echo to its own addresses.

Router addresses: link-local fe80::1 (the default router nodes see, as in natlab) and
prefix::1. Networks can be IPv4-only, IPv6-only or dual-stack: the router drops IPv6 on a
network without a /64 and IPv4 on one without IPv4.

Leaves to others: switching (switch.py floods multicast and calls `proxy_nd` first),
routing between networks (internet.py's `route6`), link conditions, DHCPv6 (not
offered: SLAAC and RDNSS cover what tests need), extension headers (packets with them are
dropped with a reason, except hop-by-hop MLD reports, which are ignored), fragments.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from ipaddress import IPv6Address, IPv6Network
from typing import TYPE_CHECKING

from .drops import count_drop
from .frames import ETH_IPV6, Ethernet, _pseudo_sum, build_eth, checksum

if TYPE_CHECKING:
    from .router import Router
    from .switch import Emit, Port

__all__ = [
    "PROTO_ICMPV6", "ICMPV6_ECHO_REQUEST", "ICMPV6_ECHO_REPLY", "ND_ROUTER_SOLICIT",
    "ND_ROUTER_ADVERT", "ND_NEIGHBOR_SOLICIT", "ND_NEIGHBOR_ADVERT", "ROUTER_LINK_LOCAL",
    "ALL_NODES", "IPv6", "Icmpv6", "parse_ipv6", "build_ipv6", "parse_icmpv6", "build_icmpv6",
    "eui64_address", "multicast_mac", "solicited_node", "Ipv6Lan", "RA_INTERVAL_S",
    "MAX_NEIGHBORS6", "parse_nd_options",
]

log = logging.getLogger("vmlab.vnet.ipv6")

PROTO_HOPOPT = 0
PROTO_ICMPV6 = 58
ICMPV6_DEST_UNREACHABLE = 1
ICMPV6_TIME_EXCEEDED = 3
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ND_ROUTER_SOLICIT = 133
ND_ROUTER_ADVERT = 134
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
OPT_SOURCE_LLADDR, OPT_TARGET_LLADDR, OPT_PREFIX_INFO, OPT_MTU, OPT_RDNSS = 1, 2, 3, 5, 25

ROUTER_LINK_LOCAL = IPv6Address("fe80::1")
ALL_NODES = IPv6Address("ff02::1")
UNSPECIFIED = IPv6Address("::")
_LINK_LOCAL = IPv6Network("fe80::/10")

#: Unsolicited RA period. RFC 4861 suggests 200-600 s; vmlab's nodes boot and restore in
#: seconds and answer solicitations anyway, so this only repairs a lost RA quickly.
RA_INTERVAL_S = 10.0
#: RA lifetimes: router 1800 s, prefix valid 86400 s / preferred 14400 s (natlab's values).
ROUTER_LIFETIME_S = 1800
PREFIX_VALID_S = 86400
PREFIX_PREFERRED_S = 14400
RDNSS_LIFETIME_S = 1800
#: Bound on the IPv6 neighbour table of one network.
MAX_NEIGHBORS6 = 4096

_IPV6 = struct.Struct("!IHBB16s16s")


@dataclass(slots=True)
class IPv6:
    """A parsed IPv6 packet; field names match frames.IPv4 where they mean the same, so
    parse_udp/parse_tcp take either."""
    src: IPv6Address
    dst: IPv6Address
    proto: int          # next header
    ttl: int            # hop limit
    payload: bytes
    src_b: bytes
    dst_b: bytes
    is_fragment: bool = False


def parse_ipv6(packet: bytes) -> IPv6 | None:
    if len(packet) < 40:
        return None
    vtf, plen, nh, hlim, src, dst = _IPV6.unpack_from(packet)
    if vtf >> 28 != 6 or 40 + plen > len(packet):
        return None
    return IPv6(IPv6Address(src), IPv6Address(dst), nh, hlim, packet[40:40 + plen], src, dst)


def build_ipv6(src: IPv6Address, dst: IPv6Address, proto: int, payload: bytes, *,
               hop_limit: int = 64) -> bytes:
    return _IPV6.pack(6 << 28, len(payload), proto, hop_limit, src.packed, dst.packed) + payload


def with_hop_limit(packet: bytes, hop_limit: int) -> bytes:
    """The packet with a new hop limit (IPv6 has no header checksum to fix)."""
    return packet[:7] + bytes([hop_limit]) + packet[8:]


@dataclass(slots=True)
class Icmpv6:
    type: int
    code: int
    body: bytes  # everything after the 4-byte type/code/checksum header


def parse_icmpv6(ip: IPv6) -> Icmpv6 | None:
    data = ip.payload
    if len(data) < 4:
        return None
    if checksum(data, _pseudo_sum(ip.src_b, ip.dst_b, PROTO_ICMPV6, len(data))) != 0:
        return None
    return Icmpv6(data[0], data[1], data[4:])


def build_icmpv6(src: IPv6Address, dst: IPv6Address, typ: int, code: int, body: bytes) -> bytes:
    msg = bytes([typ, code, 0, 0]) + body
    csum = checksum(msg, _pseudo_sum(src.packed, dst.packed, PROTO_ICMPV6, len(msg)))
    return msg[:2] + struct.pack("!H", csum) + msg[4:]


def eui64_address(prefix: IPv6Network, mac: bytes) -> IPv6Address:
    """The SLAAC address of `mac` in `prefix` (modified EUI-64: flip the U/L bit, put ff:fe
    in the middle)."""
    iid = bytes([mac[0] ^ 0x02]) + mac[1:3] + b"\xff\xfe" + mac[3:6]
    return IPv6Address(prefix.network_address.packed[:8] + iid)


def link_local_address(mac: bytes) -> IPv6Address:
    return eui64_address(IPv6Network("fe80::/64"), mac)


def multicast_mac(ip: IPv6Address) -> bytes:
    """RFC 2464 §7: 33:33 and the address's last four bytes."""
    return b"\x33\x33" + ip.packed[12:]


def solicited_node(ip: IPv6Address) -> IPv6Address:
    return IPv6Address(IPv6Address("ff02::1:ff00:0").packed[:13] + ip.packed[13:])


def parse_nd_options(data: bytes) -> dict[int, bytes] | None:
    """NDP options (RFC 4861 §4.6) by type; None if malformed (a zero length is invalid)."""
    opts: dict[int, bytes] = {}
    i = 0
    while i + 2 <= len(data):
        length = data[i + 1] * 8
        if length == 0 or i + length > len(data):
            return None
        opts.setdefault(data[i], data[i + 2:i + length])
        i += length
    return opts if i == len(data) else None


def build_ra(router_mac: bytes, prefix: IPv6Network, dns: IPv6Address | None, dst: IPv6Address,
             dst_mac: bytes) -> bytes:
    """A router advertisement frame from fe80::1 announcing `prefix` and `dns`."""
    body = struct.pack("!BBHII", 64, 0, ROUTER_LIFETIME_S, 0, 0)  # hop limit, M/O=0, lifetimes
    body += bytes([OPT_SOURCE_LLADDR, 1]) + router_mac
    body += struct.pack("!BBHI", OPT_MTU, 1, 0, 1500)
    body += struct.pack("!BBBBIII16s", OPT_PREFIX_INFO, 4, prefix.prefixlen, 0xC0,  # L and A
                        PREFIX_VALID_S, PREFIX_PREFERRED_S, 0, prefix.network_address.packed)
    if dns is not None:
        body += struct.pack("!BBHI16s", OPT_RDNSS, 3, 0, RDNSS_LIFETIME_S, dns.packed)
    icmp = build_icmpv6(ROUTER_LINK_LOCAL, dst, ND_ROUTER_ADVERT, 0, body)
    return build_eth(dst_mac, router_mac, ETH_IPV6,
                     build_ipv6(ROUTER_LINK_LOCAL, dst, PROTO_ICMPV6, icmp, hop_limit=255))


def build_na(src: IPv6Address, target: IPv6Address, target_mac: bytes, dst: IPv6Address,
             dst_mac: bytes, *, router: bool, solicited: bool = True) -> bytes:
    """A neighbour advertisement frame saying `target` is at `target_mac`."""
    flags = (0x80 if router else 0) | (0x40 if solicited else 0) | 0x20  # R, S, O
    body = struct.pack("!B3x16s", flags, target.packed) + bytes([OPT_TARGET_LLADDR, 1]) + target_mac
    icmp = build_icmpv6(src, dst, ND_NEIGHBOR_ADVERT, 0, body)
    return build_eth(dst_mac, target_mac, ETH_IPV6,
                     build_ipv6(src, dst, PROTO_ICMPV6, icmp, hop_limit=255))


class Ipv6Lan:
    """The IPv6 side of one network's router. Created by VNet for networks with a /64."""

    def __init__(self, router: "Router", prefix: IPv6Network, dns: IPv6Address | None):
        if prefix.prefixlen != 64:
            raise ValueError(f"IPv6 prefix {prefix} must be a /64 (SLAAC needs 64-bit "
                             f"interface identifiers)")
        self.router = router
        self.prefix = prefix
        self.dns = dns
        self.address = prefix.network_address + 1
        self.mac = router.mac
        self._key = prefix.network_address.packed[:8]
        #: address bytes -> MAC, for nodes' global and link-local addresses (bounded)
        self.neighbors: dict[bytes, bytes] = {}
        self._next_ra: float | None = None
        self.drops: dict[str, int] = {}
        self.log = log.getChild(router.name)

    # ------------------------------------------------------------------ neighbours

    def add_node_mac(self, mac: bytes) -> None:
        """Know a NIC before it speaks: its SLAAC and link-local addresses follow from its MAC."""
        self._learn(eui64_address(self.prefix, mac).packed, mac)
        self._learn(link_local_address(mac).packed, mac)

    def _learn(self, addr: bytes, mac: bytes) -> None:
        if addr in self.neighbors or len(self.neighbors) < MAX_NEIGHBORS6:
            self.neighbors[addr] = mac

    def _ours(self, addr: bytes) -> bool:
        return addr == self.address.packed or addr == ROUTER_LINK_LOCAL.packed

    def _drop(self, reason: str) -> list["Emit"]:
        count_drop(self.drops, reason)
        self.log.debug("drop: %s", reason)
        return []

    # ------------------------------------------------------------------ timers

    def next_deadline(self) -> float | None:
        return self._next_ra

    def tick(self, now: float) -> list["Emit"]:
        """Send the periodic unsolicited RA when due."""
        if self._next_ra is None or now < self._next_ra:
            return []
        self._next_ra = now + RA_INTERVAL_S
        return self.router.switch.deliver(
            build_ra(self.mac, self.prefix, self.dns, ALL_NODES, multicast_mac(ALL_NODES)))

    def start(self, now: float) -> None:
        """Begin periodic RAs (the first one at once)."""
        if self._next_ra is None:
            self._next_ra = now

    # ------------------------------------------------------------------ LAN side

    def proxy_nd(self, port: "Port", eth: Ethernet, now: float) -> list["Emit"] | None:
        """For the switch: answer a multicast NDP message on the LAN, or None to flood it."""
        ip = parse_ipv6(eth.payload)
        if ip is None or ip.proto != PROTO_ICMPV6:
            return None
        icmp = parse_icmpv6(ip)
        if icmp is None or icmp.type not in (ND_ROUTER_SOLICIT, ND_NEIGHBOR_SOLICIT):
            return None
        self.start(now)
        return self._ndp(eth, ip, icmp, now)

    def _ndp(self, eth: Ethernet, ip: IPv6, icmp: Icmpv6, now: float) -> list["Emit"] | None:
        if ip.ttl != 255:
            return self._drop("NDP message with hop limit != 255 (RFC 4861 §6.1)")
        if icmp.type == ND_ROUTER_SOLICIT:
            # Answer to all nodes, as RFC 4861 §6.2.6 allows; a node with no address yet
            # (source ::) can only be reached that way.
            return self.router.switch.deliver(
                build_ra(self.mac, self.prefix, self.dns, ALL_NODES, multicast_mac(ALL_NODES)))
        if len(icmp.body) < 20:
            return self._drop("truncated neighbour solicitation")
        target = icmp.body[4:20]
        if ip.src_b == UNSPECIFIED.packed:
            # Duplicate address detection: stay silent unless the address is really ours.
            return [] if self._ours(target) else None
        if ip.src_b[:8] == self._key or ip.src_b[:2] == b"\xfe\x80":
            self._learn(ip.src_b, eth.src)
        if self._ours(target):
            mac = self.mac
        else:
            mac = self.neighbors.get(target)
            if mac is None or mac == eth.src:
                return None  # unknown (or the asker itself): let the owner answer
        return self.router.switch.deliver(
            build_na(IPv6Address(target), IPv6Address(target), mac, ip.src, eth.src,
                     router=mac == self.mac))

    def from_lan(self, eth: Ethernet, now: float) -> list["Emit"]:
        """An IPv6 frame the switch handed to the router (to its MAC, or multicast)."""
        ip = parse_ipv6(eth.payload)
        if ip is None:
            return self._drop("malformed IPv6 from LAN")
        self.start(now)
        if ip.proto == PROTO_ICMPV6:
            icmp = parse_icmpv6(ip)
            if icmp is None:
                return self._drop("ICMPv6 with a bad checksum or length")
            if icmp.type in (ND_ROUTER_SOLICIT, ND_NEIGHBOR_SOLICIT):
                return self._ndp(eth, ip, icmp, now) or []
            if icmp.type in (ND_ROUTER_ADVERT, ND_NEIGHBOR_ADVERT):
                if ip.src_b[:8] == self._key or ip.src_b[:2] == b"\xfe\x80":
                    self._learn(ip.src_b, eth.src)
                return []
            if self._ours(ip.dst_b):
                if icmp.type == ICMPV6_ECHO_REQUEST:
                    reply = build_icmpv6(ip.dst, ip.src, ICMPV6_ECHO_REPLY, 0, icmp.body)
                    return self.router.switch.deliver(build_eth(
                        eth.src, self.mac, ETH_IPV6, build_ipv6(ip.dst, ip.src, PROTO_ICMPV6, reply)))
                return self._drop(f"ICMPv6 type {icmp.type} to the router")
        if ip.dst_b[0] == 0xFF:
            return []  # multicast (MLD reports and the like): switched already, nothing to route
        if eth.dst != self.mac:
            return []
        if self._ours(ip.dst_b):
            return self._drop(f"nothing listens on the router for IPv6 protocol {ip.proto}")
        if ip.src_b[:8] != self._key:
            if ip.src_b[:2] == b"\xfe\x80":
                return self._drop("link-local source to a routed destination")
            return self._drop(f"IPv6 source {ip.src} is not in the LAN's {self.prefix}")
        self._learn(ip.src_b, eth.src)
        if ip.ttl <= 1:
            return self._drop("hop limit expired")
        packet = with_hop_limit(eth.payload[:40 + len(ip.payload)], ip.ttl - 1)
        if ip.dst_b[:8] == self._key:
            return self._to_lan(ip, packet)
        if self.router.blackholed and ip.dst not in self.router.internet.blackhole_exempt:
            return self._drop("WAN blackholed (IPv6 out)")
        return self.router.internet.route6(packet, now)

    # ------------------------------------------------------------------ WAN side

    def from_wan(self, packet: bytes, now: float) -> list["Emit"]:
        """A packet the internet routed to this network's /64 (hop limit already counted)."""
        ip = parse_ipv6(packet)
        if ip is None:
            return self._drop("malformed IPv6 from WAN")
        if self.router.blackholed and ip.src not in self.router.internet.blackhole_exempt:
            return self._drop("WAN blackholed (IPv6 in)")
        if self._ours(ip.dst_b):
            if ip.proto == PROTO_ICMPV6:
                icmp = parse_icmpv6(ip)
                if icmp is not None and icmp.type == ICMPV6_ECHO_REQUEST:
                    reply = build_icmpv6(ip.dst, ip.src, ICMPV6_ECHO_REPLY, 0, icmp.body)
                    return self.router.internet.route6(
                        build_ipv6(ip.dst, ip.src, PROTO_ICMPV6, reply), now)
            return self._drop(f"nothing listens on the router for IPv6 protocol {ip.proto}")
        if ip.ttl <= 1:
            return self._drop("hop limit expired")
        return self._to_lan(ip, with_hop_limit(packet[:40 + len(ip.payload)], ip.ttl - 1))

    def _to_lan(self, ip: IPv6, packet: bytes) -> list["Emit"]:
        mac = self.neighbors.get(ip.dst_b)
        if mac is None:
            return self._drop(f"no IPv6 neighbour {ip.dst}")
        return self.router.switch.deliver(build_eth(mac, self.mac, ETH_IPV6, packet))


def is_link_local(ip: IPv6Address) -> bool:
    return ip in _LINK_LOCAL

