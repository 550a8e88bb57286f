"""The L2 switch of one network: MAC learning, flooding, and proxy ARP.

It owns which port reaches which MAC and answers ARP for every address it knows (the
gateway and every node with a lease), so guests resolve neighbours without a broadcast
storm. IP logic belongs to the router; the switch hands it frames addressed to the
router's MAC, and broadcasts.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import TYPE_CHECKING

from .drops import count_drop
from .frames import (ARP_REPLY, ARP_REQUEST, ETH_ARP, ETH_IPV6, build_arp,
                     build_eth, mac_str, parse_arp, parse_eth)

if TYPE_CHECKING:
    from .router import Router

__all__ = ["Port", "Switch", "Emit", "MAX_FDB_ENTRIES"]

log = logging.getLogger("vmlab.vnet.switch")

#: Bound on learned MACs per network: a guest spraying random source MACs cannot grow it.
MAX_FDB_ENTRIES = 4096


@dataclass(eq=False)
class Port:
    """One NIC's attachment to a network. `name` reads like 'alice/eth0'."""
    name: str
    mac: bytes
    network: str
    #: set by the runtime; frames for this port are handed to it
    sink: object = field(default=None, repr=False)
    #: False while the NIC's cable is out (`VNet.set_link`): frames either way are dropped
    link_up: bool = True


Emit = tuple[Port, bytes]


class Switch:
    def __init__(self, name: str, router: "Router"):
        self.name = name
        self.router = router
        self.ports: list[Port] = []
        self.fdb: dict[bytes, Port] = {}
        #: proxy-ARP table: IP -> MAC for the gateway and every known node address
        self.arp: dict[IPv4Address, bytes] = {}
        self.drops: dict[str, int] = {}
        #: capture hook: tap(interface, frame, now) for what the router's LAN port sees
        self.tap = None
        self._tap_name = f"{name}-lan"
        self.log = log.getChild(name)

    def attach(self, port: Port) -> None:
        self.ports.append(port)
        self.fdb.setdefault(port.mac, port)

    def detach(self, port: Port) -> None:
        if port in self.ports:
            self.ports.remove(port)
        for mac in [m for m, p in self.fdb.items() if p is port]:
            del self.fdb[mac]

    def _drop(self, reason: str) -> list[Emit]:
        count_drop(self.drops, reason)
        self.log.debug("drop: %s", reason)
        return []

    def from_port(self, port: Port, frame: bytes, now: float) -> list[Emit]:
        eth = parse_eth(frame)
        if eth is None:
            return self._drop("malformed ethernet frame")
        if eth.src[0] & 1:
            return self._drop("multicast source MAC")
        if self.fdb.get(eth.src) is not port:
            if eth.src not in self.fdb and len(self.fdb) >= MAX_FDB_ENTRIES:
                return self._drop("forwarding table full")
            self.fdb[eth.src] = port
        if eth.ethertype == ETH_ARP:
            handled = self._proxy_arp(port, eth.src, eth.payload)
            if handled is not None:
                return handled
        elif (eth.ethertype == ETH_IPV6 and eth.dst[0] & 1 and self.router.v6 is not None):
            handled = self.router.v6.proxy_nd(port, eth, now)  # proxy NDP, like proxy ARP
            if handled is not None:
                return handled
        if self.tap is not None and (eth.dst == self.router.mac or eth.dst[0] & 1):
            self.tap(self._tap_name, frame, now)
        if eth.dst == self.router.mac:
            return self.router.from_lan(eth, now)
        if eth.dst[0] & 1:  # broadcast or multicast: everyone, the router included
            out = [(p, frame) for p in self.ports if p is not port]
            return out + self.router.from_lan(eth, now)
        dst_port = self.fdb.get(eth.dst)
        if dst_port is None:
            return [(p, frame) for p in self.ports if p is not port]
        if dst_port is port:
            return self._drop("frame to its own port")
        return [(dst_port, frame)]

    def deliver(self, frame: bytes) -> list[Emit]:
        """A frame from the router onto the LAN."""
        if self.tap is not None:
            self.tap(self._tap_name, frame, None)
        dst = frame[:6]
        if dst[0] & 1:
            return [(p, frame) for p in self.ports]
        port = self.fdb.get(dst)
        if port is None:
            return self._drop(f"no port for {mac_str(dst)}")
        return [(port, frame)]

    def _proxy_arp(self, port: Port, src_mac: bytes, payload: bytes) -> list[Emit] | None:
        """Answer ARP requests for known addresses; return None to let the frame flood."""
        arp = parse_arp(payload)
        if arp is None:
            return self._drop("malformed ARP")
        if arp.spa != IPv4Address(0) and arp.spa in self.router.lan:
            self.router.learn_neighbor(arp.spa, arp.sha)
        if arp.op != ARP_REQUEST:
            return None if arp.op == ARP_REPLY else self._drop("unknown ARP op")
        if arp.spa == arp.tpa:
            return []  # gratuitous ARP / announcement: learnt above, nobody needs a copy
        mac = self.arp.get(arp.tpa)
        if mac is None or mac == arp.sha:
            return None
        reply = build_arp(ARP_REPLY, mac, arp.tpa, arp.sha, arp.spa)
        return [(port, build_eth(src_mac, mac, ETH_ARP, reply))]
