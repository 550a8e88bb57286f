"""NAT behaviours: the table a router consults when a packet crosses its WAN side.

Owns: the behaviour model (`NatBehavior`, RFC 4787 for UDP, RFC 5382 for TCP, RFC 5508 for
ICMP echo), the named presets (`NatType`, one registry checked at import), and the tables that
implement them, including the explicit (port-mapped) entries that `portmap.py` creates.
Leaves to others: parsing and rewriting packets (router.py, frames.py), the port-mapping
protocols themselves (portmap.py), and the clock (every call gets `now`).

Contract (after natlab's NATTable): per packet a table is asked either for the WAN source
endpoint of an outbound packet (`outbound`) or for the LAN destination of an inbound one
(`inbound`). ``None`` means "drop", and the table says why in `last_drop`. Tables are not
thread-safe (vnet serialises calls) and never read the clock.

Vocabulary is RFC 4787's: *mapping* behaviour says when an inside endpoint gets a new public
port (§4.1: endpoint-independent, address-dependent, address-and-port-dependent); *filtering*
behaviour says which outside senders may use it (§5, the same three words).

    preset                mapping      filtering    port pres.  hairpin  reference name
    none                  (routed: the LAN prefix is public, nothing is translated)
    one2one               LAN IP <-> WAN IP, same ports, nothing filtered         One2OneNAT
    easy                  EIM          APDF         yes         yes      EasyNAT
    easyaf                EIM          ADF          yes         yes      EasyAFNAT
    hard                  APDM         APDF         no          no       HardNAT
    full_cone             EIM          EIF          yes         yes      RFC 3489 full cone
    restricted_cone       EIM          ADF          yes         yes      RFC 3489 restricted cone
    port_restricted_cone  EIM          APDF         yes         yes      RFC 3489 port restricted
    symmetric             APDM         APDF         no          yes      RFC 3489 symmetric

natlab's easyaf keys its mapping on the LAN IP alone, so every socket of a host shares one
public port and inbound traffic goes to whichever socket got it first; that is a shortcut of
its implementation, not a NAT behaviour, so easyaf here keys on the LAN IP and port like easy.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import Enum
from ipaddress import IPv4Address, IPv4Network
from typing import Callable, Protocol

from ..errors import ConfigError

__all__ = ["NatBehavior", "NatType", "MappingBehavior", "FilteringBehavior", "Translation",
           "NatTable", "NaptTable", "Endpoint", "PortMapping", "make_nat_table", "resolve_nat",
           "parse_nat_type", "NAT_TYPES", "MAPPING_TIMEOUT_S", "PUBLIC_PORT_RANGE",
           "MAX_MAPPINGS", "MAX_PORT_MAPPINGS"]

Endpoint = tuple[IPv4Address, int]

PROTO_ICMP, PROTO_TCP, PROTO_UDP = 1, 6, 17
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10

#: Idle lifetime of a UDP mapping and its filter entries, refreshed by outbound traffic.
#: RFC 4787 REQ-5 asks for at least 2 minutes and recommends 5; natlab uses 300 s.
MAPPING_TIMEOUT_S = 300.0
#: RFC 5382 REQ-5: an established TCP mapping idles at least 2 h 4 min.
TCP_ESTABLISHED_TIMEOUT_S = 7440.0
#: RFC 5382 REQ-5: a partially open or closing TCP mapping idles at least 4 min.
TCP_TRANSITORY_TIMEOUT_S = 240.0
#: RFC 5508 REQ-1: an ICMP query mapping idles at least 60 s.
ICMP_TIMEOUT_S = 60.0
#: Where public ports are picked from (natlab and many consumer routers use the upper half).
PUBLIC_PORT_RANGE = (32768, 65535)
#: Bound on dynamic mappings per table, so a guest looping over ports cannot grow memory.
MAX_MAPPINGS = 32768
#: Bound on filter entries (outside peers) per mapping; the stalest is forgotten first.
MAX_PEERS_PER_MAPPING = 1024
#: Bound on explicit port mappings (NAT-PMP, PCP, UPnP) per table.
MAX_PORT_MAPPINGS = 1024


class MappingBehavior(str, Enum):
    """RFC 4787 §4.1: what decides whether an inside endpoint reuses its public port."""
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class FilteringBehavior(str, Enum):
    """RFC 4787 §5: which outside senders may reach a mapping."""
    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class Translation(str, Enum):
    """How addresses change at all: ports translated (napt), one host owns the WAN IP
    (one2one), or nothing (none: the LAN prefix is routed on the internet)."""
    NAPT = "napt"
    ONE2ONE = "one2one"
    NONE = "none"


class NatType(str, Enum):
    """Named NAT presets; values are what users type (`nat="easy"`)."""
    NONE = "none"
    ONE2ONE = "one2one"
    EASY = "easy"
    EASYAF = "easyaf"
    HARD = "hard"
    FULL_CONE = "full_cone"
    RESTRICTED_CONE = "restricted_cone"
    PORT_RESTRICTED_CONE = "port_restricted_cone"
    SYMMETRIC = "symmetric"


EIM = MappingBehavior.ENDPOINT_INDEPENDENT
APDM = MappingBehavior.ADDRESS_AND_PORT_DEPENDENT
EIF = FilteringBehavior.ENDPOINT_INDEPENDENT
ADF = FilteringBehavior.ADDRESS_DEPENDENT
APDF = FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT


@dataclass(frozen=True)
class NatBehavior:
    """Everything a Network's NAT does, as flags. Strings are accepted for the enums.

        NatBehavior(mapping="endpoint-independent", filtering="address-dependent",
                    hairpinning=True, port_preservation=False, udp_timeout_s=120,
                    port_range=(1024, 65535))
        dataclasses.replace(NatBehavior.preset("easy"), hairpinning=False)

    The defaults are the `easy` preset's. `inbound_refresh` lets admitted inbound packets
    refresh a mapping too (RFC 4787 REQ-6 makes outbound refresh a MUST, inbound a MAY).
    """
    mapping: MappingBehavior = EIM
    filtering: FilteringBehavior = APDF
    hairpinning: bool = True
    port_preservation: bool = True
    udp_timeout_s: float = MAPPING_TIMEOUT_S
    tcp_established_timeout_s: float = TCP_ESTABLISHED_TIMEOUT_S
    tcp_transitory_timeout_s: float = TCP_TRANSITORY_TIMEOUT_S
    icmp_timeout_s: float = ICMP_TIMEOUT_S
    port_range: tuple[int, int] = PUBLIC_PORT_RANGE
    inbound_refresh: bool = False
    translation: Translation = Translation.NAPT
    #: the preset this came from, or "custom"; shown in reprs and logs
    name: str = "custom"

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "mapping", MappingBehavior(self.mapping))
            object.__setattr__(self, "filtering", FilteringBehavior(self.filtering))
            object.__setattr__(self, "translation", Translation(self.translation))
        except ValueError as err:
            words = ", ".join(m.value for m in MappingBehavior)
            raise ConfigError(f"NatBehavior: {err}; mapping and filtering take one of {words}") \
                from None
        for attr in ("udp_timeout_s", "tcp_established_timeout_s", "tcp_transitory_timeout_s",
                     "icmp_timeout_s"):
            value = getattr(self, attr)
            if not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"NatBehavior: {attr}={value!r} must be a positive number of "
                                  f"seconds (RFC 4787 REQ-5 suggests 300 for UDP)")
        lo_hi = self.port_range
        if (not isinstance(lo_hi, tuple) or len(lo_hi) != 2
                or not all(isinstance(p, int) for p in lo_hi)
                or not 1 <= lo_hi[0] <= lo_hi[1] <= 65535):
            raise ConfigError(f"NatBehavior: port_range={lo_hi!r} must be a tuple (low, high) with "
                              f"1 <= low <= high <= 65535, like (1024, 65535)")

    @classmethod
    def preset(cls, name: "str | NatType") -> "NatBehavior":
        """The behaviour of a named preset: ``NatBehavior.preset("hard")``."""
        return NAT_TYPES[parse_nat_type(name)]

    @property
    def translates_ports(self) -> bool:
        return self.translation is Translation.NAPT

    def describe(self) -> str:
        if self.translation is not Translation.NAPT:
            return self.name if self.name != "custom" else self.translation.value
        return (f"{self.name} ({self.mapping.value} mapping, {self.filtering.value} filtering"
                f"{', hairpinning' if self.hairpinning else ''}"
                f"{', port preservation' if self.port_preservation else ''})")


class NatTable(Protocol):
    last_drop: str
    behavior: NatBehavior

    def outbound(self, proto: int, src: Endpoint, dst: Endpoint, now: float,
                 tcp_flags: int = 0) -> Endpoint | None:
        """WAN source for a packet from LAN endpoint `src` to outside endpoint `dst`."""

    def inbound(self, proto: int, src: Endpoint, wan_dst: Endpoint, now: float,
                tcp_flags: int = 0) -> Endpoint | None:
        """LAN destination for a packet from outside `src` to WAN endpoint `wan_dst`."""


# --------------------------------------------------------------------------- registry

#: Registry of presets: name -> behaviour. Duplicates raise at import.
NAT_TYPES: dict[NatType, NatBehavior] = {}


def _register(kind: NatType, **flags) -> None:
    if kind in NAT_TYPES:
        raise RuntimeError(f"NAT type {kind.value!r} registered twice")
    NAT_TYPES[kind] = NatBehavior(name=kind.value, **flags)


_register(NatType.NONE, translation=Translation.NONE)
_register(NatType.ONE2ONE, translation=Translation.ONE2ONE)
_register(NatType.EASY, mapping=EIM, filtering=APDF)
_register(NatType.EASYAF, mapping=EIM, filtering=ADF)
_register(NatType.HARD, mapping=APDM, filtering=APDF, port_preservation=False, hairpinning=False)
_register(NatType.FULL_CONE, mapping=EIM, filtering=EIF)
_register(NatType.RESTRICTED_CONE, mapping=EIM, filtering=ADF)
_register(NatType.PORT_RESTRICTED_CONE, mapping=EIM, filtering=APDF)
_register(NatType.SYMMETRIC, mapping=APDM, filtering=APDF, port_preservation=False)
if set(NAT_TYPES) != set(NatType):
    raise RuntimeError(f"NAT types without a preset: {set(NatType) - set(NAT_TYPES)}")


def parse_nat_type(value: "str | NatType") -> NatType:
    try:
        return NatType(value)
    except ValueError:
        known = ", ".join(t.value for t in NatType)
        raise ConfigError(f"unknown NAT type {value!r}; known types: {known}, or pass a "
                          f"NatBehavior(...) for any other combination") from None


def resolve_nat(value: "str | NatType | NatBehavior") -> NatBehavior:
    """A preset name, a NatType or a NatBehavior -> NatBehavior."""
    if isinstance(value, NatBehavior):
        return value
    if isinstance(value, (str, NatType)):
        return NAT_TYPES[parse_nat_type(value)]
    raise ConfigError(f"nat={value!r}: give a preset name like 'easy' or a NatBehavior(...)")


# --------------------------------------------------------------------------- simple tables

class RoutedTable:
    """translation none: the LAN prefix is public, so nothing is rewritten or filtered."""

    def __init__(self, behavior: NatBehavior, lan: IPv4Network):
        self.behavior = behavior
        self.lan = lan
        self.last_drop = ""

    def outbound(self, proto, src, dst, now, tcp_flags=0):
        return src

    def inbound(self, proto, src, wan_dst, now, tcp_flags=0):
        if wan_dst[0] not in self.lan:
            self.last_drop = f"routed network: {wan_dst[0]} is not in the LAN {self.lan}"
            return None
        return wan_dst


class One2OneTable:
    """The LAN host owns the WAN IP outright: addresses swap, ports stay, nothing is filtered."""

    def __init__(self, behavior: NatBehavior, wan_ip: IPv4Address,
                 lan_ip: Callable[[], IPv4Address | None]):
        self.behavior = behavior
        self.wan_ip = wan_ip
        self._lan_ip = lan_ip
        self.last_drop = ""

    def outbound(self, proto, src, dst, now, tcp_flags=0):
        return (self.wan_ip, src[1])

    def inbound(self, proto, src, wan_dst, now, tcp_flags=0):
        lan = self._lan_ip()
        if lan is None:
            self.last_drop = "one2one: the network has no node yet"
            return None
        return (lan, wan_dst[1])


# --------------------------------------------------------------------------- NAPT

@dataclass(eq=False)
class _Mapping:
    proto: int
    key: tuple
    lan: Endpoint
    wan_port: int
    #: when outbound traffic last refreshed it (inbound too, with inbound_refresh)
    refreshed: float
    #: filter state: outside endpoint -> until when it may send in (APDF), and per address (ADF)
    peers: dict[Endpoint, float] = field(default_factory=dict)
    peer_ips: dict[IPv4Address, float] = field(default_factory=dict)
    # TCP state (RFC 5382), per mapping: SYN seen each way, FIN seen each way, RST seen
    syn_out: bool = False
    syn_in: bool = False
    fin_out: bool = False
    fin_in: bool = False
    rst: bool = False

    def tcp_established(self) -> bool:
        return self.syn_out and self.syn_in and not self.rst and not (self.fin_out and self.fin_in)


@dataclass(eq=False)
class PortMapping:
    """An explicit inbound mapping made by NAT-PMP, PCP or UPnP: WAN port -> LAN endpoint,
    open to every outside sender (or to `remote` only), until `expires` (None: forever)."""
    proto: int
    wan_port: int
    lan: Endpoint
    expires: float | None
    #: who made it ("natpmp", "pcp:<nonce hex>", "upnp"); only its owner may change it
    owner: str
    remote: IPv4Address | None = None
    description: str = ""

    def live(self, now: float) -> bool:
        return self.expires is None or self.expires > now


class NaptTable:
    """Network address and port translation with any RFC 4787 mapping/filtering pair,
    TCP state tracking, timeouts, hairpinning (decided by the router), a port range, and
    explicit port mappings. Expired state is removed lazily when touched, and swept when a
    table fills, so its size stays bounded by MAX_MAPPINGS and MAX_PORT_MAPPINGS."""

    def __init__(self, behavior: NatBehavior, wan_ip: IPv4Address, rng: random.Random):
        self.behavior = behavior
        self.wan_ip = wan_ip
        self.last_drop = ""
        self._rng = rng
        self._by_key: dict[tuple, _Mapping] = {}
        self._by_wan: dict[tuple[int, int], _Mapping] = {}
        self._ports: dict[tuple[int, int], object] = {}  # (proto, port) -> its user
        self.port_mappings: dict[tuple[int, int], PortMapping] = {}
        self._pm_by_lan: dict[tuple[int, Endpoint], PortMapping] = {}

    # -- timeouts ------------------------------------------------------------------------

    def _timeout(self, m: _Mapping) -> float:
        b = self.behavior
        if m.proto == PROTO_TCP:
            if m.tcp_established():
                return b.tcp_established_timeout_s
            return b.tcp_transitory_timeout_s
        return b.icmp_timeout_s if m.proto == PROTO_ICMP else b.udp_timeout_s

    def _expires(self, m: _Mapping) -> float:
        return m.refreshed + self._timeout(m)

    def _live(self, m: _Mapping | None, now: float) -> _Mapping | None:
        if m is not None and self._expires(m) <= now:
            self._remove(m)
            return None
        return m

    def _remove(self, m: _Mapping) -> None:
        self._by_key.pop(m.key, None)
        self._by_wan.pop((m.proto, m.wan_port), None)
        if self._ports.get((m.proto, m.wan_port)) is m:
            del self._ports[(m.proto, m.wan_port)]

    def sweep(self, now: float) -> int:
        """Remove every expired mapping and port mapping; returns how many went."""
        gone = [m for m in self._by_key.values() if self._expires(m) <= now]
        for m in gone:
            self._remove(m)
        stale = [pm for pm in self.port_mappings.values() if not pm.live(now)]
        for pm in stale:
            self._unmap(pm)
        return len(gone) + len(stale)

    def mappings(self, now: float) -> list[tuple[int, Endpoint, int, float]]:
        """Live dynamic mappings as (proto, lan endpoint, wan port, expires), for tests."""
        self.sweep(now)
        return [(m.proto, m.lan, m.wan_port, self._expires(m)) for m in self._by_key.values()]

    # -- ports ---------------------------------------------------------------------------

    def _allocate(self, proto: int, user: object, prefer: int | None,
                  prefer_anywhere: bool = False) -> int | None:
        """A free public port: `prefer` if free and in the range (anywhere with
        `prefer_anywhere`, for explicit port mappings), else a random free one of the range."""
        lo, hi = self.behavior.port_range
        in_range = 1 <= (prefer or 0) <= 65535 if prefer_anywhere else lo <= (prefer or 0) <= hi
        if prefer is not None and in_range and (proto, prefer) not in self._ports:
            self._ports[(proto, prefer)] = user
            return prefer
        span = hi - lo + 1
        start = self._rng.randrange(span)
        for i in range(span):
            port = lo + (start + i) % span
            if (proto, port) not in self._ports:
                self._ports[(proto, port)] = user
                return port
        return None

    # -- the packet path -----------------------------------------------------------------

    def _key(self, proto: int, src: Endpoint, dst: Endpoint) -> tuple:
        mapping = self.behavior.mapping
        if mapping is MappingBehavior.ENDPOINT_INDEPENDENT:
            return (proto, src)
        if mapping is MappingBehavior.ADDRESS_DEPENDENT:
            return (proto, src, dst[0])
        return (proto, src, dst)

    def outbound(self, proto, src, dst, now, tcp_flags=0):
        pm = self._pm_by_lan.get((proto, src))
        if pm is not None and pm.live(now):
            # Replies from a port-mapped socket leave from the mapped port (natlab doNATOut).
            return (self.wan_ip, pm.wan_port)
        key = self._key(proto, src, dst)
        m = self._live(self._by_key.get(key), now)
        if m is None:
            m = self._new_mapping(proto, key, src, now)
            if m is None:
                return None
        if proto == PROTO_TCP:
            if tcp_flags & TCP_SYN and (m.rst or (m.fin_out and m.fin_in)):
                # A new connection from the same endpoint reuses the mapping with fresh state.
                m.syn_in = m.fin_out = m.fin_in = m.rst = False
            m.syn_out |= bool(tcp_flags & TCP_SYN)
            m.fin_out |= bool(tcp_flags & TCP_FIN)
            m.rst |= bool(tcp_flags & TCP_RST)
        m.refreshed = now
        until = now + self._timeout(m)
        self._add_peer(m, dst, until)
        return (self.wan_ip, m.wan_port)

    def _new_mapping(self, proto: int, key: tuple, src: Endpoint, now: float) -> _Mapping | None:
        if len(self._by_key) >= MAX_MAPPINGS and self.sweep(now) == 0:
            self.last_drop = f"nat: table full ({MAX_MAPPINGS} mappings)"
            return None
        m = _Mapping(proto, key, src, 0, now)
        prefer = src[1] if self.behavior.port_preservation else None
        port = self._allocate(proto, m, prefer)
        if port is None:
            self.sweep(now)
            port = self._allocate(proto, m, prefer)
        if port is None:
            lo, hi = self.behavior.port_range
            self.last_drop = f"nat: no free public port in {lo}-{hi} (port range exhausted)"
            return None
        m.wan_port = port
        self._by_key[key] = m
        self._by_wan[(proto, port)] = m
        return m

    def _add_peer(self, m: _Mapping, dst: Endpoint, until: float) -> None:
        if dst not in m.peers and len(m.peers) >= MAX_PEERS_PER_MAPPING:
            oldest = min(m.peers, key=m.peers.__getitem__)
            del m.peers[oldest]
        m.peers[dst] = until
        if dst[0] not in m.peer_ips and len(m.peer_ips) >= MAX_PEERS_PER_MAPPING:
            oldest_ip = min(m.peer_ips, key=m.peer_ips.__getitem__)
            del m.peer_ips[oldest_ip]
        m.peer_ips[dst[0]] = until

    def inbound(self, proto, src, wan_dst, now, tcp_flags=0):
        pm = self.port_mappings.get((proto, wan_dst[1]))
        if pm is not None:
            if not pm.live(now):
                self._unmap(pm)
            elif pm.remote is not None and pm.remote != src[0]:
                self.last_drop = (f"nat: port mapping {wan_dst[1]} admits only {pm.remote}, "
                                  f"not {src[0]}")
                return None
            else:
                return pm.lan
        m = self._live(self._by_wan.get((proto, wan_dst[1])), now)
        if m is None:
            self.last_drop = f"nat: no mapping for {wan_dst[0]}:{wan_dst[1]} (unsolicited)"
            return None
        filtering = self.behavior.filtering
        if filtering is FilteringBehavior.ADDRESS_AND_PORT_DEPENDENT:
            until = m.peers.get(src)
            what = "that address and port"
        elif filtering is FilteringBehavior.ADDRESS_DEPENDENT:
            until = m.peer_ips.get(src[0])
            what = "that address"
        else:
            until = float("inf")
            what = ""
        if until is None or until <= now:
            self.last_drop = (f"nat: {src[0]}:{src[1]} -> {wan_dst[0]}:{wan_dst[1]} filtered "
                              f"({filtering.value} filtering: the inside host has not sent to "
                              f"{what} recently)")
            return None
        if proto == PROTO_TCP:
            m.syn_in |= bool(tcp_flags & TCP_SYN)
            m.fin_in |= bool(tcp_flags & TCP_FIN)
            m.rst |= bool(tcp_flags & TCP_RST)
        if self.behavior.inbound_refresh:
            m.refreshed = now
            self._add_peer(m, src, now + self._timeout(m))
        return m.lan

    # -- explicit port mappings (used by portmap.py) --------------------------------------

    def map_port(self, proto: int, lan: Endpoint, suggested: int | None, lifetime_s: float | None,
                 now: float, *, owner: str, exact: bool = False,
                 remote: IPv4Address | None = None, description: str = "") -> PortMapping | str:
        """Create or renew an inbound mapping; returns it, or a reason it cannot be made.

        An existing mapping of the same LAN endpoint and protocol is renewed (its owner
        must match); else the suggested port is used when free, else (unless `exact`) any
        free port of the range. An endpoint-independent dynamic mapping the endpoint already
        has is adopted, so the port peers see stays the same (RFC 6887 §11.3). `lifetime_s`
        None means no expiry (UPnP lease 0)."""
        expires = None if lifetime_s is None else now + lifetime_s
        pm = self._pm_by_lan.get((proto, lan))
        if pm is not None and not pm.live(now):
            self._unmap(pm)
            pm = None
        if pm is not None and (not exact or suggested in (None, pm.wan_port)):
            if pm.owner != owner:
                return f"the mapping of {lan[0]}:{lan[1]} belongs to {pm.owner}"
            pm.expires, pm.remote = expires, remote
            pm.description = description or pm.description
            return pm
        taken = self.port_mappings.get((proto, suggested)) if suggested else None
        if taken is not None and not taken.live(now):
            self._unmap(taken)
            taken = None
        if taken is not None:
            if exact:
                return f"port {suggested} is mapped to {taken.lan[0]}:{taken.lan[1]} already"
        if len(self.port_mappings) >= MAX_PORT_MAPPINGS and self.sweep(now) == 0:
            return f"too many port mappings ({MAX_PORT_MAPPINGS})"
        pm = PortMapping(proto, 0, lan, expires, owner, remote, description)
        dyn = self._live(self._by_key.get((proto, lan)), now)
        if (dyn is not None and self.behavior.mapping is MappingBehavior.ENDPOINT_INDEPENDENT
                and (suggested in (None, 0, dyn.wan_port) or not exact)):
            self._remove(dyn)
            port = dyn.wan_port
            self._ports[(proto, port)] = pm
        else:
            user = self._ports.get((proto, suggested)) if suggested else None
            if isinstance(user, _Mapping) and self._expires(user) <= now:
                self._remove(user)
            if exact and suggested and (proto, suggested) in self._ports:
                return f"port {suggested} is in use by a dynamic mapping"
            port = self._allocate(proto, pm, suggested or None, prefer_anywhere=True)
            if port is None:
                self.sweep(now)
                port = self._allocate(proto, pm, suggested or None, prefer_anywhere=True)
            if port is None:
                return "no free public port"
        pm.wan_port = port
        self.port_mappings[(proto, port)] = pm
        self._pm_by_lan.setdefault((proto, lan), pm)
        return pm

    def unmap_port(self, proto: int, wan_port: int) -> PortMapping | None:
        pm = self.port_mappings.get((proto, wan_port))
        if pm is not None:
            self._unmap(pm)
        return pm

    def port_mapping_of(self, proto: int, lan: Endpoint, now: float) -> PortMapping | None:
        pm = self._pm_by_lan.get((proto, lan))
        return pm if pm is not None and pm.live(now) else None

    def _unmap(self, pm: PortMapping) -> None:
        self.port_mappings.pop((pm.proto, pm.wan_port), None)
        if self._pm_by_lan.get((pm.proto, pm.lan)) is pm:
            del self._pm_by_lan[(pm.proto, pm.lan)]
        if self._ports.get((pm.proto, pm.wan_port)) is pm:
            del self._ports[(pm.proto, pm.wan_port)]


def make_nat_table(behavior: "NatBehavior | NatType | str", wan_ip: IPv4Address,
                   lan_ip: Callable[[], IPv4Address | None], rng: random.Random,
                   lan: IPv4Network | None = None) -> NatTable:
    behavior = resolve_nat(behavior)
    if behavior.translation is Translation.ONE2ONE:
        return One2OneTable(behavior, wan_ip, lan_ip)
    if behavior.translation is Translation.NONE:
        if lan is None:
            raise ConfigError("a routed (nat='none') network needs its LAN prefix")
        return RoutedTable(behavior, lan)
    return NaptTable(behavior, wan_ip, rng)

