"""The flow cache must forward exactly as the full path does, and stay out of the way of
anything that changes state."""
from __future__ import annotations

import random

import pytest

from framekit import World, decode, udp_frame
from vmlab.vnet import frames as F
from vmlab.vnet.core import node_mac, router_mac
from vmlab.vnet.flows import FLOW_CACHE_S
from vmlab.vnet.nat import NatType
from vmlab.vnet.tcp import TcpFlags, TcpSegment

from ipaddress import IPv4Address as IP


def _tcp(src_mac, dst_mac, src, dst, sport, dport, flags, payload, seq=1000):
    seg = TcpSegment(IP(src), sport, IP(dst), dport, seq, 5, flags, 65535, payload)
    packet = F.build_ipv4(IP(src), IP(dst), F.PROTO_TCP, F.build_tcp(seg), ident=seq & 0xFFFF)
    return F.build_eth(F.mac_bytes(dst_mac), F.mac_bytes(src_mac), F.ETH_IPV4, packet)


def _twin_worlds(nat):
    fast, slow = World(nat), World(nat)
    for w in (fast, slow):
        w.lease_all()
    return fast, slow


def _send_both(fast, slow, which, frame):
    a = fast.send(getattr(fast, which), frame)
    slow.vnet.flows.clear()
    b = slow.send(getattr(slow, which), frame)
    slow.vnet.flows.clear()
    return a, b


@pytest.mark.parametrize("nat", [NatType.EASY, NatType.HARD, NatType.ONE2ONE], ids=str)
def test_fast_path_forwards_exactly_like_the_full_path(nat):
    rng = random.Random(7)
    fast, slow = _twin_worlds(nat)
    frames = []
    for i in range(300):
        sport = 40000 + rng.randrange(4)
        size = rng.choice([0, 1, 100, 1400])
        payload = bytes(rng.randrange(256) for _ in range(size))
        if rng.random() < 0.5:
            frames.append(("a", udp_frame(node_mac(1), router_mac(1), "192.168.1.101", "5.6.7.8",
                                          sport, 3478, payload)))
        else:
            frames.append(("a", _tcp(node_mac(1), router_mac(1), "192.168.1.101", "5.6.7.8",
                                     sport, 80, TcpFlags.ACK | TcpFlags.PSH, payload, seq=i * 7)))
    for which, frame in frames:
        got, want = _send_both(fast, slow, which, frame)
        assert [(p.name, f) for p, f in got] == [(p.name, f) for p, f in want]
        for port, out in got:  # and what comes out is a valid frame
            _eth, ip, _l4 = decode(out)
            assert F.checksum(out[14:34]) == 0
            length = len(ip.payload).to_bytes(2, "big")
            pseudo = ip.src.packed + ip.dst.packed + bytes([0, ip.proto]) + length
            if not (ip.proto == F.PROTO_UDP and out[40:42] == b"\0\0"):
                assert F.checksum(pseudo + ip.payload) == 0
    assert fast.vnet.flows.hits > 200  # the fast path did the work


def test_cache_entries_expire_so_nat_state_is_revalidated():
    w = World(NatType.EASY)
    w.lease_all()
    frame = udp_frame(node_mac(1), router_mac(1), "192.168.1.101", "5.6.7.8", 40000, 3478, b"x")
    w.send(w.a, frame)
    w.send(w.a, frame)
    hits = w.vnet.flows.hits
    assert hits == 1
    w.now += FLOW_CACHE_S + 0.1
    w.send(w.a, frame)  # the full path again (the NAT mapping is refreshed there)
    assert w.vnet.flows.hits == hits


def test_state_changing_frames_clear_the_cache():
    w = World(NatType.EASY)
    w.lease_all()
    frame = udp_frame(node_mac(1), router_mac(1), "192.168.1.101", "5.6.7.8", 40000, 3478, b"x")
    w.send(w.a, frame)
    assert len(w.vnet.flows) == 1
    syn = _tcp(node_mac(1), router_mac(1), "192.168.1.101", "5.6.7.8", 40001, 80, TcpFlags.SYN, b"")
    w.send(w.a, syn)
    assert len(w.vnet.flows) == 0


def test_blackhole_and_link_down_bypass_the_cache():
    w = World(NatType.EASY)
    w.lease_all()
    frame = udp_frame(node_mac(1), router_mac(1), "192.168.1.101", "5.6.7.8", 40000, 3478, b"x")
    assert len(w.send(w.a, frame)) == 1
    w.vnet.set_blackhole("home", True)
    assert w.send(w.a, frame) == []
    w.vnet.set_blackhole("home", False)
    assert len(w.send(w.a, frame)) == 1
    assert len(w.send(w.a, frame)) == 1  # cached again
    w.vnet.set_link("c/eth0", False)
    assert w.send(w.a, frame) == []


def test_lan_switching_leaves_cached_flows_alone():
    w = World(NatType.EASY)
    w.lease_all()
    wan = udp_frame(node_mac(1), router_mac(1), "192.168.1.101", "5.6.7.8", 40000, 3478, b"x")
    lan = udp_frame(node_mac(1), node_mac(2), "192.168.1.101", "192.168.1.102", 5000, 6000, b"y")
    w.send(w.a, wan)
    assert w.send(w.a, lan) == [(w.b, lan)]
    assert len(w.vnet.flows) == 1
