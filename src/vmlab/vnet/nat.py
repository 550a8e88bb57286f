"""NAT behaviours: the table a router consults when a packet crosses its WAN side.

Contract (after natlab's NATTable): a table is asked, per packet, either for the WAN source
endpoint to use for an outbound packet (`outbound`) or for the LAN destination of an inbound
packet (`inbound`). ``None`` means "drop", and the table records why in `last_drop`. Tables
are not thread-safe (vnet serialises calls) and never read the clock: they get `now`.

Names follow RFC 4787: mapping behaviour (which WAN port an inside endpoint gets) and
filtering behaviour (which outside senders may reach it).

    type        mapping                       filtering                          reference name
    one2one     LAN IP <-> WAN IP, same port  none (everything comes in)          One2OneNAT
    easy        endpoint-independent          address-and-port-dependent          EasyNAT
    hard        address-and-port-dependent    address-and-port-dependent          HardNAT

More behaviours (address-dependent variants, hairpinning, presets by RFC 3489 names) are
registered the same way.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address
from typing import Callable, Protocol

from ..errors import ConfigError

__all__ = ["NatType", "NatTable", "Endpoint", "make_nat_table", "NAT_TYPES",
           "MAPPING_TIMEOUT_S", "PUBLIC_PORT_RANGE"]

Endpoint = tuple[IPv4Address, int]

#: How long an idle mapping (and its filter entries) lives; refreshed by outbound traffic.
#: RFC 4787 REQ-5 asks for at least 2 minutes for UDP; natlab uses 300 s for filtering.
MAPPING_TIMEOUT_S = 300.0
#: Where public ports are picked from (natlab and most consumer routers use the upper half).
PUBLIC_PORT_RANGE = (32768, 65535)
#: Bound on mappings per table, so a guest looping over ports cannot grow memory forever.
MAX_MAPPINGS = 32768


class NatType(str, Enum):
    """The NAT behaviours a Network can have; values are what users type."""
    ONE2ONE = "one2one"
    EASY = "easy"
    HARD = "hard"


class NatTable(Protocol):
    last_drop: str

    def outbound(self, proto: int, src: Endpoint, dst: Endpoint, now: float) -> Endpoint | None:
        """WAN source for a packet from LAN endpoint `src` to outside endpoint `dst`."""

    def inbound(self, proto: int, src: Endpoint, wan_dst: Endpoint, now: float) -> Endpoint | None:
        """LAN destination for a packet from outside `src` to WAN endpoint `wan_dst`."""


@dataclass
class _Mapping:
    lan: Endpoint
    wan_port: int
    expires: float
    #: outside endpoints this mapping has sent to -> expiry (address-and-port filtering)
    peers: dict[Endpoint, float] = field(default_factory=dict)


class _PortAllocator:
    """Picks free public ports per protocol, starting at a random point and wrapping."""

    def __init__(self, rng: random.Random):
        self._rng = rng
        self.used: dict[tuple[int, int], object] = {}

    def allocate(self, proto: int, owner: object, prefer: int | None = None) -> int | None:
        lo, hi = PUBLIC_PORT_RANGE
        if prefer is not None and lo <= prefer <= hi and (proto, prefer) not in self.used:
            self.used[(proto, prefer)] = owner
            return prefer
        span = hi - lo + 1
        start = self._rng.randrange(span)
        for i in range(span):
            port = lo + (start + i) % span
            if (proto, port) not in self.used:
                self.used[(proto, port)] = owner
                return port
        return None

    def free(self, proto: int, port: int) -> None:
        self.used.pop((proto, port), None)


class One2OneNat:
    """The LAN host owns the WAN IP outright: addresses swap, ports stay, nothing is filtered."""

    def __init__(self, wan_ip: IPv4Address, lan_ip: Callable[[], IPv4Address | None]):
        self.wan_ip = wan_ip
        self._lan_ip = lan_ip
        self.last_drop = ""

    def outbound(self, proto, src, dst, now):
        return (self.wan_ip, src[1])

    def inbound(self, proto, src, wan_dst, now):
        lan = self._lan_ip()
        if lan is None:
            self.last_drop = "one2one: the network has no node yet"
            return None
        return (lan, wan_dst[1])


class _MappingNat:
    """Shared machinery for tables that allocate a WAN port per mapping key."""

    def __init__(self, wan_ip: IPv4Address, rng: random.Random):
        self.wan_ip = wan_ip
        self.last_drop = ""
        self._ports = _PortAllocator(rng)
        self._by_key: dict[tuple, _Mapping] = {}
        self._by_wan: dict[tuple[int, int], tuple] = {}

    def _key(self, proto: int, src: Endpoint, dst: Endpoint) -> tuple:
        raise NotImplementedError

    def _expire(self, key: tuple, now: float) -> _Mapping | None:
        m = self._by_key.get(key)
        if m is not None and m.expires <= now:
            del self._by_key[key]
            del self._by_wan[(key[0], m.wan_port)]
            self._ports.free(key[0], m.wan_port)
            return None
        return m

    def outbound(self, proto, src, dst, now):
        key = self._key(proto, src, dst)
        m = self._expire(key, now)
        if m is None:
            if len(self._by_key) >= MAX_MAPPINGS:
                self.last_drop = f"nat: table full ({MAX_MAPPINGS} mappings)"
                return None
            # Port preservation when the port is free, as Linux/most routers do.
            port = self._ports.allocate(proto, key, prefer=src[1])
            if port is None:
                self.last_drop = "nat: no free public port"
                return None
            m = _Mapping(src, port, 0.0)
            self._by_key[key] = m
            self._by_wan[(proto, port)] = key
        m.expires = now + MAPPING_TIMEOUT_S
        m.peers[dst] = now + MAPPING_TIMEOUT_S
        return (self.wan_ip, m.wan_port)

    def inbound(self, proto, src, wan_dst, now):
        key = self._by_wan.get((proto, wan_dst[1]))
        m = self._expire(key, now) if key is not None else None
        if m is None:
            self.last_drop = f"nat: no mapping for {wan_dst[0]}:{wan_dst[1]} (unsolicited)"
            return None
        expiry = m.peers.get(src)
        if expiry is None or expiry <= now:
            m.peers.pop(src, None)
            self.last_drop = (f"nat: {src[0]}:{src[1]} -> {wan_dst[0]}:{wan_dst[1]} filtered "
                              f"(the inside host has not sent to that address and port recently)")
            return None
        return m.lan


class EasyNat(_MappingNat):
    """Endpoint-independent mapping, address-and-port-dependent filtering."""

    def _key(self, proto, src, dst):
        return (proto, src)


class HardNat(_MappingNat):
    """A fresh mapping per destination (endpoint-dependent), same filtering as easy."""

    def _key(self, proto, src, dst):
        return (proto, src, dst)

    def outbound(self, proto, src, dst, now):
        # Endpoint-dependent mappings never preserve the port: a second destination would
        # otherwise collide with the first mapping's port and fall back to random anyway.
        key = self._key(proto, src, dst)
        if self._expire(key, now) is None and len(self._by_key) < MAX_MAPPINGS:
            port = self._ports.allocate(proto, key)
            if port is None:
                self.last_drop = "nat: no free public port"
                return None
            self._by_key[key] = _Mapping(src, port, 0.0)
            self._by_wan[(proto, port)] = key
        return super().outbound(proto, src, dst, now)


#: Registry of NAT types: name -> factory(wan_ip, lan_ip_getter, rng). Checked at import.
NAT_TYPES: dict[NatType, Callable[..., NatTable]] = {}


def _register(kind: NatType, factory: Callable[..., NatTable]) -> None:
    if kind in NAT_TYPES:
        raise RuntimeError(f"NAT type {kind.value!r} registered twice")
    NAT_TYPES[kind] = factory


_register(NatType.ONE2ONE, lambda wan, lan, rng: One2OneNat(wan, lan))
_register(NatType.EASY, lambda wan, lan, rng: EasyNat(wan, rng))
_register(NatType.HARD, lambda wan, lan, rng: HardNat(wan, rng))


def parse_nat_type(value: str | NatType) -> NatType:
    try:
        return NatType(value)
    except ValueError:
        known = ", ".join(t.value for t in NatType)
        raise ConfigError(f"unknown NAT type {value!r}; known types: {known}") from None


def make_nat_table(kind: NatType, wan_ip: IPv4Address,
                   lan_ip: Callable[[], IPv4Address | None], rng: random.Random) -> NatTable:
    return NAT_TYPES[kind](wan_ip, lan_ip, rng)
