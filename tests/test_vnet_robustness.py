"""Hostile input never crashes vnet, and every table stays bounded.

Property tests (hypothesis) feed random bytes and mutated valid frames of every protocol vnet
speaks into `VNet.receive`; a flood test then checks each table against its bound."""
from __future__ import annotations

import random
import struct
from ipaddress import IPv4Address as IP
from ipaddress import IPv6Network

from dnslib import DNSRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framekit import World, arp_request, dhcp_message, ping_frame, udp_frame
from vmlab.vnet import frames as F
from vmlab.vnet import ipv6 as V6
from vmlab.vnet.core import node_mac, router_mac
from vmlab.vnet.dns import DnsRecords, DnsServer
from vmlab.vnet.drops import MAX_DROP_REASONS
from vmlab.vnet.router import MAX_NEIGHBORS
from vmlab.vnet.services import DNS_VIP
from vmlab.vnet.switch import MAX_FDB_ENTRIES
from vmlab.vnet.tcp import TcpFlags, TcpSegment

A_MAC = node_mac(1)
GW = router_mac(1)


def _world() -> World:
    w = World()
    # give home an IPv6 /64 too, so NDP and IPv6 routing are exercised
    home = w.vnet.routers["home"]
    home.v6 = V6.Ipv6Lan(home, IPv6Network("2001:db8:1::/64"), DNS_VIP.ipv6)
    w.vnet.internet.add_prefix6(IPv6Network("2001:db8:1::/64"), home)
    for port in (w.a, w.b):
        home.v6.add_node_mac(port.mac)
    w.lease_all()
    return w


def _seeds() -> list[bytes]:
    a6 = V6.eui64_address(IPv6Network("2001:db8:1::/64"), F.mac_bytes(A_MAC))
    tcp = TcpSegment(IP("192.168.1.101"), 4000, IP("52.52.0.2"), 8008, 1, 0, TcpFlags.SYN, 65535,
                     b"", 1460)
    dns = DNSRecord.question("web.test").pack()
    rs = V6.build_icmpv6(a6, V6.ALL_NODES, V6.ND_ROUTER_SOLICIT, 0, b"\0" * 4)
    ns = V6.build_icmpv6(a6, V6.solicited_node(V6.ROUTER_LINK_LOCAL), V6.ND_NEIGHBOR_SOLICIT, 0,
                         struct.pack("!4x16s", V6.ROUTER_LINK_LOCAL.packed))
    return [
        arp_request(A_MAC, "192.168.1.101", "192.168.1.102"),
        dhcp_message(A_MAC, 1),
        ping_frame(A_MAC, GW, "192.168.1.101", "5.6.7.8"),
        udp_frame(A_MAC, GW, "192.168.1.101", str(DNS_VIP.ipv4), 5353, 53, dns),
        udp_frame(A_MAC, GW, "192.168.1.101", "52.52.0.78", 5000, 3478,
                  bytes.fromhex("000100002112a442") + b"\x01" * 12),
        F.build_eth(F.mac_bytes(GW), F.mac_bytes(A_MAC), F.ETH_IPV4,
                    F.build_ipv4(tcp.src_ip, tcp.dst_ip, F.PROTO_TCP, F.build_tcp(tcp))),
        F.build_eth(b"\x33\x33\0\0\0\x02", F.mac_bytes(A_MAC), F.ETH_IPV6,
                    V6.build_ipv6(a6, V6.ALL_NODES, V6.PROTO_ICMPV6, rs, hop_limit=255)),
        F.build_eth(V6.multicast_mac(V6.solicited_node(V6.ROUTER_LINK_LOCAL)), F.mac_bytes(A_MAC),
                    F.ETH_IPV6, V6.build_ipv6(a6, V6.solicited_node(V6.ROUTER_LINK_LOCAL),
                                              V6.PROTO_ICMPV6, ns, hop_limit=255)),
        F.build_eth(F.mac_bytes(GW), F.mac_bytes(A_MAC), F.ETH_IPV6,
                    V6.build_ipv6(a6, DNS_VIP.ipv6, F.PROTO_UDP,
                                  F.build_udp(a6, DNS_VIP.ipv6, 5353, 53, dns))),
    ]


SEEDS = _seeds()


@st.composite
def mutated_frames(draw):
    frame = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        i = draw(st.integers(0, len(frame) - 1))
        frame[i] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(frame)))
    if draw(st.booleans()):
        frame = frame[:cut]
    return bytes(frame)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.binary(max_size=200), mutated_frames()), max_size=8))
def test_hostile_frames_never_raise(frames):
    w = _world()
    for i, frame in enumerate(frames):
        port = (w.a, w.b, w.c)[i % 3]
        out = w.vnet.receive(port, frame, 1000.0 + i)
        assert isinstance(out, list)
        w.vnet.tick(1000.0 + i + 0.5)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_dns_server_survives_any_bytes(data):
    DnsServer(DnsRecords()).answer_udp(data)
    DnsServer(DnsRecords(), split=True).answer_tcp(data)


def test_tables_stay_bounded_under_a_flood():
    """A guest spraying source MACs, addresses and destinations cannot grow vnet's tables
    past their bounds (the switch's FDB, ARP and neighbour tables, IPv6 neighbours, drop
    reasons)."""
    w = _world()
    rng = random.Random(5)
    home = w.vnet.routers["home"]
    for i in range(6000):
        src_mac = bytes([0x52, 0x01]) + rng.randbytes(4)
        dst = f"{rng.randrange(1, 223)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        frame = udp_frame(F.mac_str(src_mac), GW, f"192.168.{rng.randrange(256)}.{rng.randrange(1, 255)}",
                          dst, rng.randrange(1, 65535), rng.randrange(1, 65535))
        w.vnet.receive(w.a, frame, 1000.0 + i * 0.001)
        # and unroutable IPv6 from spoofed in-prefix sources
        a6 = V6.eui64_address(IPv6Network("2001:db8:1::/64"), src_mac)
        p6 = V6.build_ipv6(a6, V6.eui64_address(IPv6Network(f"2001:db8:{i % 9000 + 10:x}::/64"),
                                                  src_mac), F.PROTO_UDP, b"\0" * 8)
        w.vnet.receive(w.a, F.build_eth(F.mac_bytes(GW), src_mac, F.ETH_IPV6, p6), 1000.0)
    assert len(home.switch.fdb) <= MAX_FDB_ENTRIES
    assert len(home.neighbors) <= MAX_NEIGHBORS and len(home.switch.arp) <= MAX_NEIGHBORS + 1
    assert len(home.v6.neighbors) <= V6.MAX_NEIGHBORS6
    for table in (w.vnet.internet.drops, home.drops, home.switch.drops, home.v6.drops):
        assert len(table) <= MAX_DROP_REASONS
    # reasons naming 6000 distinct addresses were folded, not kept one by one
    assert any("other reasons" in r for r in w.vnet.internet.drops)
