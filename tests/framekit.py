"""Synthetic frames and a small harness for vnet unit tests (no VM, no sockets)."""
from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network

from vmlab.vnet import frames as F
from vmlab.vnet.core import NetworkConfig, VNet, node_mac, router_mac
from vmlab.vnet.dhcp import MAGIC_COOKIE, parse_options
from vmlab.vnet.nat import NatType

IP = IPv4Address


def udp_frame(src_mac, dst_mac, src_ip, dst_ip, sport, dport, payload=b"x") -> bytes:
    udp = F.build_udp(IP(src_ip), IP(dst_ip), sport, dport, payload)
    ip = F.build_ipv4(IP(src_ip), IP(dst_ip), F.PROTO_UDP, udp)
    return F.build_eth(F.mac_bytes(dst_mac), F.mac_bytes(src_mac), F.ETH_IPV4, ip)


def ping_frame(src_mac, dst_mac, src_ip, dst_ip, ident=0x1234, seq=1, data=b"ping") -> bytes:
    icmp = F.build_icmp_echo(F.ICMP_ECHO_REQUEST, ident, seq, data)
    ip = F.build_ipv4(IP(src_ip), IP(dst_ip), F.PROTO_ICMP, icmp)
    return F.build_eth(F.mac_bytes(dst_mac), F.mac_bytes(src_mac), F.ETH_IPV4, ip)


def arp_request(src_mac, src_ip, target_ip) -> bytes:
    arp = F.build_arp(F.ARP_REQUEST, F.mac_bytes(src_mac), IP(src_ip), b"\0" * 6, IP(target_ip))
    return F.build_eth(F.BROADCAST_MAC, F.mac_bytes(src_mac), F.ETH_ARP, arp)


def dhcp_message(mac, kind: int, xid=0x1234, requested: str | None = None,
                 server: str | None = None, ciaddr: str = "0.0.0.0") -> bytes:
    mac_b = F.mac_bytes(mac)
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000,
                        IP(ciaddr).packed, b"\0" * 4, b"\0" * 4, b"\0" * 4,
                        mac_b + b"\0" * 10, b"", b"")
    opts = bytes([53, 1, kind])
    if requested:
        opts += bytes([50, 4]) + IP(requested).packed
    if server:
        opts += bytes([54, 4]) + IP(server).packed
    opts += bytes([12, 5]) + b"guest" + b"\xff"
    payload = bootp + MAGIC_COOKIE + opts
    src_ip = ciaddr
    return udp_frame(mac, "ff:ff:ff:ff:ff:ff", src_ip, "255.255.255.255", 68, 67, payload)


def decode(frame: bytes):
    """(eth, ip or None, l4 or None) for assertions."""
    eth = F.parse_eth(frame)
    if eth.ethertype != F.ETH_IPV4:
        return eth, None, None
    ip = F.parse_ipv4(eth.payload)
    l4 = None
    if ip.proto == F.PROTO_UDP:
        l4 = F.parse_udp(ip)
    elif ip.proto == F.PROTO_ICMP:
        l4 = F.parse_icmp_echo(ip)
    elif ip.proto == F.PROTO_TCP:
        l4 = F.parse_tcp(ip)
    return eth, ip, l4


def dhcp_reply_options(frame: bytes) -> tuple[IPv4Address, dict[int, bytes]]:
    _eth, _ip, udp = decode(frame)
    yiaddr = IPv4Address(udp.payload[16:20])
    opts = parse_options(udp.payload[240:])
    return yiaddr, opts


class World:
    """Two networks: 'home' (192.168.1.0/24 behind 2.1.1.1, NAT `home_nat`) with nodes
    1 and 2, and 'dc' (10.0.5.0/24 behind 5.6.7.8, one2one) with node 3."""

    def __init__(self, home_nat: NatType = NatType.EASY):
        self.events = []
        self.vnet = VNet(seed=1, on_event=lambda kind, data: self.events.append((kind, data)))
        self.vnet.add_network(NetworkConfig("home", IPv4Network("192.168.1.0/24"), IP("2.1.1.1"),
                                            home_nat, 1))
        self.vnet.add_network(NetworkConfig("dc", IPv4Network("10.0.5.0/24"), IP("5.6.7.8"),
                                            NatType.ONE2ONE, 2))
        self.a = self.vnet.add_port("a/eth0", "home", node_mac(1), IP("192.168.1.101"))
        self.b = self.vnet.add_port("b/eth0", "home", node_mac(2), IP("192.168.1.102"))
        self.c = self.vnet.add_port("c/eth0", "dc", node_mac(3), IP("10.0.5.103"))
        self.home_gw_mac = router_mac(1)
        self.dc_gw_mac = router_mac(2)
        self.now = 1000.0

    def send(self, port, frame: bytes):
        return self.vnet.receive(port, frame, self.now)

    def lease(self, port, ip: str, server: str):
        """Run DISCOVER/REQUEST so vnet knows the node (as a booting guest would)."""
        mac = F.mac_str(port.mac)
        self.send(port, dhcp_message(mac, 1))
        self.send(port, dhcp_message(mac, 3, requested=ip, server=server))

    def lease_all(self):
        self.lease(self.a, "192.168.1.101", "192.168.1.1")
        self.lease(self.b, "192.168.1.102", "192.168.1.1")
        self.lease(self.c, "10.0.5.103", "10.0.5.1")
