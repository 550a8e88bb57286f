"""The simulated internet: routes packets between routers' WAN IPs and answers for VIPs.

Every public address is owned by exactly one thing: a router's WAN IP or a VIP. A packet to
an address nobody owns (a private LAN address, say) is dropped with a reason, as the real
internet would. VIPs are registered in one table; a collision raises at once.
"""
from __future__ import annotations

import logging
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from .frames import (ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, PROTO_ICMP, build_icmp_echo, build_ipv4,
                     parse_icmp_echo, parse_ipv4)
from .switch import Emit

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

    def owner(self, ip: IPv4Address) -> str | None:
        if ip in self.routers:
            return f"WAN of network {self.routers[ip].name!r}"
        if ip in self.vips:
            return f"VIP {self.vips[ip]}"
        return None

    def add_router(self, router: "Router") -> None:
        owner = self.owner(router.wan_ip)
        if owner is not None:
            raise ValueError(f"WAN IP {router.wan_ip} is already used by {owner}")
        self.routers[router.wan_ip] = router

    def add_vip(self, ip: IPv4Address, what: str) -> None:
        owner = self.owner(ip)
        if owner is not None:
            raise ValueError(f"VIP {ip} ({what}) collides with {owner}")
        self.vips[ip] = what

    def _drop(self, reason: str) -> list[Emit]:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        log.debug("drop: %s", reason)
        return []

    def route(self, packet: bytes, now: float) -> list[Emit]:
        """Deliver an IPv4 packet (already NATed, TTL already decremented) to its owner."""
        dst = IPv4Address(packet[16:20])
        router = self.routers.get(dst)
        if router is not None:
            return router.from_wan(packet, now)
        if dst in self.vips:
            return self._vip(packet, now)
        return self._drop(f"no route to {dst} on the internet")

    def _vip(self, packet: bytes, now: float) -> list[Emit]:
        ip = parse_ipv4(packet)
        if ip is not None and ip.proto == PROTO_ICMP:
            echo = parse_icmp_echo(ip)
            if echo is not None and echo.type == ICMP_ECHO_REQUEST:
                reply = build_ipv4(ip.dst, ip.src, PROTO_ICMP,
                                   build_icmp_echo(ICMP_ECHO_REPLY, echo.ident, echo.seq, echo.data))
                return self.route(reply, now)
        return self._drop(f"VIP {IPv4Address(packet[16:20])} has no service for this packet")
