"""EventBus rules: history length, screenshot exclusion, replay order, slow subscribers."""
from __future__ import annotations

import asyncio
import threading


from vmlab.web.eventbus import HISTORY_SIZE, Event, EventBus, EventKind
from vmlab.web.status import StatusBoard, NodeStatus, NicStatus


def ev(i: int, kind: EventKind = EventKind.CONSOLE, node: str = "alice") -> Event:
    return Event(kind, node, f"line {i}")


def test_history_keeps_newest_500():
    bus = EventBus()
    for i in range(HISTORY_SIZE + 37):
        bus.publish(ev(i))
    hist = bus.history()
    assert len(hist) == 500 == HISTORY_SIZE
    assert hist[0].message == "line 37" and hist[-1].message == f"line {HISTORY_SIZE + 36}"


def test_publish_stamps_time_and_sequence():
    bus = EventBus(clock=lambda: 1234.5)
    a = bus.publish(ev(1))
    b = bus.publish(ev(2))
    assert (a.time, a.seq, b.seq) == (1234.5, 1, 2)


def test_screenshots_are_not_in_history_but_reach_live_subscribers():
    async def main():
        bus = EventBus()
        bus.publish(Event(EventKind.SCREENSHOT, "alice", "screenshot", {"thumbnail": "x" * 10}))
        bus.publish(ev(1))
        sub = bus.subscribe()
        assert [e.kind for e in bus.history()] == [EventKind.CONSOLE]
        assert (await sub.get()).message == "line 1"
        bus.publish(Event(EventKind.SCREENSHOT, "alice", "screenshot", {"thumbnail": "y"}))
        live = await asyncio.wait_for(sub.get(), 1)
        assert live.kind is EventKind.SCREENSHOT
        assert all(e.kind is not EventKind.SCREENSHOT for e in bus.history())
    asyncio.run(main())


def test_new_subscriber_gets_history_first_then_live_in_order():
    async def main():
        bus = EventBus()
        for i in range(5):
            bus.publish(ev(i))
        sub = bus.subscribe()
        for i in range(5, 8):
            bus.publish(ev(i))
        got = [(await asyncio.wait_for(sub.get(), 1)).message for _ in range(8)]
        assert got == [f"line {i}" for i in range(8)]
        assert sub.pending() == 0
    asyncio.run(main())


def test_slow_subscriber_misses_events_and_never_blocks_the_publisher():
    async def main():
        bus = EventBus()
        slow = bus.subscribe(capacity=10)
        fast = bus.subscribe()
        done = threading.Event()

        def publisher():  # from another thread, as the test thread publishes at teardown
            for i in range(200):
                bus.publish(ev(i))
            done.set()

        t = threading.Thread(target=publisher)
        t.start()
        t.join(5)
        assert done.is_set(), "publisher blocked on a subscriber that never reads"
        assert slow.pending() == 10 and slow.missed == 190
        assert [(await slow.get()).message for _ in range(10)] == [f"line {i}" for i in range(10)]
        assert fast.pending() == 200 and fast.missed == 0
    asyncio.run(main())


def test_closed_subscription_stops_receiving():
    async def main():
        bus = EventBus()
        sub = bus.subscribe()
        assert bus.subscriber_count == 1
        sub.close()
        bus.publish(ev(1))
        assert bus.subscriber_count == 0 and sub.pending() == 0
    asyncio.run(main())


def test_snapshot_agrees_with_replayed_history():
    """The state a page gets covers exactly the events up to the snapshot's seq."""
    async def main():
        board = StatusBoard("t")
        board.add_node(NodeStatus("alice", "appliance", nics=[
            NicStatus("home", "52:cc:cc:cc:cc:01", "192.168.1.101")]))
        bus = EventBus(reducer=board.apply, snapshot=board.snapshot)
        bus.publish(ev(1))
        bus.publish(Event(EventKind.DHCP_OFFER, "alice", "offer",
                          {"mac": "52:cc:cc:cc:cc:01", "ip": "192.168.1.101"}))
        sub = bus.subscribe()
        bus.publish(ev(2))
        snap = sub.snapshot
        assert snap["seq"] == 2
        alice = snap["nodes"][0]
        assert alice["console"] == ["line 1"]
        assert alice["nics"][0]["dhcp"] == "Offered 192.168.1.101"
        seqs = [(await sub.get()).seq for _ in range(3)]
        assert seqs == [1, 2, 3] and [s for s in seqs if s > snap["seq"]] == [3]
    asyncio.run(main())
