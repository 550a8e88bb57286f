"""A flow cache: vnet's fast path for frames that the full path merely forwards.

Most frames crossing routers and NATs belong to a flow the full path has just handled:
the same ports, the same translation, the same next hop. The cache remembers, per flow,
what the full path did to one frame (new Ethernet header, addresses, ports, TTL, and the
checksum deltas those imply, RFC 1624) and applies it to the next frames of the flow in a
few slices. It learns only from *verified pure forwards* (the output is the input with
exactly those fields changed), only for IPv4 UDP and TCP without SYN, FIN or RST.

Staying faithful:
- An entry stands for `FLOW_CACHE_S` of simulated time; then the full path runs again, so
  NAT mappings and filters are refreshed and expire as the NAT table says.
- Any frame the full path does not purely forward (ARP, DHCP, ICMP, SYN/FIN/RST, a reply
  from a VIP, a drop, a port-mapping request...) may have changed state: the cache is cleared.
- The owner bypasses the cache entirely while capture, link conditions or blackholes are on.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FlowCache", "FLOW_CACHE_S", "MAX_FLOWS"]

#: How long a cached decision stands before the full path re-validates it (simulated seconds).
FLOW_CACHE_S = 1.0
#: Bound on cached flows; the cache is cleared when full.
MAX_FLOWS = 4096

_UDP, _TCP = 17, 6


def _key(port: object, frame: bytes) -> tuple | None:
    """The flow a frame belongs to, or None when it is not for the fast path."""
    if len(frame) < 42 or frame[12] != 0x08 or frame[13] != 0x00 or frame[14] != 0x45:
        return None
    if frame[20] & 0x3F or frame[21]:  # MF set or a fragment offset
        return None
    proto = frame[23]
    if proto == _TCP:
        if len(frame) < 54 or frame[47] & 0x07:  # FIN, SYN or RST change NAT state
            return None
    elif proto != _UDP:
        return None
    return (port, frame[:12], frame[23:24] + frame[26:38])


def _adjust(csum: int, delta: int) -> int:
    """RFC 1624 eqn. 3: a checksum after words changed by `delta` (ones' complement)."""
    return ~(((~csum & 0xFFFF) + delta) % 0xFFFF) & 0xFFFF


def _delta(old_csum: int, new_csum: int) -> int:
    return ((~new_csum & 0xFFFF) - (~old_csum & 0xFFFF)) % 0xFFFF


@dataclass(slots=True)
class _Flow:
    out_port: object
    until: float
    eth: bytes          # new destination and source MAC
    addrs_ports: bytes  # new source and destination address, source and destination port
    ttl_dec: int
    ip_delta: int
    l4_off: int         # where the TCP/UDP checksum sits in the frame
    l4_delta: int

    def apply(self, frame: bytes) -> bytes | None:
        ttl = frame[22]
        if ttl <= self.ttl_dec:
            return None  # the full path says why it is dropped
        off = self.l4_off
        hc = _adjust((frame[24] << 8) | frame[25], self.ip_delta)
        c = (frame[off] << 8) | frame[off + 1]
        if c or off == 50:  # a UDP checksum of 0 means "none" and stays so (RFC 768)
            c = _adjust(c, self.l4_delta)
        return b"".join((self.eth, frame[12:22], bytes((ttl - self.ttl_dec, frame[23])),
                         hc.to_bytes(2, "big"), self.addrs_ports, frame[38:off],
                         c.to_bytes(2, "big"), frame[off + 2:]))


class FlowCache:
    def __init__(self) -> None:
        self._flows: dict[tuple, _Flow] = {}
        self.hits = 0

    def __len__(self) -> int:
        return len(self._flows)

    def clear(self) -> None:
        self._flows.clear()

    def lookup(self, port: object, frame: bytes, now: float):
        """(key, output) — output is [(port, frame)] on a hit, else None; key None means the
        frame is not for the fast path at all."""
        key = _key(port, frame)
        if key is None:
            return None, None
        flow = self._flows.get(key)
        if flow is None or flow.until <= now or not getattr(flow.out_port, "link_up", True):
            return key, None
        out = flow.apply(frame)
        if out is None:
            return key, None
        self.hits += 1
        return key, [(flow.out_port, out)]

    def learn(self, key: tuple | None, frame: bytes, emits: list, now: float) -> None:
        """After the full path: remember a verified pure forward, or clear the cache."""
        if key is None or len(emits) != 1:
            self._flows.clear()
            return
        port, out = emits[0]
        if out is frame or out == frame:
            return  # switched on one LAN, untouched: no state to go stale, nothing to learn
        proto = frame[23]
        off = 40 if proto == _UDP else 50
        if (len(out) != len(frame) or out[12:22] != frame[12:22] or out[23] != proto
                or not 1 <= frame[22] - out[22] <= 4 or out[38:off] != frame[38:off]
                or out[off + 2:] != frame[off + 2:]):
            self._flows.clear()
            return
        if proto == _UDP and ((frame[off] << 8) | frame[off + 1]) == 0 != \
                ((out[off] << 8) | out[off + 1]):
            self._flows.clear()  # a checksum appeared where there was none: not ours to copy
            return
        if len(self._flows) >= MAX_FLOWS:
            self._flows.clear()
        self._flows[key] = _Flow(
            out_port=port, until=now + FLOW_CACHE_S, eth=out[:12], addrs_ports=out[26:38],
            ttl_dec=frame[22] - out[22],
            ip_delta=_delta((frame[24] << 8) | frame[25], (out[24] << 8) | out[25]),
            l4_off=off,
            l4_delta=_delta((frame[off] << 8) | frame[off + 1], (out[off] << 8) | out[off + 1]))
