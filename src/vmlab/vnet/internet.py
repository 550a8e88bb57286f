"""The simulated internet: routes packets between routers' WAN IPs and answers for VIPs.

Every public address is owned by exactly one thing: a router's WAN IP or a VIP. A packet to
an address nobody owns (a private LAN address, say) is dropped with a reason, as the real
internet would. VIPs are registered in one table; a collision raises at once.

IPv6 is routed too, without NAT: each IPv6 network owns its /64 (looked up by the first 8
bytes of the destination, so routing costs one dict lookup), and VIPs have IPv6 addresses
(`services.VIPS`: 2052::x beside 52.52.0.x).

Services on VIPs live here, after the NAT, so they are reached whatever route a packet
takes: from any LAN, through any NAT, over either family. They see the post-NAT source,
as a real server would. `tcp` terminates TCP for VIP listeners (`listen_tcp`) and answers
a closed port of a VIP with RST; `udp_services` answers UDP (DNS and tests' own servers).
The driver's IPv4 VIP is the one exception: routers intercept it on the LAN side
(`lan_tcp_vips`), so an agent reaches the driver even behind a blackholed WAN.
"""
from __future__ import annotations

import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import TYPE_CHECKING, Callable

from .frames import (ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, PROTO_ICMP, PROTO_UDP, build_icmp_echo,
                     build_ipv4, build_udp, parse_icmp_echo, parse_ipv4, parse_udp)
from .drops import count_drop
from .frames import PROTO_TCP, build_tcp, ip4, parse_tcp
from .ipv6 import (ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, PROTO_ICMPV6, build_icmpv6,
                   build_ipv6, parse_icmpv6, parse_ipv6)
from .services import UdpHandler, run_udp_handler
from .stun import STUN_VIPS, StunServer
from .switch import Emit
from .tcp import TcpConnection, TcpStack

if TYPE_CHECKING:
    from .router import Router

__all__ = ["Internet", "TEST_DRIVER_IPV4", "TEST_DRIVER_PORT"]

log = logging.getLogger("vmlab.vnet.internet")

#: The driver's VIP: every agent dials TEST_DRIVER_IPV4:TEST_DRIVER_PORT (mnemonic 52.52.0.x
#: block for vmlab's own services, as in natlab).
TEST_DRIVER_IPV4 = IPv4Address("52.52.0.2")
TEST_DRIVER_PORT = 8008


class Internet:
    def __init__(self) -> None:
        self.routers: dict[IPv4Address, "Router"] = {}
        #: VIP address -> description; VIPs answer ICMP echo here, and their services are
        #: intercepted by routers (TCP) before packets get this far
        self.vips: dict[IPv4Address, str] = {}
        self.drops: dict[str, int] = {}
        #: LAN prefixes of routed (nat="none") networks: the internet delivers them to their router
        self.routed: list[tuple[IPv4Network, "Router"]] = []
        #: STUN binding and RFC 5780 behaviour discovery on the STUN VIP pair (see stun.py)
        self.stun = StunServer()
        for ip, what in STUN_VIPS.items():
            self.add_vip(ip, what)
        #: first 8 bytes of an IPv6 network's /64 -> its router
        self.prefixes6: dict[bytes, "Router"] = {}
        #: userspace TCP for services on VIPs, reached through the internet (see module doc)
        self.tcp = TcpStack()
        #: (VIP, port) -> handler for UDP services (DNS, tests' servers)
        self.udp_services: dict[tuple, UdpHandler] = {}
        #: VIPs whose TCP routers terminate on the LAN side, before NAT (the driver's IPv4)
        self.lan_tcp_vips: set[IPv4Address] = set()
        #: VIPs a blackholed WAN still reaches: vmlab's own infrastructure (driver, DNS), so a
        #: test can still drive and resolve on a network it cut off from the internet
        self.blackhole_exempt: set = set()
        #: capture hook: tap(interface, packet, now) for each router's WAN side (see pcap.py)
        self.tap: Callable[[str, bytes, float], None] | None = None

    def owner(self, ip: IPv4Address) -> str | None:
        if ip in self.routers:
            return f"WAN of network {self.routers[ip].name!r}"
        if ip in self.vips:
            return f"VIP {self.vips[ip]}"
        for prefix, router in self.routed:
            if ip in prefix:
                return f"LAN {prefix} of routed network {router.name!r}"
        return None

    def add_router(self, router: "Router") -> None:
        owner = self.owner(router.wan_ip)
        if owner is not None:
            raise ValueError(f"WAN IP {router.wan_ip} is already used by {owner}")
        self.routers[router.wan_ip] = router
        if router.nat_behavior.translation.value == "none":
            for ip in (*self.routers, *self.vips):
                if ip in router.lan:
                    raise ValueError(f"routed LAN {router.lan} contains {self.owner(ip)}")
            self.routed.append((router.lan, router))

    def add_vip(self, ip: IPv4Address, what: str) -> None:
        owner = self.owner(ip)
        if owner is not None:
            raise ValueError(f"VIP {ip} ({what}) collides with {owner}")
        if isinstance(ip, IPv6Address) and ip.packed[:8] in self.prefixes6:
            raise ValueError(f"VIP {ip} ({what}) lies in the IPv6 prefix of network "
                             f"{self.prefixes6[ip.packed[:8]].name!r}")
        self.vips[ip] = what

    def add_prefix6(self, prefix, router: "Router") -> None:
        """Route IPv6 `prefix` (a /64) to `router`."""
        key = prefix.network_address.packed[:8]
        if key in self.prefixes6:
            raise ValueError(f"IPv6 prefix {prefix} is already used by network "
                             f"{self.prefixes6[key].name!r}")
        for ip in self.vips:
            if isinstance(ip, IPv6Address) and ip in prefix:
                raise ValueError(f"IPv6 prefix {prefix} contains VIP {ip} ({self.vips[ip]})")
        self.prefixes6[key] = router

    def router_for(self, ip) -> "Router | None":
        """The router whose WAN address or IPv6 prefix `ip` is (who sent a packet)."""
        if isinstance(ip, IPv6Address):
            return self.prefixes6.get(ip.packed[:8])
        router = self.routers.get(ip)
        if router is None:
            for prefix, routed in self.routed:
                if ip in prefix:
                    return routed
        return router

    def listen_tcp(self, ip, port: int, on_accept: Callable[[TcpConnection], None]) -> None:
        """Serve TCP on VIP ip:port; `ip` must be a VIP already (`add_vip`)."""
        if ip not in self.vips:
            raise ValueError(f"{ip} is not a VIP; add_vip() it first")
        self.tcp.listen(ip, port, on_accept)

    def serve_udp(self, ip, port: int, handler: UdpHandler) -> None:
        """Answer UDP to VIP ip:port with `handler` (see services.UdpHandler)."""
        if ip not in self.vips:
            raise ValueError(f"{ip} is not a VIP; add_vip() it first")
        if (ip, port) in self.udp_services:
            raise ValueError(f"UDP {ip}:{port} is served already")
        self.udp_services[(ip, port)] = handler

    def _drop(self, reason: str) -> list[Emit]:
        count_drop(self.drops, reason)
        log.debug("drop: %s", reason)
        return []

    def _tap_wan(self, packet: bytes, now: float) -> None:
        """Record a packet on the WAN interface of the router(s) it leaves or enters."""
        for where in (packet[12:16], packet[16:20]) if packet[0] >> 4 == 4 else (
                packet[8:16], packet[24:32]):
            router = (self.routers.get(IPv4Address(where)) if len(where) == 4
                      else self.prefixes6.get(where))
            if router is not None:
                self.tap(f"{router.name}-wan", packet, now)

    def route(self, packet: bytes, now: float) -> list[Emit]:
        """Deliver an IPv4 packet (already NATed, TTL already decremented) to its owner."""
        if self.tap is not None:
            self._tap_wan(packet, now)
        dst = ip4(packet[16:20])
        router = self.routers.get(dst)
        if router is not None:
            return router.from_wan(packet, now)
        if dst in self.vips:
            return self._vip(packet, now)
        for prefix, routed in self.routed:
            if dst in prefix:
                return routed.from_wan(packet, now)
        return self._drop(f"no route to {dst} on the internet")

    def _vip(self, packet: bytes, now: float) -> list[Emit]:
        ip = parse_ipv4(packet)
        if ip is not None and ip.proto == PROTO_ICMP:
            echo = parse_icmp_echo(ip)
            if echo is not None and echo.type == ICMP_ECHO_REQUEST:
                reply = build_ipv4(ip.dst, ip.src, PROTO_ICMP,
                                   build_icmp_echo(ICMP_ECHO_REPLY, echo.ident, echo.seq, echo.data))
                return self.route(reply, now)
        if ip is not None and ip.proto == PROTO_UDP and not ip.is_fragment:
            udp = parse_udp(ip)
            if udp is not None:
                answers = self.stun.handle((ip.src, udp.sport), (ip.dst, udp.dport), udp.payload)
                if answers is not None:
                    out: list[Emit] = []
                    for (sip, sport), (dip, dport), payload in answers:
                        out += self.route(build_ipv4(sip, dip, PROTO_UDP,
                                                     build_udp(sip, dip, sport, dport, payload)),
                                          now)
                    return out
                handler = self.udp_services.get((ip.dst, udp.dport))
                if handler is not None:
                    reply = run_udp_handler(handler, udp.payload, (ip.src, udp.sport))
                    if reply is None:
                        return []
                    return self.route(build_ipv4(ip.dst, ip.src, PROTO_UDP,
                                                 build_udp(ip.dst, ip.src, udp.dport, udp.sport,
                                                           reply)), now)
        if ip is not None and ip.proto == PROTO_TCP and not ip.is_fragment:
            seg = parse_tcp(ip)
            if seg is not None:
                # VIP addresses are ours whatever the port: a port nobody serves gets a RST.
                self.tcp.receive(seg, now)
                return self.flush_tcp(now)
        return self._drop(f"VIP {IPv4Address(packet[16:20])} has no service for this packet")

    # ------------------------------------------------------------------ IPv6

    def route6(self, packet: bytes, now: float) -> list[Emit]:
        """Deliver an IPv6 packet (hop limit already decremented) to its owner."""
        if self.tap is not None:
            self._tap_wan(packet, now)
        if len(packet) < 40:
            return self._drop("truncated IPv6 packet on the internet")
        router = self.prefixes6.get(packet[24:32])
        if router is not None:
            return router.v6.from_wan(packet, now)
        dst = IPv6Address(packet[24:40])
        if dst in self.vips:
            return self._vip6(packet, now)
        return self._drop(f"no route to {dst} on the internet")

    def _vip6(self, packet: bytes, now: float) -> list[Emit]:
        ip = parse_ipv6(packet)
        if ip is None:
            return self._drop("malformed IPv6 to a VIP")
        if ip.proto == PROTO_ICMPV6:
            icmp = parse_icmpv6(ip)
            if icmp is not None and icmp.type == ICMPV6_ECHO_REQUEST:
                reply = build_icmpv6(ip.dst, ip.src, ICMPV6_ECHO_REPLY, 0, icmp.body)
                return self.route6(build_ipv6(ip.dst, ip.src, PROTO_ICMPV6, reply), now)
        elif ip.proto == PROTO_UDP:
            udp = parse_udp(ip)
            handler = self.udp_services.get((ip.dst, udp.dport)) if udp is not None else None
            if handler is not None:
                reply = run_udp_handler(handler, udp.payload, (ip.src, udp.sport))
                if reply is None:
                    return []
                return self.route6(build_ipv6(ip.dst, ip.src, PROTO_UDP,
                                              build_udp(ip.dst, ip.src, udp.dport, udp.sport,
                                                        reply)), now)
        elif ip.proto == PROTO_TCP:
            seg = parse_tcp(ip)
            if seg is not None:
                self.tcp.receive(seg, now)
                return self.flush_tcp(now)
        return self._drop(f"VIP {ip.dst} has no service for this packet")

    # ------------------------------------------------------------------ VIP TCP

    def flush_tcp(self, now: float) -> list[Emit]:
        """Let the VIP TCP stack act on what apps queued; route its segments."""
        self.tcp.tick(now)
        out: list[Emit] = []
        for seg in self.tcp.take_outgoing():
            if isinstance(seg.dst_ip, IPv6Address):
                out += self.route6(build_ipv6(seg.src_ip, seg.dst_ip, PROTO_TCP, build_tcp(seg)),
                                   now)
            else:
                out += self.route(build_ipv4(seg.src_ip, seg.dst_ip, PROTO_TCP, build_tcp(seg)),
                                  now)
        return out
