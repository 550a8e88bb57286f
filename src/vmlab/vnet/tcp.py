"""Userspace TCP for vnet's virtual IPs: passive open only, sans-I/O.

Owns: the TCP state machine of RFC 9293 for connections that peers open *to* a
virtual IP (the agent dialling the test driver at 52.52.0.2:8008, for example),
with retransmission (RFC 6298), congestion control (RFC 5681 slow start,
congestion avoidance, fast retransmit; RFC 6582 NewReno recovery), zero-window
probing, out-of-order reassembly and RFC 5961 checks on RST, SYN and ACK.

Leaves to others: parsing and building IPv4/TCP headers and checksums (vnet's
frame codec turns wire bytes into `TcpSegment` and back), the clock (every entry
point takes `now`, monotonic seconds), sockets and timers (the runtime), and the
asyncio-facing stream (`vmlab.vnet.tcp_stream`). Active open, window scaling,
SACK, timestamps and urgent data are not implemented; our SYN-ACK carries only
the MSS option, so a peer never uses the others.

Contract for the runtime (one thread; nothing here is thread-safe):

* call `receive(seg, now)` for each inbound segment and `tick(now)` when
  `next_deadline()` has passed, or after any app call on a connection
  (`send`, `close`, `abort`, `set_receive_window`), which only record intent;
* after each of those calls, send everything `take_outgoing()` returns and
  re-arm the timer at `next_deadline()` (a value <= now means "tick now");
* never call `receive` or `tick` from inside a callback (`on_accept`,
  `on_data`, `on_eof`, `on_closed`, `on_writable`): app code that runs there
  may call the connection's methods, but the runtime's "kick" must defer the
  tick to the next loop iteration (`loop.call_soon`).
"""
from __future__ import annotations

import enum
import hashlib
import heapq
import itertools
import logging
import os
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Callable

from vmlab.errors import StateError

__all__ = [
    "TcpStack", "TcpConnection", "TcpSegment", "TcpFlags", "TcpState",
    "seq_add", "seq_diff", "seq_lt", "seq_le", "seq_gt", "seq_ge",
]

log = logging.getLogger(__name__)

MSS_DEFAULT = 536          # RFC 9293 §3.7.1: assumed when a SYN carries no MSS option
MSS_MAX = 1460             # 1500-byte Ethernet MTU minus 20 (IPv4) and 20 (TCP) header bytes
MAX_WINDOW = 65535         # no window scaling (RFC 7323) is negotiated, so 16 bits is the cap
RTO_INITIAL_S = 1.0        # RFC 6298 §2.1
RTO_MIN_S = 0.2            # below RFC 6298's 1 s: a simulated network has sub-ms RTTs (Linux uses 0.2 s)
RTO_MAX_S = 10.0
MAX_RETRIES = 8            # retransmissions (or unanswered window probes) before we reset (~65 s)
SYN_RECEIVED_RETRIES = 4   # SYN-ACK retransmissions before a half-open connection is dropped (~31 s)
TIME_WAIT_S = 2.0          # 2*MSL, shortened: segments in a simulated network do not linger
MAX_OOO_SEGMENTS = 64      # out-of-order segments held per connection; all lie within our window
MAX_HALF_OPEN = 4096
MAX_ESTABLISHED = 4096
SEND_LOW_WATER = 64 * 1024  # on_writable fires when unacked+unsent bytes fall to this

_MOD = 1 << 32
_HALF = 1 << 31


def seq_add(a: int, n: int) -> int:
    """Sequence number `a + n` modulo 2**32 (RFC 9293 §3.4)."""
    return (a + n) & (_MOD - 1)


def seq_diff(a: int, b: int) -> int:
    """Signed distance `a - b` between sequence numbers, in [-2**31, 2**31)."""
    d = (a - b) & (_MOD - 1)
    return d - _MOD if d >= _HALF else d


def seq_lt(a: int, b: int) -> bool: return seq_diff(a, b) < 0
def seq_le(a: int, b: int) -> bool: return seq_diff(a, b) <= 0
def seq_gt(a: int, b: int) -> bool: return seq_diff(a, b) > 0
def seq_ge(a: int, b: int) -> bool: return seq_diff(a, b) >= 0


class TcpFlags(enum.IntFlag):
    """TCP control bits with their wire values (RFC 9293 §3.1, RFC 3168 for ECE/CWR)."""
    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    PSH = 0x08
    ACK = 0x10
    URG = 0x20
    ECE = 0x40
    CWR = 0x80


# Plain ints on the hot path: an IntFlag operation costs a microsecond. Emitted segments carry ints.
FIN, SYN, RST, PSH, ACK = (int(f) for f in (TcpFlags.FIN, TcpFlags.SYN, TcpFlags.RST, TcpFlags.PSH, TcpFlags.ACK))


class TcpState(enum.Enum):
    """Connection states, named as in RFC 9293 §3.3.2 (no SYN-SENT: we never open)."""
    LISTEN = "LISTEN"
    SYN_RECEIVED = "SYN-RECEIVED"
    ESTABLISHED = "ESTABLISHED"
    FIN_WAIT_1 = "FIN-WAIT-1"
    FIN_WAIT_2 = "FIN-WAIT-2"
    CLOSE_WAIT = "CLOSE-WAIT"
    CLOSING = "CLOSING"
    LAST_ACK = "LAST-ACK"
    TIME_WAIT = "TIME-WAIT"
    CLOSED = "CLOSED"


S = TcpState
_CAN_SEND = {S.ESTABLISHED, S.CLOSE_WAIT}
_OUTPUT_STATES = {S.ESTABLISHED, S.CLOSE_WAIT, S.FIN_WAIT_1, S.CLOSING, S.LAST_ACK}
_RECEIVES_DATA = {S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2}
# A RST in these states loses data the app expected, so on_closed gets an error (§3.10.7.4).
_RESET_IS_ERROR = {S.ESTABLISHED, S.FIN_WAIT_1, S.FIN_WAIT_2, S.CLOSE_WAIT}


@dataclass(frozen=True, slots=True)
class TcpSegment:
    """One TCP segment as vnet sees it; the frame codec maps it to and from the wire.

    Deliberately dropped wire fields: checksum, data offset, urgent pointer and
    every option except MSS (`mss`, present on SYN and SYN-ACK).
    """
    src_ip: IPv4Address
    src_port: int
    dst_ip: IPv4Address
    dst_port: int
    seq: int
    ack: int
    flags: int                 # TcpFlags bits; emitted as a plain int
    window: int
    payload: bytes = b""
    mss: int | None = None

    def __repr__(self) -> str:
        f = "|".join(x.name for x in TcpFlags if self.flags & x) or "-"
        return (f"<TcpSegment {self.src_ip}:{self.src_port} > {self.dst_ip}:{self.dst_port} {f} "
                f"seq={self.seq} ack={self.ack} win={self.window} len={len(self.payload)}>")


Addr = tuple[IPv4Address, int]
IsnFunc = Callable[[Addr, Addr, float], int]


def rfc6528_isn(key: bytes | None = None) -> IsnFunc:
    """ISN generator of RFC 6528: a 4-microsecond clock plus a keyed hash of the 4-tuple."""
    key = key if key is not None else os.urandom(16)

    def isn(local: Addr, remote: Addr, now: float) -> int:
        h = hashlib.blake2b(f"{local}{remote}".encode(), key=key, digest_size=4).digest()
        return (int(now * 250_000) + int.from_bytes(h, "big")) & (_MOD - 1)
    return isn


class TcpStack:
    """All listeners and connections of the virtual IPs one vnet serves.

    Example (what the runtime does)::

        stack = TcpStack()
        stack.listen(IPv4Address("52.52.0.2"), 8008, lambda conn: TcpStream(conn, kick))
        stack.receive(seg, now); send_all(stack.take_outgoing()); rearm(stack.next_deadline())
    """

    def __init__(self, *, isn: IsnFunc | None = None, mss: int = MSS_MAX, ack_delay_s: float = 0.0,
                 rcv_window: int = MAX_WINDOW,
                 max_half_open: int = MAX_HALF_OPEN, max_established: int = MAX_ESTABLISHED):
        """`mss` is what we advertise; `ack_delay_s` 0 means every in-order data
        segment is ACKed at once (default: avoids the Nagle/delayed-ACK stall on
        request/response traffic); > 0 ACKs every second segment and holds an odd
        one at most that long (RFC 9293 §3.8.6.3). `rcv_window` is the receive
        window offered in the SYN-ACK, before the app can call set_receive_window."""
        self._isn = isn or rfc6528_isn()
        self.mss = mss
        self.ack_delay_s = ack_delay_s
        self.rcv_window = rcv_window
        self.max_half_open, self.max_established = max_half_open, max_established
        self.stats: Counter[str] = Counter()
        self._listeners: dict[Addr, Callable[[TcpConnection], None]] = {}
        self._conns: dict[tuple, TcpConnection] = {}
        self._half_open = 0
        self._established = 0
        self._out: list[TcpSegment] = []
        self._heap: list[tuple[float, int, TcpConnection]] = []
        self._tiebreak = itertools.count()
        # Connections to flush, in a dict (an ordered set) so output order is reproducible.
        self._dirty: dict[TcpConnection, None] = {}
        self._now = 0.0

    # -- runtime-facing API ------------------------------------------------------------

    def listen(self, ip: IPv4Address, port: int, on_accept: Callable[[TcpConnection], None]) -> None:
        """Accept connections to ip:port; `on_accept(conn)` runs when one reaches ESTABLISHED.

        Set the connection's callbacks inside on_accept: data that came with the
        handshake's final ACK is delivered right after it returns."""
        if (ip, port) in self._listeners:
            raise StateError(f"already listening on {ip}:{port}; call unlisten() first")
        self._listeners[(ip, port)] = on_accept

    def unlisten(self, ip: IPv4Address, port: int) -> None:
        """Stop accepting on ip:port; existing connections are unaffected."""
        self._listeners.pop((ip, port), None)

    def handles(self, seg: TcpSegment) -> bool:
        """True if seg is for a listener or a live connection of this stack.

        The runtime may also pass segments for any other port of a VIP it owns;
        they are answered with RST as a closed port (RFC 9293 §3.10.7.1)."""
        return ((seg.dst_ip, seg.dst_port) in self._listeners
                or (seg.dst_ip, seg.dst_port, seg.src_ip, seg.src_port) in self._conns)

    def receive(self, seg: TcpSegment, now: float) -> None:
        """Process one inbound segment (RFC 9293 §3.10.7); then call take_outgoing()."""
        self._now = now
        self.stats["segments_in"] += 1
        conn = self._conns.get((seg.dst_ip, seg.dst_port, seg.src_ip, seg.src_port))
        listener = self._listeners.get((seg.dst_ip, seg.dst_port))
        if (conn is not None and conn.state is S.TIME_WAIT and listener is not None
                and seg.flags & (SYN | ACK | RST) == SYN and seq_gt(seg.seq, conn.rcv_nxt)):
            # A new incarnation of the pair may reuse it from TIME-WAIT (RFC 9293 §3.10.7.4, RFC 6191).
            conn._destroy(None)
            conn = None
        if conn is not None:
            conn._segment_arrives(seg, now)
            self._dirty[conn] = None
        elif listener is not None:
            self._listen_arrives(seg, now, listener)
        else:
            self._closed_arrives(seg, "no_listener")
        self._flush(now)

    def tick(self, now: float) -> None:
        """Run due timers and any output app calls have queued; then call take_outgoing()."""
        self._now = now
        while self._heap and self._heap[0][0] <= now:
            at, _, conn = heapq.heappop(self._heap)
            if conn._heap_at != at or conn.state is S.CLOSED:
                continue  # superseded: a later entry for this connection exists, or it is gone
            conn._heap_at = None
            conn._on_timer(now)
            self._dirty[conn] = None
        self._flush(now)

    def next_deadline(self) -> float | None:
        """Earliest time tick() has work (<= the last `now` seen means at once), or None.

        May be early (a timer was pushed back); tick() then does nothing and re-arms."""
        if self._dirty:
            return self._now
        while self._heap and (self._heap[0][2]._heap_at != self._heap[0][0]
                              or self._heap[0][2].state is S.CLOSED):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def take_outgoing(self) -> list[TcpSegment]:
        """Segments produced since the last call, in send order."""
        out, self._out = self._out, []
        return out

    @property
    def connections(self) -> list[TcpConnection]:
        return list(self._conns.values())

    # -- internals ------------------------------------------------------------------

    def _emit(self, seg: TcpSegment) -> None:
        self.stats["segments_out"] += 1
        if seg.flags & RST:
            self.stats["resets_sent"] += 1
        self._out.append(seg)

    def _drop(self, reason: str) -> None:
        self.stats["drop." + reason] += 1

    def _reply(self, seg: TcpSegment, seq: int, ack: int, flags: int) -> None:
        self._emit(TcpSegment(seg.dst_ip, seg.dst_port, seg.src_ip, seg.src_port, seq, ack, flags, 0))

    def _closed_arrives(self, seg: TcpSegment, reason: str) -> None:
        # RFC 9293 §3.10.7.1: answer anything but a RST with a RST the sender will accept.
        self._drop(reason)
        if seg.flags & RST:
            return
        if seg.flags & ACK:
            self._reply(seg, seg.ack, 0, RST)
        else:
            seg_len = len(seg.payload) + bool(seg.flags & SYN) + bool(seg.flags & FIN)
            self._reply(seg, 0, seq_add(seg.seq, seg_len), RST | ACK)

    def _listen_arrives(self, seg: TcpSegment, now: float, on_accept) -> None:
        # RFC 9293 §3.10.7.2 (LISTEN state).
        if seg.flags & RST:
            return self._drop("rst_to_listener")
        if seg.flags & ACK:
            return self._closed_arrives(seg, "ack_to_listener")
        if not seg.flags & SYN:
            return self._drop("no_syn_to_listener")
        if self._half_open >= self.max_half_open:
            return self._drop("half_open_full")  # silently: the peer retries its SYN
        local, remote = (seg.dst_ip, seg.dst_port), (seg.src_ip, seg.src_port)
        iss = self._isn(local, remote, now) & (_MOD - 1)
        conn = TcpConnection(self, local, remote, iss=iss, irs=seg.seq,
                             peer_mss=seg.mss or MSS_DEFAULT, peer_window=seg.window, on_accept=on_accept)
        self._conns[(seg.dst_ip, seg.dst_port, seg.src_ip, seg.src_port)] = conn
        self._half_open += 1
        # SYN data, if any, is not acknowledged, so the peer sends it again after the handshake.
        conn._send_syn_ack(now)
        self._dirty[conn] = None

    def _flush(self, now: float) -> None:
        while self._dirty:
            conn, _ = self._dirty.popitem()
            if conn.state is S.CLOSED:
                continue
            conn._output(now)
            if conn._ack_now:
                conn._emit(ACK, conn.snd_nxt)
            at = conn._next_deadline()
            if at is not None and (conn._heap_at is None or at < conn._heap_at):
                conn._heap_at = at
                heapq.heappush(self._heap, (at, next(self._tiebreak), conn))


class TcpConnection:
    """One connection; RFC 9293 variable names (snd_una, rcv_nxt, ...).

    App side: set `on_data(bytes)`, `on_eof()`, `on_closed(error | None)` and
    `on_writable()` in the stack's on_accept callback; call `send`, `close`,
    `abort` and `set_receive_window`, then have the runtime tick the stack.
    `on_closed(None)` means every byte we sent was acknowledged and the peer
    finished too; it runs on entering TIME-WAIT, whose 2 s linger is internal.
    """

    def __init__(self, stack: TcpStack, local: Addr, remote: Addr, *, iss: int, irs: int,
                 peer_mss: int, peer_window: int, on_accept):
        self._stack = stack
        self.local, self.remote = local, remote
        self.state = S.SYN_RECEIVED
        self.on_data: Callable[[bytes], None] = lambda data: None
        self.on_eof: Callable[[], None] = lambda: None
        self.on_closed: Callable[[Exception | None], None] = lambda error: None
        self.on_writable: Callable[[], None] = lambda: None
        self.send_low_water = SEND_LOW_WATER
        self._on_accept = on_accept
        self._accepted = False
        self._closed_reported = False
        self.iss, self.irs = iss, irs
        self.snd_una, self.snd_nxt = iss, seq_add(iss, 1)
        self._snd_max = self.snd_nxt              # highest sequence number sent so far, plus one
        self.snd_wnd, self.snd_wl1, self.snd_wl2 = peer_window, irs, iss
        self._max_snd_wnd = peer_window
        self.rcv_nxt = seq_add(irs, 1)
        self._rcv_adv = self.rcv_nxt              # right edge of the window we last advertised
        self._rcv_app_window = stack.rcv_window
        self._rcv_buff: int | None = None         # RCV.BUFF: the largest window the app asked for
        self.mss = max(1, min(peer_mss, MSS_MAX, stack.mss))
        # RFC 5681 §3.1 initial window; ssthresh starts "arbitrarily high".
        self.cwnd = min(4 * self.mss, max(2 * self.mss, 4380))
        self.ssthresh = MAX_WINDOW
        self._dupacks = 0
        self._recover: int | None = None          # NewReno recovery point while in fast recovery
        self._sndbuf = bytearray()                # unacked + unsent data, starting at _snd_base
        self._snd_base = self.snd_nxt
        self._fin_seq: int | None = None          # sequence number of our FIN once close() is called
        self._ooo: dict[int, tuple[bytes, bool]] = {}
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._rto_base = RTO_INITIAL_S
        self._rto = RTO_INITIAL_S                 # _rto_base with exponential backoff applied
        self._retries = 0
        self._rtt_seq: int | None = None          # Karn: time one never-retransmitted segment at a time
        self._rtt_at = 0.0
        self._rto_at: float | None = None
        self._persist_at: float | None = None
        self._probes = 0
        self._ack_at: float | None = None
        self._ack_now = False
        self._unacked_segments = 0
        self._timewait_at: float | None = None
        self._heap_at: float | None = None

    def __repr__(self) -> str:
        return (f"<TcpConnection {self.local[0]}:{self.local[1]} <- {self.remote[0]}:{self.remote[1]}"
                f" {self.state.name}>")

    # -- app-facing API ---------------------------------------------------------------

    @property
    def send_buffered(self) -> int:
        """Bytes given to send() and not yet acknowledged by the peer."""
        return len(self._sndbuf)

    def send(self, data: bytes) -> None:
        """Queue data; it goes out within the peer's window and our congestion window."""
        if self.state not in _CAN_SEND or self._fin_seq is not None:
            raise StateError(f"{self!r}: send() after close() or reset; open a new connection")
        if data:
            self._sndbuf += data
            self._stack._dirty[self] = None

    def close(self) -> None:
        """Send FIN once buffered data is out (RFC 9293 §3.10.4). Receiving continues until the peer's FIN."""
        if self.state is S.ESTABLISHED:
            self._set_state(S.FIN_WAIT_1)
        elif self.state is S.CLOSE_WAIT:
            self._set_state(S.LAST_ACK)  # §3.10.4 says CLOSING; the state diagram (§3.3.2) is right
        else:
            return
        self._fin_seq = seq_add(self._snd_base, len(self._sndbuf))
        self._stack._dirty[self] = None

    def abort(self) -> None:
        """Reset the connection now (RFC 9293 §3.10.5); on_closed(None) follows."""
        if self.state not in (S.CLOSED, S.TIME_WAIT):
            self._emit(RST, self.snd_nxt)
        self._destroy(None)

    def set_receive_window(self, n: int) -> None:
        """Free receive space the app has; we advertise min(65535, n), never shrinking the
        window already offered, and growing it in steps of at least min(RCV.BUFF/2, MSS),
        RCV.BUFF being the largest n passed so far (receiver SWS avoidance, §3.8.6.2.2)."""
        old = self._rcv_wnd()
        self._rcv_app_window = max(0, n)
        self._rcv_buff = max(self._rcv_buff or 0, self._rcv_app_window)
        if self.state in _RECEIVES_DATA and self._rcv_wnd() > old:
            self._ack_now = True  # window update, so the peer need not wait for its persist timer
            self._stack._dirty[self] = None

    # -- sending ------------------------------------------------------------------------

    def _rcv_wnd(self) -> int:
        offered = max(0, seq_diff(self._rcv_adv, self.rcv_nxt))
        wanted = min(MAX_WINDOW, self._rcv_app_window)
        buff = self._stack.rcv_window if self._rcv_buff is None else self._rcv_buff
        if wanted - offered < min(min(buff, MAX_WINDOW) // 2, self.mss):
            return offered  # receiver SWS avoidance (§3.8.6.2.2), and never shrink the window
        return wanted

    def _emit(self, flags: int, seq: int, payload: bytes = b"", mss: int | None = None) -> None:
        wnd = self._rcv_wnd()
        if flags & ACK:
            self._rcv_adv = seq_add(self.rcv_nxt, wnd)
            self._ack_now, self._ack_at, self._unacked_segments = False, None, 0
        (lip, lport), (rip, rport) = self.local, self.remote
        self._stack._emit(TcpSegment(lip, lport, rip, rport, seq, self.rcv_nxt if flags & ACK else 0,
                                     flags, wnd, payload, mss))

    def _send_syn_ack(self, now: float) -> None:
        self._emit(SYN | ACK, self.iss, mss=self._stack.mss)
        self._rto_at = now + self._rto

    def _output(self, now: float) -> None:
        """Send what the windows allow (RFC 9293 §3.8.6.2.1 sender SWS avoidance, no Nagle)."""
        if self.state not in _OUTPUT_STATES:
            return
        data_end = seq_add(self._snd_base, len(self._sndbuf))
        while True:
            in_flight = seq_diff(self.snd_nxt, self.snd_una)
            unsent = seq_diff(data_end, self.snd_nxt)
            if unsent > 0:
                room = min(self.snd_wnd, self.cwnd) - in_flight
                n = min(unsent, self.mss, room)
                if n <= 0 or (n < min(unsent, self.mss) and in_flight > 0 and n < self._max_snd_wnd // 2):
                    break
                self._send_data(self.snd_nxt, n, now)
            elif unsent == 0 and self._fin_seq == self.snd_nxt:
                self._send_data(self.snd_nxt, 0, now)  # a FIN takes no window space
            else:
                break
        if (self.snd_wnd == 0 and seq_lt(self.snd_nxt, data_end) and self.snd_nxt == self.snd_una
                and self._persist_at is None):
            # §3.8.6.1: probe a zero window after one RTO, backing off, so a lost update cannot deadlock us.
            self._persist_at = now + min(self._rto_base * 2 ** self._probes, RTO_MAX_S)

    def _send_data(self, seq: int, n: int, now: float, advance: bool = True) -> None:
        off = seq_diff(seq, self._snd_base)
        payload = bytes(self._sndbuf[off:off + n])
        end = seq_add(seq, n)
        flags = ACK | (PSH if n else 0)
        if self._fin_seq is not None and end == self._fin_seq:
            flags |= FIN
            end = seq_add(end, 1)
        if seq_lt(seq, self._snd_max):
            self._stack.stats["retransmits"] += 1
        elif self._rtt_seq is None:
            self._rtt_seq, self._rtt_at = end, now
        self._emit(flags, seq, payload)
        if advance:
            self.snd_nxt = end
        if seq_gt(end, self._snd_max):
            self._snd_max = end
        if self._rto_at is None:
            self._rto_at = now + self._rto

    # -- receiving ----------------------------------------------------------------------

    def _segment_arrives(self, seg: TcpSegment, now: float) -> None:
        """RFC 9293 §3.10.7.4, steps numbered as there."""
        if self.state is S.SYN_RECEIVED and seg.flags & SYN and not seg.flags & ACK and seg.seq == self.irs:
            self._emit(SYN | ACK, self.iss, mss=self._stack.mss)  # our SYN-ACK was lost; the peer retries
            return
        wnd = self._rcv_wnd()
        n = len(seg.payload)
        # A FIN needs no buffer space, so only the payload is tested against the window.
        if n == 0:
            ok = (seg.seq == self.rcv_nxt if wnd == 0 else
                  seq_le(self.rcv_nxt, seg.seq) and seq_lt(seg.seq, seq_add(self.rcv_nxt, wnd)))
        else:
            last = seq_add(seg.seq, n - 1)
            ok = wnd > 0 and any(seq_le(self.rcv_nxt, x) and seq_lt(x, seq_add(self.rcv_nxt, wnd))
                                 for x in (seg.seq, last))
        if not ok:  # step 1
            if seg.flags & RST:
                return self._stack._drop("rst_out_of_window")
            self._stack._drop("duplicate" if n and seq_le(seq_add(seg.seq, n), self.rcv_nxt)
                              else "out_of_window")
            if wnd == 0 and seg.flags & ACK and self.state is not S.SYN_RECEIVED:
                self._process_ack(seg, now)  # §3.10.7.4: still take ACKs (e.g. on window probes)
            self._ack_now = True
            if self.state is S.TIME_WAIT and seg.flags & FIN:
                self._timewait_at = now + TIME_WAIT_S  # a retransmitted FIN: re-ACK, restart 2*MSL
            return
        if seg.flags & RST:  # step 2, with RFC 5961 §3.2: only an exact match resets
            if seg.seq != self.rcv_nxt:
                self._ack_now = True  # challenge ACK
                return
            self._stack.stats["resets_received"] += 1
            err = (ConnectionResetError(f"{self!r}: peer reset the connection")
                   if self.state in _RESET_IS_ERROR else None)
            return self._destroy(err)
        if seg.flags & SYN:  # step 4, RFC 5961 §4: challenge ACK instead of reset
            self._ack_now = True
            return
        if not seg.flags & ACK:  # step 5
            return self._stack._drop("no_ack")
        if self.state is S.SYN_RECEIVED:
            if not (seq_lt(self.snd_una, seg.ack) and seq_le(seg.ack, self.snd_nxt)):
                return self._stack._reply(seg, seg.ack, 0, RST)
            if not self._establish(seg, now):
                return
        if not self._process_ack(seg, now) or self.state is S.CLOSED:
            return
        if self.state in _RECEIVES_DATA and (n or seg.flags & FIN):  # step 7
            self._receive_text(seg, wnd, now)

    def _establish(self, seg: TcpSegment, now: float) -> bool:
        stack = self._stack
        if stack._established >= stack.max_established:
            stack._drop("established_full")
            self._emit(RST, seg.ack)
            self._destroy(None)
            return False
        stack._half_open -= 1
        stack._established += 1
        stack.stats["connections_accepted"] += 1
        self.snd_una = seg.ack
        self._rto_at, self._retries, self._rto = None, 0, self._rto_base
        self.snd_wnd, self.snd_wl1, self.snd_wl2 = seg.window, seg.seq, seg.ack
        self._max_snd_wnd = seg.window
        self._set_state(S.ESTABLISHED)
        self._accepted = True
        self._on_accept(self)
        return self.state is not S.CLOSED

    def _process_ack(self, seg: TcpSegment, now: float) -> bool:
        """Step 5 for synchronized states; False if the segment must be dropped."""
        ack = seg.ack
        if seq_gt(ack, self._snd_max) or seq_lt(ack, seq_add(self.snd_una, -max(self._max_snd_wnd, 1))):
            self._ack_now = True  # acks data never sent, or far too old (RFC 5961 §5.2)
            self._stack._drop("bad_ack")
            return False
        self._probes = 0  # the peer is alive: window probing must not give up (§3.8.6.1)
        if seq_gt(ack, self.snd_una):
            self._new_ack(ack, now)
        elif (ack == self.snd_una and not seg.payload and not seg.flags & (SYN | FIN)
              and seg.window == self.snd_wnd and seq_lt(self.snd_una, self.snd_nxt)):
            self._dup_ack(now)
        if seq_lt(self.snd_wl1, seg.seq) or (self.snd_wl1 == seg.seq and seq_le(self.snd_wl2, ack)):
            if seg.window and not self.snd_wnd:
                self._persist_at = None
            self.snd_wnd, self.snd_wl1, self.snd_wl2 = seg.window, seg.seq, ack
            self._max_snd_wnd = max(self._max_snd_wnd, seg.window)
        if self._fin_seq is not None and seq_gt(self.snd_una, self._fin_seq):  # our FIN is acked
            if self.state is S.FIN_WAIT_1:
                self._set_state(S.FIN_WAIT_2)
            elif self.state is S.CLOSING:
                self._enter_time_wait(now)
            elif self.state is S.LAST_ACK:
                self._destroy(None)
                return False
        self._stack._dirty[self] = None
        return True

    def _new_ack(self, ack: int, now: float) -> None:
        acked = seq_diff(ack, self.snd_una)
        before = len(self._sndbuf)
        trim = min(max(seq_diff(ack, self._snd_base), 0), before)
        del self._sndbuf[:trim]
        self._snd_base = seq_add(self._snd_base, trim)
        self.snd_una = ack
        if seq_lt(self.snd_nxt, ack):
            self.snd_nxt = ack  # a go-back-N resend, or a window probe, was covered
        if self._rtt_seq is not None and seq_ge(ack, self._rtt_seq):
            self._rtt_sample(now - self._rtt_at)
        self._retries, self._rto = 0, self._rto_base
        self._rto_at = now + self._rto if seq_lt(ack, self.snd_nxt) else None  # RFC 6298 §5.2, 5.3
        if self._recover is not None:
            if seq_ge(ack, self._recover):  # RFC 6582 §3.2 step 3: full ACK ends recovery
                self.cwnd, self._recover = self.ssthresh, None
            else:  # partial ACK: the next hole is lost too; resend it and deflate
                self._send_data(self.snd_una, min(self.mss, self._unacked_data()), now, advance=False)
                self.cwnd = max(self.cwnd - acked + self.mss, self.mss)
        elif self.cwnd < self.ssthresh:
            self.cwnd += min(acked, self.mss)  # slow start, RFC 5681 §3.1 with RFC 3465 L=1
        else:
            self.cwnd += max(1, self.mss * self.mss // self.cwnd)  # congestion avoidance
        self.cwnd = min(self.cwnd, 2 * MAX_WINDOW)  # the peer's window caps us anyway
        self._dupacks = 0
        if before > self.send_low_water >= len(self._sndbuf):
            self.on_writable()

    def _dup_ack(self, now: float) -> None:
        self._dupacks += 1
        if self._dupacks == 3 and self._recover is None:  # RFC 5681 §3.2 fast retransmit
            flight = seq_diff(self._snd_max, self.snd_una)
            self.ssthresh = max(flight // 2, 2 * self.mss)
            self._recover = self._snd_max
            self._rtt_seq = None
            self._send_data(self.snd_una, min(self.mss, self._unacked_data()), now, advance=False)
            self.cwnd = self.ssthresh + 3 * self.mss
        elif self._dupacks > 3 and self._recover is not None:
            self.cwnd += self.mss  # each dup ACK means a segment left the network

    def _unacked_data(self) -> int:
        return len(self._sndbuf) - max(0, seq_diff(self.snd_una, self._snd_base))

    def _rtt_sample(self, r: float) -> None:
        # RFC 6298 §2.2-2.3, G taken as 1 ms.
        if self._srtt is None:
            self._srtt, self._rttvar = r, r / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - r)
            self._srtt = 0.875 * self._srtt + 0.125 * r
        self._rto_base = min(max(self._srtt + max(0.001, 4 * self._rttvar), RTO_MIN_S), RTO_MAX_S)
        self._rtt_seq = None

    def _receive_text(self, seg: TcpSegment, wnd: int, now: float) -> None:
        seq, data, fin = seg.seq, seg.payload, bool(seg.flags & FIN)
        skip = seq_diff(self.rcv_nxt, seq)
        if skip > 0:  # already have the front of it
            data, seq = data[skip:], self.rcv_nxt
        room = seq_diff(seq_add(self.rcv_nxt, wnd), seq)
        if len(data) > room:  # beyond our window: keep what fits, and the FIN cannot be reached
            data, fin = data[:max(room, 0)], False
            self._stack._drop("beyond_window")
        if seq != self.rcv_nxt:
            if len(self._ooo) >= MAX_OOO_SEGMENTS:
                self._stack._drop("ooo_full")
            elif (data or fin) and len(data) >= len(self._ooo.get(seq, (b"",))[0]):
                self._ooo[seq] = (data, fin)
            self._ack_now = True  # an immediate duplicate ACK drives the peer's fast retransmit
            return
        self._unacked_segments += 1
        if self._ooo:
            self._ack_now = True  # a gap is filling: tell the peer at once (RFC 5681 §4.2)
        while True:
            if data:
                self.rcv_nxt = seq_add(self.rcv_nxt, len(data))
                self.on_data(data)
                if self.state is S.CLOSED:
                    return
            if fin:
                return self._receive_fin(now)
            data, fin = self._pop_ooo()
            if not data and not fin:
                break
        if self._stack.ack_delay_s <= 0 or self._unacked_segments >= 2:
            self._ack_now = True
        elif self._ack_at is None:
            self._ack_at = now + self._stack.ack_delay_s

    def _pop_ooo(self) -> tuple[bytes, bool]:
        for seq in list(self._ooo):
            if seq_le(seq, self.rcv_nxt):
                data, fin = self._ooo.pop(seq)
                skip = seq_diff(self.rcv_nxt, seq)
                if skip < len(data) or (fin and skip == len(data)):
                    return data[skip:], fin
        return b"", False

    def _receive_fin(self, now: float) -> None:
        # Step 8.
        self.rcv_nxt = seq_add(self.rcv_nxt, 1)
        self._ooo.clear()
        self._ack_now = True
        if self.state is S.ESTABLISHED:
            self._set_state(S.CLOSE_WAIT)
        elif self.state is S.FIN_WAIT_1:
            self._set_state(S.CLOSING)  # our FIN is not acked yet, or _process_ack moved us on
        elif self.state is S.FIN_WAIT_2:
            self._enter_time_wait(now)
        self.on_eof()

    # -- timers and teardown ------------------------------------------------------------

    def _next_deadline(self) -> float | None:
        times = [t for t in (self._ack_at, self._rto_at, self._persist_at, self._timewait_at) if t is not None]
        return min(times) if times else None

    def _on_timer(self, now: float) -> None:
        if self._ack_at is not None and now >= self._ack_at:
            self._ack_now = True
        if self._timewait_at is not None and now >= self._timewait_at:
            return self._destroy(None)
        if self._rto_at is not None and now >= self._rto_at:
            self._on_rto(now)
        if self._persist_at is not None and now >= self._persist_at and self.state is not S.CLOSED:
            self._on_persist(now)

    def _on_rto(self, now: float) -> None:
        self._rto_at = None
        if not seq_lt(self.snd_una, self.snd_nxt):
            return
        self._retries += 1
        if self._retries > (SYN_RECEIVED_RETRIES if self.state is S.SYN_RECEIVED else MAX_RETRIES):
            return self._give_up(f"no ACK after {self._retries - 1} retransmissions")
        self._rto = min(self._rto * 2, RTO_MAX_S)  # RFC 6298 §5.5 backoff
        if self.state is S.SYN_RECEIVED:
            self._stack.stats["retransmits"] += 1
            return self._send_syn_ack(now)
        # RFC 5681 §3.1 eq. 4, then go back to SND.UNA and resend in slow start.
        self.ssthresh = max(seq_diff(self._snd_max, self.snd_una) // 2, 2 * self.mss)
        self.cwnd, self._recover, self._dupacks, self._rtt_seq = self.mss, None, 0, None
        self.snd_nxt = self.snd_una
        self._output(now)
        if self._rto_at is None and seq_lt(self.snd_una, self.snd_nxt):
            self._rto_at = now + self._rto

    def _on_persist(self, now: float) -> None:
        self._persist_at = None
        if self.snd_wnd or self.snd_nxt != self.snd_una or not self._unacked_data():
            return
        self._probes += 1  # reset by any acceptable ACK
        if self._probes > MAX_RETRIES:
            return self._give_up(f"peer silent for {MAX_RETRIES} zero-window probes")
        # One byte beyond the window; snd_nxt stays put so the RTO timer does not count it,
        # and it is not timed, since the peer may hold it for as long as its window stays shut.
        rtt_seq = self._rtt_seq
        self._send_data(self.snd_nxt, 1, now, advance=False)
        self._rto_at, self._rtt_seq = None, rtt_seq
        self._persist_at = now + min(self._rto_base * 2 ** self._probes, RTO_MAX_S)

    def _give_up(self, why: str) -> None:
        self._stack.stats["give_ups"] += 1
        if self.state is S.SYN_RECEIVED:
            self._stack._drop("syn_received_timeout")
            return self._destroy(None)
        log.info("%r: %s; resetting", self, why)
        self._emit(RST, self.snd_nxt)
        self._destroy(ConnectionResetError(f"{self!r}: {why}"))

    def _enter_time_wait(self, now: float) -> None:
        self._set_state(S.TIME_WAIT)
        self._rto_at = self._persist_at = None
        self._timewait_at = now + TIME_WAIT_S
        self._report_closed(None)

    def _set_state(self, state: TcpState) -> None:
        log.debug("= %r -> %s", self, state.name)
        self.state = state

    def _report_closed(self, error: Exception | None) -> None:
        if self._accepted and not self._closed_reported:
            self._closed_reported = True
            self.on_closed(error)

    def _destroy(self, error: Exception | None) -> None:
        stack = self._stack
        if self.state is S.CLOSED:
            return
        if self.state is S.SYN_RECEIVED:
            stack._half_open -= 1
        elif self._accepted:
            stack._established -= 1
        self._set_state(S.CLOSED)
        key = (self.local[0], self.local[1], self.remote[0], self.remote[1])
        if stack._conns.get(key) is self:
            del stack._conns[key]
        self._rto_at = self._persist_at = self._ack_at = self._timewait_at = None
        self._ack_now = False
        self._report_closed(error)
