"""Port mapping on a network's gateway: NAT-PMP (RFC 6886), PCP (RFC 6887) and UPnP IGD.

Owns: the three protocols' wire formats and their server side. NAT-PMP and PCP share UDP
port 5351 of the gateway and are told apart by the version byte (RFC 6887 §9); UPnP is SSDP
discovery (M-SEARCH to 239.255.255.250:1900 or to the gateway) plus a small HTTP/SOAP
control endpoint on the gateway's TCP port `UPNP_HTTP_PORT`, served over vnet's userspace TCP
(the router passes accepted `TcpConnection`s to `accept_http`). Each is off unless the
Network enables it; a request to a protocol that is off is dropped, as on a router without it.

Leaves to others: the mappings themselves (`NaptTable.map_port` in nat.py: port choice,
lifetimes, inbound admission), packet parsing and delivery (router.py), and the clock (every
call gets `now`; HTTP handlers use the time of the segment that completed the request).

Not modelled: the unsolicited announcements a gateway multicasts on restart or address
change (NAT-PMP to 224.0.0.1:5350, PCP ANNOUNCE): a vnet router never restarts nor changes
its WAN address. PCP PEER and THIRD_PARTY/PREFER_FAILURE/FILTER options are refused with the
RFC's error codes. UPnP eventing (GENA) is not served.
"""
from __future__ import annotations

import logging
import struct
import xml.etree.ElementTree as ET
from enum import Enum
from html import escape
from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .nat import PROTO_TCP, PROTO_UDP, NaptTable, PortMapping

if TYPE_CHECKING:
    from .tcp import TcpConnection

__all__ = ["PortMapProtocol", "PortMapper", "parse_port_mapping", "NATPMP_PORT", "SSDP_ADDR",
           "SSDP_PORT", "UPNP_HTTP_PORT", "MAX_LIFETIME_S"]

log = logging.getLogger("vmlab.vnet.portmap")

Endpoint = tuple[IPv4Address, int]
Reply = tuple[Endpoint, Endpoint, bytes]  # (from, to, UDP payload)

NATPMP_PORT = 5351               # RFC 6886 §3.1 / RFC 6887 §19.1: both listen here
SSDP_ADDR = IPv4Address("239.255.255.250")
SSDP_PORT = 1900
UPNP_HTTP_PORT = 5000            # what miniupnpd uses; any port works, LOCATION names it
#: Longest lifetime granted; longer requests are cut to this (RFC 6886 §3.3 lets the server
#: pick; RFC 6887 §15 suggests a maximum of one day).
MAX_LIFETIME_S = 86400
#: Largest HTTP request the UPnP endpoint buffers before answering 413.
MAX_HTTP_REQUEST = 64 * 1024

# NAT-PMP (RFC 6886 §3.5) result codes
NATPMP_OK, NATPMP_UNSUPP_VERSION, NATPMP_REFUSED, NATPMP_NETWORK_FAILURE = 0, 1, 2, 3
NATPMP_NO_RESOURCES, NATPMP_UNSUPP_OPCODE = 4, 5
# PCP (RFC 6887 §7.4) result codes and opcodes
PCP_VERSION = 2
PCP_SUCCESS, PCP_UNSUPP_VERSION, PCP_NOT_AUTHORIZED, PCP_MALFORMED_REQUEST = 0, 1, 2, 3
PCP_UNSUPP_OPCODE, PCP_UNSUPP_OPTION, PCP_MALFORMED_OPTION, PCP_NETWORK_FAILURE = 4, 5, 6, 7
PCP_NO_RESOURCES, PCP_UNSUPP_PROTOCOL, PCP_CANNOT_PROVIDE_EXTERNAL = 8, 9, 11
PCP_ADDRESS_MISMATCH = 12
PCP_ANNOUNCE, PCP_MAP, PCP_PEER = 0, 1, 2


class PortMapProtocol(str, Enum):
    """Port-mapping protocols a Network can offer; values are what users type."""
    NATPMP = "natpmp"
    PCP = "pcp"
    UPNP = "upnp"


def parse_port_mapping(value) -> frozenset[PortMapProtocol]:
    """None/False -> off; True or "all" -> all three; a name or an iterable of names."""
    if value is None or value is False:
        return frozenset()
    if value is True or value == "all":
        return frozenset(PortMapProtocol)
    items = [value] if isinstance(value, (str, PortMapProtocol)) else list(value)
    try:
        return frozenset(PortMapProtocol(v) for v in items)
    except ValueError:
        known = ", ".join(p.value for p in PortMapProtocol)
        raise ConfigError(f"port_mapping={value!r}: unknown protocol; give one or more of "
                          f"{known}, or True for all") from None


def _v4_mapped(ip: IPv4Address) -> bytes:
    return b"\0" * 10 + b"\xff\xff" + ip.packed


def _from_v4_mapped(raw: bytes) -> IPv4Address | None:
    addr = IPv6Address(raw)
    return addr.ipv4_mapped


class PortMapper:
    """The port-mapping server of one network's gateway."""

    def __init__(self, protocols: frozenset[PortMapProtocol], nat: NaptTable, *,
                 gateway: IPv4Address, wan_ip: IPv4Address, lan: IPv4Network, name: str):
        if not isinstance(nat, NaptTable):
            raise ConfigError(f"network {name!r}: port mapping needs a translating NAT; "
                              f"{nat.behavior.name!r} lets every inbound packet in already")
        self.protocols = protocols
        self.nat = nat
        self.gateway = gateway
        self.wan_ip = wan_ip
        self.lan = lan
        self.name = name
        #: start of the mapping table's epoch (RFC 6886 §3.6): the first request's time
        self._epoch_start: float | None = None
        #: time of the packet being handled; HTTP callbacks run inside its processing
        self.now = 0.0
        self.uuid = f"uuid:7e1ab000-0000-4000-8000-{int(wan_ip):012x}"
        self.log = log.getChild(name)

    def _epoch(self, now: float) -> int:
        if self._epoch_start is None:
            self._epoch_start = now
        return int(now - self._epoch_start) & 0xFFFFFFFF

    # ------------------------------------------------------------------ UDP entry point

    def handle_udp(self, src: Endpoint, dst: Endpoint, payload: bytes, now: float
                   ) -> list[Reply] | None:
        """Answers to a UDP datagram from the LAN, or None if it is not for us."""
        self.now = now
        if src[0] not in self.lan:
            return None
        if dst == (self.gateway, NATPMP_PORT) and payload:
            if payload[0] == 0 and PortMapProtocol.NATPMP in self.protocols:
                return self._natpmp(src, payload, now)
            if PortMapProtocol.PCP in self.protocols:
                return self._pcp(src, payload, now)
            if PortMapProtocol.NATPMP in self.protocols and len(payload) >= 2:
                # A PCP request to a NAT-PMP-only server: NAT-PMP's "unsupported version"
                # tells the client to fall back (RFC 6887 §9).
                reply = struct.pack("!BBHI", 0, (payload[1] & 0x7F) | 0x80,
                                    NATPMP_UNSUPP_VERSION, self._epoch(now))
                return [((self.gateway, NATPMP_PORT), src, reply)]
            return None
        if (PortMapProtocol.UPNP in self.protocols and dst[1] == SSDP_PORT
                and dst[0] in (SSDP_ADDR, self.gateway)):
            return self._ssdp(src, payload)
        return None

    # ------------------------------------------------------------------ NAT-PMP

    def _natpmp(self, src: Endpoint, data: bytes, now: float) -> list[Reply]:
        gw = (self.gateway, NATPMP_PORT)
        if len(data) < 2:
            return []
        op = data[1]
        if op >= 128:
            return []  # a response sent to us; RFC 6886 §3.1 says ignore
        epoch = self._epoch(now)
        if op == 0:
            if len(data) != 2:
                self.log.debug("NAT-PMP: public address request of %d bytes", len(data))
            return [(gw, src, struct.pack("!BBHI4s", 0, 128, NATPMP_OK, epoch, self.wan_ip.packed))]
        if op not in (1, 2):
            return [(gw, src, struct.pack("!BBHI", 0, 128 + op, NATPMP_UNSUPP_OPCODE, epoch))]
        if len(data) < 12:
            return []  # RFC 6886 has no "malformed" code; a short request is dropped
        _v, _op, _res, internal, suggested, lifetime = struct.unpack_from("!BBHHHI", data)
        proto = PROTO_UDP if op == 1 else PROTO_TCP

        def reply(code: int, ext: int, life: int) -> list[Reply]:
            return [(gw, src, struct.pack("!BBHIHHI", 0, 128 + op, code, epoch, internal, ext,
                                          life))]

        if lifetime == 0:
            # Delete one mapping, or with internal port 0 all of this client's (RFC 6886 §3.4).
            self._delete(proto, src[0], internal, owner="natpmp")
            return reply(NATPMP_OK, 0, 0)
        if internal == 0:
            return reply(NATPMP_REFUSED, 0, 0)
        life = min(lifetime, MAX_LIFETIME_S)
        result = self.nat.map_port(proto, (src[0], internal), suggested or None, life, now,
                                   owner="natpmp", description="NAT-PMP")
        if isinstance(result, str):
            self.log.info("NAT-PMP map %s:%d refused: %s", src[0], internal, result)
            code = NATPMP_REFUSED if "belongs" in result else NATPMP_NO_RESOURCES
            return reply(code, 0, 0)
        self.log.info("NAT-PMP %s %s:%d <- %s:%d for %d s", "udp" if op == 1 else "tcp",
                      src[0], internal, self.wan_ip, result.wan_port, life)
        return reply(NATPMP_OK, result.wan_port, life)

    def _delete(self, proto: int, client: IPv4Address, internal: int, owner: str) -> None:
        for pm in list(self.nat.port_mappings.values()):
            if (pm.proto == proto and pm.lan[0] == client and pm.owner.split(":")[0] == owner
                    and internal in (0, pm.lan[1])):
                self.nat.unmap_port(pm.proto, pm.wan_port)

    # ------------------------------------------------------------------ PCP

    def _pcp(self, src: Endpoint, data: bytes, now: float) -> list[Reply]:
        gw = (self.gateway, NATPMP_PORT)
        epoch = self._epoch(now)
        if len(data) < 2 or data[1] & 0x80:
            return []  # too short to answer, or a response (RFC 6887 §8.3)
        opcode = data[1] & 0x7F

        def reply(code: int, lifetime: int = 0, body: bytes = b"") -> list[Reply]:
            head = struct.pack("!BBBBII12s", PCP_VERSION, 0x80 | opcode, 0, code, lifetime,
                               epoch, b"")
            return [(gw, src, head + body)]

        if data[0] != PCP_VERSION:
            # Both sides fall back on the version we give (RFC 6887 §9).
            return reply(PCP_UNSUPP_VERSION)
        if len(data) < 24 or len(data) > 1100 or len(data) % 4:
            return reply(PCP_MALFORMED_REQUEST) if len(data) >= 24 else []
        lifetime = struct.unpack_from("!I", data, 4)[0]
        client = _from_v4_mapped(data[8:24])
        if client != src[0]:
            return reply(PCP_ADDRESS_MISMATCH)  # RFC 6887 §8.1: client behind another NAT
        if opcode == PCP_ANNOUNCE:
            return reply(PCP_SUCCESS)
        if opcode != PCP_MAP:
            return reply(PCP_UNSUPP_OPCODE)
        if len(data) < 60:
            return reply(PCP_MALFORMED_REQUEST)
        nonce, proto, internal, suggested, _sugg_ip = struct.unpack_from("!12sB3xHH16s", data, 24)
        options = data[60:]
        bad_option = self._pcp_options(options)

        def body(ext_port: int, ext_ip: IPv4Address) -> bytes:
            return struct.pack("!12sB3xHH16s", nonce, proto, internal, ext_port,
                               _v4_mapped(ext_ip))

        if bad_option is not None:
            return reply(bad_option, 0, body(0, IPv4Address(0)))
        if proto not in (PROTO_UDP, PROTO_TCP):
            return reply(PCP_UNSUPP_PROTOCOL, 0, body(0, IPv4Address(0)))
        owner = f"pcp:{nonce.hex()}"
        if lifetime == 0:
            pm = self.nat.port_mapping_of(proto, (src[0], internal), now)
            if pm is not None and pm.owner != owner:
                return reply(PCP_NOT_AUTHORIZED, 0, body(0, IPv4Address(0)))
            if pm is not None:
                self.nat.unmap_port(proto, pm.wan_port)
            return reply(PCP_SUCCESS, 0, body(suggested, self.wan_ip))
        if internal == 0:
            return reply(PCP_MALFORMED_REQUEST, 0, body(0, IPv4Address(0)))
        life = min(lifetime, MAX_LIFETIME_S)
        result = self.nat.map_port(proto, (src[0], internal), suggested or None, life, now,
                                   owner=owner, description="PCP")
        if isinstance(result, str):
            code = PCP_NOT_AUTHORIZED if "belongs" in result else PCP_NO_RESOURCES
            return reply(code, 0, body(0, IPv4Address(0)))
        self.log.info("PCP MAP %d %s:%d <- %s:%d for %d s", proto, src[0], internal,
                      self.wan_ip, result.wan_port, life)
        return reply(PCP_SUCCESS, life, body(result.wan_port, self.wan_ip))

    @staticmethod
    def _pcp_options(options: bytes) -> int | None:
        """An error code for options we must refuse, else None (RFC 6887 §7.3)."""
        i = 0
        while i < len(options):
            if i + 4 > len(options):
                return PCP_MALFORMED_OPTION
            code, _res, length = struct.unpack_from("!BBH", options, i)
            if i + 4 + length > len(options):
                return PCP_MALFORMED_OPTION
            if code < 128:
                # Mandatory to process; we implement none (THIRD_PARTY, PREFER_FAILURE, FILTER).
                return PCP_UNSUPP_OPTION
            i += 4 + length + (-length % 4)
        return None

    # ------------------------------------------------------------------ UPnP: SSDP

    _DEVICE_TYPES = (
        "upnp:rootdevice",
        "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
        "urn:schemas-upnp-org:device:WANDevice:1",
        "urn:schemas-upnp-org:device:WANConnectionDevice:1",
        "urn:schemas-upnp-org:service:WANIPConnection:1",
        "urn:schemas-upnp-org:service:WANCommonInterfaceConfig:1",
    )

    def _ssdp(self, src: Endpoint, payload: bytes) -> list[Reply]:
        try:
            text = payload.decode("latin-1")
        except ValueError:
            return []
        lines = text.split("\r\n")
        if not lines[0].upper().startswith("M-SEARCH * HTTP/1.1"):
            return []  # NOTIFYs from other devices, or junk
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().upper()] = v.strip()
        if headers.get("MAN", "").strip('"') != "ssdp:discover":
            return []
        st = headers.get("ST", "")
        if st == "ssdp:all":
            targets = list(self._DEVICE_TYPES)
        elif st in self._DEVICE_TYPES or st == self.uuid:
            targets = [st]
        else:
            return []
        location = f"http://{self.gateway}:{UPNP_HTTP_PORT}/rootDesc.xml"
        out = []
        for target in targets:
            usn = self.uuid if target == self.uuid else f"{self.uuid}::{target}"
            msg = (f"HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nST: {target}\r\n"
                   f"USN: {usn}\r\nEXT:\r\nSERVER: Linux UPnP/1.1 vmlab/1\r\n"
                   f"LOCATION: {location}\r\n\r\n")
            out.append(((self.gateway, SSDP_PORT), src, msg.encode()))
        return out

    # ------------------------------------------------------------------ UPnP: HTTP/SOAP

    def accept_http(self, conn: "TcpConnection") -> None:
        """Serve one HTTP request on an accepted connection, then close it."""
        buf = bytearray()

        def on_data(data: bytes) -> None:
            if conn.state.name not in ("ESTABLISHED", "CLOSE_WAIT"):
                return
            buf.extend(data)
            request = _complete_request(buf)
            if request is None and len(buf) <= MAX_HTTP_REQUEST:
                return
            if request is None:
                response = _http(413, "text/plain", b"request too large\n")
            else:
                response = self.handle_http(conn.remote[0], *request, self.now)
            conn.on_data = lambda data: None
            conn.send(response)
            conn.close()

        conn.on_data = on_data

    def handle_http(self, client: IPv4Address, method: str, path: str, headers: dict[str, str],
                    body: bytes, now: float) -> bytes:
        """One HTTP request to the IGD -> the whole HTTP response (sans-I/O, for tests)."""
        if method == "GET" and path == "/rootDesc.xml":
            return _http(200, 'text/xml; charset="utf-8"', self._root_desc().encode())
        if method == "GET" and path.startswith("/scpd/"):
            return _http(200, 'text/xml; charset="utf-8"', _SCPD.encode())
        if method != "POST" or path not in ("/ctl/IPConn", "/ctl/CmnIfCfg"):
            return _http(404, "text/plain", b"not found\n")
        action = headers.get("soapaction", "").strip('"').rsplit("#", 1)[-1]
        try:
            args = _soap_args(body, action)
        except ValueError as err:
            return _soap_fault(402, f"Invalid Args ({err})")
        try:
            out = self._upnp_action(client, action, args, now)
        except _UpnpError as err:
            self.log.info("UPnP %s from %s: %d %s", action, client, err.code, err.text)
            return _soap_fault(err.code, err.text)
        service = ("WANCommonInterfaceConfig" if path == "/ctl/CmnIfCfg" else "WANIPConnection")
        inner = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in out.items())
        xml = (f'<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/'
               f'envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
               f'<u:{action}Response xmlns:u="urn:schemas-upnp-org:service:{service}:1">{inner}'
               f'</u:{action}Response></s:Body></s:Envelope>\r\n')
        return _http(200, 'text/xml; charset="utf-8"', xml.encode())

    def _upnp_action(self, client: IPv4Address, action: str, args: dict[str, str],
                     now: float) -> dict[str, object]:
        if action == "GetExternalIPAddress":
            return {"NewExternalIPAddress": str(self.wan_ip)}
        if action == "GetStatusInfo":
            return {"NewConnectionStatus": "Connected", "NewLastConnectionError": "ERROR_NONE",
                    "NewUptime": self._epoch(now)}
        if action == "GetConnectionTypeInfo":
            return {"NewConnectionType": "IP_Routed", "NewPossibleConnectionTypes": "IP_Routed"}
        if action == "GetCommonLinkProperties":
            return {"NewWANAccessType": "Ethernet", "NewLayer1UpstreamMaxBitRate": 1000000000,
                    "NewLayer1DownstreamMaxBitRate": 1000000000,
                    "NewPhysicalLinkStatus": "Up"}
        if action in ("AddPortMapping", "AddAnyPortMapping"):
            return self._upnp_add(client, args, now, any_port=action == "AddAnyPortMapping")
        if action == "DeletePortMapping":
            proto, ext = _proto(args), _port(args, "NewExternalPort")
            pm = self.nat.port_mappings.get((proto, ext))
            if pm is None or not pm.live(now) or pm.owner != "upnp":
                raise _UpnpError(714, "NoSuchEntryInArray")
            if pm.lan[0] != client:
                raise _UpnpError(606, "Action not authorized")
            self.nat.unmap_port(proto, ext)
            return {}
        if action == "GetSpecificPortMappingEntry":
            proto, ext = _proto(args), _port(args, "NewExternalPort")
            pm = self.nat.port_mappings.get((proto, ext))
            if pm is None or not pm.live(now):
                raise _UpnpError(714, "NoSuchEntryInArray")
            entry = self._entry(pm, now)
            del entry["NewRemoteHost"], entry["NewExternalPort"], entry["NewProtocol"]
            return entry
        if action == "GetGenericPortMappingEntry":
            try:
                index = int(args.get("NewPortMappingIndex", ""))
            except ValueError:
                raise _UpnpError(402, "Invalid Args") from None
            live = sorted((pm for pm in self.nat.port_mappings.values() if pm.live(now)),
                          key=lambda pm: (pm.proto, pm.wan_port))
            if not 0 <= index < len(live):
                raise _UpnpError(713, "SpecifiedArrayIndexInvalid")
            return self._entry(live[index], now)
        raise _UpnpError(401, "Invalid Action")

    def _entry(self, pm: PortMapping, now: float) -> dict[str, object]:
        lease = 0 if pm.expires is None else max(1, int(pm.expires - now))
        return {"NewRemoteHost": str(pm.remote or ""), "NewExternalPort": pm.wan_port,
                "NewProtocol": "TCP" if pm.proto == PROTO_TCP else "UDP",
                "NewInternalPort": pm.lan[1], "NewInternalClient": str(pm.lan[0]),
                "NewEnabled": 1, "NewPortMappingDescription": pm.description,
                "NewLeaseDuration": lease}

    def _upnp_add(self, client: IPv4Address, args: dict[str, str], now: float,
                  any_port: bool) -> dict[str, object]:
        proto = _proto(args)
        ext = _port(args, "NewExternalPort", allow_zero=True)
        internal = _port(args, "NewInternalPort")
        try:
            target = IPv4Address(args.get("NewInternalClient", ""))
            remote_s = args.get("NewRemoteHost", "").strip()
            remote = IPv4Address(remote_s) if remote_s not in ("", "*") else None
            lease = int(args.get("NewLeaseDuration", "0") or 0)
        except ValueError:
            raise _UpnpError(402, "Invalid Args") from None
        if target != client:
            # miniupnpd's secure mode: a client maps ports to itself only.
            raise _UpnpError(606, "Action not authorized")
        if args.get("NewEnabled", "1") not in ("1", "true", "yes"):
            raise _UpnpError(402, "Invalid Args (disabled entries are not supported)")
        if ext == 0 and not any_port:
            raise _UpnpError(716, "WildCardNotPermittedInExtPort")
        life = None if lease == 0 else min(lease, MAX_LIFETIME_S)  # 0: infinite (IGD:1)
        result = self.nat.map_port(proto, (target, internal), ext or None, life, now,
                                   owner="upnp", exact=not any_port, remote=remote,
                                   description=args.get("NewPortMappingDescription", ""))
        if isinstance(result, str):
            raise _UpnpError(718, f"ConflictInMappingEntry ({result})")
        self.log.info("UPnP %s %s:%d <- %s:%d lease %s", _proto_name(proto), target, internal,
                      self.wan_ip, result.wan_port, life or "infinite")
        return {"NewReservedPort": result.wan_port} if any_port else {}

    def _root_desc(self) -> str:
        def service(kind: str, ident: str, ctl: str) -> str:
            return (f"<service><serviceType>urn:schemas-upnp-org:service:{kind}:1</serviceType>"
                    f"<serviceId>urn:upnp-org:serviceId:{ident}</serviceId>"
                    f"<SCPDURL>/scpd/{kind}.xml</SCPDURL><controlURL>{ctl}</controlURL>"
                    f"<eventSubURL>/evt/{ident}</eventSubURL></service>")

        def device(kind: str, suffix: str, inner: str) -> str:
            return (f"<device><deviceType>urn:schemas-upnp-org:device:{kind}:1</deviceType>"
                    f"<friendlyName>vmlab {escape(self.name)} {kind}</friendlyName>"
                    f"<manufacturer>vmlab</manufacturer><modelName>vnet router</modelName>"
                    f"<UDN>{self.uuid}{suffix}</UDN>{inner}</device>")

        conn_dev = device("WANConnectionDevice", "2", "<serviceList>" + service(
            "WANIPConnection", "WANIPConn1", "/ctl/IPConn") + "</serviceList>")
        wan_dev = device("WANDevice", "1", "<serviceList>" + service(
            "WANCommonInterfaceConfig", "WANCommonIFC1", "/ctl/CmnIfCfg") + "</serviceList>"
            f"<deviceList>{conn_dev}</deviceList>")
        root = device("InternetGatewayDevice", "", f"<deviceList>{wan_dev}</deviceList>")
        return ('<?xml version="1.0"?>\r\n<root xmlns="urn:schemas-upnp-org:device-1-0">'
                '<specVersion><major>1</major><minor>0</minor></specVersion>'
                f'<URLBase>http://{self.gateway}:{UPNP_HTTP_PORT}/</URLBase>{root}</root>\r\n')


class _UpnpError(Exception):
    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code, self.text = code, text


_SCPD = ('<?xml version="1.0"?>\r\n<scpd xmlns="urn:schemas-upnp-org:service-1-0"><specVersion>'
         '<major>1</major><minor>0</minor></specVersion><actionList/><serviceStateTable/></scpd>')


def _proto(args: dict[str, str]) -> int:
    value = args.get("NewProtocol", "").upper()
    if value not in ("TCP", "UDP"):
        raise _UpnpError(402, "Invalid Args (NewProtocol must be TCP or UDP)")
    return PROTO_TCP if value == "TCP" else PROTO_UDP


def _proto_name(proto: int) -> str:
    return "tcp" if proto == PROTO_TCP else "udp"


def _port(args: dict[str, str], name: str, allow_zero: bool = False) -> int:
    try:
        port = int(args.get(name, ""))
    except ValueError:
        raise _UpnpError(402, f"Invalid Args ({name} is not a number)") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise _UpnpError(402, f"Invalid Args ({name}={port})")
    return port


def _soap_args(body: bytes, action: str) -> dict[str, str]:
    """The arguments of the SOAP action element, by local name."""
    try:
        root = ET.fromstring(body)
    except ET.ParseError as err:
        raise ValueError(f"body is not XML: {err}") from None
    for el in root.iter():
        if el.tag.rsplit("}", 1)[-1] == action:
            return {child.tag.rsplit("}", 1)[-1]: (child.text or "").strip() for child in el}
    raise ValueError(f"no {action} element in the body")


def _complete_request(buf: bytearray) -> tuple[str, str, dict[str, str], bytes] | None:
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = head[0].split(" ")
    headers = {}
    for line in head[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError:
        length = 0
    if len(buf) < end + 4 + length:
        return None
    method, path = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
    return method, path, headers, bytes(buf[end + 4:end + 4 + length])


def _http(status: int, ctype: str, body: bytes) -> bytes:
    reason = {200: "OK", 404: "Not Found", 413: "Payload Too Large",
              500: "Internal Server Error"}[status]
    return (f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
            f"\r\nConnection: close\r\nServer: Linux UPnP/1.1 vmlab/1\r\n\r\n").encode() + body


def _soap_fault(code: int, text: str) -> bytes:
    xml = ('<?xml version="1.0"?>\r\n<s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/'
           'envelope/" s:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
           '<s:Fault><faultcode>s:Client</faultcode><faultstring>UPnPError</faultstring><detail>'
           '<UPnPError xmlns="urn:schemas-upnp-org:control-1-0">'
           f'<errorCode>{code}</errorCode><errorDescription>{escape(text)}</errorDescription>'
           '</UPnPError></detail></s:Fault></s:Body></s:Envelope>\r\n')
    return _http(500, 'text/xml; charset="utf-8"', xml.encode())
