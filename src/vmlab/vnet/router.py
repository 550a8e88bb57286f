"""The router of one network: the LAN's gateway, its NAT, and its link to the internet.

LAN side it answers pings to the gateway, sends echo requests of its own for `lan_ping`
(`echo_request`, replies land in `echo_replies`), serves DHCP, terminates TCP for VIPs that are
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
from .drops import count_drop
from .frames import (BROADCAST_MAC, ETH_IPV4, ETH_IPV6, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST,
                     ICMP_PORT_UNREACHABLE, PROTO_ICMP, build_icmp_unreachable,
                     PROTO_TCP, PROTO_UDP, Ethernet, build_eth, build_icmp_echo, build_ipv4,
                     build_tcp, build_udp, l4_ports, parse_icmp_echo, parse_ipv4, parse_tcp,
                     parse_udp, rewrite_ipv4)
from .nat import NatBehavior, NatTable, NatType, make_nat_table, resolve_nat
from .portmap import SSDP_ADDR, UPNP_HTTP_PORT, PortMapper, PortMapProtocol
from .switch import Emit, Switch
from .tcp import TcpStack

if TYPE_CHECKING:
    from .internet import Internet

__all__ = ["Router", "MAX_NEIGHBORS"]

log = logging.getLogger("vmlab.vnet.router")

DHCP_SERVER_PORT, DHCP_CLIENT_PORT = 67, 68
#: built once: parsing an address string per packet showed up in vnet's profile
_LIMITED_BROADCAST = IPv4Address("255.255.255.255")
#: Bound on the LAN neighbour table.
MAX_NEIGHBORS = 4096
#: Bound on the gateway's own outstanding echo requests and their recorded replies.
MAX_ECHOES = 256


class Router:
    def __init__(self, *, name: str, mac: bytes, lan: IPv4Network, gateway: IPv4Address,
                 wan_ip: IPv4Address, nat: "NatBehavior | NatType | str", internet: "Internet",
                 address_for: Callable[[bytes], IPv4Address | None],
                 dns: list[IPv4Address], rng: random.Random,
                 on_event: Callable[[str, object], None],
                 port_mapping: frozenset[PortMapProtocol] = frozenset()):
        self.name = name
        self.mac = mac
        self.lan = lan
        self.gateway = gateway
        self.wan_ip = wan_ip
        self.nat_behavior = resolve_nat(nat)
        #: the preset's name ("easy", "one2one", ...; "custom" for a NatBehavior of its own)
        self.nat_type = self.nat_behavior.name
        self.internet = internet
        self.switch = Switch(name, self)
        self.switch.arp[gateway] = mac
        self.neighbors: dict[IPv4Address, bytes] = {}
        self.dhcp = DhcpServer(prefix=lan, gateway=gateway, dns=dns, address_for=address_for)
        self.nat: NatTable = make_nat_table(self.nat_behavior, wan_ip, self._sole_lan_ip, rng,
                                            lan=lan)
        #: userspace TCP for VIPs intercepted on the LAN side (one stack per network, because
        #: two networks may use the same LAN prefix and so the same 4-tuples)
        self.tcp = TcpStack()
        #: NAT-PMP/PCP/UPnP server on the gateway, if the network offers port mapping
        self.portmap: PortMapper | None = None
        if port_mapping:
            self.portmap = PortMapper(port_mapping, self.nat, gateway=gateway, wan_ip=wan_ip,
                                      lan=lan, name=name)
            if PortMapProtocol.UPNP in port_mapping:
                self.tcp.listen(gateway, UPNP_HTTP_PORT, self.portmap.accept_http)
        self.on_event = on_event
        self.drops: dict[str, int] = {}
        #: the network's IPv6 side (ipv6.Ipv6Lan), set by VNet for networks with a /64
        self.v6 = None
        #: False on an IPv6-only network: IPv4 from the LAN is dropped, DHCPv4 not served
        self.ipv4 = True
        #: True cuts the WAN: nothing crosses it either way, except traffic to and from
        #: vmlab's own VIPs (`internet.blackhole_exempt`); the LAN keeps working
        self.blackholed = False
        self.log = log.getChild(name)
        #: (ident, seq) -> when the gateway sent that echo request (oldest evicted first)
        self._echoes_sent: dict[tuple[int, int], float] = {}
        #: (ident, seq) -> (who answered, round trip in s); the caller pops what it awaits
        self.echo_replies: dict[tuple[int, int], tuple[IPv4Address, float]] = {}

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
        count_drop(self.drops, reason)
        self.log.debug("drop: %s", reason)
        return []

    # ------------------------------------------------------------------ LAN side

    def from_lan(self, eth: Ethernet, now: float) -> list[Emit]:
        if eth.ethertype != ETH_IPV4:
            if eth.ethertype == ETH_IPV6:
                if self.v6 is not None:
                    return self.v6.from_lan(eth, now)
                return self._drop("IPv6 on a network without an IPv6 prefix")
            return []  # ARP is the switch's
        if not self.ipv4:
            return self._drop("IPv4 on an IPv6-only network")
        ip = parse_ipv4(eth.payload)
        if ip is None:
            return self._drop("malformed IPv4 from LAN")
        if ip.src in self.lan and ip.src != self.gateway:
            self.learn_neighbor(ip.src, eth.src)
        if ip.proto == PROTO_UDP:
            udp = parse_udp(ip)
            if udp is not None and udp.dport == DHCP_SERVER_PORT and udp.sport == DHCP_CLIENT_PORT:
                return self._dhcp(eth, udp.payload, now)
        if self.portmap is not None and ip.dst == SSDP_ADDR and ip.proto == PROTO_UDP:
            out = self._portmap_udp(ip, now)  # UPnP discovery, multicast to every router
            if out is not None:
                return out
        if ip.dst == _LIMITED_BROADCAST or eth.dst != self.mac:
            return []
        if ip.dst == self.gateway:
            return self._to_gateway(eth, ip, now)
        if ip.proto == PROTO_TCP and not ip.is_fragment:
            seg = parse_tcp(ip)
            # The driver's VIP is ours whatever the port: a port nobody serves gets a RST.
            # Other VIPs' services live on the internet, after the NAT (internet.py).
            if seg is not None and (self.tcp.handles(seg)
                                    or seg.dst_ip in self.internet.lan_tcp_vips):
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

    def _to_gateway(self, eth: Ethernet, ip, now: float) -> list[Emit]:
        if self.portmap is not None and not ip.is_fragment:
            if ip.proto == PROTO_UDP:
                out = self._portmap_udp(ip, now)
                if out is not None:
                    return out
            elif ip.proto == PROTO_TCP:
                seg = parse_tcp(ip)
                if seg is not None and self.tcp.handles(seg):
                    self.portmap.now = now  # the UPnP HTTP handler runs inside receive()
                    self.tcp.receive(seg, now)
                    return self.flush_tcp(now)
        if ip.proto == PROTO_ICMP:
            echo = parse_icmp_echo(ip)
            if echo is not None and echo.type == ICMP_ECHO_REQUEST:
                reply = build_ipv4(self.gateway, ip.src, PROTO_ICMP,
                                   build_icmp_echo(ICMP_ECHO_REPLY, echo.ident, echo.seq, echo.data))
                return [(p, f) for p, f in self.switch.deliver(
                    build_eth(eth.src, self.mac, ETH_IPV4, reply))]
            if echo is not None and echo.type == ICMP_ECHO_REPLY:
                sent = self._echoes_sent.pop((echo.ident, echo.seq), None)
                if sent is None:
                    return self._drop("echo reply to the gateway that it did not ask for")
                self.echo_replies[(echo.ident, echo.seq)] = (ip.src, now - sent)
                return []
        if ip.proto == PROTO_UDP:
            # Say so, as a real host does: a resolver or client then fails at once instead of
            # waiting out its timeouts.
            icmp = build_icmp_unreachable(ICMP_PORT_UNREACHABLE, eth.payload)
            reply = build_ipv4(self.gateway, ip.src, PROTO_ICMP, icmp)
            self._drop("UDP to a closed port of the gateway (answered port unreachable)")
            return self.switch.deliver(build_eth(eth.src, self.mac, ETH_IPV4, reply))
        return self._drop(f"nothing listens on the gateway for protocol {ip.proto}")

    def echo_request(self, dst: IPv4Address, ident: int, seq: int, now: float,
                     payload: bytes = b"vmlab lan_ping") -> list[Emit]:
        """The frames of an ICMP echo request from the gateway to LAN address `dst`. A reply
        is recorded in `echo_replies[(ident, seq)]` as (source, round trip seconds)."""
        mac = self.neighbors.get(dst)
        if mac is None:
            return self._drop(f"no neighbour {dst} for the gateway's echo request")
        while len(self._echoes_sent) >= MAX_ECHOES:
            self._echoes_sent.pop(next(iter(self._echoes_sent)))
        while len(self.echo_replies) >= MAX_ECHOES:
            self.echo_replies.pop(next(iter(self.echo_replies)))
        self._echoes_sent[(ident, seq)] = now
        packet = build_ipv4(self.gateway, dst, PROTO_ICMP,
                            build_icmp_echo(ICMP_ECHO_REQUEST, ident, seq, payload))
        return self.switch.deliver(build_eth(mac, self.mac, ETH_IPV4, packet))

    def _portmap_udp(self, ip, now: float) -> list[Emit] | None:
        """NAT-PMP/PCP/SSDP from the LAN: the port mapper's answers as LAN frames, or None if
        the datagram is not for it."""
        udp = parse_udp(ip)
        if udp is None:
            return None
        replies = self.portmap.handle_udp((ip.src, udp.sport), (ip.dst, udp.dport), udp.payload,
                                          now)
        if replies is None:
            return None
        out: list[Emit] = []
        for (sip, sport), (dip, dport), payload in replies:
            mac = self.neighbors.get(dip)
            if mac is None:
                self._drop(f"no neighbour {dip} for a port-mapping reply")
                continue
            packet = build_ipv4(sip, dip, PROTO_UDP, build_udp(sip, dip, sport, dport, payload))
            out += self.switch.deliver(build_eth(mac, self.mac, ETH_IPV4, packet))
        return out

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
        if self.blackholed and ip.dst not in self.internet.blackhole_exempt:
            return self._drop("WAN blackholed (out)")
        if ip.is_fragment:
            return self._drop("IPv4 fragment (NAT needs whole datagrams)")
        ports = l4_ports(ip)
        if ports is None:
            return self._drop(f"protocol {ip.proto} cannot cross the NAT")
        if (ip.proto == PROTO_ICMP and self.nat_behavior.translates_ports
                and parse_icmp_echo(ip).type != ICMP_ECHO_REQUEST):
            return self._drop("ICMP echo reply from LAN: only one2one and routed networks let "
                              "pings in")
        if ip.dst == self.wan_ip and not self.nat_behavior.hairpinning:
            return self._drop(f"hairpinning is off: {ip.src} sent to its own WAN IP {ip.dst}")
        wan = self.nat.outbound(ip.proto, (ip.src, ports[0]), (ip.dst, ports[1]), now,
                                _tcp_flags(ip))
        if wan is None:
            return self._drop(self.nat.last_drop)
        packet = rewrite_ipv4(ip, src=wan[0], sport=wan[1], ttl=ip.ttl - 1)
        return self.internet.route(packet, now)

    def from_wan(self, packet: bytes, now: float) -> list[Emit]:
        """A packet the internet routed to our WAN IP."""
        ip = parse_ipv4(packet)
        if ip is None:
            return self._drop("malformed IPv4 from WAN")
        if self.blackholed and ip.src not in self.internet.blackhole_exempt:
            return self._drop("WAN blackholed (in)")
        if ip.is_fragment:
            return self._drop("IPv4 fragment from WAN")
        ports = l4_ports(ip)
        if ports is None:
            return self._drop(f"protocol {ip.proto} from WAN has no NAT state")
        if ip.proto == PROTO_ICMP:
            echo = parse_icmp_echo(ip)
            if echo.type == ICMP_ECHO_REQUEST and self.nat_behavior.translates_ports:
                # Like most consumer routers, the WAN side does not answer pings.
                return self._drop(f"ICMP echo to WAN {ip.dst} from {ip.src} (unsolicited)")
        lan = self.nat.inbound(ip.proto, (ip.src, ports[0]), (ip.dst, ports[1]), now,
                               _tcp_flags(ip))
        if lan is None:
            return self._drop(self.nat.last_drop)
        if ip.ttl <= 1:
            return self._drop("TTL expired")
        mac = self.neighbors.get(lan[0])
        if mac is None:
            return self._drop(f"no neighbour {lan[0]} behind NAT")
        packet = rewrite_ipv4(ip, dst=lan[0], dport=lan[1], ttl=ip.ttl - 1)
        return self.switch.deliver(build_eth(mac, self.mac, ETH_IPV4, packet))


def _tcp_flags(ip) -> int:
    """The TCP flags byte of a packet (0 for other protocols), for the NAT's TCP tracking."""
    if ip.proto == PROTO_TCP and len(ip.payload) >= 14:
        return ip.payload[13]
    return 0
