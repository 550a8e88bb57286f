"""Tests for vnet's userspace TCP (vmlab.vnet.tcp) and its asyncio streams (vmlab.vnet.tcp_stream).

Segments are synthetic and time is injected (no sleeps), except in the kernel
test, which connects a real Linux TCP to the stack through a TUN device in a
private network namespace (root only).
"""
from __future__ import annotations

import asyncio
import ctypes
import fcntl
import heapq
import itertools
import os
import random
import socket
import struct
import threading
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vmlab.vnet.tcp import (
    MAX_RETRIES, RTO_INITIAL_S, TIME_WAIT_S, TcpConnection, TcpFlags, TcpSegment, TcpStack, TcpState,
    seq_add, seq_diff, seq_ge, seq_gt, seq_le, seq_lt,
)
from vmlab.vnet.tcp_stream import TcpStream

F, S, R, P, A = TcpFlags.FIN, TcpFlags.SYN, TcpFlags.RST, TcpFlags.PSH, TcpFlags.ACK
VIP, VPORT = IPv4Address("52.52.0.2"), 8008
PEER, PPORT = IPv4Address("10.0.0.5"), 40000
ISS, IRS = 1000, 5000  # our ISN (injected) and the peer's; data starts at ISS+1 and IRS+1


def sig(seg: TcpSegment) -> tuple:
    """(flags, seq, ack, payload length), flags as letters in the order F S R P A."""
    letters = "".join(ch for ch, fl in zip("FSRPA", (F, S, R, P, A)) if seg.flags & fl)
    return (letters, seg.seq, seg.ack, len(seg.payload))


class App:
    """Records what one TcpConnection reports to its app."""

    def __init__(self, conn: TcpConnection):
        self.conn, self.data, self.eof, self.closed, self.writable = conn, bytearray(), False, [], 0
        self.window_after_data: int | None = None
        conn.on_data = self._data
        conn.on_eof = lambda: setattr(self, "eof", True)
        conn.on_closed = self.closed.append
        conn.on_writable = lambda: setattr(self, "writable", self.writable + 1)

    def _data(self, data: bytes) -> None:
        self.data += data
        if self.window_after_data is not None:
            self.conn.set_receive_window(self.window_after_data)


class H:
    """One stack listening on VIP:VPORT, a peer at PEER, and the current time."""

    def __init__(self, isn: int = ISS, **kw):
        self.stack = TcpStack(isn=lambda local, remote, now: isn, **kw)
        self.apps: list[App] = []
        self.stack.listen(VIP, VPORT, lambda conn: self.apps.append(App(conn)))
        self.now = 0.0

    def seg(self, flags, seq, ack=0, payload=b"", window=65535, mss=None, sport=PPORT, dport=VPORT):
        return TcpSegment(PEER, sport, VIP, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF, flags, window,
                          payload, mss)

    def rx(self, flags, seq, ack=0, payload=b"", **kw) -> list[tuple]:
        self.stack.receive(self.seg(flags, seq, ack, payload, **kw), self.now)
        return [sig(s) for s in self.stack.take_outgoing()]

    def tick(self, at: float | None = None) -> list[tuple]:
        """Advance to `at` (default: stay) and run the stack, as the runtime does after kick()."""
        self.now = self.now if at is None else at
        self.stack.tick(self.now)
        return [sig(s) for s in self.stack.take_outgoing()]

    def handshake(self, mss=1460, window=65535) -> App:
        assert self.rx(S, IRS, mss=mss, window=window) == [("SA", ISS, IRS + 1, 0)]
        assert self.rx(A, IRS + 1, ISS + 1, window=window) == []
        return self.apps[-1]

    @property
    def conn(self) -> TcpConnection:
        return self.apps[-1].conn


# -- sequence arithmetic ---------------------------------------------------------------------

@pytest.mark.parametrize("a,b,lt", [
    (1, 2, True), (2, 1, False), (0xFFFFFFFF, 0, True), (0, 0xFFFFFFFF, False),
    (0x7FFFFFFF, 0xFFFFFFFE, True), (5, 5, False),
], ids=["plain", "plain-rev", "wrap", "wrap-rev", "half-1", "equal"])
def test_seq_compare(a, b, lt):
    assert seq_lt(a, b) is lt
    assert seq_gt(b, a) is lt
    assert seq_le(a, b) is (lt or a == b)
    assert seq_ge(b, a) is (lt or a == b)


def test_seq_add_and_diff_wrap():
    assert seq_add(0xFFFFFFFF, 2) == 1
    assert seq_diff(1, 0xFFFFFFFF) == 2
    assert seq_diff(0xFFFFFFFF, 1) == -2


# -- handshake and closed ports (RFC 9293 §3.5, §3.10.7.1-2) -----------------------------------

def test_handshake_accepts_and_negotiates_mss():
    h = H()
    out = h.rx(S, IRS, mss=1000)
    assert out == [("SA", ISS, IRS + 1, 0)]
    assert h.apps == [] and h.stack.stats["connections_accepted"] == 0
    assert h.rx(A, IRS + 1, ISS + 1) == []
    assert len(h.apps) == 1
    conn = h.conn
    assert conn.state is TcpState.ESTABLISHED and conn.mss == 1000
    assert conn.local == (VIP, VPORT) and conn.remote == (PEER, PPORT)
    assert h.stack.handles(h.seg(A, IRS + 1, ISS + 1))


def test_syn_ack_carries_our_mss_and_no_other_option():
    h = H(mss=1400)
    h.stack.receive(h.seg(S, IRS, mss=1460), 0.0)
    (synack,) = h.stack.take_outgoing()
    assert synack.mss == 1400 and synack.window == 65535
    assert (synack.src_ip, synack.src_port, synack.dst_ip, synack.dst_port) == (VIP, VPORT, PEER, PPORT)


@pytest.mark.parametrize("flags,seq,ack,payload,dport,want", [
    (S, IRS, 0, b"", 9, [("RA", 0, IRS + 1, 0)]),               # SYN to a closed port
    (A, IRS + 1, 777, b"", VPORT, [("R", 777, 0, 0)]),                # ACK on a listener, no connection
    (A, IRS + 1, 777, b"", 9, [("R", 777, 0, 0)]),                    # ACK to a closed port
    (P, IRS + 1, 0, b"abc", 9, [("RA", 0, IRS + 4, 0)]),              # data without ACK: ack covers it
    (F, IRS + 1, 0, b"", 9, [("RA", 0, IRS + 2, 0)]),                 # FIN counts one
    (R, IRS + 1, 0, b"", 9, []),                                      # never answer a RST
    (R | A, IRS + 1, 5, b"", VPORT, []),
], ids=["syn-closed", "ack-listener", "ack-closed", "data-closed", "fin-closed", "rst-closed",
        "rst-listener"])
def test_segments_without_connection_get_rst(flags, seq, ack, payload, dport, want):
    h = H()
    assert h.rx(flags, seq, ack, payload, dport=dport) == want
    assert h.stack.connections == []


def test_handles_only_listeners_and_connections():
    h = H()
    assert h.stack.handles(h.seg(S, IRS))
    assert not h.stack.handles(h.seg(S, IRS, dport=9))
    h.stack.unlisten(VIP, VPORT)
    assert not h.stack.handles(h.seg(S, IRS))


def test_retransmitted_syn_gets_syn_ack_again():
    h = H()
    h.rx(S, IRS)
    assert h.rx(S, IRS) == [("SA", ISS, IRS + 1, 0)]


def test_bad_ack_in_syn_received_gets_rst():
    h = H()
    h.rx(S, IRS)
    assert h.rx(A, IRS + 1, ISS + 5) == [("R", ISS + 5, 0, 0)]
    assert h.apps == []


def test_syn_received_times_out_with_backoff():
    h = H()
    h.rx(S, IRS)
    times = []
    while (t := h.stack.next_deadline()) is not None:
        out = h.tick(t)
        if out:
            assert out == [("SA", ISS, IRS + 1, 0)]
            times.append(t)
    assert times == [1.0, 3.0, 7.0, 15.0]
    assert h.stack.connections == [] and h.apps == []
    assert h.stack.stats["drop.syn_received_timeout"] == 1


def test_half_open_and_established_tables_are_bounded():
    h = H(max_half_open=2, max_established=1)
    for port in (1, 2, 3):
        h.rx(S, IRS, sport=port)
    assert h.stack.stats["drop.half_open_full"] == 1
    assert h.rx(A, IRS + 1, ISS + 1, sport=1) == []
    assert h.rx(A, IRS + 1, ISS + 1, sport=2) == [("R", ISS + 1, 0, 0)]
    assert h.stack.stats["drop.established_full"] == 1
    assert len(h.apps) == 1 and len(h.stack.connections) == 1


# -- data transfer ----------------------------------------------------------------------

def test_data_in_order_is_delivered_and_acked():
    h = H()
    app = h.handshake()
    assert h.rx(P | A, IRS + 1, ISS + 1, b"hello") == [("A", ISS + 1, IRS + 6, 0)]
    assert h.rx(P | A, IRS + 6, ISS + 1, b" world") == [("A", ISS + 1, IRS + 12, 0)]
    assert app.data == b"hello world"


def test_data_out_is_segmented_by_peer_mss_and_initial_cwnd():
    h = H()
    app = h.handshake(mss=1000)
    app.conn.send(b"x" * 5000)
    # RFC 5681 initial window for MSS 1000 is 4 segments.
    assert h.tick() == [("PA", ISS + 1 + i * 1000, IRS + 1, 1000) for i in range(4)]
    assert h.rx(A, IRS + 1, ISS + 2001) == [("PA", ISS + 4001, IRS + 1, 1000)]
    assert app.conn.send_buffered == 3000


def test_reply_from_on_data_piggybacks_the_ack():
    h = H()
    app = h.handshake()
    app.conn.on_data = lambda data: app.conn.send(data.upper())
    assert h.rx(P | A, IRS + 1, ISS + 1, b"ping") == [("PA", ISS + 1, IRS + 5, 4)]


def test_out_of_order_segments_are_reassembled():
    h = H()
    app = h.handshake()
    assert h.rx(P | A, IRS + 5, ISS + 1, b"5678") == [("A", ISS + 1, IRS + 1, 0)]   # dup ACK at once
    assert h.rx(P | A, IRS + 9, ISS + 1, b"9") == [("A", ISS + 1, IRS + 1, 0)]
    assert app.data == b""
    assert h.rx(P | A, IRS + 1, ISS + 1, b"1234") == [("A", ISS + 1, IRS + 10, 0)]
    assert app.data == b"123456789"


def test_duplicate_and_overlapping_data_is_delivered_once():
    h = H()
    app = h.handshake()
    h.rx(P | A, IRS + 1, ISS + 1, b"abcd")
    assert h.rx(P | A, IRS + 1, ISS + 1, b"abcd") == [("A", ISS + 1, IRS + 5, 0)]
    assert h.rx(P | A, IRS + 3, ISS + 1, b"cdef") == [("A", ISS + 1, IRS + 7, 0)]
    assert app.data == b"abcdef"
    assert h.stack.stats["drop.duplicate"] == 1


def test_data_beyond_window_is_dropped_and_acked():
    h = H(rcv_window=100)
    app = h.handshake()
    assert h.rx(P | A, IRS + 1 + 200, ISS + 1, b"z" * 10) == [("A", ISS + 1, IRS + 1, 0)]
    assert h.stack.stats["drop.out_of_window"] == 1
    # Partly inside: the part within the window is taken, the rest is dropped.
    out = h.rx(P | A, IRS + 1, ISS + 1, b"y" * 150)
    assert app.data == b"y" * 100 and out[0][2] == IRS + 101
    assert h.stack.stats["drop.beyond_window"] == 1


def test_delayed_ack_acks_every_second_segment_or_after_the_delay():
    h = H(ack_delay_s=0.04)
    h.handshake()
    assert h.rx(P | A, IRS + 1, ISS + 1, b"a") == []
    assert h.stack.next_deadline() == pytest.approx(0.04)
    assert h.tick(0.04) == [("A", ISS + 1, IRS + 2, 0)]
    assert h.rx(P | A, IRS + 2, ISS + 1, b"b") == []
    assert h.rx(P | A, IRS + 3, ISS + 1, b"c") == [("A", ISS + 1, IRS + 4, 0)]


def test_app_calls_ask_for_an_immediate_tick():
    h = H()
    app = h.handshake()
    h.now = 5.0
    h.tick()
    assert h.stack.next_deadline() is None
    app.conn.send(b"x")
    assert h.stack.next_deadline() <= h.now


# -- retransmission and congestion control (RFC 6298, RFC 5681) ------------------------------

def test_lost_segment_is_retransmitted_after_rto_with_backoff():
    h = H()
    app = h.handshake()
    app.conn.send(b"data")
    assert h.tick() == [("PA", ISS + 1, IRS + 1, 4)]   # "lost"
    assert h.stack.next_deadline() == RTO_INITIAL_S
    assert h.tick(1.0) == [("PA", ISS + 1, IRS + 1, 4)]
    assert h.stack.next_deadline() == 3.0               # doubled
    assert h.tick(3.0) == [("PA", ISS + 1, IRS + 1, 4)]
    assert h.stack.next_deadline() == 7.0
    assert h.rx(A, IRS + 1, ISS + 5) == []
    assert h.stack.next_deadline() in (None, 7.0)        # a stale wakeup may remain; it does nothing
    assert h.tick(7.0) == [] and h.stack.next_deadline() is None
    assert h.stack.stats["retransmits"] == 2


def test_rto_goes_back_to_snd_una_in_slow_start():
    h = H()
    app = h.handshake(mss=1000)
    app.conn.send(b"x" * 3000)
    assert len(h.tick()) == 3
    h.rx(A, IRS + 1, ISS + 1001)            # first segment arrived; second and third "lost"
    assert h.tick(1.0) == [("PA", ISS + 1001, IRS + 1, 1000)]  # cwnd is one segment
    assert h.rx(A, IRS + 1, ISS + 2001) == [("PA", ISS + 2001, IRS + 1, 1000)]


def test_rtt_estimate_sets_rto():
    h = H()
    app = h.handshake()
    app.conn.send(b"x")
    h.tick(10.0)
    h.now = 10.05
    h.rx(A, IRS + 1, ISS + 2)
    app.conn.send(b"y")
    h.tick()
    # srtt 0.05, rttvar 0.025: RTO = 0.05 + 4 * 0.025 = 0.15, raised to the 0.2 s floor.
    assert h.stack.next_deadline() == pytest.approx(10.25)


def test_fast_retransmit_on_third_duplicate_ack():
    h = H()
    app = h.handshake(mss=1000)
    app.conn.send(b"x" * 6000)
    assert len(h.tick()) == 4
    assert h.rx(A, IRS + 1, ISS + 1001) == [              # ACK of segment 1: cwnd 5000, two more out
        ("PA", ISS + 4001, IRS + 1, 1000), ("PA", ISS + 5001, IRS + 1, 1000)]
    assert h.rx(A, IRS + 1, ISS + 1001) == []
    assert h.rx(A, IRS + 1, ISS + 1001) == []
    assert h.rx(A, IRS + 1, ISS + 1001) == [("PA", ISS + 1001, IRS + 1, 1000)]
    assert h.stack.stats["retransmits"] == 1
    h.rx(A, IRS + 1, ISS + 4001)                          # partial ACK: the next hole is resent
    assert h.stack.stats["retransmits"] == 2
    h.rx(A, IRS + 1, ISS + 6001)                          # full ACK ends recovery
    assert app.conn.cwnd == app.conn.ssthresh


def test_give_up_after_max_retries_reports_error():
    h = H()
    app = h.handshake()
    app.conn.send(b"data")
    h.tick()
    out = []
    while (t := h.stack.next_deadline()) is not None:
        out += h.tick(t)
    assert out[:-1] == [("PA", ISS + 1, IRS + 1, 4)] * MAX_RETRIES
    assert out[-1] == ("R", ISS + 5, 0, 0)
    (err,) = app.closed
    assert isinstance(err, ConnectionResetError) and "8 retransmissions" in str(err)
    assert h.stack.connections == [] and h.stack.stats["give_ups"] == 1


def test_on_writable_fires_below_low_water():
    h = H()
    app = h.handshake()
    app.conn.send_low_water = 1000
    app.conn.send(b"x" * 2000)
    h.tick()
    h.rx(A, IRS + 1, ISS + 1 + 500)
    assert app.writable == 0
    h.rx(A, IRS + 1, ISS + 1 + 1200)
    assert app.writable == 1


# -- windows and persist (RFC 9293 §3.8.6) -----------------------------------------------------

def test_peer_zero_window_is_probed_then_reopened():
    h = H()
    app = h.handshake(mss=1000, window=1000)
    app.conn.send(b"x" * 3000)
    assert h.tick() == [("PA", ISS + 1, IRS + 1, 1000)]
    assert h.rx(A, IRS + 1, ISS + 1001, window=0) == []
    assert h.stack.next_deadline() == pytest.approx(0.2)  # one RTO: a 0 s RTT sample puts it at the floor
    probes = []
    for _ in range(MAX_RETRIES + 5):  # more than MAX_RETRIES: an answering peer is never given up on
        out = h.tick(h.stack.next_deadline())
        if out:
            probes.append(out)
            assert out == [("PA", ISS + 1001, IRS + 1, 1)]
            h.rx(A, IRS + 1, ISS + 1001, window=0)
    assert len(probes) == MAX_RETRIES + 5 and app.conn.state is TcpState.ESTABLISHED
    assert h.rx(A, IRS + 1, ISS + 1001, window=2000) == [
        ("PA", ISS + 1001, IRS + 1, 1000), ("PA", ISS + 2001, IRS + 1, 1000)]


def test_probe_byte_taken_by_peer_advances_snd_una():
    h = H()
    app = h.handshake(mss=1000, window=1000)
    app.conn.send(b"x" * 1500)
    h.tick()
    h.rx(A, IRS + 1, ISS + 1001, window=0)
    assert h.tick(h.stack.next_deadline()) == [("PA", ISS + 1001, IRS + 1, 1)]
    assert h.rx(A, IRS + 1, ISS + 1002, window=5000) == [("PA", ISS + 1002, IRS + 1, 499)]


def test_our_zero_window_drops_probes_and_sends_window_update():
    h = H(rcv_window=1000)
    app = h.handshake(mss=1000)
    app.conn.set_receive_window(1000)   # the app's buffer: RCV.BUFF for receiver SWS avoidance
    app.window_after_data = 0
    assert h.rx(P | A, IRS + 1, ISS + 1, b"a" * 1000) == [("A", ISS + 1, IRS + 1001, 0)]
    h.stack.receive(h.seg(P | A, IRS + 1001, ISS + 1, b"b"), h.now)  # the peer's window probe
    (ack,) = h.stack.take_outgoing()
    assert sig(ack) == ("A", ISS + 1, IRS + 1001, 0) and ack.window == 0
    app.conn.set_receive_window(400)
    assert h.tick() == []   # under min(buffer/2, MSS): still 0 (receiver SWS avoidance)
    app.conn.set_receive_window(4000)
    h.stack.tick(h.now)
    (upd,) = h.stack.take_outgoing()
    assert sig(upd) == ("A", ISS + 1, IRS + 1001, 0) and upd.window == 4000


def test_zero_window_still_takes_acks():
    h = H(rcv_window=1000)
    app = h.handshake(mss=1000)
    app.window_after_data = 0
    app.conn.send(b"q" * 10)
    h.tick()
    h.rx(P | A, IRS + 1, ISS + 1, b"a" * 1000)
    h.rx(P | A, IRS + 1001, ISS + 11, b"b")      # unacceptable data, but its ACK counts
    assert app.conn.snd_una == ISS + 11 and app.conn.send_buffered == 0


# -- closing (RFC 9293 §3.6) -----------------------------------------------------------------

def test_peer_closes_first():
    h = H()
    app = h.handshake()
    assert h.rx(F | A, IRS + 1, ISS + 1) == [("A", ISS + 1, IRS + 2, 0)]
    assert app.eof and app.conn.state is TcpState.CLOSE_WAIT
    app.conn.send(b"bye")
    app.conn.close()
    assert h.tick() == [("FPA", ISS + 1, IRS + 2, 3)]
    assert app.conn.state is TcpState.LAST_ACK
    assert h.rx(A, IRS + 2, ISS + 5) == []
    assert app.closed == [None] and h.stack.connections == []


def test_we_close_first_then_time_wait_expires():
    h = H()
    app = h.handshake()
    app.conn.close()
    assert h.tick() == [("FA", ISS + 1, IRS + 1, 0)]
    assert app.conn.state is TcpState.FIN_WAIT_1
    assert h.rx(A, IRS + 1, ISS + 2) == []
    assert app.conn.state is TcpState.FIN_WAIT_2
    assert h.rx(P | A, IRS + 1, ISS + 2, b"late") == [("A", ISS + 2, IRS + 5, 0)]  # half-close: still reads
    assert h.rx(F | A, IRS + 5, ISS + 2) == [("A", ISS + 2, IRS + 6, 0)]
    assert app.conn.state is TcpState.TIME_WAIT and app.closed == [None] and app.data == b"late"
    assert h.rx(F | A, IRS + 5, ISS + 2) == [("A", ISS + 2, IRS + 6, 0)]           # lost ACK: again
    h.tick(TIME_WAIT_S - 0.01)
    assert h.stack.connections != []
    h.tick(TIME_WAIT_S)
    assert h.stack.connections == []
    assert h.rx(A, IRS + 6, ISS + 2) == [("R", ISS + 2, 0, 0)]   # the listener now answers for the pair


def test_simultaneous_close():
    h = H()
    app = h.handshake()
    app.conn.close()
    h.tick()
    assert h.rx(F | A, IRS + 1, ISS + 1) == [("A", ISS + 2, IRS + 2, 0)]
    assert app.conn.state is TcpState.CLOSING and app.eof
    assert h.rx(A, IRS + 2, ISS + 2) == []
    assert app.conn.state is TcpState.TIME_WAIT and app.closed == [None]


def test_fin_with_data_and_fin_out_of_order():
    h = H()
    app = h.handshake()
    assert h.rx(F | P | A, IRS + 4, ISS + 1, b"end") == [("A", ISS + 1, IRS + 1, 0)]
    assert not app.eof
    assert h.rx(P | A, IRS + 1, ISS + 1, b"the") == [("A", ISS + 1, IRS + 8, 0)]
    assert app.data == b"theend" and app.eof


def test_lost_fin_is_retransmitted():
    h = H()
    app = h.handshake()
    app.conn.close()
    assert h.tick() == [("FA", ISS + 1, IRS + 1, 0)]
    assert h.tick(1.0) == [("FA", ISS + 1, IRS + 1, 0)]
    h.rx(A, IRS + 1, ISS + 2)
    assert app.conn.state is TcpState.FIN_WAIT_2


def test_new_syn_reuses_time_wait_pair():
    h = H()
    app = h.handshake()
    app.conn.close()
    h.tick()
    h.rx(A, IRS + 1, ISS + 2)
    h.rx(F | A, IRS + 1, ISS + 2)
    assert h.rx(S, IRS + 100_000) == [("SA", ISS, IRS + 100_001, 0)]


def test_send_after_close_is_a_state_error():
    from vmlab.errors import StateError
    h = H()
    app = h.handshake()
    app.conn.close()
    with pytest.raises(StateError, match="send\\(\\) after close"):
        app.conn.send(b"x")


# -- RST and SYN in synchronized states (RFC 9293 §3.10.7.4, RFC 5961) -----------------------

@pytest.mark.parametrize("close_first,seq,want_out,want_state,want_error", [
    (None, IRS + 1, [], TcpState.CLOSED, True),                             # exact: reset
    (None, IRS + 100, [("A", ISS + 1, IRS + 1, 0)], TcpState.ESTABLISHED, None),  # in window: challenge ACK
    (None, IRS + 200_000, [], TcpState.ESTABLISHED, None),                  # outside: ignored
    ("peer", IRS + 2, [], TcpState.CLOSED, False),                          # LAST-ACK: closes quietly
    ("us", IRS + 1, [], TcpState.CLOSED, True),                             # FIN-WAIT-1: data may be lost
], ids=["exact", "in-window", "outside", "last-ack", "fin-wait-1"])
def test_rst(close_first, seq, want_out, want_state, want_error):
    h = H()
    app = h.handshake()
    if close_first == "peer":
        h.rx(F | A, IRS + 1, ISS + 1)
        app.conn.close()
        h.tick()
    elif close_first == "us":
        app.conn.send(b"unacked")
        app.conn.close()
        h.tick()
    assert h.rx(R, seq) == want_out
    assert app.conn.state is want_state
    if want_error is None:
        assert app.closed == []
    elif want_error:
        assert len(app.closed) == 1 and isinstance(app.closed[0], ConnectionResetError)
    else:
        assert app.closed == [None]


def test_rst_in_syn_received_drops_half_open_connection():
    h = H()
    h.rx(S, IRS)
    assert h.rx(R, IRS + 1) == []
    assert h.stack.connections == [] and h.apps == []


def test_syn_in_established_gets_challenge_ack():
    h = H()
    app = h.handshake()
    assert h.rx(S, IRS + 7) == [("A", ISS + 1, IRS + 1, 0)]
    assert app.conn.state is TcpState.ESTABLISHED


def test_ack_of_unsent_data_is_dropped_with_ack():
    h = H()
    app = h.handshake()
    assert h.rx(P | A, IRS + 1, ISS + 500, b"x") == [("A", ISS + 1, IRS + 1, 0)]
    assert app.data == b"" and h.stack.stats["drop.bad_ack"] == 1


def test_abort_sends_rst():
    h = H()
    app = h.handshake()
    app.conn.abort()
    assert [sig(s) for s in h.stack.take_outgoing()] == [("R", ISS + 1, 0, 0)]
    assert app.closed == [None] and h.stack.connections == []


# -- a second, independent peer over a lossy, reordering channel -------------------------------

class MiniClient:
    """Client-side TCP written for these tests: active open, in-order receive with cumulative
    ACKs, go-back-N retransmission on a fixed timer (which doubles as zero-window probing)."""

    def __init__(self, isn: int, data: bytes, mss: int, window: int, rto_s: float = 0.3):
        self.isn, self.data, self.mss, self.window, self.rto_s = isn, data, mss, window, rto_s
        self.snd_una = self.snd_nxt = isn
        self.peer_wnd = 0
        self.established = False
        self.rcv_nxt: int | None = None
        self.received = bytearray()
        self.fin_received = False
        self.reset = False
        self.rto_at: float | None = None
        self.out: list[TcpSegment] = []

    @property
    def fin_seq(self) -> int:
        return seq_add(self.isn, 1 + len(self.data))

    @property
    def done_sending(self) -> bool:
        return self.established and self.snd_una == seq_add(self.fin_seq, 1)

    def _emit(self, flags, seq, payload=b"", mss=None):
        self.out.append(TcpSegment(PEER, PPORT, VIP, VPORT, seq, self.rcv_nxt or 0, flags,
                                   self.window, payload, mss))

    def start(self, now):
        self._emit(S, self.isn, mss=self.mss)
        self.snd_nxt = seq_add(self.isn, 1)
        self.rto_at = now + self.rto_s

    def receive(self, seg: TcpSegment, now: float):
        if seg.flags & R:
            self.reset = True
            return
        if not self.established:
            if seg.flags & S and seg.flags & A and seg.ack == seq_add(self.isn, 1):
                self.established, self.rcv_nxt, self.snd_una = True, seq_add(seg.seq, 1), seg.ack
                self.peer_wnd = seg.window
                self._emit(A, self.snd_una)
                self.rto_at = None
                self._output(now)
            return
        if seg.flags & S:  # our ACK of the SYN-ACK was lost
            self._emit(A, self.snd_nxt)
            return
        if seq_gt(seg.ack, self.snd_una) and seq_le(seg.ack, self.snd_nxt):
            self.snd_una = seg.ack
            self.rto_at = now + self.rto_s if self.snd_una != self.snd_nxt else None
        self.peer_wnd = seg.window
        if seg.seq == self.rcv_nxt and not self.fin_received:
            self.received += seg.payload
            self.rcv_nxt = seq_add(self.rcv_nxt, len(seg.payload))
            if seg.flags & F:
                self.rcv_nxt = seq_add(self.rcv_nxt, 1)
                self.fin_received = True
        if seg.payload or seg.flags & F:
            self._emit(A, self.snd_nxt)
        self._output(now)

    def _output(self, now, force=False):
        data_end = seq_add(self.isn, 1 + len(self.data))
        while True:
            in_flight = seq_diff(self.snd_nxt, self.snd_una)
            room = self.peer_wnd - in_flight
            if force:
                room, force = max(room, 1), False  # go-back-N resend of one segment probes a zero window
            if seq_lt(self.snd_nxt, data_end) and room > 0:
                off = seq_diff(self.snd_nxt, self.isn) - 1
                n = min(self.mss, room, seq_diff(data_end, self.snd_nxt))
                payload = self.data[off:off + n]
                end = seq_add(self.snd_nxt, n)
                fin = F if end == data_end else 0
                self._emit(A | P | fin, self.snd_nxt, payload)
                self.snd_nxt = seq_add(end, 1 if fin else 0)
            elif self.snd_nxt == data_end:
                self._emit(F | A, self.snd_nxt)
                self.snd_nxt = seq_add(data_end, 1)
            else:
                break
            if self.rto_at is None:
                self.rto_at = now + self.rto_s
        if self.rto_at is None and seq_le(self.snd_nxt, data_end):
            self.rto_at = now + self.rto_s  # persist: a zero window whose update was lost must be probed

    def tick(self, now):
        if self.rto_at is None or now < self.rto_at:
            return
        self.rto_at = now + self.rto_s
        if not self.established:
            self._emit(S, self.isn, mss=self.mss)
            return
        self.snd_nxt = self.snd_una
        self._output(now, force=True)


class Channel:
    """Delivers segments after a delay with jitter (so they reorder), dropping and duplicating some."""

    def __init__(self, rng: random.Random, loss: float, dup: float, delay_s: float, jitter_s: float):
        self.rng, self.loss, self.dup, self.delay_s, self.jitter_s = rng, loss, dup, delay_s, jitter_s
        self.heap: list = []
        self.count = itertools.count()

    def send(self, seg, now, to):
        if self.rng.random() < self.loss:
            return
        for _ in range(2 if self.rng.random() < self.dup else 1):
            at = now + self.delay_s + self.rng.random() * self.jitter_s
            heapq.heappush(self.heap, (at, next(self.count), seg, to))


class SlowReader:
    """Server app: receives into a bounded buffer an app consumes now and then, and sends its data."""

    def __init__(self, conn: TcpConnection, data: bytes, chunks: list[int], capacity: int):
        self.conn, self.data, self.chunks, self.capacity = conn, data, chunks, capacity
        self.sent = 0
        self.buffer = bytearray()
        self.received = bytearray()
        self.eof = False
        self.closed: list = []
        conn.on_data = self._data
        conn.on_eof = lambda: setattr(self, "eof", True)
        conn.on_closed = self.closed.append
        conn.set_receive_window(capacity)

    def _data(self, data):
        self.buffer += data
        self.conn.set_receive_window(self.capacity - len(self.buffer))

    def step(self):
        """Consume everything buffered; write chunks up to 256 KiB unacked, then FIN."""
        self.received += self.buffer
        self.buffer.clear()
        if self.conn.state is TcpState.CLOSED:
            return
        self.conn.set_receive_window(self.capacity)
        while self.sent < len(self.data) and self.conn.send_buffered < 256 * 1024:
            n = self.chunks[self.sent % len(self.chunks)]
            self.conn.send(self.data[self.sent:self.sent + n])
            self.sent += n
        if self.sent >= len(self.data) and self.conn.state in (TcpState.ESTABLISHED, TcpState.CLOSE_WAIT):
            self.conn.close()


def run_lossy_transfer(*, up: bytes, down: bytes, chunks, server_isn, client_isn, mss, client_window,
                       capacity, loss, dup, delay_s, jitter_s, step_s, seed, max_time_s=5000.0):
    rng = random.Random(seed)
    stack = TcpStack(isn=lambda local, remote, now: server_isn)
    apps: list[SlowReader] = []
    stack.listen(VIP, VPORT, lambda conn: apps.append(SlowReader(conn, down, chunks, capacity)))
    client = MiniClient(client_isn, up, mss, client_window)
    chan = Channel(rng, loss, dup, delay_s, jitter_s)
    now, next_step = 0.0, step_s
    client.start(now)

    def pump():
        for seg in client.out:
            chan.send(seg, now, "server")
        client.out.clear()
        for seg in stack.take_outgoing():
            chan.send(seg, now, "client")

    pump()
    while now < max_time_s:
        if client.reset:
            raise AssertionError(f"client was reset at t={now:.3f}; stats {dict(stack.stats)}")
        if (apps and apps[0].closed and client.fin_received and client.done_sending
                and not apps[0].buffer):
            break
        times = [t for t in (chan.heap[0][0] if chan.heap else None, stack.next_deadline(),
                             client.rto_at, next_step) if t is not None]
        now = max(now, min(times))
        while chan.heap and chan.heap[0][0] <= now:
            _, _, seg, to = heapq.heappop(chan.heap)
            if to == "server":
                stack.receive(seg, now)
            else:
                client.receive(seg, now)
        client.tick(now)
        if now >= next_step:
            next_step = now + step_s
            for app in apps:
                app.step()
        stack.tick(now)
        pump()
    else:
        raise AssertionError(f"transfer not done by t={now}: client got {len(client.received)}/"
                             f"{len(down)}, server got {len(apps[0].received) if apps else 0}/{len(up)}; "
                             f"stats {dict(stack.stats)}")
    app = apps[0]
    assert app.closed == [None]
    assert bytes(app.received) == up
    assert bytes(client.received) == down
    # TIME-WAIT, if we closed first, expires on its own.
    stack.tick(now + 10 * TIME_WAIT_S)
    assert stack.connections == []
    return stack


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    up_len=st.integers(0, 200_000), down_len=st.integers(0, 200_000),
    chunks=st.lists(st.integers(1, 50_000), min_size=1, max_size=5),
    server_isn=st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32 - 5000, 2**32 - 1)),
    client_isn=st.one_of(st.integers(0, 2**32 - 1), st.integers(2**32 - 5000, 2**32 - 1)),
    mss=st.integers(200, 1460), client_window=st.integers(1000, 65535),
    capacity=st.integers(3000, 300_000), loss=st.floats(0, 0.15), dup=st.floats(0, 0.1),
    delay_s=st.floats(0.0005, 0.02), jitter_s=st.floats(0, 0.03), step_s=st.floats(0.001, 0.1),
    seed=st.integers(0, 2**32),
)
def test_property_transfer_over_lossy_reordering_channel(up_len, down_len, chunks, server_isn, client_isn,
                                                         mss, client_window, capacity, loss, dup, delay_s,
                                                         jitter_s, step_s, seed):
    rng = random.Random(seed)
    run_lossy_transfer(up=rng.randbytes(up_len), down=rng.randbytes(down_len), chunks=chunks,
                       server_isn=server_isn, client_isn=client_isn, mss=mss, client_window=client_window,
                       capacity=capacity, loss=loss, dup=dup, delay_s=delay_s, jitter_s=jitter_s,
                       step_s=step_s, seed=seed)


def test_lossless_transfer_of_a_megabyte_each_way():
    rng = random.Random(1)
    stack = run_lossy_transfer(up=rng.randbytes(1 << 20), down=rng.randbytes(1 << 20), chunks=[65536],
                               server_isn=0xFFFFF000, client_isn=7, mss=1460, client_window=65535,
                               capacity=256 * 1024, loss=0, dup=0, delay_s=0.001, jitter_s=0, step_s=0.001,
                               seed=1)
    assert stack.stats["retransmits"] == 0


# -- the asyncio stream adapter ------------------------------------------------------------

class StreamHarness(H):
    """H plus TcpStreams whose kick ticks the stack and collects what it sends."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.sent: list[TcpSegment] = []
        self.streams: list[TcpStream] = []
        self.kw = {}
        self.stack._listeners[(VIP, VPORT)] = lambda conn: self.streams.append(
            TcpStream(conn, self.kick, **self.kw))

    def kick(self):
        self.stack.tick(self.now)
        self.sent += self.stack.take_outgoing()

    def handshake_stream(self, **kw) -> TcpStream:
        self.kw = kw
        self.rx(S, IRS, mss=1000)
        self.rx(A, IRS + 1, ISS + 1)
        return self.streams[-1]


def test_stream_reads_lines_exactly_and_to_eof():
    async def main():
        h = StreamHarness()
        s = h.handshake_stream()
        h.rx(P | A, IRS + 1, ISS + 1, b"line one\nline")
        assert await s.readline() == b"line one\n"
        reader = asyncio.ensure_future(s.readline())
        await asyncio.sleep(0)  # let readline block on the partial line
        h.rx(P | A, IRS + 14, ISS + 1, b" two\nabcdef")
        assert await reader == b"line two\n"
        assert await s.readexactly(3) == b"abc"
        assert await s.read(2) == b"de"
        h.rx(F | A, IRS + 25, ISS + 1)
        assert await s.read() == b"f"
        assert s.at_eof()
        with pytest.raises(asyncio.IncompleteReadError):
            await s.readexactly(1)
        assert s.remote == (PEER, PPORT) and s.local == (VIP, VPORT)
    asyncio.run(main())


def test_stream_read_backpressure_closes_and_reopens_window():
    async def main():
        h = StreamHarness(rcv_window=3000)     # the SYN-ACK's window cannot be taken back later
        s = h.handshake_stream(read_limit=3000)
        out = []
        for i in range(3):
            out += h.rx(P | A, IRS + 1 + 1000 * i, ISS + 1, b"x" * 1000)
        assert h.stack.connections[0]._rcv_wnd() == 0
        h.sent.clear()
        assert len(await s.read(5000)) == 3000
        assert [seg.window for seg in h.sent] == [3000]   # the window update
    asyncio.run(main())


def test_stream_write_drain_close():
    async def main():
        h = StreamHarness()
        s = h.handshake_stream(write_high_water=2000, write_low_water=500)
        s.write(b"y" * 3000)
        assert [sig(x) for x in h.sent] == [("PA", ISS + 1 + 1000 * i, IRS + 1, 1000) for i in range(3)]
        drainer = asyncio.ensure_future(s.drain())
        await asyncio.sleep(0)
        assert not drainer.done()
        h.rx(A, IRS + 1, ISS + 2001)             # 1000 left: below high water, not yet at low water
        await asyncio.sleep(0)
        assert not drainer.done()
        h.rx(A, IRS + 1, ISS + 2501)
        await asyncio.sleep(0)
        assert drainer.done()
        s.close()
        assert s.is_closing()
        closer = asyncio.ensure_future(s.wait_closed())
        h.rx(P | A, IRS + 1, ISS + 3001, b"ignored after close")
        h.rx(F | A, IRS + 20, ISS + 3002)
        await closer
        with pytest.raises(ConnectionResetError):
            s.write(b"more")
    asyncio.run(main())


def test_stream_reset_surfaces_as_connection_reset_error():
    async def main():
        h = StreamHarness()
        s = h.handshake_stream()
        reader = asyncio.ensure_future(s.read(10))
        await asyncio.sleep(0)
        h.rx(R, IRS + 1)
        with pytest.raises(ConnectionResetError, match="reset"):
            await reader
        with pytest.raises(ConnectionResetError):
            await s.drain()
        with pytest.raises(ConnectionResetError):
            await s.wait_closed()
    asyncio.run(main())


# -- the Linux kernel as the peer, through a TUN device in a private network namespace ----------

CLONE_NEWNET = 0x40000000
TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000
SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFFLAGS, IFF_UP, IFF_RUNNING = 0x8916, 0x891C, 0x8914, 0x1, 0x40
KERNEL_IP, STACK_IP = IPv4Address("10.77.0.1"), IPv4Address("10.77.0.2")


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def build_ipv4_tcp(seg: TcpSegment) -> bytes:
    """IPv4 + TCP bytes for seg (only the MSS option)."""
    opts = struct.pack("!BBH", 2, 4, seg.mss) if seg.mss is not None else b""
    off = (20 + len(opts)) // 4
    tcp = struct.pack("!HHIIBBHHH", seg.src_port, seg.dst_port, seg.seq, seg.ack, off << 4, seg.flags,
                      seg.window, 0, 0) + opts + seg.payload
    pseudo = seg.src_ip.packed + seg.dst_ip.packed + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", _checksum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                     seg.src_ip.packed, seg.dst_ip.packed)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return ip + tcp


def parse_ipv4_tcp(pkt: bytes) -> TcpSegment | None:
    """TcpSegment from an IPv4 packet, or None if it is not unfragmented TCP with good checksums."""
    if len(pkt) < 40 or pkt[0] >> 4 != 4 or pkt[9] != 6:
        return None
    ihl = (pkt[0] & 0xF) * 4
    total = struct.unpack("!H", pkt[2:4])[0]
    src, dst = IPv4Address(pkt[12:16]), IPv4Address(pkt[16:20])
    tcp = pkt[ihl:total]
    pseudo = pkt[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    assert _checksum(pkt[:ihl]) == 0 and _checksum(pseudo + tcp) == 0, "bad checksum from the kernel"
    sport, dport, seq, ack, off, flags, window = struct.unpack("!HHIIBBH", tcp[:16])
    hlen = (off >> 4) * 4
    mss, opts, i = None, tcp[20:hlen], 0
    while i < len(opts) and opts[i] != 0:  # kind 0 ends the list, kind 1 is one byte of padding
        if opts[i] == 1:
            i += 1
            continue
        if opts[i] == 2 and opts[i + 1] == 4:
            mss = struct.unpack("!H", opts[i + 2:i + 4])[0]
        i += max(opts[i + 1], 2)
    return TcpSegment(src, sport, dst, dport, seq, ack, flags, window, tcp[hlen:], mss)


def open_tun_in_new_netns():
    """(tun fd, unconnected client socket), both in a fresh network namespace.

    unshare() moves only the calling thread, so a throwaway thread does it; the
    namespace lives as long as the fd and socket do."""
    result: dict = {}

    def setup():
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", b"vmlabtcp0", IFF_TUN | IFF_NO_PI))
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as ctl:
                for req, addr in ((SIOCSIFADDR, str(KERNEL_IP)), (SIOCSIFNETMASK, "255.255.255.0")):
                    fcntl.ioctl(ctl, req, struct.pack("16sHH4s8x", b"vmlabtcp0", socket.AF_INET, 0,
                                                      socket.inet_aton(addr)))
                fcntl.ioctl(ctl, SIOCSIFFLAGS, struct.pack("16sH22x", b"vmlabtcp0", IFF_UP | IFF_RUNNING))
            result["fd"], result["sock"] = fd, socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        except OSError as err:
            result["error"] = err

    t = threading.Thread(target=setup)
    t.start()
    t.join()
    if "error" in result:
        pytest.skip(f"cannot create a TUN device in a new network namespace: {result['error']}")
    return result["fd"], result["sock"]


class TunRuntime:
    """The runtime contract of vmlab.vnet.tcp, on asyncio, with a TUN device for the wire."""

    def __init__(self, fd: int, stack: TcpStack, rng: random.Random, loss: float, delay_p: float):
        self.loop = asyncio.get_running_loop()
        self.fd, self.stack, self.rng, self.loss, self.delay_p = fd, stack, rng, loss, delay_p
        self.timer: asyncio.TimerHandle | None = None
        self.kick_pending = False
        self.loop.add_reader(fd, self.on_readable)

    def close(self):
        self.loop.remove_reader(self.fd)
        if self.timer:
            self.timer.cancel()

    def impair(self, deliver, item):
        """Drop some packets and hold back others a few ms, so they arrive out of order."""
        if self.rng.random() < self.loss:
            return
        if self.rng.random() < self.delay_p:
            self.loop.call_later(self.rng.random() * 0.005, deliver, item)
        else:
            deliver(item)

    def on_readable(self):
        while True:
            try:
                pkt = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            seg = parse_ipv4_tcp(pkt)
            if seg is not None and seg.dst_ip == STACK_IP:
                self.impair(self.deliver_in, seg)

    def deliver_in(self, seg):
        self.stack.receive(seg, self.loop.time())
        self.flush()

    def write_out(self, pkt):
        os.write(self.fd, pkt)

    def kick(self):
        # Called from app code; tick on the next loop iteration, so a kick from inside a
        # stack callback never re-enters the stack, and many writes share one tick.
        if not self.kick_pending:
            self.kick_pending = True
            self.loop.call_soon(self.on_kick)

    def on_kick(self):
        self.kick_pending = False
        self.on_timer()

    def on_timer(self):
        self.timer = None
        self.stack.tick(self.loop.time())
        self.flush()

    def flush(self):
        for seg in self.stack.take_outgoing():
            self.impair(self.write_out, build_ipv4_tcp(seg))
        if self.timer:
            self.timer.cancel()
            self.timer = None
        deadline = self.stack.next_deadline()
        if deadline is not None:
            self.timer = self.loop.call_at(deadline, self.on_timer)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a network namespace and a TUN device")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("loss,delay_p", [(0.0, 0.0), (0.01, 0.02)], ids=["clean", "lossy"])
def test_linux_kernel_peer_transfers_megabytes_both_ways(loss, delay_p):
    fd, sock = open_tun_in_new_netns()
    size = 4 << 20
    rng = random.Random(42)
    up, down = rng.randbytes(size), rng.randbytes(size)

    async def main():
        stack = TcpStack()
        runtime = TunRuntime(fd, stack, random.Random(7), loss, delay_p)
        server_result: asyncio.Future = asyncio.get_running_loop().create_future()

        async def serve(stream: TcpStream):
            async def send_all():
                for i in range(0, size, 100_000):
                    stream.write(down[i:i + 100_000])
                    await stream.drain()
                stream.write_eof()
            sender = asyncio.ensure_future(send_all())
            got = await stream.read()
            await sender
            await stream.wait_closed()
            server_result.set_result(got)

        stack.listen(STACK_IP, 8008, lambda conn: asyncio.ensure_future(serve(TcpStream(conn, runtime.kick))))
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (str(STACK_IP), 8008))
            reader, writer = await asyncio.open_connection(sock=sock)

            async def client_send():
                writer.write(up)
                await writer.drain()
                writer.write_eof()
            sender = asyncio.ensure_future(client_send())
            client_got = await reader.read()
            await sender
            writer.close()
            server_got = await server_result
        finally:
            runtime.close()
        assert len(client_got) == size and client_got == down
        assert len(server_got) == size and server_got == up
        return stack

    try:
        stack = asyncio.run(asyncio.wait_for(main(), 100))
    finally:
        os.close(fd)
        sock.close()
    assert stack.stats["connections_accepted"] == 1
    if loss:
        assert stack.stats["retransmits"] > 0
