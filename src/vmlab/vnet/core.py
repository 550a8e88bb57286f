"""VNet: the whole simulated network of one Env, as a pure state machine.

It owns the networks (switch + router each), the internet between them, and the ports
nodes' NICs plug into. Input is a frame from a port plus `now`; output is a list of
(port, frame) to send. No sockets and no clock here: `vnet/runtime.py` does the I/O.

Addressing is deterministic so tests and pcaps read well (after natlab):
node NIC MACs are 52:cc:cc:cc:NN:KK (node NN, NIC KK), router MACs 52:ee:ee:ee:ee:NN, and a
node's LAN IPv4 is the network's prefix with host part 100 + NN; its IPv6 address is the
network's /64 plus the EUI-64 of its MAC (SLAAC).

Delivery to NICs goes through one place (`_deliver`), which drops frames to a NIC whose
link is down, applies the network's link conditions (conditions.py: delayed frames come
back out of `tick` once `next_deadline` has passed) and records frames for the pcap.
vmlab's resolvers (dns.py) and the driver's IPv6 address are VIPs on the internet.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Network
from typing import Callable

from .conditions import LinkConditions, Shaper
from .dns import DnsRecords, DnsServer, tcp_acceptor
from .drops import count_drop
from .flows import FlowCache
from .frames import mac_bytes
from .internet import TEST_DRIVER_IPV4, TEST_DRIVER_PORT, Internet
from .nat import NatBehavior, NatType
from .portmap import PortMapProtocol
from .ipv6 import Ipv6Lan
from .router import Router
from .services import DNS_VIP, DRIVER_VIP, SPLIT_DNS_VIP
from .switch import Emit, Port
from .tcp import TcpConnection

__all__ = ["VNet", "NetworkConfig", "node_mac", "router_mac", "TEST_DRIVER_IPV4",
           "TEST_DRIVER_PORT"]

log = logging.getLogger("vmlab.vnet")


def node_mac(node_num: int, nic_num: int = 0) -> str:
    """MAC of NIC `nic_num` (0-based) of node `node_num` (1-based): 52:cc:cc:cc:NN:KK."""
    return f"52:cc:cc:cc:{node_num:02x}:{nic_num:02x}"


def router_mac(net_num: int) -> str:
    return f"52:ee:ee:ee:ee:{net_num:02x}"


@dataclass(frozen=True)
class NetworkConfig:
    name: str
    lan: IPv4Network
    wan_ip: IPv4Address
    nat: NatType | NatBehavior
    num: int  # 1-based, for the router MAC
    #: port-mapping protocols the gateway serves (NAT-PMP, PCP, UPnP); none by default
    port_mapping: frozenset[PortMapProtocol] = frozenset()
    #: the network's IPv6 /64 (None: no IPv6); routed without NAT
    lan6: IPv6Network | None = None
    #: False for an IPv6-only network (then `wan_ip` may be None)
    ipv4: bool = True
    #: latency, loss, bandwidth on delivery to the network's NICs (None: ideal)
    conditions: LinkConditions | None = None

    @property
    def gateway(self) -> IPv4Address:
        return self.lan.network_address + 1

    def __post_init__(self) -> None:
        if self.lan is None:
            if self.ipv4 or self.lan6 is None:
                raise ValueError(f"network {self.name!r}: no IPv4 LAN and no IPv6 prefix")
            # The router's IPv4 side still exists but never serves (ipv4=False); give it an
            # address block that is never routed (TEST-NET-1, RFC 5737).
            object.__setattr__(self, "lan", IPv4Network("192.0.2.0/24"))


class VNet:
    def __init__(self, *, seed: int = 0,
                 on_event: Callable[[str, object], None] | None = None):
        self.internet = Internet()
        self.routers: dict[str, Router] = {}
        self.ports: dict[str, Port] = {}
        #: network name -> {mac: ip} for DHCP's deterministic answers
        self._addresses: dict[str, dict[bytes, IPv4Address]] = {}
        self._tcp_listeners: list[tuple[IPv4Address, int, Callable]] = []
        self._rng = random.Random(seed)
        self.on_event = on_event or (lambda kind, data: None)
        #: network name -> its link conditions' shaper (only networks that have conditions)
        self.shapers: dict[str, Shaper] = {}
        #: the fast path for flows the full path merely forwards (see flows.py)
        self.flows = FlowCache()
        self._blackholes: set[str] = set()
        #: capture hook for NIC traffic: tap(port name, frame, now); see set_tap
        self.tap: Callable[[str, bytes, float | None], None] | None = None
        self.drops_nic: dict[str, int] = {}
        self.dns_records = DnsRecords()
        self.dns = DnsServer(self.dns_records)
        self.split_dns = DnsServer(self.dns_records, split=True)
        inet = self.internet
        for server, vip in ((self.dns, DNS_VIP), (self.split_dns, SPLIT_DNS_VIP)):
            for ip in vip.addresses:
                inet.add_vip(ip, f"{vip.name} (DNS)")
                inet.serve_udp(ip, 53, self._dns_udp(server))
                inet.listen_tcp(ip, 53, tcp_acceptor(server))
                inet.blackhole_exempt.add(ip)
        inet.blackhole_exempt.update(DRIVER_VIP.addresses)

    @staticmethod
    def _dns_udp(server: DnsServer):
        return lambda payload, src: server.answer_udp(payload)

    def add_network(self, cfg: NetworkConfig) -> Router:
        if cfg.name in self.routers:
            raise ValueError(f"network {cfg.name!r} added twice")
        table: dict[bytes, IPv4Address] = {}
        self._addresses[cfg.name] = table
        router = Router(name=cfg.name, mac=mac_bytes(router_mac(cfg.num)), lan=cfg.lan,
                        gateway=cfg.gateway, wan_ip=cfg.wan_ip, nat=cfg.nat,
                        internet=self.internet, address_for=table.get, dns=[DNS_VIP.ipv4],
                        rng=random.Random(self._rng.getrandbits(64)), on_event=self.on_event,
                        port_mapping=cfg.port_mapping)
        router.ipv4 = cfg.ipv4
        if cfg.wan_ip is not None:
            self.internet.add_router(router)
        if cfg.lan6 is not None:
            router.v6 = Ipv6Lan(router, cfg.lan6, DNS_VIP.ipv6)
            self.internet.add_prefix6(cfg.lan6, router)
        if cfg.conditions is not None and not cfg.conditions.is_ideal:
            self.shapers[cfg.name] = Shaper(cfg.conditions,
                                            random.Random(self._rng.getrandbits(64)))
        if self.tap is not None:
            router.switch.tap = self.tap
        self.routers[cfg.name] = router
        for ip, port, on_accept in self._tcp_listeners:
            router.tcp.listen(ip, port, self._accept_cb(router, on_accept))
        return router

    def add_port(self, name: str, network: str, mac: str, ip: IPv4Address) -> Port:
        """Plug a NIC with `mac` into `network`; DHCP will give it `ip`."""
        router = self.routers[network]
        if name in self.ports:
            raise ValueError(f"port {name!r} added twice")
        port = Port(name=name, mac=mac_bytes(mac), network=network)
        if ip is not None:  # None: an IPv6-only network (no DHCPv4, no ARP)
            self._addresses[network][port.mac] = ip
        router.switch.attach(port)
        # Known up front, so ARP for a node is answered even before it has spoken (a node
        # restored from a snapshot takes its address statically, with no DHCP to learn from).
        if ip is not None:
            router.learn_neighbor(ip, port.mac)
        if router.v6 is not None:
            router.v6.add_node_mac(port.mac)
        self.ports[name] = port
        return port

    def listen_tcp(self, ip: IPv4Address, port: int,
                   on_accept: Callable[[Router, TcpConnection], None], what: str) -> None:
        """Terminate TCP to ip:port in vnet itself, on every network's LAN side."""
        self.flows.clear()  # what is reachable changed
        self.internet.add_vip(ip, what)
        self.internet.lan_tcp_vips.add(ip)
        self._tcp_listeners.append((ip, port, on_accept))
        for router in self.routers.values():
            router.tcp.listen(ip, port, self._accept_cb(router, on_accept))

    @staticmethod
    def _accept_cb(router: Router, on_accept):
        return lambda conn: on_accept(router, conn)

    # ------------------------------------------------------------------ the packet path

    def receive(self, port: Port, frame: bytes, now: float) -> list[Emit]:
        """A frame a NIC sent; returns the frames to hand to NICs now."""
        if not port.link_up:
            count_drop(self.drops_nic, f"{port.name}: link down (frame from the node)")
            return []
        if self.tap is not None:
            self.tap(port.name, frame, now)
        fast = self.tap is None and not self.shapers and not self._blackholes
        if fast:
            key, out = self.flows.lookup(port, frame, now)
            if out is not None:
                return out
        router = self.routers[port.network]
        out = self._deliver(router.switch.from_port(port, frame, now), now)
        if fast:
            self.flows.learn(key, frame, out, now)
        else:
            self.flows.clear()
        return out

    def _deliver(self, emits: list[Emit], now: float) -> list[Emit]:
        """The last hop to every NIC: link state, link conditions, capture."""
        if not emits:
            return emits
        shapers = self.shapers
        tap = self.tap
        if not shapers and tap is None:
            for port, _ in emits:
                if not port.link_up:
                    break
            else:
                return emits  # the fast path: nothing to check per frame
        out = []
        for port, frame in emits:
            if not port.link_up:
                count_drop(self.drops_nic, f"{port.name}: link down (frame to the node)")
                continue
            shaper = shapers.get(port.network)
            if shaper is not None and not shaper.submit(port, frame, now):
                continue
            if tap is not None:
                tap(port.name, frame, now)
            out.append((port, frame))
        return out

    def _release(self, emits: list[Emit], now: float) -> list[Emit]:
        """Frames a shaper held, now due: only the link state and capture still apply."""
        out = []
        for port, frame in emits:
            if not port.link_up:
                count_drop(self.drops_nic, f"{port.name}: link down (frame to the node)")
                continue
            if self.tap is not None:
                self.tap(port.name, frame, now)
            out.append((port, frame))
        return out

    def kick(self, router: Router | None, now: float) -> list[Emit]:
        """Flush what a VIP service queued on `router`'s LAN-side TCP (None: the internet's)."""
        if router is None:
            return self._deliver(self.internet.flush_tcp(now), now)
        return self._deliver(router.flush_tcp(now), now)

    def tick(self, now: float) -> list[Emit]:
        out: list[Emit] = []
        for router in self.routers.values():
            out += router.flush_tcp(now)
            if router.v6 is not None:
                out += router.v6.tick(now)
        out += self.internet.flush_tcp(now)
        out = self._deliver(out, now)
        for shaper in self.shapers.values():
            out += self._release(shaper.due(now), now)
        return out

    def next_deadline(self) -> float | None:
        deadlines = [d for r in self.routers.values() if (d := r.tcp.next_deadline()) is not None]
        deadlines += [d for r in self.routers.values()
                      if r.v6 is not None and (d := r.v6.next_deadline()) is not None]
        deadlines += [d for s in self.shapers.values() if (d := s.next_deadline()) is not None]
        if (d := self.internet.tcp.next_deadline()) is not None:
            deadlines.append(d)
        return min(deadlines, default=None)

    # ------------------------------------------------------------------ knobs

    def set_conditions(self, network: str, conditions: LinkConditions | None) -> None:
        """Change a network's link conditions at run time (None or ideal: none)."""
        if network not in self.routers:
            raise KeyError(f"no network {network!r}")
        shaper = self.shapers.get(network)
        if conditions is None or conditions.is_ideal:
            if shaper is not None and shaper.queued == 0:
                del self.shapers[network]
            elif shaper is not None:
                shaper.set_conditions(LinkConditions())  # drain what is in flight, then idle
        elif shaper is None:
            self.shapers[network] = Shaper(conditions, random.Random(self._rng.getrandbits(64)))
        else:
            shaper.set_conditions(conditions)

    def set_link(self, port_name: str, up: bool) -> None:
        """Plug (True) or pull (False) the cable of one NIC, as vnet sees it."""
        self.flows.clear()  # what is reachable changed
        self.ports[port_name].link_up = bool(up)

    def set_blackhole(self, network: str, on: bool) -> None:
        """Cut (True) or restore (False) a network's WAN, both families, both directions."""
        self.routers[network].blackholed = bool(on)
        if on:
            self._blackholes.add(network)
        else:
            self._blackholes.discard(network)
        self.flows.clear()

    def set_tap(self, tap: Callable[[str, bytes, float | None], None] | None) -> None:
        """Record traffic: `tap(interface, data, now)` for every frame a NIC sends or gets
        (interface = port name), every frame the router's LAN port sees ('<network>-lan') and
        every IP packet crossing its WAN side ('<network>-wan'). `now` None means "the same
        time as the previous call"."""
        self.tap = tap
        self.internet.tap = tap
        for router in self.routers.values():
            router.switch.tap = tap

    def serve_udp(self, ip, port: int, handler, what: str) -> None:
        """Put a UDP service on public address `ip` (made a VIP if it is not one)."""
        self.flows.clear()  # what is reachable changed
        if ip not in self.internet.vips:
            self.internet.add_vip(ip, what)
        self.internet.serve_udp(ip, port, handler)

    def listen_tcp_vip(self, ip, port: int, on_accept: Callable[[TcpConnection], None],
                       what: str) -> None:
        """Serve TCP on public address `ip` (made a VIP if it is not one), after the NAT."""
        self.flows.clear()  # what is reachable changed
        if ip not in self.internet.vips:
            self.internet.add_vip(ip, what)
        self.internet.listen_tcp(ip, port, on_accept)

    def drops(self) -> dict[str, int]:
        """Every drop reason with its count, across switches, routers and the internet."""
        total: dict[str, int] = dict(self.internet.drops)
        for reason, n in self.drops_nic.items():
            total[reason] = total.get(reason, 0) + n
        for name, shaper in self.shapers.items():
            for reason, n in shaper.drops.items():
                total[f"{name}: {reason}"] = total.get(f"{name}: {reason}", 0) + n
        for r in self.routers.values():
            tables = (r.drops, r.switch.drops) + ((r.v6.drops,) if r.v6 is not None else ())
            for table in tables:
                for reason, n in table.items():
                    total[f"{r.name}: {reason}"] = total.get(f"{r.name}: {reason}", 0) + n
        return total
