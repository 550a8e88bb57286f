"""Port mapping on the gateway with synthetic frames: NAT-PMP (RFC 6886) and PCP (RFC 6887)
byte for byte against the RFC layouts, UPnP IGD over SSDP and userspace TCP, lifetimes."""
from __future__ import annotations

import os
import struct
from ipaddress import IPv4Address as IP

import pytest

from framekit import decode, udp_frame
from test_vnet_nat import A_MAC, HOME_WAN, NatWorld
from vmlab.vnet import frames as F
from vmlab.vnet.core import router_mac
from vmlab.vnet.nat import NatType
from vmlab.vnet.portmap import PortMapProtocol as PMP
from vmlab.vnet.tcp import TcpFlags, TcpSegment

GW = "192.168.1.1"
ALL = frozenset(PMP)
WAN = IP(HOME_WAN).packed


def world(nat=NatType.EASY, protocols=ALL) -> NatWorld:
    return NatWorld(nat, port_mapping=frozenset(protocols))


def ask(w: NatWorld, payload: bytes, sport: int = 5350, dst: str = GW, dport: int = 5351,
        src_ip: str | None = None) -> list[bytes]:
    """Send a UDP datagram from a to the gateway; the UDP payloads that come back to a."""
    frame = udp_frame(A_MAC, router_mac(1), src_ip or w.a_ip, dst, sport, dport, payload)
    out = []
    for port, f in w.send(w.a, frame):
        assert port is w.a
        _eth, ip, udp = decode(f)
        assert (str(ip.src), udp.sport, udp.dport) == (GW, dport, sport)
        out.append(udp.payload)
    return out


def epoch_of(reply: bytes) -> int:
    return struct.unpack_from("!I", reply, 4)[0]


# --------------------------------------------------------------------------- NAT-PMP

def test_natpmp_public_address_request_byte_for_byte():
    w = world()
    [reply] = ask(w, bytes([0, 0]))
    # RFC 6886 §3.2: vers 0, op 128, result 0, seconds since epoch, external IPv4 address
    assert reply == bytes([0, 128, 0, 0]) + struct.pack("!I", 0) + WAN
    w.now += 42
    [reply] = ask(w, bytes([0, 0]))
    assert epoch_of(reply) == 42


@pytest.mark.parametrize("op, proto", [(1, "udp"), (2, "tcp")])
def test_natpmp_map_then_outside_reaches_the_port_until_the_lifetime_ends(op, proto):
    w = world()
    # RFC 6886 §3.3: vers, op, reserved, internal port, suggested external port, lifetime
    [reply] = ask(w, struct.pack("!BBHHHI", 0, op, 0, 8080, 8080, 3600))
    assert reply == struct.pack("!BBHIHHI", 0, 128 + op, 0, 0, 8080, 8080, 3600)
    if proto == "udp":
        # unsolicited, from anyone: the mapping admits every outside sender
        assert w.inbound("d", 999, 8080) == (w.a_ip, 8080)
        w.now += 3599
        assert w.inbound("c", 1, 8080) == (w.a_ip, 8080)
        w.now += 2
        assert w.inbound("c", 1, 8080) is None
    else:
        assert w.inbound("c", 1, 8080) is None  # a UDP packet does not use a TCP mapping


def test_natpmp_renew_delete_and_errors():
    w = world()
    ask(w, struct.pack("!BBHHHI", 0, 1, 0, 9000, 0, 60))
    [renew] = ask(w, struct.pack("!BBHHHI", 0, 1, 0, 9000, 0, 7200))
    ext = struct.unpack_from("!H", renew, 10)[0]
    assert struct.unpack_from("!HI", renew, 10) == (ext, 7200)
    assert w.out(9000, "5.6.7.8", 1) == (HOME_WAN, ext)  # replies leave from the mapped port
    # lifetime 0 deletes: reply has external port 0 and lifetime 0 (RFC 6886 §3.4)
    [gone] = ask(w, struct.pack("!BBHHHI", 0, 1, 0, 9000, 0, 0))
    assert gone == struct.pack("!BBHIHHI", 0, 129, 0, 0, 9000, 0, 0)
    assert w.inbound("d", 1, ext) is None
    # unsupported opcode: result 5 (RFC 6886 §3.5)
    [bad] = ask(w, bytes([0, 3]) + bytes(10))
    assert bad[:4] == bytes([0, 131, 0, 5])


def test_natpmp_adopts_an_existing_endpoint_independent_mapping():
    w = world(NatType.EASY)
    _ip, dyn = w.out(7000, "5.6.7.8", 3478)
    [reply] = ask(w, struct.pack("!BBHHHI", 0, 1, 0, 7000, 0, 600))
    assert struct.unpack_from("!H", reply, 10)[0] == dyn  # peers keep seeing the same port


def test_natpmp_on_hard_nat_opens_the_port_to_everyone():
    w = world(NatType.HARD)
    [reply] = ask(w, struct.pack("!BBHHHI", 0, 1, 0, 6000, 6000, 600))
    assert struct.unpack_from("!H", reply, 10)[0] == 6000
    assert w.inbound("c", 5, 6000) == (w.a_ip, 6000)
    assert w.inbound("d", 6, 6000) == (w.a_ip, 6000)


def test_port_mapping_is_off_by_default():
    w = NatWorld(NatType.EASY)
    frame = udp_frame(A_MAC, router_mac(1), w.a_ip, GW, 5350, 5351, bytes([0, 0]))
    replies = [decode(f)[1] for _p, f in w.send(w.a, frame)]
    assert all(ip.proto != F.PROTO_UDP for ip in replies)  # no NAT-PMP answer (at most ICMP)
    assert not any("port-mapping" in r for r in w.vnet.drops())


# --------------------------------------------------------------------------- PCP

def pcp_map(client: str, nonce: bytes, proto: int, internal: int, suggested: int,
            lifetime: int, options: bytes = b"") -> bytes:
    """RFC 6887 §7.1 request header + §11.1 MAP opcode payload."""
    mapped = b"\0" * 10 + b"\xff\xff" + IP(client).packed
    header = struct.pack("!BBHI16s", 2, 1, 0, lifetime, mapped)
    body = struct.pack("!12sB3xHH16s", nonce, proto, internal, suggested,
                       b"\0" * 10 + b"\xff\xff" + b"\0" * 4)
    return header + body + options


def test_pcp_map_byte_for_byte():
    w = world()
    nonce = bytes(range(12))
    [reply] = ask(w, pcp_map(w.a_ip, nonce, 17, 5000, 5000, 600))
    assert len(reply) == 60
    # §7.2 response header: version, R|opcode, reserved, result, lifetime, epoch, 96 reserved bits
    assert reply[:24] == struct.pack("!BBBBII12s", 2, 0x81, 0, 0, 600, 0, b"")
    # §11.1 MAP payload echoes nonce, protocol and internal port; assigned port and address
    assert reply[24:] == struct.pack("!12sB3xHH16s", nonce, 17, 5000, 5000,
                                     b"\0" * 10 + b"\xff\xff" + WAN)
    assert w.inbound("d", 1, 5000) == (w.a_ip, 5000)


def test_pcp_lifetime_nonce_and_delete():
    w = world()
    nonce = os.urandom(12)
    ask(w, pcp_map(w.a_ip, nonce, 6, 5001, 0, 30))
    [stolen] = ask(w, pcp_map(w.a_ip, os.urandom(12), 6, 5001, 0, 30))
    assert stolen[3] == 2  # NOT_AUTHORIZED: another nonce may not touch the mapping (§11.3)
    [deleted] = ask(w, pcp_map(w.a_ip, nonce, 6, 5001, 0, 0))
    assert deleted[3] == 0 and struct.unpack_from("!I", deleted, 4)[0] == 0
    [again] = ask(w, pcp_map(w.a_ip, nonce, 17, 5002, 0, 30))
    ext = struct.unpack_from("!H", again, 42)[0]
    w.now += 31
    assert w.inbound("c", 1, ext) is None  # lifetime honoured


@pytest.mark.parametrize("payload_fn, code", [
    (lambda ip: pcp_map("192.168.1.77", bytes(12), 17, 1, 1, 60), 12),       # ADDRESS_MISMATCH
    (lambda ip: pcp_map(ip, bytes(12), 1, 1, 1, 60), 9),                     # UNSUPP_PROTOCOL
    (lambda ip: pcp_map(ip, bytes(12), 17, 1, 1, 60, bytes([1, 0, 0, 0])), 5),  # UNSUPP_OPTION
    (lambda ip: bytes([2, 2, 0, 0]) + bytes(20), 12),  # PEER from client 0.0.0.0: mismatch first
    (lambda ip: pcp_map(ip, bytes(12), 17, 1, 1, 60)[:40], 3),               # MALFORMED_REQUEST
], ids=["address-mismatch", "unsupported-protocol", "mandatory-option", "peer", "short"])
def test_pcp_errors(payload_fn, code):
    w = world()
    [reply] = ask(w, payload_fn(w.a_ip))
    assert reply[0] == 2 and reply[3] == code


def test_pcp_announce_and_version_negotiation():
    w = world()
    mapped = b"\0" * 10 + b"\xff\xff" + IP(w.a_ip).packed
    [reply] = ask(w, struct.pack("!BBHI16s", 2, 0, 0, 0, mapped))
    assert reply == struct.pack("!BBBBII12s", 2, 0x80, 0, 0, 0, 0, b"")
    [reply] = ask(w, bytes([3, 1]) + bytes(58))
    assert reply[:4] == bytes([2, 0x81, 0, 1])  # UNSUPP_VERSION, with the version we speak
    # NAT-PMP-only gateway: a PCP request gets NAT-PMP's "unsupported version" (RFC 6887 §9)
    w2 = world(protocols={PMP.NATPMP})
    [reply] = ask(w2, pcp_map(w2.a_ip, bytes(12), 17, 1, 1, 60))
    assert reply[:4] == bytes([0, 0x81, 0, 1])
    # PCP-only gateway: a NAT-PMP request gets PCP's UNSUPP_VERSION
    w3 = world(protocols={PMP.PCP})
    [reply] = ask(w3, bytes([0, 0]))
    assert reply[0] == 2 and reply[3] == 1


# --------------------------------------------------------------------------- UPnP

M_SEARCH = (b"M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\nST: "
            b"urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\nMAN: \"ssdp:discover\"\r\n"
            b"MX: 2\r\n\r\n")


def test_ssdp_m_search_multicast_gets_a_unicast_answer_with_location():
    w = world()
    frame = udp_frame(A_MAC, "01:00:5e:7f:ff:fa", w.a_ip, "239.255.255.250", 40000, 1900, M_SEARCH)
    answers = [decode(f) for p, f in w.send(w.a, frame) if p is w.a]
    assert len(answers) == 1
    _eth, ip, udp = answers[0]
    assert (str(ip.src), udp.sport, str(ip.dst), udp.dport) == (GW, 1900, w.a_ip, 40000)
    text = udp.payload.decode()
    assert text.startswith("HTTP/1.1 200 OK\r\n")
    assert f"LOCATION: http://{GW}:5000/rootDesc.xml\r\n" in text
    assert "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n" in text
    # ssdp:all lists every device and service; a NOTIFY is not answered
    every = M_SEARCH.replace(b"urn:schemas-upnp-org:device:InternetGatewayDevice:1", b"ssdp:all")
    assert len(ask(w, every, sport=40000, dst="239.255.255.250", dport=1900)) == 6
    assert ask(w, b"NOTIFY * HTTP/1.1\r\n\r\n", dst="239.255.255.250", dport=1900) == []


class HttpClient:
    """Just enough of a TCP client, in frames, to make one HTTP request to the gateway."""

    def __init__(self, w: NatWorld, sport: int):
        self.w, self.sport, self.seq = w, sport, 1000

    def _send(self, flags, ack, payload=b""):
        seg = TcpSegment(IP(self.w.a_ip), self.sport, IP(GW), 5000, self.seq, ack, flags, 65535,
                         payload, 1460 if flags & TcpFlags.SYN else None)
        pkt = F.build_ipv4(seg.src_ip, seg.dst_ip, F.PROTO_TCP, F.build_tcp(seg))
        frame = F.build_eth(F.mac_bytes(router_mac(1)), F.mac_bytes(A_MAC), F.ETH_IPV4, pkt)
        return [decode(f)[2] for p, f in self.w.send(self.w.a, frame) if p is self.w.a]

    def request(self, raw: bytes) -> bytes:
        [synack] = self._send(TcpFlags.SYN, 0)
        assert synack.flags & TcpFlags.SYN
        self.seq += 1
        ack = synack.seq + 1
        self._send(TcpFlags.ACK, ack)
        segs = self._send(TcpFlags.ACK | TcpFlags.PSH, ack, raw)
        self.seq += len(raw)
        data = b"".join(s.payload for s in segs)
        assert any(s.flags & TcpFlags.FIN for s in segs), "the server closes after answering"
        return data


def soap(action: str, args: dict, service="WANIPConnection") -> bytes:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in args.items())
    body = (f'<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/"'
            f' s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body><u:{action} '
            f'xmlns:u="urn:schemas-upnp-org:service:{service}:1">{inner}</u:{action}></s:Body>'
            f'</s:Envelope>').encode()
    path = "/ctl/IPConn" if service == "WANIPConnection" else "/ctl/CmnIfCfg"
    return (f"POST {path} HTTP/1.1\r\nHost: {GW}:5000\r\nContent-Type: text/xml\r\n"
            f'SOAPAction: "urn:schemas-upnp-org:service:{service}:1#{action}"\r\n'
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def add_args(client, ext=7777, internal=8000, proto="TCP", lease=0):
    return {"NewRemoteHost": "", "NewExternalPort": ext, "NewProtocol": proto,
            "NewInternalPort": internal, "NewInternalClient": client, "NewEnabled": 1,
            "NewPortMappingDescription": "test", "NewLeaseDuration": lease}


def test_upnp_root_description_over_userspace_tcp():
    w = world()
    resp = HttpClient(w, 41000).request(b"GET /rootDesc.xml HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"urn:schemas-upnp-org:service:WANIPConnection:1" in resp
    assert b"<controlURL>/ctl/IPConn</controlURL>" in resp


def test_upnp_add_port_mapping_then_outside_reaches_it_and_delete_closes_it():
    w = world()
    resp = HttpClient(w, 41001).request(soap("AddPortMapping", add_args(w.a_ip, proto="UDP",
                                                                         lease=120)))
    assert resp.startswith(b"HTTP/1.1 200 OK") and b"AddPortMappingResponse" in resp
    assert w.inbound("c", 9, 7777) == (w.a_ip, 8000)
    resp = HttpClient(w, 41002).request(soap("GetExternalIPAddress", {}))
    assert b"<NewExternalIPAddress>2.1.1.1</NewExternalIPAddress>" in resp
    resp = HttpClient(w, 41003).request(soap("GetSpecificPortMappingEntry", {
        "NewRemoteHost": "", "NewExternalPort": 7777, "NewProtocol": "UDP"}))
    assert b"<NewInternalPort>8000</NewInternalPort>" in resp
    assert b"<NewLeaseDuration>120</NewLeaseDuration>" in resp
    resp = HttpClient(w, 41004).request(soap("DeletePortMapping", {
        "NewRemoteHost": "", "NewExternalPort": 7777, "NewProtocol": "UDP"}))
    assert resp.startswith(b"HTTP/1.1 200 OK")
    assert w.inbound("c", 9, 7777) is None


def test_upnp_lease_is_honoured():
    w = world()
    HttpClient(w, 41005).request(soap("AddPortMapping", add_args(w.a_ip, proto="UDP", lease=60)))
    w.now += 61
    assert w.inbound("c", 9, 7777) is None


@pytest.mark.parametrize("args_fn, code", [
    (lambda w: add_args(w.b_ip), b"<errorCode>606</errorCode>"),          # maps for another host
    (lambda w: add_args(w.a_ip, ext=0), b"<errorCode>716</errorCode>"),   # wildcard port
    (lambda w: add_args(w.a_ip, proto="SCTP"), b"<errorCode>402</errorCode>"),
], ids=["other-host", "wildcard", "bad-protocol"])
def test_upnp_add_errors_are_soap_faults(args_fn, code):
    w = world()
    resp = HttpClient(w, 41006).request(soap("AddPortMapping", args_fn(w)))
    assert resp.startswith(b"HTTP/1.1 500 ") and code in resp


def test_upnp_conflict_and_add_any_port_mapping():
    w = world()
    HttpClient(w, 41007).request(soap("AddPortMapping", add_args(w.a_ip, internal=8000)))
    resp = HttpClient(w, 41008).request(soap("AddPortMapping", add_args(w.a_ip, internal=8001)))
    assert b"<errorCode>718</errorCode>" in resp  # 7777/TCP is taken
    resp = HttpClient(w, 41009).request(soap("AddAnyPortMapping", add_args(w.a_ip, internal=8001)))
    assert b"<NewReservedPort>" in resp and b"<NewReservedPort>7777<" not in resp
    resp = HttpClient(w, 41010).request(soap("Reboot", {}))
    assert b"<errorCode>401</errorCode>" in resp


def test_other_multicast_to_the_ssdp_group_is_not_ours():
    w = world()
    frame = udp_frame(A_MAC, "01:00:5e:7f:ff:fa", w.a_ip, "239.255.255.250", 40000, 1901, b"x")
    assert w.send(w.a, frame) == [(w.b, frame)]  # flooded to the LAN, nothing from the router
