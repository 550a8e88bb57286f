"""vnet with synthetic frames: ARP, DHCP, ICMP, NAT mapping and filtering, routing, VIP TCP."""
from __future__ import annotations

from ipaddress import IPv4Address as IP

import pytest

from framekit import (World, arp_request, decode, dhcp_message, dhcp_reply_options, ping_frame,
                      udp_frame)
from vmlab.vnet import frames as F
from vmlab.vnet.core import node_mac, router_mac
from vmlab.vnet.dhcp import ACK, NAK, OFFER
from vmlab.vnet.internet import TEST_DRIVER_IPV4, TEST_DRIVER_PORT
from vmlab.vnet.nat import NatType
from vmlab.vnet.tcp import TcpFlags, TcpSegment

A_MAC, B_MAC, C_MAC = node_mac(1), node_mac(2), node_mac(3)


# --------------------------------------------------------------------------- ARP

def test_arp_for_gateway_is_answered_with_router_mac():
    w = World()
    out = w.send(w.a, arp_request(A_MAC, "192.168.1.101", "192.168.1.1"))
    assert len(out) == 1
    port, frame = out[0]
    assert port is w.a
    eth = F.parse_eth(frame)
    arp = F.parse_arp(eth.payload)
    assert arp.op == F.ARP_REPLY
    assert arp.sha == F.mac_bytes(router_mac(1)) and arp.spa == IP("192.168.1.1")
    assert arp.tpa == IP("192.168.1.101") and eth.dst == F.mac_bytes(A_MAC)


def test_proxy_arp_answers_for_leased_node_and_floods_unknown():
    w = World()
    w.lease_all()
    out = w.send(w.a, arp_request(A_MAC, "192.168.1.101", "192.168.1.102"))
    assert [p for p, _ in out] == [w.a]
    assert F.parse_arp(F.parse_eth(out[0][1]).payload).sha == F.mac_bytes(B_MAC)
    out = w.send(w.a, arp_request(A_MAC, "192.168.1.101", "192.168.1.77"))
    assert [p for p, _ in out] == [w.b]  # flooded to the other port of the same LAN only


def test_unicast_switching_between_lan_ports():
    w = World()
    w.lease_all()
    frame = udp_frame(A_MAC, B_MAC, "192.168.1.101", "192.168.1.102", 5000, 6000, b"hi")
    out = w.send(w.a, frame)
    assert out == [(w.b, frame)]


# --------------------------------------------------------------------------- DHCP

def test_whole_dhcp_exchange_gives_deterministic_address():
    w = World()
    out = w.send(w.a, dhcp_message(A_MAC, 1, xid=7))
    offers = [f for p, f in out if p is w.a]
    assert len(offers) == 1
    yiaddr, opts = dhcp_reply_options(offers[0])
    assert yiaddr == IP("192.168.1.101")
    assert opts[53] == bytes([OFFER])
    assert opts[1] == IP("255.255.255.0").packed
    # DNS is vnet's resolver VIP, not the gateway (the gateway serves no DNS).
    assert opts[3] == IP("192.168.1.1").packed and opts[6] == IP("52.52.0.53").packed
    assert opts[54] == IP("192.168.1.1").packed
    out = w.send(w.a, dhcp_message(A_MAC, 3, xid=7, requested="192.168.1.101",
                                   server="192.168.1.1"))
    yiaddr, opts = dhcp_reply_options([f for p, f in out if p is w.a][0])
    assert opts[53] == bytes([ACK]) and yiaddr == IP("192.168.1.101")
    assert int.from_bytes(opts[51], "big") > 0
    kinds = [d["kind"] for k, d in w.events if k == "dhcp"]
    assert kinds == ["discover", "offer", "request", "ack"]
    # the lease taught vnet the node's address: ARP for it is now answered
    out = w.send(w.b, arp_request(B_MAC, "192.168.1.102", "192.168.1.101"))
    assert F.parse_arp(F.parse_eth(out[0][1]).payload).sha == F.mac_bytes(A_MAC)


def test_dhcp_request_for_wrong_address_gets_nak_and_unknown_mac_is_ignored():
    w = World()
    out = w.send(w.a, dhcp_message(A_MAC, 3, requested="192.168.1.55", server="192.168.1.1"))
    _, opts = dhcp_reply_options([f for p, f in out if p is w.a][0])
    assert opts[53] == bytes([NAK])
    out = w.send(w.a, dhcp_message("52:00:00:00:00:99", 1))
    assert [f for p, f in out if p is w.a] == []


def test_dhcp_renewal_with_ciaddr_is_acked():
    w = World()
    w.lease(w.a, "192.168.1.101", "192.168.1.1")
    out = w.send(w.a, dhcp_message(A_MAC, 3, ciaddr="192.168.1.101"))
    _, opts = dhcp_reply_options([f for p, f in out if p is w.a][0])
    assert opts[53] == bytes([ACK])


# --------------------------------------------------------------------------- ICMP

def test_gateway_answers_ping():
    w = World()
    w.lease_all()
    out = w.send(w.a, ping_frame(A_MAC, router_mac(1), "192.168.1.101", "192.168.1.1",
                                 ident=9, seq=3, data=b"abc"))
    assert len(out) == 1 and out[0][0] is w.a
    _eth, ip, echo = decode(out[0][1])
    assert ip.src == IP("192.168.1.1") and ip.dst == IP("192.168.1.101")
    assert (echo.type, echo.ident, echo.seq, echo.data) == (0, 9, 3, b"abc")
    assert F.checksum(ip.payload) == 0  # valid ICMP checksum


# --------------------------------------------------------------------------- NAT and routing

def test_ping_through_easy_nat_to_public_node_and_back():
    w = World()
    w.lease_all()
    out = w.send(w.a, ping_frame(A_MAC, router_mac(1), "192.168.1.101", "5.6.7.8", ident=77))
    assert len(out) == 1 and out[0][0] is w.c
    eth, ip, echo = decode(out[0][1])
    assert ip.src == IP("2.1.1.1") and ip.dst == IP("10.0.5.103")  # NATed at both ends
    assert eth.dst == F.mac_bytes(C_MAC) and ip.ttl == 62
    wan_ident = echo.ident
    # carol answers; the reply finds its way back to alice with alice's identifier
    reply = F.build_icmp_echo(0, wan_ident, echo.seq, echo.data)
    frame = F.build_eth(F.mac_bytes(router_mac(2)), F.mac_bytes(C_MAC), F.ETH_IPV4,
                        F.build_ipv4(IP("10.0.5.103"), IP("2.1.1.1"), F.PROTO_ICMP, reply))
    out = w.send(w.c, frame)
    assert len(out) == 1 and out[0][0] is w.a
    _eth, ip, echo = decode(out[0][1])
    assert ip.src == IP("5.6.7.8") and ip.dst == IP("192.168.1.101") and echo.ident == 77


def _udp_out(w, sport, dst, dport):
    out = w.send(w.a, udp_frame(A_MAC, router_mac(1), "192.168.1.101", dst, sport, dport))
    assert len(out) == 1, w.vnet.drops()
    _eth, ip, udp = decode(out[0][1])
    return ip, udp


def _udp_in(w, src_ip, sport, wan_port):
    """Carol (public) sends UDP to home's WAN IP; returns what reaches the LAN."""
    frame = udp_frame(C_MAC, router_mac(2), "10.0.5.103", "2.1.1.1", sport, wan_port, b"in")
    return w.send(w.c, frame)


def test_easy_nat_maps_endpoint_independently_and_filters_by_address_and_port():
    w = World(NatType.EASY)
    w.lease_all()
    ip, udp = _udp_out(w, 40000, "5.6.7.8", 3478)
    assert ip.src == IP("2.1.1.1") and ip.dst == IP("10.0.5.103")
    assert udp.sport == 40000  # port preserved when free and inside the public range
    _ip, low = _udp_out(w, 4000, "5.6.7.8", 3478)
    assert 32768 <= low.sport <= 65535  # a port outside the range is remapped into it
    # the same inside endpoint to another port of the peer: the same public port (EIM)
    _ip2, udp2 = _udp_out(w, 40000, "5.6.7.8", 3479)
    assert udp2.sport == udp.sport
    # carol answers from the port alice sent to: admitted, delivered to alice's port 4000
    out = _udp_in(w, "5.6.7.8", 3478, udp.sport)
    assert len(out) == 1 and out[0][0] is w.a
    _eth, ip_in, udp_in = decode(out[0][1])
    assert (ip_in.dst, udp_in.dport, ip_in.src, udp_in.sport) == (IP("192.168.1.101"), 40000,
                                                                   IP("5.6.7.8"), 3478)
    # from a port alice never sent to: filtered (address-and-port-dependent filtering)
    assert _udp_in(w, "5.6.7.8", 9999, udp.sport) == []
    assert any("filtered" in r for r in w.vnet.drops())
    # to a public port with no mapping at all: unsolicited
    assert _udp_in(w, "5.6.7.8", 3478, 12345) == []
    assert any("unsolicited" in r for r in w.vnet.drops())


def test_easy_nat_mapping_expires_and_outbound_refreshes_it():
    from vmlab.vnet.nat import MAPPING_TIMEOUT_S
    w = World(NatType.EASY)
    w.lease_all()
    _ip, udp = _udp_out(w, 4000, "5.6.7.8", 3478)
    w.now += MAPPING_TIMEOUT_S - 1
    _udp_out(w, 4000, "5.6.7.8", 3478)  # refresh
    w.now += MAPPING_TIMEOUT_S - 1
    assert len(_udp_in(w, "5.6.7.8", 3478, udp.sport)) == 1
    w.now += MAPPING_TIMEOUT_S + 1
    assert _udp_in(w, "5.6.7.8", 3478, udp.sport) == []


def test_hard_nat_maps_each_destination_to_its_own_port():
    w = World(NatType.HARD)
    w.lease_all()
    _ip, u1 = _udp_out(w, 4000, "5.6.7.8", 3478)
    _ip, u2 = _udp_out(w, 4000, "5.6.7.8", 3479)
    assert u1.sport != u2.sport
    assert len(_udp_in(w, "5.6.7.8", 3479, u2.sport)) == 1
    assert _udp_in(w, "5.6.7.8", 3478, u2.sport) == []


def test_one2one_admits_unsolicited_inbound_and_keeps_ports():
    w = World()
    w.lease_all()
    # alice -> carol's WAN IP, arbitrary port: one2one lets it in to carol, same port
    out = w.send(w.a, udp_frame(A_MAC, router_mac(1), "192.168.1.101", "5.6.7.8", 5000, 7777))
    assert len(out) == 1 and out[0][0] is w.c
    _eth, ip, udp = decode(out[0][1])
    assert ip.dst == IP("10.0.5.103") and udp.dport == 7777
    assert F.parse_udp(ip) is not None


def test_public_node_cannot_reach_lan_unsolicited():
    w = World()
    w.lease_all()
    # ping to the home router's WAN: dropped, not answered
    out = w.send(w.c, ping_frame(C_MAC, router_mac(2), "10.0.5.103", "2.1.1.1"))
    assert out == []
    # ping to a private LAN address: the internet has no route
    out = w.send(w.c, ping_frame(C_MAC, router_mac(2), "10.0.5.103", "192.168.1.101"))
    assert out == []
    drops = w.vnet.drops()
    assert any("unsolicited" in r for r in drops)
    assert any("no route to 192.168.1.101" in r for r in drops)


def test_routing_keeps_checksums_valid():
    w = World()
    w.lease_all()
    out = w.send(w.a, udp_frame(A_MAC, router_mac(1), "192.168.1.101", "5.6.7.8", 4000, 53,
                                b"query" * 20))
    _eth, ip, udp = decode(out[0][1])
    assert F.checksum(out[0][1][14:34]) == 0  # IPv4 header
    pseudo = ip.src.packed + ip.dst.packed + bytes([0, 17]) + len(ip.payload).to_bytes(2, "big")
    assert F.checksum(pseudo + ip.payload) == 0  # UDP with pseudo-header


def test_ttl_one_is_not_forwarded():
    w = World()
    w.lease_all()
    icmp = F.build_icmp_echo(8, 1, 1, b"")
    packet = F.build_ipv4(IP("192.168.1.101"), IP("5.6.7.8"), F.PROTO_ICMP, icmp, ttl=1)
    out = w.send(w.a, F.build_eth(F.mac_bytes(router_mac(1)), F.mac_bytes(A_MAC), F.ETH_IPV4, packet))
    assert out == [] and any("TTL" in r for r in w.vnet.drops())


@pytest.mark.parametrize("frame", [
    b"", b"\x01" * 5, b"\xff" * 14, b"\xff" * 13 + b"\x08",
    bytes.fromhex("52eeeeeeee01" "52cccccc0100" "0800") + b"\x45" + b"\x00" * 10,
    bytes.fromhex("ffffffffffff" "52cccccc0100" "0806") + b"\x00\x01",
])
def test_malformed_frames_are_dropped_not_raised(frame):
    w = World()
    assert w.send(w.a, frame) in ([], [(w.b, frame)])


# --------------------------------------------------------------------------- TCP to the driver VIP

def test_tcp_handshake_and_data_to_driver_vip():
    w = World()
    w.lease_all()
    accepted = []
    received = []

    def on_accept(router, conn):
        accepted.append((router.name, conn))
        conn.on_data = received.append

    w.vnet.listen_tcp(TEST_DRIVER_IPV4, TEST_DRIVER_PORT, on_accept, "driver")

    def tcp(seq, ack, flags, payload=b"", mss=None):
        seg = TcpSegment(IP("192.168.1.101"), 40000, TEST_DRIVER_IPV4, TEST_DRIVER_PORT,
                         seq, ack, flags, 64240, payload, mss)
        packet = F.build_ipv4(seg.src_ip, seg.dst_ip, F.PROTO_TCP, F.build_tcp(seg))
        return F.build_eth(F.mac_bytes(router_mac(1)), F.mac_bytes(A_MAC), F.ETH_IPV4, packet)

    out = w.send(w.a, tcp(1000, 0, TcpFlags.SYN, mss=1460))
    assert len(out) == 1 and out[0][0] is w.a
    _eth, ip, synack = decode(out[0][1])
    assert ip.src == TEST_DRIVER_IPV4 and synack.flags & TcpFlags.SYN and synack.flags & TcpFlags.ACK
    assert synack.ack == 1001 and synack.mss
    server_isn = synack.seq
    w.send(w.a, tcp(1001, server_isn + 1, TcpFlags.ACK))
    assert len(accepted) == 1 and accepted[0][0] == "home"
    out = w.send(w.a, tcp(1001, server_isn + 1, TcpFlags.ACK | TcpFlags.PSH, b"VMLAB-AGENT 1 {}\n"))
    assert b"".join(received) == b"VMLAB-AGENT 1 {}\n"
    # data from the driver side reaches the guest, from the VIP
    conn = accepted[0][1]
    conn.send(b"GET /status HTTP/1.1\r\n\r\n")
    out = w.vnet.routers["home"].flush_tcp(w.now)
    datas = [decode(f)[2] for p, f in out if p is w.a]
    assert b"".join(s.payload for s in datas) == b"GET /status HTTP/1.1\r\n\r\n"
    assert all(decode(f)[1].src == TEST_DRIVER_IPV4 for p, f in out)


def test_tcp_to_vip_port_without_listener_is_reset():
    w = World()
    w.lease_all()
    w.vnet.listen_tcp(TEST_DRIVER_IPV4, TEST_DRIVER_PORT, lambda r, c: None, "driver")
    seg = TcpSegment(IP("192.168.1.101"), 40000, TEST_DRIVER_IPV4, 9999, 5, 0, TcpFlags.SYN,
                     64240, b"", 1460)
    packet = F.build_ipv4(seg.src_ip, seg.dst_ip, F.PROTO_TCP, F.build_tcp(seg))
    out = w.send(w.a, F.build_eth(F.mac_bytes(router_mac(1)), F.mac_bytes(A_MAC), F.ETH_IPV4, packet))
    assert len(out) == 1
    _eth, ip, rst = decode(out[0][1])
    assert ip.src == TEST_DRIVER_IPV4 and rst.flags & TcpFlags.RST and rst.ack == 6


def test_udp_to_closed_gateway_port_gets_port_unreachable():
    # A resolver pointed at the gateway must fail at once, not wait out its timeouts
    # (python's http.server does a reverse lookup before it listens).
    w = World()
    w.lease_all()
    query = udp_frame(A_MAC, router_mac(1), "192.168.1.101", "192.168.1.1", 5353, 53, b"q")
    out = w.send(w.a, query)
    assert len(out) == 1 and out[0][0] is w.a
    _eth, ip, _ = decode(out[0][1])
    assert ip.proto == F.PROTO_ICMP and ip.src == IP("192.168.1.1")
    assert ip.payload[:2] == bytes([3, 3]) and F.checksum(ip.payload) == 0
    assert ip.payload[8:28] == query[14:34]  # quotes the original IP header
