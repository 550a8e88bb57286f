"""NAT behaviours with synthetic frames: mapping and filtering matrices for every preset,
port preservation, port ranges, hairpinning, UDP/TCP/ICMP timeouts, routed networks."""
from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address as IP, IPv4Network

import pytest

from framekit import decode, ping_frame, udp_frame
from vmlab import Env
from vmlab.errors import ConfigError
from vmlab.vnet import frames as F
from vmlab.vnet.core import NetworkConfig, VNet, node_mac, router_mac
from vmlab.vnet.nat import (MAPPING_TIMEOUT_S, NAT_TYPES, TCP_ESTABLISHED_TIMEOUT_S,
                            TCP_TRANSITORY_TIMEOUT_S, NatBehavior, NatType)
from vmlab.vnet.tcp import TcpFlags, TcpSegment

A_MAC, B_MAC, C_MAC, D_MAC = (node_mac(i) for i in (1, 2, 3, 4))
HOME_WAN = "2.1.1.1"
C_PUB, D_PUB = "5.6.7.8", "6.6.6.6"


class NatWorld:
    """'home' (192.168.1.0/24 behind 2.1.1.1 with the NAT under test) holds nodes a and b;
    two one2one networks hold c (public 5.6.7.8) and d (public 6.6.6.6), the outside peers."""

    def __init__(self, nat, home_lan="192.168.1.0/24", port_mapping=frozenset()):
        self.vnet = VNet(seed=7)
        self.home = self.vnet.add_network(NetworkConfig("home", IPv4Network(home_lan), IP(HOME_WAN),
                                                        nat, 1, port_mapping=port_mapping))
        self.vnet.add_network(NetworkConfig("c", IPv4Network("10.0.3.0/24"), IP(C_PUB),
                                            NatType.ONE2ONE, 2))
        self.vnet.add_network(NetworkConfig("d", IPv4Network("10.0.4.0/24"), IP(D_PUB),
                                            NatType.ONE2ONE, 3))
        net = IPv4Network(home_lan)
        self.a_ip, self.b_ip = str(net.network_address + 101), str(net.network_address + 102)
        self.a = self.vnet.add_port("a/eth0", "home", A_MAC, IP(self.a_ip))
        self.b = self.vnet.add_port("b/eth0", "home", B_MAC, IP(self.b_ip))
        self.c = self.vnet.add_port("c/eth0", "c", C_MAC, IP("10.0.3.103"))
        self.d = self.vnet.add_port("d/eth0", "d", D_MAC, IP("10.0.4.104"))
        self.now = 1000.0

    def send(self, port, frame):
        return self.vnet.receive(port, frame, self.now)

    def out(self, sport, dst, dport, src="a"):
        """UDP from a (or b) to an outside peer; returns the (ip, port) it arrived from, or None."""
        port, mac, ip = (self.a, A_MAC, self.a_ip) if src == "a" else (self.b, B_MAC, self.b_ip)
        got = self.send(port, udp_frame(mac, router_mac(1), ip, dst, sport, dport))
        if not got:
            return None
        _eth, pkt, udp = decode(got[0][1])
        return (str(pkt.src), udp.sport)

    def inbound(self, peer, sport, wan_port, proto=F.PROTO_UDP):
        """UDP from outside peer ('c' or 'd') to home's WAN; returns where on the LAN it lands."""
        port, mac, lan_ip, gw = ((self.c, C_MAC, "10.0.3.103", router_mac(2)) if peer == "c"
                                 else (self.d, D_MAC, "10.0.4.104", router_mac(3)))
        got = self.send(port, udp_frame(mac, gw, lan_ip, HOME_WAN, sport, wan_port, b"in"))
        if not got:
            return None
        _eth, pkt, udp = decode(got[0][1])
        return (str(pkt.dst), udp.dport)

    def drops(self) -> str:
        return "\n".join(self.vnet.drops())


NAPT_PRESETS = [t for t, b in NAT_TYPES.items() if b.translation.value == "napt"]

# preset -> (same IP other port reuses the mapping, other IP reuses it,
#            other port of the same IP admitted, other IP admitted)
MATRIX = {
    NatType.EASY: (True, True, False, False),
    NatType.EASYAF: (True, True, True, False),
    NatType.HARD: (False, False, False, False),
    NatType.FULL_CONE: (True, True, True, True),
    NatType.RESTRICTED_CONE: (True, True, True, False),
    NatType.PORT_RESTRICTED_CONE: (True, True, False, False),
    NatType.SYMMETRIC: (False, False, False, False),
}


def test_matrix_covers_every_translating_preset():
    assert set(MATRIX) == set(NAPT_PRESETS)


@pytest.mark.parametrize("kind", NAPT_PRESETS, ids=lambda k: k.value)
def test_mapping_behaviour_of_preset(kind):
    same_ip_reuses, other_ip_reuses, _, _ = MATRIX[kind]
    w = NatWorld(kind)
    first = w.out(4000, C_PUB, 3478)
    other_port = w.out(4000, C_PUB, 3479)
    other_ip = w.out(4000, D_PUB, 3478)
    assert first[0] == other_port[0] == other_ip[0] == HOME_WAN
    assert (other_port == first) is same_ip_reuses
    assert (other_ip == first) is other_ip_reuses
    assert w.out(4000, C_PUB, 3478) == first  # the same destination always reuses it


@pytest.mark.parametrize("kind", NAPT_PRESETS, ids=lambda k: k.value)
def test_filtering_behaviour_of_preset(kind):
    _, _, other_port_in, other_ip_in = MATRIX[kind]
    w = NatWorld(kind)
    _ip, wan_port = w.out(4000, C_PUB, 3478)
    assert w.inbound("c", 3478, wan_port) == (w.a_ip, 4000)  # the peer itself: always
    assert (w.inbound("c", 9999, wan_port) is not None) is other_port_in
    assert (w.inbound("d", 3478, wan_port) is not None) is other_ip_in
    if not other_ip_in:
        assert "filtered" in w.drops()


@pytest.mark.parametrize("kind", NAPT_PRESETS, ids=lambda k: k.value)
def test_port_preservation_of_preset(kind):
    w = NatWorld(kind)
    _ip, port = w.out(40000, C_PUB, 3478)
    assert (port == 40000) is NAT_TYPES[kind].port_preservation
    # whatever the preset, a port below the range is never kept
    _ip, low = w.out(4000, C_PUB, 3478)
    assert 32768 <= low <= 65535


@pytest.mark.parametrize("mapping, filtering, reuse_port, reuse_ip, in_port, in_ip", [
    ("endpoint-independent", "endpoint-independent", True, True, True, True),
    ("address-dependent", "address-dependent", True, False, True, False),
    ("address-dependent", "address-and-port-dependent", True, False, False, False),
    ("address-and-port-dependent", "endpoint-independent", False, False, True, True),
], ids=["eim-eif", "adm-adf", "adm-apdf", "apdm-eif"])
def test_any_combination_by_flags(mapping, filtering, reuse_port, reuse_ip, in_port, in_ip):
    w = NatWorld(NatBehavior(mapping=mapping, filtering=filtering))
    first = w.out(4000, C_PUB, 3478)
    assert (w.out(4000, C_PUB, 3479) == first) is reuse_port
    assert (w.out(4000, D_PUB, 3478) == first) is reuse_ip
    w2 = NatWorld(NatBehavior(mapping=mapping, filtering=filtering))
    _ip, port = w2.out(4000, C_PUB, 3478)
    assert (w2.inbound("c", 9999, port) is not None) is in_port
    assert (w2.inbound("d", 3478, port) is not None) is in_ip


def test_port_range_is_honoured_and_exhaustion_is_reported():
    w = NatWorld(NatBehavior(port_range=(50000, 50001), port_preservation=False))
    ports = {w.out(4000 + i, C_PUB, 3478)[1] for i in range(2)}
    assert ports == {50000, 50001}
    assert w.out(4002, C_PUB, 3478) is None
    assert "port range exhausted" in w.drops()
    w.now += MAPPING_TIMEOUT_S + 1  # the old mappings expire and free their ports
    assert w.out(4002, C_PUB, 3478)[1] in (50000, 50001)


def test_port_preservation_falls_back_when_the_port_is_taken():
    w = NatWorld(NatBehavior(port_range=(1024, 65535)))
    assert w.out(5000, C_PUB, 1, src="a") == (HOME_WAN, 5000)
    _ip, port = w.out(5000, C_PUB, 1, src="b")
    assert port != 5000 and 1024 <= port <= 65535


# --------------------------------------------------------------------------- hairpinning

def test_hairpinning_translates_the_source_and_keeps_filtering():
    w = NatWorld(NatType.EASY)
    _ip, pa = w.out(4000, C_PUB, 1, src="a")
    _ip, pb = w.out(5000, C_PUB, 1, src="b")
    # b -> a's public endpoint: a never sent to b's public endpoint, so a's NAT filter drops it
    assert w.out(5000, HOME_WAN, pa, src="b") is None
    assert "filtered" in w.drops()
    # ... but b's mapping now admits a, so a -> b's public endpoint gets through, from a's
    # public endpoint (RFC 4787 REQ-9b), not its private one
    got = w.send(w.a, udp_frame(A_MAC, router_mac(1), w.a_ip, HOME_WAN, 4000, pb))
    assert len(got) == 1 and got[0][0] is w.b
    _eth, pkt, udp = decode(got[0][1])
    assert (str(pkt.src), udp.sport, str(pkt.dst), udp.dport) == (HOME_WAN, pa, w.b_ip, 5000)


def test_hairpinning_off_drops_with_reason():
    w = NatWorld(NatType.HARD)
    _ip, pb = w.out(5000, C_PUB, 1, src="b")
    assert w.out(4000, HOME_WAN, pb, src="a") is None
    assert "hairpinning is off" in w.drops()


def test_full_cone_hairpin_needs_no_prior_packet():
    w = NatWorld(NatType.FULL_CONE)
    _ip, pb = w.out(5000, C_PUB, 1, src="b")
    got = w.send(w.a, udp_frame(A_MAC, router_mac(1), w.a_ip, HOME_WAN, 4000, pb))
    assert [p for p, _ in got] == [w.b]


# --------------------------------------------------------------------------- timeouts

def test_udp_mapping_expires_refreshes_on_outbound_only():
    w = NatWorld(NatType.EASY)
    _ip, port = w.out(4000, C_PUB, 3478)
    w.now += MAPPING_TIMEOUT_S - 10
    assert w.inbound("c", 3478, port) is not None  # inbound does not refresh by default
    w.now += 11
    assert w.inbound("c", 3478, port) is None
    assert "unsolicited" in w.drops()


def test_inbound_refresh_flag_keeps_a_mapping_alive():
    w = NatWorld(NatBehavior(inbound_refresh=True, udp_timeout_s=100))
    _ip, port = w.out(4000, C_PUB, 3478)
    for _ in range(5):
        w.now += 90
        assert w.inbound("c", 3478, port) is not None


def test_filter_entries_expire_per_peer():
    w = NatWorld(NatType.EASY)
    _ip, port = w.out(4000, C_PUB, 3478)
    w.now += 200
    w.out(4000, D_PUB, 3478)  # refreshes the mapping and admits d, not c
    w.now += 150
    assert w.inbound("d", 3478, port) is not None
    assert w.inbound("c", 3478, port) is None


def test_icmp_query_mapping_uses_its_own_timeout():
    w = NatWorld(NatBehavior(icmp_timeout_s=30))
    got = w.send(w.a, ping_frame(A_MAC, router_mac(1), w.a_ip, C_PUB, ident=77))
    _eth, _pkt, echo = decode(got[0][1])
    wan_ident = echo.ident
    reply = F.build_icmp_echo(0, wan_ident, 1, b"ping")

    def reply_in():
        pkt = F.build_ipv4(IP("10.0.3.103"), IP(HOME_WAN), F.PROTO_ICMP, reply)
        return w.send(w.c, F.build_eth(F.mac_bytes(router_mac(2)), F.mac_bytes(C_MAC),
                                       F.ETH_IPV4, pkt))
    w.now += 29
    assert len(reply_in()) == 1
    w.now += 2
    assert reply_in() == []


def _tcp(w, from_, flags, sport=4000, dport=443, wan_port=None):
    """A TCP segment with `flags`, a -> c:dport (from_='a') or c -> home WAN (from_='c')."""
    if from_ == "a":
        seg = TcpSegment(IP(w.a_ip), sport, IP(C_PUB), dport, 1, 1, flags, 65535, b"", None)
        pkt = F.build_ipv4(seg.src_ip, seg.dst_ip, F.PROTO_TCP, F.build_tcp(seg))
        got = w.send(w.a, F.build_eth(F.mac_bytes(router_mac(1)), F.mac_bytes(A_MAC),
                                      F.ETH_IPV4, pkt))
    else:
        seg = TcpSegment(IP("10.0.3.103"), dport, IP(HOME_WAN), wan_port, 1, 1, flags, 65535, b"",
                         None)
        pkt = F.build_ipv4(seg.src_ip, seg.dst_ip, F.PROTO_TCP, F.build_tcp(seg))
        got = w.send(w.c, F.build_eth(F.mac_bytes(router_mac(2)), F.mac_bytes(C_MAC),
                                      F.ETH_IPV4, pkt))
    if not got:
        return None
    return decode(got[0][1])[2]


SYN, ACK, FIN, RST = TcpFlags.SYN, TcpFlags.ACK, TcpFlags.FIN, TcpFlags.RST


def test_tcp_half_open_mapping_has_the_transitory_timeout():
    w = NatWorld(NatType.EASY)
    port = _tcp(w, "a", SYN).src_port
    w.now += TCP_TRANSITORY_TIMEOUT_S + 1
    assert _tcp(w, "c", SYN | ACK, wan_port=port) is None


def test_tcp_established_mapping_lives_long_and_closes_to_transitory():
    w = NatWorld(NatType.EASY)
    port = _tcp(w, "a", SYN).src_port
    assert _tcp(w, "c", SYN | ACK, wan_port=port) is not None
    _tcp(w, "a", ACK)
    w.now += TCP_ESTABLISHED_TIMEOUT_S - 60  # idle for two hours: still mapped
    assert _tcp(w, "c", ACK, wan_port=port) is not None
    _tcp(w, "a", FIN | ACK)
    assert _tcp(w, "c", FIN | ACK, wan_port=port) is not None
    w.now += TCP_TRANSITORY_TIMEOUT_S + 1  # both FINs seen: the short timer applies again
    assert _tcp(w, "c", ACK, wan_port=port) is None


def test_tcp_rst_ends_an_established_mapping_early():
    w = NatWorld(NatType.EASY)
    port = _tcp(w, "a", SYN).src_port
    _tcp(w, "c", SYN | ACK, wan_port=port)
    w.now += 1000
    _tcp(w, "a", ACK)  # refresh at t+1000
    assert _tcp(w, "c", RST, wan_port=port) is not None
    w.now += TCP_TRANSITORY_TIMEOUT_S + 1
    assert _tcp(w, "c", ACK, wan_port=port) is None
    # a new SYN from the same socket starts over on a fresh (or renewed) mapping
    assert _tcp(w, "a", SYN) is not None


# --------------------------------------------------------------------------- none and one2one

def test_routed_network_keeps_addresses_both_ways():
    w = NatWorld(NatType.NONE, home_lan="44.1.2.0/24")
    assert w.out(4000, C_PUB, 3478) == ("44.1.2.101", 4000)
    # unsolicited inbound to the LAN address itself is routed in; pings are answered by the node
    got = w.send(w.c, udp_frame(C_MAC, router_mac(2), "10.0.3.103", "44.1.2.102", 1, 7777))
    assert [p for p, _ in got] == [w.b]
    got = w.send(w.c, ping_frame(C_MAC, router_mac(2), "10.0.3.103", "44.1.2.101"))
    assert [p for p, _ in got] == [w.a]


def test_nat_behavior_validation_names_the_fix():
    with pytest.raises(ConfigError, match="mapping and filtering take one of"):
        NatBehavior(mapping="cone")
    with pytest.raises(ConfigError, match="port_range"):
        NatBehavior(port_range=(2000, 1000))
    with pytest.raises(ConfigError, match="udp_timeout_s"):
        NatBehavior(udp_timeout_s=0)
    with pytest.raises(ConfigError, match="unknown NAT type 'cone'.*NatBehavior"):
        NatBehavior.preset("cone")


def test_preset_derivation_and_strings_keep_working():
    easy = NatBehavior.preset("easy")
    assert easy == NAT_TYPES[NatType.EASY] and easy.name == "easy"
    quiet = dataclasses.replace(easy, hairpinning=False)
    assert quiet.mapping is easy.mapping and not quiet.hairpinning
    env = Env()
    net = env.add_network(wan_ip="2.1.1.1", nat="restricted_cone")
    assert net.nat.filtering.value == "address-dependent"
    net2 = env.add_network(wan_ip="2.1.1.2", lan="192.168.2.0/24", nat=quiet)
    assert net2.nat is quiet


@pytest.mark.parametrize("kwargs, msg", [
    (dict(wan_ip="2.1.1.1", lan="44.0.0.0/24", nat="none", port_mapping="natpmp"),
     "port_mapping needs a translating NAT"),
    (dict(wan_ip="2.1.1.1", nat="easy", port_mapping=["natpmp", "igd"]), "unknown protocol"),
    (dict(wan_ip="44.0.0.9", lan="44.0.0.0/24", nat="none"), "would contain its own WAN IP"),
    (dict(wan_ip="2.1.1.1", lan="52.52.0.0/16", nat="none"), "would contain 52.52.0.0/24"),
], ids=["portmap-on-routed", "unknown-protocol", "routed-lan-holds-wan", "routed-lan-holds-vips"])
def test_add_network_rejects_bad_nat_options(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        Env().add_network(**kwargs)


def test_routed_lan_may_not_swallow_another_networks_wan():
    env = Env()
    env.add_network(wan_ip="44.0.0.9", lan="192.168.1.0/24")
    with pytest.raises(ConfigError, match="contains net1's WAN IP"):
        env.add_network(wan_ip="2.1.1.1", lan="44.0.0.0/24", nat="none")
