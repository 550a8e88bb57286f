"""The router of one network: the LAN's gateway, its NAT, and its link to the internet.

LAN side it answers pings to the gateway, serves DHCP, terminates TCP for VIPs that are
intercepted before NAT (the driver VIP, so an agent reaches the driver whatever the NAT
does), and forwards everything else through the NAT table to the simulated internet.
WAN side it takes packets the internet routes to its WAN IP and lets the NAT decide
whether and where they enter the LAN.
"""
from __future__ import annotations

import logging
import random
from ipaddress import IPv4Address, IPv4Network
from typing import TYPE_CHECKING, Callable

from .dhcp import DhcpEvent, DhcpServer
from .frames import (BROADCAST_MAC, ETH_IPV4, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, PROTO_ICMP,
                     PROTO_TCP, PROTO_UDP, Ethernet, build_eth, build_icmp_echo, build_ipv4,
                     build_tcp, build_udp, l4_ports, parse_icmp_echo, parse_ipv4, parse_tcp,
                     parse_udp, rewrite_ipv4)
from .nat import NatTable, NatType, make_nat_table
from .switch import Emit, Switch
from .tcp import TcpStack

if TYPE_CHECKING:
    from .internet import Internet

__all__ = ["Router", "MAX_NEIGHBORS"]

log = logging.getLogger("vmlab.vnet.router")

DHCP_SERVER_PORT, DHCP_CLIENT_PORT = 67, 68
#: Bound on the LAN neighbour table.
MAX_NEIGHBORS = 4096


class Router:
    def __init__(self, *, name: str, mac: bytes, lan: IPv4Network, gateway: IPv4Address,
                 wan_ip: IPv4Address, nat: NatType, internet: "Internet",
                 address_for: Callable[[bytes], IPv4Address | None],
                 dns: list[IPv4Address], rng: random.Random,
                 on_event: Callable[[str, object], None]):
        self.name = name
        self.mac = mac
        self.lan = lan
        self.gateway = gateway
        self.wan_ip = wan_ip
        self.nat_type = nat
        self.internet = internet
        self.switch = Switch(name, self)
        self.switch.arp[gateway] = mac
        self.neighbors: dict[IPv4Address, bytes] = {}
        self.dhcp = DhcpServer(prefix=lan, gateway=gateway, dns=dns, address_for=address_for)
        self.nat: NatTable = make_nat_table(nat, wan_ip, self._sole_lan_ip, rng)
        #: userspace TCP for VIPs intercepted on the LAN side (one stack per network, because
        #: two networks may use the same LAN prefix and so the same 4-tuples)
        self.tcp = TcpStack()
        self.on_event = on_event
        self.drops: dict[str, int] = {}
        self.log = log.getChild(name)

    # ------------------------------------------------------------------ neighbours

    def learn_neighbor(self, ip: IPv4Address, mac: bytes) -> None:
        if ip == self.gateway or ip not in self.lan:
            return
        if ip not in self.neighbors and len(self.neighbors) >= MAX_NEIGHBORS:
            return
        self.neighbors[ip] = mac
        self.switch.arp[ip] = mac

    def _sole_lan_ip(self) -> IPv4Address | None:
        """The one node behind a one2one NAT: the address it leased, else the one it used."""
        for ip, _expiry in self.dhcp.leases.values():
            return ip
        return next(iter(self.neighbors), None)

    def _drop(self, reason: str) -> list[Emit]:
        self.drops[reason] = self.drops.get(reason, 0) + 1
        self.log.debug("drop: %s", reason)
        return []

    # ------------------------------------------------------------------ LAN side

    def from_lan(self, eth: Ethernet, now: float) -> list[Emit]:
        if eth.ethertype != ETH_IPV4:
            return []  # ARP is the switch's; IPv6 comes with its own module
        ip = parse_ipv4(eth.payload)
        if ip is None:
            return self._drop("malformed IPv4 from LAN")
        if ip.src in self.lan and ip.src != self.gateway:
            self.learn_neighbor(ip.src, eth.src)
        if ip.proto == PROTO_UDP:
            udp = parse_udp(ip)
            if udp is not None and udp.dport == DHCP_SERVER_PORT and udp.sport == DHCP_CLIENT_PORT:
                return self._dhcp(eth, udp.payload, now)
        if ip.dst == IPv4Address("255.255.255.255") or eth.dst != self.mac:
            return []
        if ip.dst == self.gateway:
            return self._to_gateway(eth, ip)
        if ip.proto == PROTO_TCP and not ip.is_fragment:
            seg = parse_tcp(ip)
            # VIP addresses are ours whatever the port: a port nobody serves gets a RST.
            if seg is not None and (self.tcp.handles(seg) or seg.dst_ip in self.internet.vips):
                self.tcp.receive(seg, now)
                return self.flush_tcp(now)
        if ip.ttl <= 1:
            return self._drop("TTL expired")
        if ip.dst in self.lan:
            mac = self.neighbors.get(ip.dst)
            if mac is None:
                return self._drop(f"no neighbour {ip.dst}")
            return self.switch.deliver(build_eth(mac, self.mac, ETH_IPV4,
                                                 rewrite_ipv4(ip, ttl=ip.ttl - 1)))
        return self._nat_out(ip, now)

    def _to_gateway(self, eth: Ethernet, ip) -> list[Emit]:
        if ip.proto == PROTO_ICMP:
            echo = parse_icmp_echo(ip)
            if echo is not None and echo.type == ICMP_ECHO_REQUEST:
                reply = build_ipv4(self.gateway, ip.src, PROTO_ICMP,
                                   build_icmp_echo(ICMP_ECHO_REPLY, echo.ident, echo.seq, echo.data))
                return [(p, f) for p, f in self.switch.deliver(
                    build_eth(eth.src, self.mac, ETH_IPV4, reply))]
        return self._drop(f"nothing listens on the gateway for protocol {ip.proto}")

    def _dhcp(self, eth: Ethernet, payload: bytes, now: float) -> list[Emit]:
        reply, events = self.dhcp.handle(payload, now)
        for ev in events:
            self._dhcp_event(ev)
        if reply is None:
            return []
        # Broadcast the reply: a client without an address may not accept unicast (RFC 2131 §4.1).
        udp = build_udp(self.gateway, IPv4Address("255.255.255.255"), DHCP_SERVER_PORT,
                        DHCP_CLIENT_PORT, reply)
        packet = build_ipv4(self.gateway, IPv4Address("255.255.255.255"), PROTO_UDP, udp)
        return self.switch.deliver(build_eth(BROADCAST_MAC, self.mac, ETH_IPV4, packet))

    def _dhcp_event(self, ev: DhcpEvent) -> None:
        if ev.kind == "ack" and ev.ip is not None:
            from .frames import mac_bytes
            self.learn_neighbor(ev.ip, mac_bytes(ev.mac))
        self.log.info("dhcp %s %s%s", ev.kind, ev.mac, f" {ev.ip}" if ev.ip else "")
        self.on_event("dhcp", {"network": self.name, "kind": ev.kind, "mac": ev.mac,
                               "ip": str(ev.ip) if ev.ip else None, "hostname": ev.hostname})

    # ------------------------------------------------------------------ TCP termination

    def flush_tcp(self, now: float) -> list[Emit]:
        """Let the TCP stack act on what the app queued, and turn its segments into LAN frames."""
        self.tcp.tick(now)
        out: list[Emit] = []
        for seg in self.tcp.take_outgoing():
            mac = self.neighbors.get(seg.dst_ip)
            if mac is None:
                self._drop(f"no neighbour {seg.dst_ip} for TCP")
                continue
            packet = build_ipv4(seg.src_ip, seg.dst_ip, PROTO_TCP, build_tcp(seg))
            out += self.switch.deliver(build_eth(mac, self.mac, ETH_IPV4, packet))
        return out

    # ------------------------------------------------------------------ WAN side

    def _nat_out(self, ip, now: float) -> list[Emit]:
        if ip.is_fragment:
            return self._drop("IPv4 fragment (NAT needs whole datagrams)")
        ports = l4_ports(ip)
        if ports is None:
            return self._drop(f"protocol {ip.proto} cannot cross the NAT")
        if (ip.proto == PROTO_ICMP and self.nat_type != NatType.ONE2ONE
                and parse_icmp_echo(ip).type != ICMP_ECHO_REQUEST):
            return self._drop("ICMP echo reply from LAN: only a one2one NAT lets pings in")
        wan = self.nat.outbound(ip.proto, (ip.src, ports[0]), (ip.dst, ports[1]), now)
        if wan is None:
            return self._drop(self.nat.last_drop)
        packet = rewrite_ipv4(ip, src=wan[0], sport=wan[1], ttl=ip.ttl - 1)
        return self.internet.route(packet, now)

    def from_wan(self, packet: bytes, now: float) -> list[Emit]:
        """A packet the internet routed to our WAN IP."""
        ip = parse_ipv4(packet)
        if ip is None:
            return self._drop("malformed IPv4 from WAN")
        if ip.is_fragment:
            return self._drop("IPv4 fragment from WAN")
        ports = l4_ports(ip)
        if ports is None:
            return self._drop(f"protocol {ip.proto} from WAN has no NAT state")
        if ip.proto == PROTO_ICMP:
            echo = parse_icmp_echo(ip)
            if echo.type == ICMP_ECHO_REQUEST and self.nat_type != NatType.ONE2ONE:
                # Like most consumer routers, the WAN side does not answer pings.
                return self._drop(f"ICMP echo to WAN {ip.dst} from {ip.src} (unsolicited)")
        lan = self.nat.inbound(ip.proto, (ip.src, ports[0]), (ip.dst, ports[1]), now)
        if lan is None:
            return self._drop(self.nat.last_drop)
        if ip.ttl <= 1:
            return self._drop("TTL expired")
        mac = self.neighbors.get(lan[0])
        if mac is None:
            return self._drop(f"no neighbour {lan[0]} behind NAT")
        packet = rewrite_ipv4(ip, dst=lan[0], dport=lan[1], ttl=ip.ttl - 1)
        return self.switch.deliver(build_eth(mac, self.mac, ETH_IPV4, packet))
