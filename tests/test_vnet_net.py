"""vnet's network services with synthetic frames: DNS (UDP, TC, TCP fallback, split zone),
IPv6 (RA/SLAAC, NDP, proxy NDP, routing without NAT), services on VIPs through NAT, link
conditions (loss/latency/bandwidth statistics with a seeded RNG and injected time), link cuts,
blackholes and pcap capture."""
from __future__ import annotations

import io
import random
import re
import shutil
import struct
import subprocess
from ipaddress import IPv4Address as IP
from ipaddress import IPv6Address as IP6
from ipaddress import IPv4Network, IPv6Network

import pytest
from dnslib import RCODE, DNSRecord

from framekit import World, decode, udp_frame
from vmlab.errors import ConfigError
from vmlab.vnet import frames as F
from vmlab.vnet import ipv6 as V6
from vmlab.vnet.conditions import MAX_QUEUED_FRAMES, LinkConditions, Shaper
from vmlab.vnet.core import NetworkConfig, VNet, node_mac, router_mac
from vmlab.vnet.dns import UDP_PLAIN_MAX, DnsRecords, DnsServer
from vmlab.vnet.nat import NatType
from vmlab.vnet.pcap import PcapWriter
from vmlab.vnet.services import DNS_VIP, DRIVER_VIP, SPLIT_DNS_VIP
from vmlab.vnet.switch import Port
from vmlab.vnet.tcp import TcpFlags, TcpSegment

A_MAC, B_MAC, C_MAC = node_mac(1), node_mac(2), node_mac(3)
HOME_GW = router_mac(1)


# --------------------------------------------------------------------------- helpers

def dns_query(name: str, qtype: str = "A", *, qid: int = 0x4242) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    return q.pack()


def ask_dns(w: World, query: bytes, server: IP = DNS_VIP.ipv4, sport: int = 40000):
    """Node a asks `server` over UDP through home's NAT; returns (reply DNSRecord, ip)."""
    out = w.send(w.a, udp_frame(A_MAC, HOME_GW, "192.168.1.101", str(server), sport, 53, query))
    assert len(out) == 1 and out[0][0] is w.a, w.vnet.drops()
    _eth, ip, udp = decode(out[0][1])
    assert (ip.src, udp.sport, udp.dport) == (server, 53, sport)
    return DNSRecord.parse(udp.payload), ip


def tcp_frame_from_a(dst: str, sport: int, dport: int, seq: int, ack: int, flags: int,
                     payload: bytes = b"", mss: int | None = 1460) -> bytes:
    seg = TcpSegment(IP("192.168.1.101"), sport, IP(dst), dport, seq, ack, flags, 65535,
                     payload, mss if flags & TcpFlags.SYN else None)
    ip = F.build_ipv4(IP("192.168.1.101"), IP(dst), F.PROTO_TCP, F.build_tcp(seg))
    return F.build_eth(F.mac_bytes(HOME_GW), F.mac_bytes(A_MAC), F.ETH_IPV4, ip)


def tcp_segments(out, port) -> list[TcpSegment]:
    segs = []
    for p, frame in out:
        if p is port:
            _eth, ip, seg = decode(frame)
            assert ip.proto == F.PROTO_TCP
            segs.append(seg)
    return segs


def v6_world(*, a_net_v4: bool = True):
    """Two IPv6 networks: 'home' (dual-stack unless a_net_v4 is False) with nodes 1 and 2 and
    'dc' (dual-stack) with node 3."""
    events = []
    vnet = VNet(seed=3, on_event=lambda k, d: events.append((k, d)))
    vnet.add_network(NetworkConfig("home", IPv4Network("192.168.1.0/24"),
                                   IP("2.1.1.1") if a_net_v4 else None, NatType.EASY, 1,
                                   lan6=IPv6Network("2001:db8:1::/64"), ipv4=a_net_v4))
    vnet.add_network(NetworkConfig("dc", IPv4Network("10.0.5.0/24"), IP("5.6.7.8"),
                                   NatType.ONE2ONE, 2, lan6=IPv6Network("2001:db8:2::/64")))
    a = vnet.add_port("a/eth0", "home", A_MAC, IP("192.168.1.101") if a_net_v4 else None)
    b = vnet.add_port("b/eth0", "home", B_MAC, IP("192.168.1.102") if a_net_v4 else None)
    c = vnet.add_port("c/eth0", "dc", C_MAC, IP("10.0.5.103"))
    return vnet, a, b, c


def slaac(prefix: str, mac: str) -> IP6:
    return V6.eui64_address(IPv6Network(prefix), F.mac_bytes(mac))


def v6_frame(src_mac, dst_mac, src: IP6, dst: IP6, proto: int, payload: bytes,
             hop_limit: int = 64) -> bytes:
    return F.build_eth(F.mac_bytes(dst_mac), F.mac_bytes(src_mac), F.ETH_IPV6,
                       V6.build_ipv6(src, dst, proto, payload, hop_limit=hop_limit))


def icmp6_frame(src_mac, dst_mac, src: IP6, dst: IP6, typ: int, body: bytes,
                hop_limit: int = 64) -> bytes:
    return v6_frame(src_mac, dst_mac, src, dst, V6.PROTO_ICMPV6,
                    V6.build_icmpv6(src, dst, typ, 0, body), hop_limit)


def ns_frame(src_mac, src: IP6, target: IP6) -> bytes:
    body = struct.pack("!4x16s", target.packed)
    if src != IP6("::"):
        body += bytes([V6.OPT_SOURCE_LLADDR, 1]) + F.mac_bytes(src_mac)
    dst = V6.solicited_node(target)
    return icmp6_frame(src_mac, F.mac_str(V6.multicast_mac(dst)), src, dst,
                       V6.ND_NEIGHBOR_SOLICIT, body, hop_limit=255)


def decode6(frame: bytes):
    eth = F.parse_eth(frame)
    assert eth.ethertype == F.ETH_IPV6
    ip = V6.parse_ipv6(eth.payload)
    icmp = V6.parse_icmpv6(ip) if ip.proto == V6.PROTO_ICMPV6 else None
    return eth, ip, icmp


# --------------------------------------------------------------------------- DNS

def test_dns_answers_registered_name_through_nat_and_nxdomain_for_unknown():
    w = World()
    w.lease_all()
    w.vnet.dns_records.register("web.test", ["8.8.4.4", "2001:db8:9::1"])
    reply, _ = ask_dns(w, dns_query("web.test", "A"))
    assert reply.header.rcode == RCODE.NOERROR and reply.header.id == 0x4242
    assert [str(r.rdata) for r in reply.rr] == ["8.8.4.4"]
    assert reply.rr[0].ttl == 60
    reply, _ = ask_dns(w, dns_query("WEB.test.", "AAAA"), sport=40001)
    assert [str(r.rdata) for r in reply.rr] == ["2001:db8:9::1"]
    reply, _ = ask_dns(w, dns_query("nope.test"), sport=40002)
    assert reply.header.rcode == RCODE.NXDOMAIN and reply.rr == []
    reply, _ = ask_dns(w, dns_query("web.test", "MX"), sport=40003)
    assert reply.header.rcode == RCODE.NOERROR and reply.rr == []  # NODATA


def test_dns_knows_vip_names():
    w = World()
    w.lease_all()
    reply, _ = ask_dns(w, dns_query(DRIVER_VIP.name, "A"))
    assert [str(r.rdata) for r in reply.rr] == [str(DRIVER_VIP.ipv4)]


def test_split_zone_is_answered_only_by_the_split_server():
    w = World()
    w.lease_all()
    w.vnet.dns_records.register("db.corp.test", ["10.99.1.1"], split=True)
    reply, _ = ask_dns(w, dns_query("db.corp.test"))
    assert reply.header.rcode == RCODE.NXDOMAIN
    reply, _ = ask_dns(w, dns_query("db.corp.test"), server=SPLIT_DNS_VIP.ipv4, sport=40001)
    assert [str(r.rdata) for r in reply.rr] == ["10.99.1.1"]
    with pytest.raises(ValueError, match="one zone"):
        w.vnet.dns_records.register("db.corp.test", ["10.99.1.2"])


def _big_name(w: World, n: int = 60) -> list[str]:
    ips = [f"7.7.{i // 250}.{i % 250 + 1}" for i in range(n)]
    w.vnet.dns_records.register("big.test", ips)
    return ips


def test_large_answer_over_udp_sets_tc_and_edns_raises_the_limit():
    w = World()
    w.lease_all()
    _big_name(w, 60)  # 60 A records: ~980 bytes, over 512
    reply, ip = ask_dns(w, dns_query("big.test"))
    assert reply.header.tc == 1 and reply.rr == []
    assert len(ip.payload) - 8 <= UDP_PLAIN_MAX
    q = DNSRecord.question("big.test", "A")
    q.add_ar(__import__("dnslib").EDNS0(udp_len=4096))
    reply, _ = ask_dns(w, q.pack(), sport=40001)
    assert reply.header.tc == 0 and len(reply.rr) == 60  # fits in 1232


def test_large_answer_is_complete_over_tcp_through_nat():
    w = World()
    w.lease_all()
    ips = _big_name(w, 120)  # ~1.9 kB: more than one segment's worth with a small MSS
    dst = str(DNS_VIP.ipv4)
    out = w.send(w.a, tcp_frame_from_a(dst, 41000, 53, 1000, 0, TcpFlags.SYN, mss=536))
    (synack,) = tcp_segments(out, w.a)
    assert synack.flags & TcpFlags.SYN and synack.flags & TcpFlags.ACK
    assert synack.src_ip == DNS_VIP.ipv4 and synack.ack == 1001
    query = dns_query("big.test")
    framed = len(query).to_bytes(2, "big") + query
    out = w.send(w.a, tcp_frame_from_a(dst, 41000, 53, 1001, synack.seq + 1, TcpFlags.ACK | TcpFlags.PSH,
                                       framed))
    data = b""
    rcv = synack.seq + 1
    for _ in range(20):  # ACK what arrives until the whole message is in
        segs = tcp_segments(out, w.a)
        segs += tcp_segments(w.vnet.tick(w.now), w.a)
        for seg in segs:
            if seg.payload and seg.seq == rcv:
                data += seg.payload
                rcv += len(seg.payload)
        if len(data) >= 2 and len(data) >= 2 + int.from_bytes(data[:2], "big"):
            break
        out = w.send(w.a, tcp_frame_from_a(dst, 41000, 53, 1001 + len(framed), rcv, TcpFlags.ACK))
    length = int.from_bytes(data[:2], "big")
    reply = DNSRecord.parse(data[2:2 + length])
    assert reply.header.tc == 0 and sorted(str(r.rdata) for r in reply.rr) == sorted(ips)
    # the service saw the post-NAT client, and the guest saw the VIP: nothing leaked the LAN
    conn = w.vnet.internet.tcp.connections[0]
    assert conn.remote[0] == IP("2.1.1.1")


@pytest.mark.parametrize("query", [b"", b"\x12", b"\x00" * 11, b"\xff" * 40,
                                   dns_query("x.test")[:20]])
def test_dns_server_never_raises_on_garbage(query):
    server = DnsServer(DnsRecords())
    reply = server.answer_udp(query)
    if reply is not None:
        r = DNSRecord.parse(reply)
        assert r.header.qr == 1 and r.header.rcode in (RCODE.FORMERR, RCODE.NXDOMAIN, RCODE.NOERROR)


def test_dns_server_ignores_responses_and_rejects_bad_names():
    server = DnsServer(DnsRecords())
    response = DNSRecord.question("a.test").reply().pack()
    assert server.answer_udp(response) is None
    with pytest.raises(ValueError):
        DnsRecords().register("bad..name", ["1.2.3.4"])
    with pytest.raises(ValueError):
        DnsRecords().register("x" * 64 + ".test", ["1.2.3.4"])


# --------------------------------------------------------------------------- IPv6

def test_eui64_slaac_address():
    assert slaac("2001:db8:1::/64", "52:cc:cc:cc:01:00") == IP6("2001:db8:1::50cc:ccff:fecc:100")


def test_router_solicitation_gets_ra_with_prefix_rdnss_and_router_mac():
    vnet, a, _b, _c = v6_world()
    ll = V6.link_local_address(F.mac_bytes(A_MAC))
    rs = icmp6_frame(A_MAC, "33:33:00:00:00:02", ll, IP6("ff02::2"), V6.ND_ROUTER_SOLICIT,
                     b"\0" * 4, hop_limit=255)
    out = vnet.receive(a, rs, 10.0)
    ras = [(p, f) for p, f in out if decode6(f)[2] is not None
           and decode6(f)[2].type == V6.ND_ROUTER_ADVERT]
    assert {p.name for p, _ in ras} == {"a/eth0", "b/eth0"}  # to all nodes
    eth, ip, icmp = decode6(ras[0][1])
    assert eth.dst == b"\x33\x33\x00\x00\x00\x01" and eth.src == F.mac_bytes(HOME_GW)
    assert ip.src == V6.ROUTER_LINK_LOCAL and ip.ttl == 255
    lifetime = struct.unpack_from("!H", icmp.body, 2)[0]
    assert lifetime > 0
    opts = V6.parse_nd_options(icmp.body[12:])
    assert opts[V6.OPT_SOURCE_LLADDR] == F.mac_bytes(HOME_GW)
    plen, flags = opts[V6.OPT_PREFIX_INFO][0], opts[V6.OPT_PREFIX_INFO][1]
    assert plen == 64 and flags & 0xC0 == 0xC0  # on-link, autonomous: SLAAC
    assert IP6(opts[V6.OPT_PREFIX_INFO][14:30]) == IP6("2001:db8:1::")
    assert IP6(opts[V6.OPT_RDNSS][6:22]) == DNS_VIP.ipv6
    # and periodic unsolicited RAs follow, on vnet's timer
    assert vnet.next_deadline() is not None and vnet.next_deadline() <= 10.0 + V6.RA_INTERVAL_S
    later = vnet.tick(10.0 + V6.RA_INTERVAL_S)
    assert any(decode6(f)[2].type == V6.ND_ROUTER_ADVERT for _, f in later)


def test_neighbour_solicitation_for_router_and_proxy_ndp_for_nodes():
    vnet, a, b, _c = v6_world()
    a_addr, b_addr = slaac("2001:db8:1::/64", A_MAC), slaac("2001:db8:1::/64", B_MAC)
    out = vnet.receive(a, ns_frame(A_MAC, a_addr, V6.ROUTER_LINK_LOCAL), 1.0)
    assert len(out) == 1 and out[0][0] is a
    eth, ip, icmp = decode6(out[0][1])
    assert icmp.type == V6.ND_NEIGHBOR_ADVERT and icmp.body[0] & 0xE0 == 0xE0  # R, S, O
    assert IP6(icmp.body[4:20]) == V6.ROUTER_LINK_LOCAL
    assert V6.parse_nd_options(icmp.body[20:])[V6.OPT_TARGET_LLADDR] == F.mac_bytes(HOME_GW)
    # proxy NDP: b's address is answered with b's MAC, and b is not bothered
    out = vnet.receive(a, ns_frame(A_MAC, a_addr, b_addr), 1.0)
    assert [p for p, _ in out] == [a]
    eth, ip, icmp = decode6(out[0][1])
    assert ip.src == b_addr and icmp.body[0] & 0x80 == 0  # not a router
    assert V6.parse_nd_options(icmp.body[20:])[V6.OPT_TARGET_LLADDR] == F.mac_bytes(B_MAC)


def test_duplicate_address_detection_is_never_answered_for_a_node():
    vnet, a, b, _c = v6_world()
    a_addr = slaac("2001:db8:1::/64", A_MAC)
    out = vnet.receive(a, ns_frame(A_MAC, IP6("::"), a_addr), 1.0)
    # flooded to b like any multicast, but no NA comes back to a (it would fail DAD)
    assert all(p is b for p, _ in out)


def test_ipv6_routed_between_networks_without_nat_and_back():
    vnet, a, _b, c = v6_world()
    a_addr, c_addr = slaac("2001:db8:1::/64", A_MAC), slaac("2001:db8:2::/64", C_MAC)
    echo = V6.build_icmpv6(a_addr, c_addr, V6.ICMPV6_ECHO_REQUEST, 0, b"\x00\x07\x00\x01hi")
    out = vnet.receive(a, v6_frame(A_MAC, HOME_GW, a_addr, c_addr, V6.PROTO_ICMPV6, echo), 1.0)
    assert len(out) == 1 and out[0][0] is c, vnet.drops()
    eth, ip, icmp = decode6(out[0][1])
    assert (ip.src, ip.dst, ip.ttl) == (a_addr, c_addr, 62)  # no NAT; two routers
    assert eth.dst == F.mac_bytes(C_MAC) and eth.src == F.mac_bytes(router_mac(2))
    assert icmp.type == V6.ICMPV6_ECHO_REQUEST  # checksum still valid (parse checks it)
    reply = V6.build_icmpv6(c_addr, a_addr, V6.ICMPV6_ECHO_REPLY, 0, icmp.body)
    out = vnet.receive(c, v6_frame(C_MAC, router_mac(2), c_addr, a_addr, V6.PROTO_ICMPV6, reply),
                       1.1)
    assert len(out) == 1 and out[0][0] is a
    assert decode6(out[0][1])[2].type == V6.ICMPV6_ECHO_REPLY


def test_ipv6_vip_answers_ping_and_driver_listens_on_its_ipv6_vip():
    vnet, a, _b, _c = v6_world()
    a_addr = slaac("2001:db8:1::/64", A_MAC)
    echo = V6.build_icmpv6(a_addr, DNS_VIP.ipv6, V6.ICMPV6_ECHO_REQUEST, 0, b"\x00\x01\x00\x01")
    out = vnet.receive(a, v6_frame(A_MAC, HOME_GW, a_addr, DNS_VIP.ipv6, V6.PROTO_ICMPV6, echo),
                       1.0)
    assert len(out) == 1 and decode6(out[0][1])[2].type == V6.ICMPV6_ECHO_REPLY
    accepted = []
    vnet.listen_tcp_vip(DRIVER_VIP.ipv6, 8008, accepted.append, "driver (IPv6)")
    syn = TcpSegment(a_addr, 50000, DRIVER_VIP.ipv6, 8008, 7, 0, TcpFlags.SYN, 65535, b"", 1440)
    out = vnet.receive(a, v6_frame(A_MAC, HOME_GW, a_addr, DRIVER_VIP.ipv6, F.PROTO_TCP,
                                   F.build_tcp(syn)), 1.0)
    assert len(out) == 1
    _eth, ip, _ = decode6(out[0][1])
    seg = F.parse_tcp(ip)
    assert seg.flags & TcpFlags.SYN and seg.flags & TcpFlags.ACK and seg.ack == 8
    # the TCP checksum over the IPv6 pseudo-header is right
    assert F.checksum(ip.payload, F._pseudo_sum(ip.src_b, ip.dst_b, F.PROTO_TCP,
                                                len(ip.payload))) == 0


def test_ipv6_only_network_drops_ipv4_and_v4_only_network_drops_ipv6():
    vnet, a, _b, _c = v6_world(a_net_v4=False)
    out = vnet.receive(a, udp_frame(A_MAC, HOME_GW, "192.168.1.101", "5.6.7.8", 1, 2), 1.0)
    assert out == [] and any("IPv6-only" in r for r in vnet.drops())
    w = World()
    a_addr = slaac("2001:db8:1::/64", A_MAC)
    out = w.send(w.a, icmp6_frame(A_MAC, HOME_GW, a_addr, IP6("2001:db8:2::1"),
                                  V6.ICMPV6_ECHO_REQUEST, b"\0" * 4))
    assert out == [] and any("without an IPv6 prefix" in r for r in w.vnet.drops())


def test_link_local_source_is_not_routed():
    vnet, a, _b, c = v6_world()
    ll = V6.link_local_address(F.mac_bytes(A_MAC))
    c_addr = slaac("2001:db8:2::/64", C_MAC)
    out = vnet.receive(a, icmp6_frame(A_MAC, HOME_GW, ll, c_addr, V6.ICMPV6_ECHO_REQUEST,
                                      b"\0" * 4), 1.0)
    assert out == [] and any("link-local source" in r for r in vnet.drops())


# --------------------------------------------------------------------------- services on VIPs

def test_udp_service_reached_through_nat_sees_post_nat_source():
    w = World()
    w.lease_all()
    seen = []

    def handler(data, src):
        seen.append(src)
        return data.upper()
    w.vnet.serve_udp(IP("9.9.9.9"), 9999, handler, "test echo")
    out = w.send(w.a, udp_frame(A_MAC, HOME_GW, "192.168.1.101", "9.9.9.9", 5555, 9999, b"abc"))
    assert len(out) == 1 and out[0][0] is w.a
    _eth, ip, udp = decode(out[0][1])
    assert (ip.src, udp.sport, udp.payload) == (IP("9.9.9.9"), 9999, b"ABC")
    assert seen[0][0] == IP("2.1.1.1")  # after NAT, as a real server sees it
    # from the one2one network too
    out = w.send(w.c, udp_frame(C_MAC, router_mac(2), "10.0.5.103", "9.9.9.9", 6000, 9999, b"x"))
    assert len(out) == 1 and out[0][0] is w.c and seen[1] == (IP("5.6.7.8"), 6000)


def test_tcp_service_on_a_public_address_through_nat_and_closed_port_reset():
    w = World()
    w.lease_all()
    accepted = []
    w.vnet.listen_tcp_vip(IP("8.8.4.4"), 80, accepted.append, "test web")
    out = w.send(w.a, tcp_frame_from_a("8.8.4.4", 42000, 80, 5, 0, TcpFlags.SYN))
    (synack,) = tcp_segments(out, w.a)
    assert synack.src_ip == IP("8.8.4.4") and synack.flags & TcpFlags.SYN
    w.send(w.a, tcp_frame_from_a("8.8.4.4", 42000, 80, 6, synack.seq + 1, TcpFlags.ACK))
    assert len(accepted) == 1 and accepted[0].remote[0] == IP("2.1.1.1")
    out = w.send(w.a, tcp_frame_from_a("8.8.4.4", 42001, 81, 5, 0, TcpFlags.SYN))
    (rst,) = tcp_segments(out, w.a)
    assert rst.flags & TcpFlags.RST


def test_http_handler_serves_routes():
    import asyncio
    from vmlab.vnet.services import HttpResponse, http_handler

    class FakeStream:
        remote = ("2.1.1.1", 1234)

        def __init__(self, data: bytes):
            self.inp = io.BytesIO(data)
            self.out = b""

        async def readline(self):
            return self.inp.readline()

        async def readexactly(self, n):
            return self.inp.read(n)

        def write(self, data):
            self.out += data

        async def drain(self):
            pass

    async def echo(req):
        return req.body[::-1]
    handle = http_handler({"/": "hi", "/echo": echo, "/teapot": HttpResponse(418, "tea"),
                           "/boom": lambda r: 1 / 0})
    s = FakeStream(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                   b"POST /echo HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"
                   b"GET /teapot HTTP/1.1\r\n\r\nGET /boom HTTP/1.1\r\n\r\n"
                   b"GET /missing HTTP/1.1\r\nConnection: close\r\n\r\n")
    asyncio.run(handle(s))
    text = s.out.decode()
    statuses = re.findall(r"HTTP/1.1 (\d{3}) ", text)
    assert statuses == ["200", "200", "418", "500", "404"]
    assert "\r\n\r\nhi" in text and "\r\n\r\ncba" in text and "ZeroDivisionError" in text


# --------------------------------------------------------------------------- link conditions

def test_conditions_are_validated():
    for bad in (dict(loss=1.5), dict(latency_ms=-1), dict(jitter_ms=float("nan")),
                dict(bandwidth_kbit=0)):
        with pytest.raises(ConfigError):
            LinkConditions(**bad)


def test_loss_statistics_with_seeded_rng():
    port = Port("a/eth0", b"\x52" * 6, "home")
    shaper = Shaper(LinkConditions(loss=0.2), random.Random(7))
    kept = sum(shaper.submit(port, b"x" * 60, 0.0) for _ in range(20_000))
    assert abs(kept / 20_000 - 0.8) < 0.01
    assert shaper.drops["loss (link conditions)"] == 20_000 - kept


def test_latency_and_jitter_statistics_keep_order():
    port = Port("a/eth0", b"\x52" * 6, "home")
    shaper = Shaper(LinkConditions(latency_ms=50, jitter_ms=10), random.Random(7))
    sent = {}
    for i in range(2000):
        now = i * 0.02  # one frame every 20 ms: jitter never forces queueing behind the last
        assert shaper.submit(port, i.to_bytes(4, "big"), now) is False
        sent[i] = now
    got = []
    t = 0.0
    while shaper.queued:
        t = shaper.next_deadline()
        got += [(int.from_bytes(f, "big"), t) for _, f in shaper.due(t)]
    assert [i for i, _ in got] == list(range(2000))  # FIFO per port
    delays = [(at - sent[i]) * 1000 for i, at in got]
    assert 40 - 1e-6 <= min(delays) and max(delays) <= 60 + 1e-6
    assert abs(sum(delays) / len(delays) - 50) < 1.0
    assert max(delays) - min(delays) > 15  # the jitter is really there


def test_bandwidth_serialises_frames():
    port = Port("a/eth0", b"\x52" * 6, "home")
    shaper = Shaper(LinkConditions(bandwidth_kbit=1000), random.Random(1))
    for _ in range(100):
        shaper.submit(port, b"x" * 1250, 0.0)  # 10 ms each at 1 Mbit/s
    assert shaper.next_deadline() == pytest.approx(0.01)
    assert len(shaper.due(0.5 + 1e-9)) == 50
    assert len(shaper.due(1.0 + 1e-9)) == 50


def test_shaper_queue_is_bounded():
    port = Port("a/eth0", b"\x52" * 6, "home")
    shaper = Shaper(LinkConditions(latency_ms=1000), random.Random(1))
    for _ in range(MAX_QUEUED_FRAMES + 10):
        shaper.submit(port, b"x", 0.0)
    assert shaper.queued == MAX_QUEUED_FRAMES and sum(shaper.drops.values()) == 10


def test_vnet_delays_delivery_until_its_deadline():
    w = World()
    w.lease_all()
    w.vnet.set_conditions("home", LinkConditions(latency_ms=30))
    frame = udp_frame(A_MAC, B_MAC, "192.168.1.101", "192.168.1.102", 1, 2, b"late")
    assert w.send(w.b, udp_frame(B_MAC, A_MAC, "192.168.1.102", "192.168.1.101", 3, 4)) == []
    assert w.send(w.a, frame) == []
    assert w.vnet.next_deadline() == pytest.approx(w.now + 0.030)
    assert w.vnet.tick(w.now + 0.029) == []
    out = w.vnet.tick(w.now + 0.030)
    assert (w.b, frame) in out
    w.vnet.set_conditions("home", None)
    assert w.send(w.a, frame) == [(w.b, frame)]


def test_link_cut_drops_both_ways_and_restores():
    w = World()
    w.lease_all()
    frame = udp_frame(A_MAC, B_MAC, "192.168.1.101", "192.168.1.102", 1, 2)
    w.vnet.set_link("b/eth0", False)
    assert w.send(w.a, frame) == []
    assert w.send(w.b, udp_frame(B_MAC, A_MAC, "192.168.1.102", "192.168.1.101", 1, 2)) == []
    drops = w.vnet.drops()
    assert drops["b/eth0: link down (frame to the node)"] == 1
    assert drops["b/eth0: link down (frame from the node)"] == 1
    w.vnet.set_link("b/eth0", True)
    assert w.send(w.a, frame) == [(w.b, frame)]


def test_blackhole_cuts_wan_but_keeps_lan_and_dns():
    w = World()
    w.lease_all()
    w.vnet.set_blackhole("home", True)
    out = w.send(w.a, udp_frame(A_MAC, HOME_GW, "192.168.1.101", "5.6.7.8", 1, 2))
    assert out == [] and w.vnet.drops()["home: WAN blackholed (out)"] == 1
    out = w.send(w.c, udp_frame(C_MAC, router_mac(2), "10.0.5.103", "2.1.1.1", 1, 2))
    assert out == []
    reply, _ = ask_dns(w, dns_query(DRIVER_VIP.name))  # vmlab's VIPs stay reachable
    assert reply.rr
    frame = udp_frame(A_MAC, B_MAC, "192.168.1.101", "192.168.1.102", 1, 2)
    assert w.send(w.a, frame) == [(w.b, frame)]
    w.vnet.set_blackhole("home", False)
    assert len(w.send(w.a, udp_frame(A_MAC, HOME_GW, "192.168.1.101", "5.6.7.8", 1, 2))) == 1


# --------------------------------------------------------------------------- pcap

def _pcap_blocks(data: bytes):
    i = 0
    while i < len(data):
        kind, length = struct.unpack_from("<II", data, i)
        yield kind, data[i + 8:i + length - 4]
        i += length


def _capture_some_traffic() -> tuple[bytes, World]:
    w = World()
    buf = io.BytesIO()
    writer = PcapWriter(buf, epoch_offset=1_700_000_000.0 - 1000.0)
    buf.close = lambda: None  # keep the bytes readable after writer.close()
    w.vnet.set_tap(writer)
    w.lease_all()
    w.send(w.a, udp_frame(A_MAC, HOME_GW, "192.168.1.101", "5.6.7.8", 1111, 2222, b"pcap!"))
    writer.close()
    return buf.getvalue(), w


def test_pcapng_has_interfaces_per_nic_and_router_side():
    data, _ = _capture_some_traffic()
    blocks = list(_pcap_blocks(data))
    assert blocks[0][0] == 0x0A0D0D0A
    names = []
    for kind, body in blocks:
        if kind == 1:
            linktype = struct.unpack_from("<H", body)[0]
            name = body[8 + 4:8 + 4 + struct.unpack_from("<H", body, 10)[0]].decode()
            names.append((name, linktype))
    assert ("a/eth0", 1) in names and ("home-lan", 1) in names
    assert ("home-wan", 101) in names and ("dc-wan", 101) in names and ("c/eth0", 1) in names
    epbs = [body for kind, body in blocks if kind == 6]
    assert epbs and sum(b"pcap!" in b for b in epbs) == 6  # a, home-lan, 2 WANs, dc-lan, c


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed (setup.sh)")
def test_tshark_reads_the_capture(tmp_path):
    data, _ = _capture_some_traffic()
    path = tmp_path / "t.pcapng"
    path.write_bytes(data)
    r = subprocess.run(["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name",
                        "-e", "ip.src", "-e", "ip.dst", "-Y", "udp.port == 2222"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    rows = [line.split("\t") for line in r.stdout.splitlines()]
    assert ["a/eth0", "192.168.1.101", "5.6.7.8"] in rows
    assert ["home-wan", "2.1.1.1", "5.6.7.8"] in rows  # after NAT
    assert ["c/eth0", "2.1.1.1", "10.0.5.103"] in rows
