"""DNS servers on VIPs, sans I/O: a query's bytes in, a reply's bytes out.

Owns: the records (names vmlab's VIPs carry and names a test registers), the answer rules
and the size rules of RFC 1035 §4.2 / RFC 7766: over UDP an answer larger than the client
can take (512 bytes, or its EDNS(0) buffer size, capped at 1232 as DNS Flag Day 2020
advises) goes back empty with the TC bit, and the client repeats the query over TCP, where
messages carry a 2-byte length prefix and the whole answer goes back.

Two servers exist per Env (see `services.DNS_VIP` and `SPLIT_DNS_VIP`): the default one
answers every name not registered for the split zone, and the split one answers only
those, so a test can prove that a guest's split-DNS configuration took effect.

Rules: A/AAAA for known names (TTL 60); NOERROR with no answers (NODATA) for another type
of a known name, or a family the name lacks; NXDOMAIN for unknown names, unlike natlab's
NOERROR, so resolvers fail fast instead of trying search domains forever; FORMERR for
unparseable queries that still have an ID; NOTIMP for opcodes other than QUERY. No
recursion: vmlab's internet has no other name servers.

Leaves to others: wire transport (UDP via `internet.py`'s UDP services, TCP via the
internet's VIP TCP stack, which `tcp_acceptor` plugs into).
"""
from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Callable, Iterable, Union

from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError, DNSHeader, DNSRecord, EDNS0

from .services import VIPS
from .tcp import TcpConnection

__all__ = ["DnsServer", "DnsRecords", "UDP_PLAIN_MAX", "UDP_EDNS_MAX", "TTL_S",
           "MAX_NAMES", "MAX_ADDRESSES_PER_NAME", "tcp_acceptor", "tcp_frame"]

IPAddress = Union[IPv4Address, IPv6Address]

TTL_S = 60
#: RFC 1035 §2.3.4: a UDP answer without EDNS carries at most 512 bytes.
UDP_PLAIN_MAX = 512
#: Cap on the EDNS buffer size we honour (DNS Flag Day 2020: no IP fragmentation).
UDP_EDNS_MAX = 1232
#: Bounds on what tests register, so the tables stay bounded.
MAX_NAMES = 10_000
MAX_ADDRESSES_PER_NAME = 1_000


def _norm(name: str) -> str:
    return str(name).rstrip(".").lower()


class DnsRecords:
    """Name -> addresses, with the bounds above. Shared by the two servers."""

    def __init__(self) -> None:
        self.default: dict[str, list[IPAddress]] = {}
        self.split: dict[str, list[IPAddress]] = {}
        for v in VIPS.values():
            self.default[_norm(v.name)] = [v.ipv4, v.ipv6]

    def register(self, name: str, addresses: Iterable[str | IPAddress], *,
                 split: bool = False) -> None:
        """Add `addresses` to `name` (in the split zone if `split`); ValueError if invalid."""
        key = _norm(name)
        if not key or len(key) > 253 or any(not 0 < len(label) <= 63 for label in key.split(".")):
            raise ValueError(f"{name!r} is not a valid DNS name (labels of 1-63 characters, "
                             f"253 in all)")
        ips = [ip_address(str(a)) for a in addresses]
        if not ips:
            raise ValueError(f"register {name!r}: give at least one address")
        table = self.split if split else self.default
        other = self.default if split else self.split
        if key in other:
            raise ValueError(f"{name!r} is already registered in the "
                             f"{'default' if split else 'split'} zone; a name lives in one zone")
        if key not in table and len(self.default) + len(self.split) >= MAX_NAMES:
            raise ValueError(f"DNS holds at most {MAX_NAMES} names")
        current = table.setdefault(key, [])
        for ip in ips:
            if ip not in current:
                current.append(ip)
        if len(current) > MAX_ADDRESSES_PER_NAME:
            del current[MAX_ADDRESSES_PER_NAME:]
            raise ValueError(f"{name!r}: at most {MAX_ADDRESSES_PER_NAME} addresses per name")


class DnsServer:
    """One resolver. `split=False` answers the default zone, `split=True` the split zone."""

    def __init__(self, records: DnsRecords, *, split: bool = False):
        self.records = records
        self.split = split
        self.queries = 0

    @property
    def _table(self) -> dict[str, list[IPAddress]]:
        return self.records.split if self.split else self.records.default

    def answer_udp(self, query: bytes) -> bytes | None:
        """The reply datagram for `query`, truncated (TC) if it does not fit; None to drop."""
        return self._answer(query, udp=True)

    def answer_tcp(self, query: bytes) -> bytes | None:
        """The reply message (without the TCP length prefix) for `query`; None to drop."""
        return self._answer(query, udp=False)

    def _answer(self, query: bytes, *, udp: bool) -> bytes | None:
        self.queries += 1
        try:
            q = DNSRecord.parse(query)
        except (DNSError, ValueError, IndexError, UnicodeDecodeError, TypeError, AttributeError,
                KeyError, AssertionError):
            # dnslib raises several types on garbage; with an ID we can still say FORMERR.
            if len(query) < 12 or query[2] & 0x80:
                return None
            return DNSRecord(DNSHeader(id=int.from_bytes(query[:2], "big"), qr=1,
                                       rcode=RCODE.FORMERR)).pack()
        if q.header.qr:  # a response: never answer those (reflection loops)
            return None
        reply = DNSRecord(DNSHeader(id=q.header.id, qr=1, aa=1, ra=0, rd=q.header.rd,
                                    opcode=q.header.opcode))
        if q.header.opcode != 0:
            reply.header.rcode = RCODE.NOTIMP
            return reply.pack()
        if len(q.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
            return reply.pack()
        question = q.questions[0]
        reply.add_question(question)
        name = _norm(question.qname)
        addrs = self._table.get(name)
        if addrs is None:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            for ip in addrs:
                if question.qtype in (QTYPE.A, QTYPE.ANY) and ip.version == 4:
                    reply.add_answer(RR(question.qname, QTYPE.A, ttl=TTL_S, rdata=A(str(ip))))
                elif question.qtype in (QTYPE.AAAA, QTYPE.ANY) and ip.version == 6:
                    reply.add_answer(RR(question.qname, QTYPE.AAAA, ttl=TTL_S,
                                        rdata=AAAA(str(ip))))
        edns = next((r for r in q.ar if r.rtype == QTYPE.OPT), None)
        if edns is not None:
            reply.add_ar(EDNS0(udp_len=UDP_EDNS_MAX))
        data = reply.pack()
        if udp:
            limit = UDP_PLAIN_MAX
            if edns is not None:
                limit = max(UDP_PLAIN_MAX, min(int(edns.rclass), UDP_EDNS_MAX))
            if len(data) > limit:
                reply.rr = []
                reply.header.tc = 1
                data = reply.pack()
        elif len(data) > 0xFFFF:
            return None  # cannot happen within MAX_ADDRESSES_PER_NAME, but never send junk
        return data


def tcp_frame(message: bytes) -> bytes:
    """RFC 1035 §4.2.2: a 2-byte length before each message on TCP."""
    return len(message).to_bytes(2, "big") + message


def tcp_acceptor(server: DnsServer) -> Callable[[TcpConnection], None]:
    """An on_accept for `TcpStack.listen` that answers DNS over TCP, sans I/O: each complete
    length-prefixed query is answered at once; the peer's FIN closes our side too.
    Buffering is bounded by the TCP receive window (64 KiB), one query's maximum size."""

    def on_accept(conn: TcpConnection) -> None:
        buf = bytearray()

        def on_data(data: bytes) -> None:
            buf.extend(data)
            while len(buf) >= 2:
                length = int.from_bytes(buf[:2], "big")
                if len(buf) < 2 + length:
                    return
                query = bytes(buf[2:2 + length])
                del buf[:2 + length]
                answer = server.answer_tcp(query)
                if answer is None:
                    conn.abort()
                    return
                conn.send(tcp_frame(answer))

        conn.on_data = on_data
        conn.on_eof = conn.close

    return on_accept
